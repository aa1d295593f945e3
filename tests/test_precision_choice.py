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


def test_the_teachers_auto_precision_is_bf16_only_on_a_bf16_cpu_left_to_auto(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_instructions", lambda: True)
    assert precision.teacher_precision("auto", "auto", "fp32", "cpu") == "bf16"
    assert precision.teacher_precision("auto", "fp32", "fp32", "cpu") == "fp32"  # a pinned fp32 run stays fp32
    assert precision.teacher_precision("fp32", "auto", "fp32", "cpu") == "fp32"
    assert precision.teacher_precision("auto", "auto", "bf16", "cuda") == "bf16"  # as the run on a GPU
    assert precision.teacher_precision("auto", "auto", "fp32", "cuda") == "fp32"
    monkeypatch.setattr(precision, "cpu_has_bf16_instructions", lambda: False)  # AVX2 only: bf16 is slow there
    assert precision.teacher_precision("auto", "auto", "fp32", "cpu") == "fp32"
    assert precision.teacher_precision("bf16", "fp32", "fp32", "cpu") == "bf16"  # an explicit choice is kept


def test_sdft_with_a_bf16_teacher_under_an_fp32_student_learns_as_the_fp32_teacher_does(tmp_path):
    from learning_matrix import check_learned, run_case, write_inputs

    inputs = write_inputs(tmp_path / "inputs")
    outcomes = {}
    for teacher_precision in ("fp32", "bf16"):
        case = {
            "name": f"sdft-full-ema-teacher-{teacher_precision}",
            "method": "sdft",
            "lora": False,
            "teacher": "ema",
            "extra": {"teacher": {"precision": teacher_precision}},
        }
        outcomes[teacher_precision] = run_case(case, inputs, tmp_path / teacher_precision)
        check_learned(case, outcomes[teacher_precision])  # the loss fell and every tensor moved
    first = {p: o["metrics"][0]["loss"] for p, o in outcomes.items()}
    # The same rollouts at step 1 (same weights, same seeds): only the teacher's precision differs.
    assert first["bf16"] != first["fp32"]
    assert abs(first["bf16"] - first["fp32"]) <= 0.05 * abs(first["fp32"]), first


def test_a_onednn_cap_below_bf16_counts_as_a_cpu_without_bf16_instructions(monkeypatch, tmp_path):
    # ONEDNN_MAX_CPU_ISA=AVX2 makes torch's bf16 products run as on an AVX2-only CPU, so the
    # teacher's 'auto' must not pick bf16 there, whatever /proc/cpuinfo says.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k)
    )
    for cap, expected in [(None, True), ("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True)]:
        precision.cpu_has_bf16_instructions.cache_clear()
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert precision.cpu_has_bf16_instructions() is expected, cap
    precision.cpu_has_bf16_instructions.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.teacher_precision("auto", "auto", "fp32", "cpu") == "fp32"
    precision.cpu_has_bf16_instructions.cache_clear()
