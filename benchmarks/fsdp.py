"""Memory and step time of FSDP2 training with 1 and 2 processes on this CPU (gloo).

    python -m benchmarks.fsdp [--steps 3] [--prompts 4] [--length 32] [--tag _x]

A SmolLM2-135M-shaped model (random weights, built from its config: 30 layers, width 576, vocab
49152, tied embeddings) trains SDFT with an EMA teacher, full fine-tuning, fp32, for --steps
steps three ways: a plain process, and torchrun with 1 and with 2 processes (FSDP2). Each process
reports:
- state_mb: the bytes it holds of weights + gradients + AdamW moments + teacher (its shards;
  gradients counted at the size of the trainable weights), computed from the tensors;
- peak_rss_mb: its peak resident memory (ru_maxrss; includes Python/torch and the gathered
  full weights during rollouts);
- s_step: median seconds per step over the steps after the first (warm-up).
Results: benchmarks/results/fsdp{tag}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)


def _local_bytes(tensors) -> int:
    from selfdistill.models.distributed import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def worker(out: Path, steps: int, prompts: int, length: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    import selfdistill.training.loop as train_mod
    from selfdistill.config import load_config
    from selfdistill.data.records import Record
    from selfdistill.models.tiny import tiny_tokenizer

    torch.set_num_threads(1)
    words = [f"w{i}" for i in range(300)]
    tok = tiny_tokenizer(words)
    config = LlamaConfig(
        **SMOLLM2_135M, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    records = [
        Record(
            prompt=" ".join(words[(i * 7 + j) % 300] for j in range(length)),
            demonstration=" ".join(words[(i * 11 + j) % 300] for j in range(length)),
        )
        for i in range(64)
    ]
    state = {}

    save_checkpoint = train_mod.save_checkpoint_now

    def measure(run, done):  # the run's state when the loop writes its checkpoint after the last step
        params = list(run.model.parameters())
        trainable = [p for p in params if p.requires_grad]
        optimizer_state = [
            v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
        ]
        teacher = run.method.teacher.module
        state.update(
            weights=_local_bytes(params),
            gradients=_local_bytes(trainable),
            optimizer=_local_bytes(optimizer_state),
            teacher=_local_bytes(teacher.parameters()) if teacher is not None else 0,
        )
        return save_checkpoint(run, done)

    train_mod.save_checkpoint_now = measure
    # One output directory for all processes, the one the launcher made: a checkpoint is shared.
    tmp = str(out / "run")
    cfg = load_config(
        overrides={
            "model": {"precision": "fp32"},
            "data": {"teacher_template": "plain"},
            "rollout": {"max_new_tokens": length, "ignore_eos": True},
            "loss": {"skip_first_tokens": 0},
            "train": {
                "output_dir": tmp,
                "batch_size": prompts,
                "micro_batch_size": prompts,
                "max_steps": steps,
                "lr": 1e-5,
                "warmup_ratio": 0.0,
            },
        }
    )
    result = train_mod.train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    rank = int(os.environ.get("RANK", "0"))
    row = {
        "rank": rank,
        "world": int(os.environ.get("WORLD_SIZE", "0")),
        "state_mb": sum(state.values()) / 2**20,
        **{f"{k}_mb": v / 2**20 for k, v in state.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "s_step": statistics.median(m["time_step"] for m in result.metrics[1:] or result.metrics),
        "losses": [m["loss"] for m in result.metrics],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(row))


def launch(kind: str, args) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix=f"fsdp-{kind}-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFDISTILL_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    command = [
        str(Path(__file__)),
        "--worker",
        str(out),
        "--steps",
        str(args.steps),
        "--prompts",
        str(args.prompts),
        "--length",
        str(args.length),
    ]
    if kind == "plain":
        prefix = [sys.executable]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", kind[-1]]
    proc = subprocess.run(prefix + command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return [dict(json.loads(p.read_text()), side=kind) for p in sorted(out.glob("rank*.json"))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (global)")
    parser.add_argument("--length", type=int, default=32, help="prompt and completion tokens")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.steps, args.prompts, args.length)
    rows = []
    for kind in ("plain", "fsdp1", "fsdp2"):
        rows.extend(launch(kind, args))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "suite": "fsdp",
        "command": " ".join(sys.argv),
        "rows": rows,
        "load": Path("/proc/loadavg").read_text().strip(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    (HERE / "results" / f"fsdp{args.tag}.json").write_text(json.dumps(result, indent=1))
    columns = [
        "side",
        "rank",
        "state_mb",
        "weights_mb",
        "gradients_mb",
        "optimizer_mb",
        "teacher_mb",
        "peak_rss_mb",
        "s_step",
    ]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    print(f"load: {result['load']}")


if __name__ == "__main__":
    main()
