"""The run-time precision and weight dtype choices the training loop makes."""

import torch

from selfdistill import precision
from selfdistill.models.loading import weights_dtype


def test_auto_is_fp32_on_every_cpu(monkeypatch):
    # bf16 measured slower for rollouts even on a CPU with AMX-BF16 (see selfdistill/precision.py).
    monkeypatch.setattr(precision, "cpu_has_bf16_instructions", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept


def test_auto_is_bf16_on_a_gpu_that_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.resolve_precision("auto", "cuda") == "fp32"


def test_weights_are_loaded_in_the_dtype_the_run_needs():
    assert weights_dtype("auto", "bf16", lora=False) == torch.float32  # fp32 master weights
    assert weights_dtype("auto", "bf16", lora=True) == torch.bfloat16  # a frozen base needs no master copy
    assert weights_dtype("auto", "fp32", lora=True) == torch.float32
    assert weights_dtype("bf16", "fp32", lora=False) == torch.bfloat16  # model.load_dtype, when set, wins


def test_a_bad_load_dtype_is_refused_naming_the_field():
    import pytest

    from selfdistill.config import load_config
    from selfdistill.errors import UserError

    with pytest.raises(UserError, match="model.load_dtype"):
        load_config(overrides={"model": {"load_dtype": "fp8"}})
