"""Every training configuration must learn: the matrix, one run of it, and what "learned" means.

The matrix is derived from the method registry, so a method added there is covered here without
an edit: method × {full, LoRA} × every teacher kind the method takes (SDFT: ema, frozen, live;
methods with a fixed teacher: that one; methods without a teacher: none) × the method's own
variants (offline_distill: ce and divergence). `run_case` trains one configuration on the toy
copy task (a tiny model pre-trained to copy a shown demonstration, see toy.py) from a checkpoint
file, in-process or under torchrun; `check_learned` asserts what every configuration must show:

- every step that had loss tokens had a non-zero gradient (`zero_grad_steps` stays 0);
- the trainable parameters moved (full: against the starting weights; LoRA: B leaves zero);
- the training loss fell within each phase (the phase's last step against its first).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfdistill.registry import METHODS, method_class

STEPS = 6  # per phase
# Large learning rates, so that one step moves every trainable tensor visibly; LoRA's B starts at
# zero and its updates are scaled down by A, so it takes a larger one.
LR = {"full": 3e-3, "lora": 3e-2}


def teacher_kinds(method: str) -> list[str | None]:
    cls = method_class(method)
    if not hasattr(cls, "teacher_kind"):  # no teacher (SFT-like losses)
        return [None]
    return [cls.teacher_kind] if cls.teacher_kind else ["ema", "frozen", "live"]


def variants(method: str) -> list[dict]:
    if method == "offline_distill":
        return [{"offline": {"loss": "ce"}}, {"offline": {"loss": "divergence"}}]
    if method == "sdft":  # the paper's SDFT, and SDFT + SFT
        return [{}, {"loss": {"sft_weight": 1.0}}]
    return [{}]


def cases() -> list[dict]:
    out = []
    for method in METHODS:
        for lora in (False, True):
            for teacher in teacher_kinds(method):
                for extra in variants(method):
                    name = "-".join(
                        [method, "lora" if lora else "full"]
                        + ([teacher] if teacher else [])
                        + [
                            f"{k}{v}" if isinstance(v, float) else str(v)
                            for sec in extra.values()
                            for k, v in sec.items()
                        ]
                    )
                    out.append({"name": name, "method": method, "lora": lora, "teacher": teacher, "extra": extra})
    return out


def write_inputs(directory: Path) -> Path:
    """The toy copy model's weights and the side files some methods read (documents, general prompts)."""
    from safetensors.torch import save_file
    from toy import KEYS, VALUES, copy_model

    directory.mkdir(parents=True, exist_ok=True)
    model, _ = copy_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "start.safetensors"))
    (directory / "documents.txt").write_text(
        "\n\n".join(" ".join(f"{k} {v}" for k, v in zip(KEYS[i:] + KEYS[:i], VALUES)) for i in range(4))
    )
    (directory / "general.jsonl").write_text("".join(json.dumps({"prompt": k}) + "\n" for k in KEYS))
    return directory


def overrides(case: dict, inputs: Path, out: Path, precision: str = "fp32") -> dict:
    cfg = {
        "method": case["method"],
        "model": {"precision": precision, "lora": {"enabled": case["lora"], "rank": 4, "alpha": 8.0}},
        "data": {"documents": str(inputs / "documents.txt")},
        "rollout": {"max_new_tokens": 3, "temperature": 1.0},
        "loss": {"skip_first_tokens": 0, "chunk_size": 4},
        "reinvoke": {"steps": STEPS, "prompts": str(inputs / "general.jsonl")},
        # sft_replay: 2 of the step's 8 examples are the starting model's answers to the general prompts.
        "replay": {"data": str(inputs / "general.jsonl"), "ratio": 0.25, "max_new_tokens": 3},
        "anchor": {"beta": 0.5},
        "train": {
            "output_dir": str(out),
            "batch_size": 8,
            "micro_batch_size": 4,
            "max_steps": STEPS,
            "lr": LR["lora" if case["lora"] else "full"],
            "warmup_ratio": 0.0,
            "demonstration_logp_every": 0,
            "seed": 0,
        },
    }
    if case["teacher"]:
        cfg["teacher"] = {"kind": case["teacher"], "ema_rate": 0.1}
    for section, values in case["extra"].items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def run_case(case: dict, inputs: Path, out: Path, precision: str = "fp32") -> dict | None:
    """Train one configuration; returns (on the main process) its steps' metrics and how far the weights moved."""
    from safetensors.torch import load_file
    from toy import KEYS, VALUES, toy_records

    from selfdistill.config import load_config
    from selfdistill.models.distributed import full_state_dict, is_sharded
    from selfdistill.models.tiny import tiny_model, tiny_tokenizer
    from selfdistill.training.loop import train

    tokenizer = tiny_tokenizer(KEYS + VALUES)
    model = tiny_model(tokenizer, hidden_size=64, layers=2, heads=4, seed=0)
    start = load_file(str(inputs / "start.safetensors"))
    model.load_state_dict(start)
    result = train(
        load_config(overrides=overrides(case, inputs, out, precision)),
        records=toy_records(),
        model=model,
        tokenizer=tokenizer,
    )
    trained = result.model
    state = full_state_dict(trained) if is_sharded(trained) else trained.state_dict()
    if not state:  # not the main process
        return None
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    moved = {}
    for name in names:
        after = state[name].float()
        if case["lora"]:
            before = torch.zeros_like(after) if "lora_B" in name else None
        else:
            before = start[name].float()
        if before is not None:
            moved[name] = float((after - before).abs().max())
    return {"name": case["name"], "metrics": result.metrics, "moved": moved}


def phases(case: dict) -> list[range]:
    if case["method"] == "sft_reinvoke":
        return [range(0, STEPS), range(STEPS, 2 * STEPS)]
    return [range(0, STEPS)]


def check_learned(case: dict, outcome: dict) -> None:
    metrics = outcome["metrics"]
    name = case["name"]
    assert len(metrics) == sum(len(p) for p in phases(case)), name
    assert all(m["zero_grad_steps"] == 0 for m in metrics), (name, [m["grad_norm"] for m in metrics])
    assert all(m["grad_norm"] > 0 for m in metrics if m["loss_tokens"]), (name, [m["grad_norm"] for m in metrics])
    assert outcome["moved"], name
    assert min(outcome["moved"].values()) > 1e-4, (name, outcome["moved"])
    for phase in phases(case):
        losses = [metrics[i]["loss"] for i in phase]
        assert losses[-1] < losses[0], (name, losses)
