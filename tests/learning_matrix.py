"""Every training configuration must learn: the matrix, one run of it, and what "learned" means.

The matrix is derived from the method registry (each entry's `step` and own settings), so a method
added there is covered here without an edit: method × {full, LoRA} × every teacher kind the method
takes (teacher.kind's choices where the step's teacher is configured; a fixed teacher: that one; no
teacher: none) × the method's variants: each choice of an own multiple-choice setting
(offline_distill: offline.loss ce and divergence) and, for a step with a demonstration forward, the
step with and without it (sdft: loss.sft_weight 0 and 1). `run_case` trains one configuration on the toy
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

from selfdistill.config import Config, for_method, merge, settings_of
from selfdistill.options import choices, is_choice
from selfdistill.registry import METHOD_INFO, METHODS

STEPS = 6  # per phase
# Large learning rates, so that one step moves every trainable tensor visibly; LoRA's B starts at
# zero and its updates are scaled down by A, so it takes a larger one.
LR = {"full": 3e-3, "lora": 3e-2}


def teacher_kinds(method: str) -> list[str | None]:
    step = METHOD_INFO[method].step
    if step is None or step.teacher is None:  # no teacher (SFT-like losses)
        return [None]
    if step.fixed_teacher:
        return [step.fixed_teacher]
    (kind,) = [hint for _, _, hint, key in settings_of(Config()) if key == "teacher.kind"]
    return list(choices(kind))


def _nested(key: str, value) -> dict:
    section, _, name = key.rpartition(".")
    return {section: {name: value}}


def variants(method: str) -> list[dict]:
    """The configurations of the method that run different code: each choice of its own multiple-choice
    settings, and its step with and without the demonstration forward it declares."""
    info = METHOD_INFO[method]
    out = []
    for _, _, hint, key in settings_of(Config(method=method)):
        if info.reads(key) and is_choice(hint):
            out += [_nested(key, choice) for choice in choices(hint)]
    if info.step is not None and info.step.demonstration_forward:  # the plain step, then with the forward
        out += [{}, _nested(info.step.demonstration_forward, 1.0)]
    return out or [{}]


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
        "reinvoke": {"prompts": str(inputs / "general.jsonl")},
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
    step = METHOD_INFO[case["method"]].step
    if step is not None and step.second_phase:  # as many steps as the first phase
        cfg = merge(cfg, _nested(step.second_phase, STEPS))
    if case["teacher"]:
        cfg["teacher"] = {"kind": case["teacher"], "ema_rate": 0.1}
    for section, values in case["extra"].items():
        cfg.setdefault(section, {}).update(values)
    return for_method(cfg, case["method"])  # without the other methods' own sections


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
    """The steps of each phase: a method whose step declares a second phase runs it for STEPS more steps."""
    step = METHOD_INFO[case["method"]].step
    if step is not None and step.second_phase:
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
