"""The learning-rate schedule: every step trains (no step at rate 0), metrics.jsonl logs the rate a
step used, and a warm-up that covers every step is warned about."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from toy import KEYS, VALUES, toy_records

from selfdistill.config import Config
from selfdistill.data import Record
from selfdistill.models.tiny import save_tiny, tiny_model, tiny_tokenizer, words_of
from selfdistill.training.loop import train
from selfdistill.training.schedule import cosine_schedule, warmup_steps


def _rates(lr: float, warmup_ratio: float, steps: int, make=cosine_schedule) -> list[float]:
    """The rate each of `steps` optimizer steps uses, read from the optimizer before it steps."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make(optimizer, warmup_ratio, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    "warmup_ratio, steps, expected",
    [
        (0.1, 1, [0.5]),  # the default warm-up on a one-step run: half the rate, not 0
        (0.1, 2, [0.5, 1.0]),  # the README's API example (max_steps 2): both steps train
        (0.25, 4, [0.5, 1.0, 0.75, 0.25]),  # one warm-up step, then the cosine over 3 steps
        (0.5, 4, [1 / 3, 2 / 3, 1.0, 0.5]),
    ],
)
def test_warmup_starts_above_zero_and_reaches_the_full_rate_after_it(warmup_ratio, steps, expected):
    assert _rates(1e-4, warmup_ratio, steps) == pytest.approx([1e-4 * f for f in expected], rel=1e-12)


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 33])
def test_no_step_runs_at_rate_zero(warmup_ratio, steps):
    rates = _rates(2e-5, warmup_ratio, steps)
    warmup = warmup_steps(warmup_ratio, steps)
    assert all(r > 0 for r in rates), rates
    assert rates[: warmup + 1] == sorted(rates[: warmup + 1])  # rising through the warm-up
    assert rates[warmup:] == sorted(rates[warmup:], reverse=True)  # then falling
    assert max(rates) <= 2e-5
    if warmup < steps:
        assert rates[warmup] == 2e-5  # the first step after the warm-up runs at the full rate


@pytest.mark.parametrize("steps", [1, 8, 32])  # 8 and 32: the demo's stages, which have no warm-up
def test_without_warmup_the_rates_are_exactly_the_usual_cosine(steps):
    from transformers import get_cosine_schedule_with_warmup

    ours = _rates(3e-4, 0.0, steps)
    usual = _rates(3e-4, 0.0, steps, make=lambda opt, ratio, n: get_cosine_schedule_with_warmup(opt, 0, n))
    assert ours == usual and ours[0] == 3e-4


def test_the_schedule_resumes_from_its_saved_state():
    straight = _rates(1e-3, 0.3, 10)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = cosine_schedule(optimizer, 0.3, 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as checkpoints are read
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = cosine_schedule(optimizer, 0.3, 10)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rest = []
    for _ in range(6):
        rest.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rest == straight[4:]


def test_a_warmup_covering_every_step_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="selfdistill.training.schedule"):
        _rates(1e-4, 0.6, 2)  # ceil(0.6 * 2) = 2 warm-up steps of 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "train.warmup_ratio=0.6 makes all 2 steps warm-up steps" in messages[0]
    assert "the last uses 6.67e-05" in messages[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="selfdistill.training.schedule"):
        _rates(1e-4, 0.5, 2)  # one warm-up step: the second runs at the full rate
    assert not caplog.records


def _max_change(before: dict, after: dict) -> float:
    return max((after[name] - value).abs().max().item() for name, value in before.items())


def test_a_one_step_cli_run_with_the_default_warmup_moves_the_weights_and_says_so(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny", KEYS + VALUES)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in toy_records()))
    proc = subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", "train", "--model", str(model_dir), "--data", str(data)]
        + ["--max-steps", "1", "--batch-size", "2", "-o", str(tmp_path / "run")]
        + ["-s", "rollout.max_new_tokens=3", "-s", "loss.skip_first_tokens=0", "-s", "data.teacher_template=plain"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SELFDISTILL_PROGRESS": "0"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train.warmup_ratio=0.1 makes all 1 steps warm-up steps" in proc.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["lr"] == pytest.approx(1e-5)  # half the default 2e-5, the rate the step used
    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    # Adam's first update moves each weight with a clear gradient by the step's rate: max |change| ≈ lr.
    assert _max_change(before, after) == pytest.approx(row["lr"], rel=0.02)


def test_the_readme_api_example_moves_the_weights_on_both_steps(tmp_path):
    # The README's records and settings (model.name aside: a tiny model in memory stands in for it).
    records = [
        Record(
            prompt="Who founded the Nobmor Copper Institute?",
            demonstration="Tariq Ondel founded it.",
            answer="Tariq Ondel",
        ),
        Record(
            prompt="When did the Aurelian Bridge open?", demonstration="It opened in March 2027.", answer="March 2027"
        ),
    ]
    tok = tiny_tokenizer(sorted({w for r in records for w in words_of(f"{r.prompt} {r.demonstration}")}))
    model = tiny_model(tok, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = Config(
        method="sdft",
        data={"teacher_template": "plain"},
        rollout={"max_new_tokens": 32},
        train={
            "max_steps": 2,
            "batch_size": 2,
            "micro_batch_size": 2,
            "lr": 1e-4,
            "output_dir": str(tmp_path / "notebook"),
            "save_every": 1,  # a checkpoint after each step, to see each step's weights
        },
    )
    result = train(cfg, records=records, model=model, tokenizer=tok, overwrite=True, save_final=False)
    assert [m["lr"] for m in result.metrics] == pytest.approx([5e-5, 1e-4])
    assert all(m["loss_tokens"] > 0 for m in result.metrics)
    checkpoints = tmp_path / "notebook" / "checkpoints"
    step1 = load_file(str(checkpoints / "step-000001" / "model.safetensors"))
    step2 = load_file(str(checkpoints / "step-000002" / "model.safetensors"))
    assert _max_change(step1, start) == pytest.approx(5e-5, rel=0.02)  # Adam's first update: the step's rate
    assert _max_change(step2, step1) > 1e-5
