"""A non-finite loss or gradient skips the step (weights, optimizer and teacher untouched), is counted
and logged; too many in a row stop the run with a clear message and the last good checkpoint."""

import json

import pytest
import torch
from reltools import train_tiny, tree_hashes
from safetensors.torch import load_file

from selfdistill.distillation.teacher import Teacher
from selfdistill.methods.sdft import SDFT
from selfdistill.training.loop import TrainingStopped


@pytest.fixture
def poison(monkeypatch):
    """poison(steps, how): make the loss ('loss') or only the gradient ('grad') non-finite at those steps."""
    state = {"step": 0, "bad": set(), "how": "loss", "teacher_updates": []}
    build, loss, update = SDFT.build_items, SDFT.loss, Teacher.update

    def counting_build(self, *args):
        state["step"] += 1
        return build(self, *args)

    def poisoned_loss(self, items):
        value, stats = loss(self, items)
        if state["step"] in state["bad"]:
            if state["how"] == "loss":
                value = value * float("nan")
            else:  # finite value, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
                weight = next(p for p in self.model.parameters() if p.requires_grad)
                value = value + torch.sqrt(weight.flatten()[0] * 0.0)
        return value, stats

    def counting_update(self, student):
        state["teacher_updates"].append(state["step"])
        return update(self, student)

    monkeypatch.setattr(SDFT, "build_items", counting_build)
    monkeypatch.setattr(SDFT, "loss", poisoned_loss)
    monkeypatch.setattr(Teacher, "update", counting_update)

    def arm(steps, how="loss"):
        state["bad"], state["how"] = set(steps), how
        return state

    return arm


def _ckpt(out, step, name):
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / name))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_counted_and_logged(tmp_path, poison, caplog, how):
    state = poison({2}, how)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        train_tiny(out, max_steps=3, save_every=1, keep_last=5)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["finite"] for r in rows] == [True, False, True]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1]
    if how == "grad":
        assert all(map(lambda r: r["loss"] == r["loss"], rows))  # the loss itself was finite
    assert state["teacher_updates"] == [1, 3]  # not updated from the bad step
    assert "step 2: non-finite loss or gradient; step skipped" in caplog.text
    # Step 2 changed nothing: the same student, teacher and optimizer state as after step 1.
    assert _same(_ckpt(out, 1, "model.safetensors"), _ckpt(out, 2, "model.safetensors"))
    assert _same(_ckpt(out, 1, "teacher.safetensors"), _ckpt(out, 2, "teacher.safetensors"))
    opt1 = torch.load(out / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=True)["optimizer"]
    opt2 = torch.load(out / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)["optimizer"]
    for k, v in opt1["state"].items():
        assert torch.equal(v["exp_avg"], opt2["state"][k]["exp_avg"]) and torch.equal(
            v["step"], opt2["state"][k]["step"]
        )
    assert not _same(_ckpt(out, 2, "model.safetensors"), _ckpt(out, 3, "model.safetensors"))  # step 3 trained


def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path, poison):
    poison(range(3, 100))
    out = tmp_path / "run"
    cfg_extra = dict(max_steps=8, save_every=2, keep_last=5)
    from reltools import run_config

    assert run_config(out).train.max_nonfinite_steps == 3  # the default
    with pytest.raises(TrainingStopped) as stopped:
        train_tiny(out, max_nonfinite_steps=2, **cfg_extra)
    message = str(stopped.value)
    assert "Training stopped at step 5: 3 steps in a row had a non-finite loss or gradient" in message
    assert (
        "train.max_nonfinite_steps=2" in message and "step-000004, is intact" in message and "lower train.lr" in message
    )
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["finite"] for r in rows] == [True, True, False, False, False]
    assert [p.name for p in (out / "checkpoints").iterdir()] and not (out / "final").exists()
    # The checkpoint kept after the bad steps holds the last good weights (those of step 2).
    assert _same(_ckpt(out, 2, "model.safetensors"), _ckpt(out, 4, "model.safetensors"))
    assert _same(_ckpt(out, 2, "teacher.safetensors"), _ckpt(out, 4, "teacher.safetensors"))
    assert json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())["nonfinite"] == {
        "in_row": 2,
        "total": 2,
    }
    before = tree_hashes(out)
    with pytest.raises(TrainingStopped):  # resuming into the same trouble stops again, touching nothing it kept
        train_tiny(out, resume=True, max_nonfinite_steps=2, **cfg_extra)
    after = tree_hashes(out)
    assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == {
        k: v for k, v in before.items() if k.startswith("checkpoints")
    }
