"""Trains (or samples from) the tiny toy setup; run by the distributed tests once plainly and once under torchrun.

    python distributed_worker.py OUT_DIR SETTINGS_JSON

SETTINGS_JSON: {"mode": "train" | "rollout", "method": ..., "lora": bool, "teacher": ..., "chunk_size": ...,
"max_steps": ..., "save_every": ..., "resume": bool, "count_collectives": bool, "activation_checkpointing": bool,
"gather": "auto" | "fp32", "shard_size": int, "save_dtype": ...}.
Rank 0 writes OUT_DIR/world.json (world size, per-step losses, collective counts per rank) and
OUT_DIR/teacher_final.safetensors (the whole teacher after the last step).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from toy import KEYS, VALUES, toy_records  # noqa: E402

from selfdistill.config import load_config  # noqa: E402
from selfdistill.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402

COLLECTIVES = (
    "all_gather_single",
    "reduce_scatter_single",
    "all_reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather",
    "broadcast",
    "barrier",
    "all_to_all_single",
)
calls: dict[str, int] = {}


def count_collectives() -> None:
    """Wrap torch.distributed's collectives (FSDP2 calls them through the module) to count calls."""
    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        setattr(dist, name, counted)


def world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def train_mode(out: Path, settings: dict) -> None:
    from selfdistill.models.distributed import full_state_dict, is_sharded
    from selfdistill.training.loop import train

    tok = tiny_tokenizer(KEYS + VALUES)
    engine = settings.get("engine", "decode")
    # vLLM's CPU attention takes a fixed set of head sizes (64 here; the default tiny model has 16)
    model = tiny_model(tok, hidden_size=128, layers=2, heads=2, seed=0) if engine == "vllm" else tiny_model(tok, seed=0)
    if settings.get("model_dir"):  # loaded by name: under torchrun built empty and filled shard by shard
        model, tok = None, None
    overrides = {
        "method": settings.get("method", "sdft"),
        "model": {
            "precision": settings.get("precision", "fp32"),
            "save_dtype": settings.get("save_dtype", "fp32"),  # the tests compare trained updates: keep them whole
            "lora": {"enabled": settings.get("lora", False), "rank": 4, "alpha": 8.0},
            **({"name": settings["model_dir"]} if settings.get("model_dir") else {}),
        },
        "rollout": {"max_new_tokens": 4, "engine": engine},
        "distributed": {"gather": settings.get("gather", "auto"), "shard_size": settings.get("shard_size", 0)},
        "teacher": {"kind": settings.get("teacher", "ema"), "ema_rate": 0.1},
        "loss": {
            "skip_first_tokens": settings.get("skip_first_tokens", 1),
            "chunk_size": settings.get("chunk_size", 3),
        },
        "train": {
            "output_dir": str(out),
            "batch_size": 8,
            "micro_batch_size": 3,
            "max_steps": settings.get("max_steps", 3),
            "lr": settings.get("lr", 1e-3),
            "save_every": settings.get("save_every", 0),
            "activation_checkpointing": settings.get("activation_checkpointing", False),
            "demonstration_logp_every": settings.get("demonstration_logp_every", 10),
        },
    }
    if settings.get("count_collectives"):
        count_collectives()
    if settings.get("slow_rollout"):  # a known time inside every process's rollouts, for the timing metrics
        import time

        import selfdistill.sampling.decode as sdft_module  # the decode loop the rollouts run

        real_generate = sdft_module.generate

        def slow_generate(*args, **kwargs):
            time.sleep(settings["slow_rollout"])
            return real_generate(*args, **kwargs)

        sdft_module.generate = slow_generate
    result = train(
        load_config(overrides=overrides),
        records=toy_records(),
        model=model,
        tokenizer=tok,
        resume=settings.get("resume", False),
    )
    counts = gathered_objects(calls)
    method_teacher = getattr(getattr(result.method, "teacher", None), "module", None)
    mesh = result.processes.mesh
    if method_teacher is not None:
        state = full_state_dict(method_teacher) if is_sharded(method_teacher) else method_teacher.state_dict()
    world, rank = world_and_rank()
    if rank == 0:
        if method_teacher is not None:
            from safetensors.torch import save_file

            save_file({k: v.clone() for k, v in state.items()}, str(out / "teacher_final.safetensors"))
        (out / "world.json").write_text(
            json.dumps(
                {
                    "world_size": world,
                    "losses": [m["loss"] for m in result.metrics],
                    "demonstration_logp": [m.get("demonstration_logp") for m in result.metrics],
                    "importance": [{k: v for k, v in m.items() if k.startswith("importance_")} for m in result.metrics],
                    "steps": [m["step"] for m in result.metrics],
                    "collectives": counts,
                    "mesh": dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh is not None else None,
                }
            )
        )


def rollout_mode(out: Path, settings: dict) -> None:
    """Each process samples its own share of the prompts from the (sharded) tiny model."""
    from selfdistill.models.distributed import setup_processes, shard_model
    from selfdistill.sampling.decode import generate

    procs = setup_processes()
    tok = tiny_tokenizer(KEYS + VALUES)
    model = tiny_model(tok, seed=0)
    if procs.sharded:
        model = shard_model(model, procs)
    ids = tok.convert_tokens_to_ids(KEYS + VALUES)
    prompts = [
        [ids[(3 * i + j) % len(ids)] for j in range(2 + i % 5)] for i in range(9)
    ]  # 5 and 4 prompts: ranks decode different numbers of batches
    mine = list(range(procs.rank, len(prompts), procs.world))
    result = generate(
        model,
        [prompts[i] for i in mine],
        stop_token_ids=ids[:6],
        pad_token_id=tok.pad_token_id,
        max_new_tokens=8,
        temperature=1.0,
        seeds=[100 + i for i in mine],
        batch_size=2,
    )
    shares = gathered_objects({i: row for i, row in zip(mine, result.ids)})
    if procs.is_main:
        merged = {}
        for share in shares:
            merged.update(share)
        (out / "world.json").write_text(
            json.dumps({"world_size": procs.world, "tokens": [merged[i] for i in range(len(prompts))]})
        )


def gathered_objects(value) -> list:
    world, _ = world_and_rank()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def learning_mode(out: Path, settings: dict) -> None:
    """The learning matrix's cases named in settings["cases"], one after another in these processes."""
    import learning_matrix

    wanted = set(settings["cases"])
    outcomes = []
    for case in learning_matrix.cases():
        if case["name"] in wanted:
            outcome = learning_matrix.run_case(
                case, Path(settings["inputs"]), out / case["name"], settings.get("precision", "fp32")
            )
            outcomes.append(outcome)
    world, rank = world_and_rank()
    if rank == 0:
        (out / "world.json").write_text(json.dumps({"world_size": world, "outcomes": outcomes}))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if options.get("mode", "train") == "rollout":
        rollout_mode(out_dir, options)
    elif options.get("mode") == "learning":
        learning_mode(out_dir, options)
    else:
        train_mode(out_dir, options)
