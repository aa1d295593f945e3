"""Peak memory per process of loading a model by name under torchrun, 1, 2 and 4 processes (gloo).

    python -m benchmarks.load_memory [--processes 1 2 4] [--layers 24] [--tag _x]

A Qwen2.5-0.5B-shaped model (random weights, built from its config: 24 layers, width 896, vocab
151936, tied embeddings; 494M parameters, 2.0 GB in fp32) is saved once to a temporary directory.
Then, for each process count, `torchrun --nproc_per_node N` trains SDFT on it by name (full
fine-tuning, EMA teacher, fp32, one step of 2 prompts per process with 8-token completions), and
every process reports its peak resident memory (ru_maxrss) when set-up is done and after the step,
and after writing final/ (one gathered parameter at a time), with the bytes of its own shards of
weights, gradients, AdamW moments and teacher, beside `sdft plan`'s prediction for the same run. Each process
count is also run the old way for comparison: every process handed the whole model in memory
(`train(model=...)`), sharded after the teacher was copied from it.
Results: benchmarks/results/load_memory{tag}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

QWEN_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_model(directory: Path, layers: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from selfdistill.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer([f"w{i}" for i in range(100)])
    config = Qwen2Config(**{**QWEN_05B, "num_hidden_layers": layers}, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)


def settings(model_dir: Path, out: Path, world: int) -> dict:
    """The run: SDFT, full fine-tuning, EMA teacher, fp32, one step of 2 prompts per process."""
    return {
        "method": "sdft",
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"teacher_template": "plain", "max_prompt_tokens": 16, "max_teacher_prompt_tokens": 32},
        "rollout": {"max_new_tokens": 8, "ignore_eos": True},
        "loss": {"skip_first_tokens": 0},
        "teacher": {"kind": "ema"},
        "train": {
            "output_dir": str(out / "run"),
            "batch_size": 2 * world,
            "micro_batch_size": 2,
            "max_steps": 1,
            "lr": 1e-5,
            "warmup_ratio": 0.0,
            "demonstration_logp_every": 0,
        },
    }


def planned(model_dir: Path, out: Path, world: int, env: dict) -> dict:
    """`sdft plan`'s figures (MB) for the same run: model state (weights, gradients, AdamW, teacher) and peaks."""
    (out / "plan.json").write_text(json.dumps(settings(model_dir, out, world)))
    command = [sys.executable, "-m", "selfdistill.cli", "plan", str(out / "plan.json"), "--processes", str(world)]
    subprocess.run(command + ["--json", str(out / "planned.json")], env=env, check=True, capture_output=True)
    plan = json.loads((out / "planned.json").read_text())
    state = plan["weights"] + plan["gradients"] + plan["optimizer"] + plan["teacher_weights"]
    return {
        "plan_state_mb": state / 2**20,
        "plan_step_peak_mb": plan["step_peak"] / 2**20,
        "plan_peak_mb": plan["peak"] / 2**20,
    }


def worker(out: Path, model_dir: Path, whole: bool) -> None:
    import torch

    import selfdistill.training.loop as train_mod
    from selfdistill.config import load_config
    from selfdistill.data.records import Record
    from selfdistill.models.distributed import local

    torch.set_num_threads(1)
    report = {}
    real_setup = train_mod.setup

    def setup(*args, **kwargs):
        run = real_setup(*args, **kwargs)
        teacher = run.method.checkpointed_module()
        state = [p for p in run.model.parameters()] + ([] if teacher is None else list(teacher.parameters()))
        report["state_mb"] = sum(local(t).numel() * local(t).element_size() for t in state) / 2**20
        report["trainable_mb"] = sum(local(p).numel() * local(p).element_size() for p in run.params) / 2**20
        report["setup_peak_rss_mb"] = _rss_mb()
        return run

    train_mod.setup = setup
    real_apply = train_mod._apply_update

    def apply_update(run, finite, done):  # the optimizer's state exists after its first step
        took = real_apply(run, finite, done)
        moments = [t for state in run.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        report["optimizer_mb"] = sum(local(t).numel() * local(t).element_size() for t in moments) / 2**20
        return took

    train_mod._apply_update = apply_update
    real_save_final = train_mod.save_final_model

    def save_final(run):
        report["step_peak_rss_mb"] = _rss_mb()  # the training peak, before final/ is written
        done = real_save_final(run)
        report["final_peak_rss_mb"] = _rss_mb()
        return done

    train_mod.save_final_model = save_final
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tokenizer = None
    if whole:
        from selfdistill.models import load_model

        model, tokenizer = load_model(str(model_dir), torch.float32, device="cpu")
    cfg = load_config(overrides=settings(model_dir, out, world))
    records = [Record(prompt=f"w{i} w{i + 1} w{i + 2}", demonstration=f"w{i + 3} w{i + 4}") for i in range(2 * world)]
    train_mod.train(cfg, records=records, model=model, tokenizer=tokenizer)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    # glibc keeps freed blocks under its mmap threshold (up to 32 MB) in the heap, so a layer's
    # gathered weights, freed after use, would stay in the resident size; a 1 MB threshold returns
    # them, and the resident size then follows the live tensors.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SELFDISTILL_PROGRESS": "0",
        "PYTHONPATH": str(ROOT),
        "MALLOC_MMAP_THRESHOLD_": "1048576",
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(model_dir, args.layers)
        size_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
        for n in args.processes:
            for way in ("by_name", "whole_in_memory"):
                out = Path(tmp) / f"{way}-{n}"
                out.mkdir()
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
                command += [__file__, "--worker", str(out), str(model_dir), way]
                proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
                row = {"processes": n, "way": way, "weights_file_mb": size_mb}
                for key in ranks[0]:
                    row[key] = max(r[key] for r in ranks)  # the largest process
                # weights + teacher + gradients (the trainable weights' size) + AdamW moments
                row["model_state_mb"] = row["state_mb"] + row["trainable_mb"] + row["optimizer_mb"]
                if way == "by_name":
                    row.update(planned(model_dir, out, n, env))
                rows.append(row)
                print(json.dumps(row), flush=True)
    results = HERE / "results" / f"load_memory{args.tag}.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(ROOT))
        worker(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "whole_in_memory")
    else:
        sys.exit(main())
