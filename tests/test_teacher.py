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
