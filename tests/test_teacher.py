import copy

import torch

from selfdistill.distillation.teacher import Teacher
from selfdistill.models import apply_lora
from selfdistill.models.tiny import tiny_model, tiny_tokenizer


def _perturb(model, scale=0.1):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def test_ema_update_full_weights():
    tok = tiny_tokenizer()
    student = tiny_model(tok)
    teacher = Teacher(student, "ema", 0.25)
    old = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    _perturb(student)
    teacher.update(student)
    for name, param in teacher.module.state_dict().items():
        expected = 0.75 * old[name] + 0.25 * student.state_dict()[name]
        torch.testing.assert_close(param, expected)
    assert not any(p.requires_grad for p in teacher.module.parameters())


def test_frozen_is_an_in_memory_copy_and_live_is_the_student():
    tok = tiny_tokenizer()
    student = tiny_model(tok)
    with torch.no_grad():
        student.model.norm.weight.fill_(0.5)  # differs from any weights on disk
    frozen = Teacher(student, "frozen")
    _perturb(student)
    frozen.update(student)
    assert torch.equal(frozen.module.model.norm.weight, torch.full_like(student.model.norm.weight, 0.5))
    live = Teacher(student, "live")
    assert live.module is None
    with live.scoring(student) as view, view.weights() as m:
        assert m is student and not view.adapter_off


def _lora_student():
    tok = tiny_tokenizer()
    base = tiny_model(tok)
    student = apply_lora(base, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    return student


def _effective_weight(student, name):
    layer = dict(student.named_modules())[f"base_model.model.{name}"]
    return layer.base_layer.weight + layer.get_delta_weight("default")


def test_ema_update_lora_averages_the_weight_delta():
    student = _lora_student()
    teacher = Teacher(student, "ema", 0.3)
    name = "model.layers.0.self_attn.q_proj"
    old = dict(teacher.module.named_modules())[name].weight.clone()
    torch.testing.assert_close(old, _effective_weight(student, name).detach())  # starts at W0 (B = 0)
    _perturb(student, 0.5)  # moves A and B
    teacher.update(student)
    new = dict(teacher.module.named_modules())[name].weight
    torch.testing.assert_close(new, 0.7 * old + 0.3 * _effective_weight(student, name).detach())
    # Averaging A and B separately would give a different weight: the product is not linear.
    layer = dict(student.named_modules())[f"base_model.model.{name}"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    separate = layer.base_layer.weight + layer.scaling["default"] * (0.3 * b) @ (0.3 * a)
    assert not torch.allclose(new, separate.detach(), atol=1e-4)
    # Layers LoRA does not touch stay at the base weights.
    untouched = "model.layers.0.self_attn.k_proj"
    torch.testing.assert_close(
        dict(teacher.module.named_modules())[untouched].weight,
        dict(student.named_modules())[f"base_model.model.{untouched}"].weight,
    )


def test_lora_frozen_teacher_is_the_adapter_switched_off():
    student = _lora_student()
    _perturb(student, 0.5)
    teacher = Teacher(student, "frozen")
    assert teacher.module is None
    ids = torch.tensor([[5, 6, 7, 8]])
    with teacher.scoring(student) as view:
        with view.weights() as m:
            off = m(input_ids=ids).logits
            assert not torch.is_grad_enabled()
        # Outside `weights()`, still inside scoring (where the student's own forward runs), the
        # adapter is on again and the student's adapter gets gradients.
        on = student(input_ids=ids).logits
        on.sum().backward()
    assert not torch.allclose(off, on.detach())
    grads = [p.grad for n, p in student.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    with torch.no_grad():
        plain = copy.deepcopy(student)
        plain.base_model.disable_adapter_layers()
        torch.testing.assert_close(off, plain(input_ids=ids).logits)


def test_teacher_state_round_trips(tmp_path):
    tok = tiny_tokenizer()
    student = tiny_model(tok)
    teacher = Teacher(student, "ema", 0.5)
    _perturb(student)
    teacher.update(student)
    teacher.save(tmp_path / "t.safetensors")
    other = Teacher(tiny_model(tok, seed=9), "ema", 0.5)
    other.load(tmp_path / "t.safetensors")
    for a, b in zip(teacher.module.parameters(), other.module.parameters()):
        assert torch.equal(a, b)


def test_lora_frozen_teacher_head_is_the_base_of_an_adapted_head():
    from selfdistill.distillation.losses import output_head

    base = tiny_model(tiny_tokenizer())
    student = apply_lora(base, rank=4, alpha=8, target_modules=["q_proj", "lm_head"])
    _perturb(student, 0.5)
    view_cm = Teacher(student, "frozen").scoring(student)
    with view_cm as view, torch.no_grad():
        hidden = torch.randn(3, student.config.hidden_size)
        head = dict(student.named_modules())["base_model.model.lm_head"]
        torch.testing.assert_close(view.head(hidden), head.base_layer(hidden))
        assert not torch.allclose(view.head(hidden), output_head(student)(hidden))  # the student's head is adapted


def test_a_bf16_compute_copy_gives_the_autocast_numbers_bit_for_bit_and_follows_the_ema(tmp_path):
    """An EMA teacher computing in bf16 on a CPU runs its forward on a copy whose linear weights are bf16: the
    same hidden states and head logits, to the bit, as autocast over the fp32 weights, after EMA steps and after
    a checkpoint is loaded; the embedding (tied to the head) is the master's own fp32 tensor, not a copy."""
    from selfdistill.distillation.losses import output_head
    from selfdistill.precision import autocast_context

    tok = tiny_tokenizer()
    student = tiny_model(tok, tied=True)
    teacher = Teacher(student, "ema", 0.25, compute_dtype=torch.bfloat16)
    copy_ = teacher.compute_module
    assert copy_.model.embed_tokens.weight is teacher.module.model.embed_tokens.weight
    assert copy_.lm_head.weight.dtype == torch.bfloat16 and copy_.model.norm.weight.dtype == torch.float32
    tokens = torch.randint(3, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))

    def outputs(model):
        with torch.no_grad(), autocast_context("cpu", "bf16"):
            hidden = model.model(tokens).last_hidden_state
            return hidden, output_head(model)(hidden)

    for step in range(2):
        _perturb(student, scale=0.1 * (step + 1))
        teacher.update(student)
        with teacher.scoring(student) as view:
            assert view.model is copy_
        for ours, autocast in zip(outputs(copy_), outputs(teacher.module)):
            assert torch.equal(ours, autocast)
    teacher.save(tmp_path / "teacher.safetensors")
    other = Teacher(tiny_model(tok, tied=True, seed=5), "ema", 0.25, compute_dtype=torch.bfloat16)
    other.load(tmp_path / "teacher.safetensors")
    assert torch.equal(outputs(other.compute_module)[1], outputs(teacher.module)[1])


def test_a_compute_copy_keeps_a_head_that_computes_outside_autocast_in_fp32():
    tok = tiny_tokenizer()
    teacher = Teacher(tiny_model(tok, tied=False), "ema", 0.25, compute_dtype=torch.bfloat16, cast_head=False)
    assert teacher.compute_module.lm_head.weight is teacher.module.lm_head.weight
    assert teacher.compute_module.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
