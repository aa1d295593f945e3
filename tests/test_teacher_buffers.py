"""The teacher computes what the student would: its buffers (rotary tables, any other non-parameter state)
keep the student's dtype and values, for every teacher kind in every precision, full and LoRA, built in one
process or empty for sharding. Only the teacher's parameters are cast (fp32 for EMA, bf16 for a bf16 frozen
copy): `module.to(torch.bfloat16)` would round `inv_freq` too and move every position."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.gpu.fidelity import buffer_mismatches, method_teacher_kinds
from selfdistill.config import load_config
from selfdistill.data import PromptBuilder
from selfdistill.distillation.teacher import Teacher
from selfdistill.methods.build import build_method
from selfdistill.models import apply_lora
from selfdistill.models.sharded import empty_model, fill_from_files, materialize
from selfdistill.models.tiny import tiny_model, tiny_tokenizer


def _student(variant: str, lora: bool):
    """fp32; bf16 weights (what loading in bf16 gives: the rotary tables stay fp32); bf16 everything."""
    student = tiny_model(tiny_tokenizer(), hidden_size=32, heads=2)
    if variant == "bf16":
        for param in student.parameters():
            param.data = param.data.to(torch.bfloat16)
    elif variant == "bf16-buffers":
        student.to(torch.bfloat16)
    if lora:
        student = apply_lora(student, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    return student


def _assert_same_buffers(teacher_model, student) -> None:
    problems = buffer_mismatches(teacher_model, student)  # names, dtypes and values, bit for bit
    assert not problems, problems


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("variant", ["fp32", "bf16", "bf16-buffers"])
@pytest.mark.parametrize("frozen_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ema", "frozen", "live"])
def test_every_teacher_keeps_the_students_buffers(kind, frozen_dtype, variant, lora):
    student = _student(variant, lora)
    teacher = Teacher(student, kind, 0.01, frozen_dtype)
    with teacher.scoring(student) as view, view.weights() as model:
        _assert_same_buffers(model, student)
        if teacher.module is not None:  # a copy of its own (EMA; frozen full weights): parameters still cast
            expected = torch.float32 if kind == "ema" else (frozen_dtype or next(student.parameters()).dtype)
            assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
@pytest.mark.parametrize(("method", "kind"), method_teacher_kinds())
def test_every_method_builds_its_teacher_with_the_students_buffers(method, kind, precision, tmp_path):
    """As training builds it: teacher.precision bf16 (and auto where the CPU has bf16 instructions) stores a
    frozen copy in bf16 — its rotary tables still the student's fp32 ones."""
    tok = tiny_tokenizer()
    student = tiny_model(tok, hidden_size=32, heads=2)
    cfg = load_config(
        overrides={
            "method": method,
            "model": {"precision": "fp32" if precision != "auto" else "auto"},
            "teacher": {"kind": kind, "precision": precision},
            "train": {"output_dir": str(tmp_path)},
        }
    )
    built = build_method(cfg, student, tok, PromptBuilder(tok), [tok.eos_token_id], tok.pad_token_id)
    assert built.teacher.kind == kind
    with built.teacher.weights(student) as model:
        _assert_same_buffers(model, student)
        if kind == "frozen" and built.teacher.precision == "bf16":
            assert model.lm_head.weight.dtype == torch.bfloat16  # stored in bf16, as before


@pytest.mark.parametrize("kind", ["ema", "frozen"])
def test_a_teacher_built_empty_for_sharding_keeps_the_students_buffers(kind, tmp_path):
    """Under torchrun the teacher is copied from the student while its parameters are on the meta device
    (buffers real), then each process allocates and reads its shards."""
    tok = tiny_tokenizer()
    tiny_model(tok, hidden_size=32, heads=2).save_pretrained(tmp_path, safe_serialization=True)
    student = empty_model(str(tmp_path), torch.float32)
    teacher = Teacher(student, kind, 0.01, torch.bfloat16)
    _assert_same_buffers(teacher.module, student)
    for module in (student, teacher.module):
        materialize(module, torch.device("cpu"))
        fill_from_files(module, tmp_path)
    _assert_same_buffers(teacher.module, student)
    assert teacher.module.lm_head.weight.dtype == (torch.float32 if kind == "ema" else torch.bfloat16)


def test_a_bf16_frozen_teacher_encodes_positions_as_the_student_does():
    """At θ = 1e6 a bf16 `inv_freq` is off by over 1 rad at 1,000 tokens; the teacher's tables are exact."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_theta=1e6,
        max_position_embeddings=4096,
    )
    student = LlamaForCausalLM(config)
    teacher = Teacher(student, "frozen", 0.0, torch.bfloat16)
    positions = torch.arange(1000)[None]
    hidden = torch.zeros(1, 1000, config.hidden_size)
    for ours, theirs in zip(
        teacher.module.model.rotary_emb(hidden, positions), student.model.rotary_emb(hidden, positions)
    ):
        assert torch.equal(ours, theirs)
    # What casting the whole module did to the tables (the fault this guards against).
    rounded = copy.deepcopy(student).to(torch.bfloat16).model.rotary_emb.inv_freq.float()
    exact = student.model.rotary_emb.inv_freq
    assert float(((rounded - exact) * 999).abs().max()) > 1.0
