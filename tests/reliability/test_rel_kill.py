"""Runs killed (SIGKILL), stopped (SIGINT/SIGTERM) and starved of disk at named points resume exactly.

One run is taken through every fault in turn, each time resumed with the same command, and its
final weights, teacher and metrics are compared with an uninterrupted run of the same seed.
"""

import json
import signal

import pytest
import torch
from reltools import Outcome, run_child, train_tiny, tree_hashes
from safetensors.torch import load_file

from selfdistill.training.checkpoint import checkpoint_dirs, latest_checkpoint

COMPLETE = ("model.safetensors", "teacher.safetensors", "trainer_state.pt", "state.json", "config.json")

# (fault, expected end, checkpoint steps on disk afterwards); max_steps=6, save_every=2, keep_last=2.
CHAIN = [
    ("rollout:2", "kill", []),  # no checkpoint yet: the resume starts again from step 0
    ("backward:3", "kill", [2]),
    ("rollout:3:sigterm", "stopped", [2, 3]),  # finishes step 3, checkpoints it, stops
    ("optimizer_step:4", "kill", [2, 3]),  # weights moved, teacher not yet: step 4 is redone
    ("checkpoint_model:4", "kill", [2, 3]),  # half-written checkpoint left in .tmp-*
    ("checkpoint_rename:4", "kill", [2, 3]),  # complete files, not yet renamed: still not picked up
    ("checkpoint_prune:4", "kill", [2, 3, 4]),  # renamed, older ones not yet pruned
    ("metrics:5", "kill", [2, 3, 4]),  # metrics.jsonl ends in half a line
    ("checkpoint_model:6:enospc", "disk full", [2, 3, 4]),
    ("final:6", "kill", [4, 6]),  # checkpoint 6 written, final/ not yet in place
    (None, "ok", [4, 6]),
]


def _steps(out):
    return [int(p.name.split("-")[1]) for p in checkpoint_dirs(out)]


def _assert_every_checkpoint_complete(out):
    for directory in checkpoint_dirs(out):
        missing = [f for f in COMPLETE if not (directory / f).is_file()]
        assert not missing, (directory, missing)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train_tiny(out)
    return out


def test_killed_at_every_point_and_resumed_equals_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "run"
    resume = False
    tried = []
    for fault, expected, steps_after in CHAIN:
        before = latest_checkpoint(out)
        before_hashes = tree_hashes(before) if before else {}
        result: Outcome = run_child(lambda: train_tiny(out, resume=resume), fault=fault, work=tmp_path / "child")
        where = f"fault {fault}: {result}"
        if expected == "kill":
            assert result.killed_by == signal.SIGKILL, where
        elif expected == "stopped":
            assert result.exit_code == 128 + signal.SIGTERM, where  # a stop, told apart from bad input (2)
            assert "Stopped by SIGTERM after step 3; checkpoint written" in result.message, where
        elif expected == "disk full":
            assert result.exit_code == 1, where  # the run could not go on
            assert "No space left on device" in result.message and "step-000004, is intact" in result.message, where
            assert "--resume" in result.message, where
            assert tree_hashes(before) == before_hashes, "the previous checkpoint changed"
        else:
            assert result.exit_code == 0, where
        if before is not None and resume:
            assert f"resumed from {before}" in result.log, where  # the newest complete one, never a partial one
        assert _steps(out) == steps_after, where
        _assert_every_checkpoint_complete(out)
        tried.append(fault)
        resume = True
    assert len([f for f in tried if f]) == 10

    # Same weights, teacher and metrics as the run that was never interrupted.
    final, ref_final = (
        load_file(str(out / "final" / "model.safetensors")),
        load_file(str(reference / "final" / "model.safetensors")),
    )
    assert final.keys() == ref_final.keys()
    for name in ref_final:
        torch.testing.assert_close(final[name], ref_final[name], atol=1e-6, rtol=1e-5)
    teacher = load_file(str(out / "checkpoints" / "step-000006" / "teacher.safetensors"))
    ref_teacher = load_file(str(reference / "checkpoints" / "step-000006" / "teacher.safetensors"))
    for name in ref_teacher:
        torch.testing.assert_close(teacher[name], ref_teacher[name], atol=1e-6, rtol=1e-5)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step exactly once
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-")]
    leftovers += [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_sigint_from_outside_stops_after_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"

    def interrupt_after_first_step(pid):
        import os
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            time.sleep(0.01)
        os.kill(pid, signal.SIGINT)

    result = run_child(
        lambda: train_tiny(out, max_steps=500, save_every=0),
        work=tmp_path / "child",
        on_start=interrupt_after_first_step,
    )
    assert result.exit_code == 128 + signal.SIGINT, result
    assert "Stopped by SIGINT after step" in result.message and "--resume" in result.message
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 1 <= last_logged < 500
    assert _steps(out) == [last_logged]  # the checkpoint is of exactly the last finished step
    _assert_every_checkpoint_complete(out)
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["step"] == last_logged


@pytest.mark.parametrize(
    "variant",
    [
        {"method": "sft"},
        {"method": "offline_distill"},
        {"method": "sdft", "lora": True},  # LoRA: adapter in the checkpoint, EMA teacher of W0 + B·A beside it
    ],
)
def test_other_methods_and_lora_resume_exactly_after_kills(tmp_path, variant):
    reference, out = tmp_path / "reference", tmp_path / "run"
    train_tiny(reference, **variant)
    resume = False
    for fault in ("rollout:3", "checkpoint_rename:4", "optimizer_step:5", None):
        result = run_child(lambda: train_tiny(out, resume=resume, **variant), fault=fault, work=tmp_path / "child")
        assert (result.killed_by == signal.SIGKILL) if fault else (result.exit_code == 0), (fault, result)
        resume = True
    for name in ("final/model.safetensors", "checkpoints/step-000006/teacher.safetensors"):
        if not (reference / name).is_file():
            assert variant["method"] == "sft" and "teacher" in name  # SFT has no teacher
            continue
        ours, ref = load_file(str(out / name)), load_file(str(reference / name))
        assert ours.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], atol=1e-6, rtol=1e-5)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_overwrite_does_not_reuse_the_previous_runs_offline_targets(tmp_path):
    out = tmp_path / "run"
    train_tiny(out, method="offline_distill", max_steps=1, save_every=0)
    first = (out / "offline_targets.jsonl").read_text()
    train_tiny(out, method="offline_distill", max_steps=1, save_every=0, seed=7, overwrite=True)
    assert (out / "offline_targets.jsonl").read_text() != first  # answers of the new run's teacher and seed
