"""LoRA across continual stages: an interrupted and resumed stream trains the same weights as an
uninterrupted one (each stage starts from plain weights with the previous adapter merged in)."""

import os

import pytest
from safetensors.torch import load_file
from test_continual_pipeline import CountingTrain, write_stream

from selfdistill.continual.config import load_continual_config
from selfdistill.continual.layout import stage_dir
from selfdistill.continual.runner import Runner


def lora_stream(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path, _ = write_stream(
        tmp_path,
        methods=[
            {
                "name": "sft-lora",
                "method": "sft",
                "overrides": {
                    "model": {"lora": {"enabled": True, "rank": 4, "alpha": 8.0}},
                    "train": {"lr": 5e-2, "max_steps": 3},
                },
            }
        ],
        eval={"max_new_tokens": 3, "batch_size": 8, "samples": 1, "probes": False, "drift": False},
    )
    return path


def test_lora_stream_resumed_after_a_kill_equals_the_uninterrupted_one(tmp_path):
    whole = lora_stream(tmp_path / "whole")
    Runner(load_continual_config(whole)).run()

    parts = lora_stream(tmp_path / "parts")
    killer = CountingTrain(fail_on=os.path.join("sft-lora", "seed-0", "stage-2"))
    with pytest.raises(KeyboardInterrupt):
        Runner(load_continual_config(parts), train_fn=killer).run()
    Runner(load_continual_config(parts)).run()

    for stage in (1, 2):
        a = load_file(
            stage_dir(tmp_path / "whole" / "run", "sft-lora", 0, stage) / "train" / "final" / "model.safetensors"
        )
        b = load_file(
            stage_dir(tmp_path / "parts" / "run", "sft-lora", 0, stage) / "train" / "final" / "model.safetensors"
        )
        assert a.keys() == b.keys() and not any("lora" in k for k in a)
        for key in a:
            assert (a[key] - b[key]).abs().max().item() < 1e-6, (stage, key)
    # stage 2 really trained (the adapter moved the merged weights)
    s1 = load_file(stage_dir(tmp_path / "whole" / "run", "sft-lora", 0, 1) / "train" / "final" / "model.safetensors")
    s2 = load_file(stage_dir(tmp_path / "whole" / "run", "sft-lora", 0, 2) / "train" / "final" / "model.safetensors")
    assert any((s1[k] - s2[k]).abs().max().item() > 1e-4 for k in s1)
