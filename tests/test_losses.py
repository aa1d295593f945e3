import math

import pytest
import torch
from toy import HeadOnlyModel

from selfdistill.config import LossConfig
from selfdistill.distillation import losses
from selfdistill.distillation.losses import (
    _chunk_loss,
    _forward_kl_chunk_closed_form,
    chunked_completion_loss,
    chunked_token_loss,
    cross_entropy,
    divergence,
    output_head,
    probability_weighted_cross_entropy,
    sampled_token_kl,
)
from selfdistill.sampling.importance import ImportanceSampling


def hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


P_T = [0.7, 0.2, 0.1]
P_S = [0.4, 0.4, 0.2]


def logits_of(p):
    return torch.log(torch.tensor(p, dtype=torch.float64))[None]


def test_forward_and_reverse_kl_match_hand_values_and_differ():
    fwd = divergence(logits_of(P_S), logits_of(P_T), "forward_kl").item()
    rev = divergence(logits_of(P_S), logits_of(P_T), "reverse_kl").item()
    assert fwd == pytest.approx(hand_kl(P_T, P_S), abs=1e-6)  # Σ p_T log(p_T / p_S)
    assert rev == pytest.approx(hand_kl(P_S, P_T), abs=1e-6)  # Σ p_S log(p_S / p_T)
    assert abs(fwd - rev) > 1e-3  # the direction matters on these distributions


def test_jsd_matches_hand_value():
    beta = 0.3
    m = [beta * t + (1 - beta) * s for t, s in zip(P_T, P_S)]
    expected = beta * hand_kl(P_T, m) + (1 - beta) * hand_kl(P_S, m)
    got = divergence(logits_of(P_S), logits_of(P_T), "jsd", beta=beta).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_jsd_extremes_are_zero_by_the_formula():
    # β=1: M = p_T, so β·KL(T‖T) = 0; β=0: M = p_S, (1−β)·KL(S‖S) = 0.
    for beta in (0.0, 1.0):
        assert divergence(logits_of(P_S), logits_of(P_T), "jsd", beta=beta).item() == pytest.approx(0.0, abs=1e-9)


def test_top_k_renormalised_and_with_tail():
    t = [0.5, 0.3, 0.15, 0.05]
    s = [0.25, 0.25, 0.25, 0.25]
    # top-2 of the teacher: tokens 0 and 1, renormalised.
    t2 = [0.5 / 0.8, 0.3 / 0.8]
    s2 = [0.5, 0.5]
    got = divergence(logits_of(s), logits_of(t), "forward_kl", top_k=2).item()
    assert got == pytest.approx(hand_kl(t2, s2), abs=1e-6)
    # with a tail bucket: [0.5, 0.3, 0.2] vs [0.25, 0.25, 0.5]
    got_tail = divergence(logits_of(s), logits_of(t), "forward_kl", top_k=2, add_tail=True).item()
    assert got_tail == pytest.approx(hand_kl([0.5, 0.3, 0.2], [0.25, 0.25, 0.5]), abs=1e-6)
    rev_tail = divergence(logits_of(s), logits_of(t), "reverse_kl", top_k=2, add_tail=True).item()
    assert rev_tail == pytest.approx(hand_kl([0.25, 0.25, 0.5], [0.5, 0.3, 0.2]), abs=1e-6)
    # top_k equal to the vocabulary is the full divergence
    full = divergence(logits_of(s), logits_of(t), "forward_kl").item()
    assert divergence(logits_of(s), logits_of(t), "forward_kl", top_k=4).item() == pytest.approx(full, abs=1e-9)


def test_shape_is_one_value_per_position():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        out = divergence(s, t, kind)
        assert out.shape == (2, 5)
        assert (out >= -1e-6).all()
    assert divergence(t, t, "forward_kl").abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_gradient_equals_autograd_of_explicit_formula(kind, top_k):
    torch.manual_seed(0)
    s = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64)
    divergence(s, t, kind, beta=0.4, top_k=top_k).sum().backward()
    ours = s.grad.clone()

    s2 = s.detach().clone().requires_grad_(True)
    ls, lt = torch.log_softmax(s2, -1), torch.log_softmax(t, -1)
    if top_k:
        idx = lt.topk(top_k, -1).indices
        ls, lt = ls.gather(-1, idx), lt.gather(-1, idx)
        ls, lt = ls - ls.logsumexp(-1, keepdim=True), lt - lt.logsumexp(-1, keepdim=True)
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward_kl":
        explicit = (pt * (lt - ls)).sum(-1)
    elif kind == "reverse_kl":
        explicit = (ps * (ls - lt)).sum(-1)
    else:
        m = 0.4 * pt + 0.6 * ps
        explicit = 0.4 * (pt * (lt - m.log())).sum(-1) + 0.6 * (ps * (ls - m.log())).sum(-1)
    explicit.sum().backward()
    torch.testing.assert_close(ours, s2.grad, atol=1e-9, rtol=1e-7)


def test_sampled_estimator_gradient_is_the_reverse_kl_score_function():
    s_lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    t_lp = torch.tensor([-1.5, -1.0])
    sampled_token_kl(s_lp, t_lp).sum().backward()
    torch.testing.assert_close(s_lp.grad, torch.tensor([0.5, -1.0]))  # (log p_S − log p_T), detached


def _heads(vocab=50, hidden=8):
    torch.manual_seed(1)
    return torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "sampled_kl"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_chunked_equals_unchunked_value_and_gradient(kind, top_k):
    student_head, teacher_head = _heads()
    n = 13
    hidden = torch.randn(n, 8, requires_grad=True)
    t_hidden = torch.randn(n, 8)
    tokens = torch.randint(0, 50, (n,))
    weights = torch.ones(n)
    results = []
    for chunk in (None, n, 4, 1):  # None: plain autograd through the whole [n, vocab] computation
        student_head.zero_grad()
        hidden.grad = None
        settings = LossConfig(kind=kind, top_k=top_k, add_tail=top_k is not None, chunk_size=chunk or n)
        if chunk is None:
            loss, stats = _chunk_loss(hidden, t_hidden, tokens, weights, student_head, teacher_head, settings)
        else:
            loss, stats = chunked_completion_loss(
                hidden, t_hidden, tokens, weights, student_head, teacher_head, settings
            )
        loss.backward()
        results.append((loss.item(), hidden.grad.clone(), student_head.weight.grad.clone(), stats.detach()))
    for value, grad_h, grad_w, stats in results[1:]:
        assert value == pytest.approx(results[0][0], abs=1e-5)
        torch.testing.assert_close(grad_h, results[0][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_w, results[0][2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats, results[0][3], atol=1e-4, rtol=1e-5)
    assert teacher_head.weight.grad is None  # the teacher is a constant


def test_chunked_loss_equals_direct_divergence():
    student_head, teacher_head = _heads()
    hidden, t_hidden = torch.randn(6, 8), torch.randn(6, 8)
    weights = torch.tensor([1.0, 1, 0, 1, 1, 0])
    loss, _ = chunked_completion_loss(
        hidden,
        t_hidden,
        torch.zeros(6, dtype=torch.long),
        weights,
        student_head,
        teacher_head,
        LossConfig(chunk_size=4),
    )
    direct = (divergence(student_head(hidden), teacher_head(t_hidden), "forward_kl") * weights).sum()
    assert loss.item() == pytest.approx(direct.item(), abs=1e-5)


def test_chunked_token_loss_is_cross_entropy():
    head, _ = _heads()
    hidden = torch.randn(9, 8)
    tokens = torch.randint(0, 50, (9,))
    loss, logp = chunked_token_loss(hidden, tokens, torch.ones(9), head, lambda lp: -lp, chunk_size=2)
    expected = torch.nn.functional.cross_entropy(head(hidden), tokens, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    assert logp.item() == pytest.approx(-expected.item(), abs=1e-4)


@pytest.mark.parametrize("loss_fn", ["completion", "token"])
def test_chunked_losses_run_each_head_once_per_chunk(loss_fn):
    """Gradients are worked out chunk by chunk in the forward pass: backward recomputes nothing."""
    student_head, teacher_head = _heads()
    calls = {"student": 0, "teacher": 0}
    student_head.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    teacher_head.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    hidden = torch.randn(13, 8, requires_grad=True)
    tokens = torch.randint(0, 50, (13,))
    if loss_fn == "completion":
        loss, _ = chunked_completion_loss(
            hidden, torch.randn(13, 8), tokens, torch.ones(13), student_head, teacher_head, LossConfig(chunk_size=4)
        )
    else:
        loss, _ = chunked_token_loss(hidden, tokens, torch.ones(13), student_head, lambda lp: -lp, chunk_size=4)
    (2.0 * loss).backward()
    assert calls["student"] == 4  # ceil(13 / 4) chunks, each projected once
    assert calls["teacher"] == (4 if loss_fn == "completion" else 0)
    # and the gradient is still the direct one (scaled by the 2.0 the loss was multiplied by)
    direct_hidden = hidden.detach().clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(student_head(direct_hidden), tokens, reduction="sum")
    if loss_fn == "token":
        (2.0 * expected).backward()
        torch.testing.assert_close(hidden.grad, direct_hidden.grad, atol=1e-5, rtol=1e-5)


def test_a_bf16_head_gradient_is_summed_over_chunks_in_fp32():
    """512 one-position chunks each adding to a bf16 head's gradient: summed in fp32 and rounded once, the
    result is within one bf16 rounding of the fp32 computation (a bf16 running sum was 5.6% of the scale off)."""
    from selfdistill.distillation.losses import chunked_token_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 16, bias=False).to(torch.bfloat16)
    hidden = torch.randn(512, 8, dtype=torch.bfloat16)
    tokens = torch.randint(0, 16, (512,))
    reference = torch.nn.Linear(8, 16, bias=False)
    reference.weight.data = head.weight.data.float()
    loss, _ = chunked_token_loss(hidden.float(), tokens, torch.ones(512), reference, torch.negative, chunk_size=512)
    loss.backward()
    loss, _ = chunked_token_loss(hidden, tokens, torch.ones(512), head, torch.negative, chunk_size=1)
    loss.backward()
    assert head.weight.grad.dtype == torch.bfloat16
    scale = float(reference.weight.grad.abs().max())
    assert float((head.weight.grad.float() - reference.weight.grad).abs().max()) <= scale * 2**-7


def _masked_teacher(teacher: torch.nn.Linear, mask_head: torch.nn.Linear):
    """A teacher head whose logits are −inf where `mask_head`'s are above 0.43 (a third of a row's vocabulary),
    row by row from the hidden states, so the same in any chunking."""

    def project(hidden):
        return teacher(hidden).masked_fill(mask_head(hidden.float()) > 0.43, float("-inf"))

    return project


def _closed_form_case(vocab=3000, n=13, dtype=torch.float32, teacher_dtype=torch.float32, mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = 16
    student, teacher = torch.nn.Linear(dim, vocab, bias=False), torch.nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():  # logits of spread ~4, the teacher partly agreeing with the student
        student.weight.copy_(torch.randn(vocab, dim, generator=g))
        teacher.weight.copy_(student.weight + torch.randn(vocab, dim, generator=g))
    student, teacher = student.to(dtype), teacher.to(teacher_dtype)
    hidden = torch.randn(n, dim, generator=g).to(dtype)
    teacher_hidden = torch.randn(n, dim, generator=g).to(teacher_dtype)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    weights[1::4] = 0.0
    teacher_head = output_head(HeadOnlyModel(teacher))
    if mask:
        mask_head = torch.nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            mask_head.weight.copy_(torch.randn(vocab, dim, generator=g) / dim**0.5)
        teacher_head = _masked_teacher(teacher, mask_head)
        # each row's token among its unmasked ones (else log p_T(token) = −inf, and so the logged gap)
        unmasked = ~torch.isinf(teacher_head(teacher_hidden))
        tokens = (torch.rand(n, vocab, generator=g) * unmasked).argmax(-1)
    return output_head(HeadOnlyModel(student)), teacher_head, hidden, teacher_hidden, tokens, weights


def _chunk_results(closed_form: bool, case, importance_level=None):
    """(loss, stats, gradient of the hidden states, of the head's weight) of one chunk, by either path."""
    student_head, teacher_head, hidden, teacher_hidden, tokens, weights = case
    importance = None
    if importance_level:
        g = torch.Generator().manual_seed(3)
        sequence = torch.tensor([i // 4 for i in range(hidden.shape[0])])
        sampler_logp = torch.randn(hidden.shape[0], generator=g) - 8.0
        importance = ImportanceSampling(sampler_logp, sequence, level=importance_level)
    weight = student_head.module.weight
    chunk = hidden.clone().requires_grad_()
    part = slice(0, hidden.shape[0])
    inputs = (chunk, teacher_hidden, tokens, weights, student_head, teacher_head)
    if closed_form:
        loss, stats, grads = _forward_kl_chunk_closed_form(*inputs, importance, part)
        head_grad = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32))
        grads[1](head_grad)  # adds itself to the fp32 buffer, as _GradientsInForward calls it
        return loss, stats, grads[0], head_grad
    loss, stats = _chunk_loss(*inputs, LossConfig(), importance, part)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [chunk, weight])
    return loss.detach(), stats, grad_hidden, grad_weight.float()


@pytest.mark.parametrize("block_rows", [None, 1, 3])  # None: the whole chunk in one block
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_fused_closed_form_chunk_equals_the_autograd_chunk(monkeypatch, block_rows, mask, teacher_dtype):
    """Loss, statistics and gradients of the fused chunk (dot products of raw logits, a block of rows at a
    time) equal autograd through log-softmaxes, with zero weights, a partly −inf teacher and bf16 teacher logits."""
    vocab = 3000
    if block_rows:
        monkeypatch.setattr(losses, "_CPU_BLOCK_BYTES", block_rows * 4 * vocab)
    case = _closed_form_case(vocab, teacher_dtype=teacher_dtype, mask=mask)
    fused, reference = _chunk_results(True, case), _chunk_results(False, case)
    for got, expected in zip(fused, reference):
        assert torch.isfinite(got).all() and torch.isfinite(expected).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert fused[0] > 0 and fused[2].abs().sum() > 0  # a real divergence, not 0 = 0
    assert (fused[2][case[5] == 0] == 0).all()  # zero weight: no gradient


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_closed_form_chunk_with_importance_weights(level):
    case = _closed_form_case()
    for got, expected in zip(_chunk_results(True, case, level), _chunk_results(False, case, level)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fused_closed_form_chunk_with_a_bf16_head():
    """A bf16 student head: the same logits, so the same loss and statistics; gradients within bf16 rounding."""
    case = _closed_form_case(dtype=torch.bfloat16, teacher_dtype=torch.bfloat16, mask=True)
    fused, reference = _chunk_results(True, case), _chunk_results(False, case)
    assert fused[2].dtype == torch.bfloat16 and fused[3].dtype == torch.float32
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], reference[1], rtol=1e-5, atol=1e-6)
    for got, expected in zip(fused[2:], reference[2:]):
        scale = float(expected.float().abs().max())
        assert float((got.float() - expected.float()).abs().max()) <= scale * 2**-6


def test_fused_closed_form_chunk_is_as_accurate_as_float64():
    """Against the whole computation in float64: the dot products of raw logits lose nothing to the
    log-softmax route in float32 (large logits, a large vocabulary)."""
    vocab = 49152
    case = _closed_form_case(vocab, n=4, mask=True)
    student_head, teacher_head, hidden, teacher_hidden, tokens, weights = case
    loss, stats, _ = _forward_kl_chunk_closed_form(
        hidden.clone().requires_grad_(), teacher_hidden, tokens, weights, student_head, teacher_head
    )
    student_logp = torch.log_softmax(student_head(hidden).double(), -1)
    teacher_logp = torch.log_softmax(teacher_head(teacher_hidden).double(), -1)
    teacher_p = teacher_logp.exp()
    kl = torch.where(teacher_p > 0, teacher_p * (teacher_logp - student_logp), 0.0).sum(-1)
    entropy = -torch.where(teacher_p > 0, teacher_p * teacher_logp, 0.0).sum(-1)
    gap = (teacher_logp - student_logp).gather(-1, tokens[:, None]).squeeze(-1)
    expected = torch.stack([(kl * weights).sum(), (gap * weights).sum(), (entropy * weights).sum()])
    torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected[0], rtol=1e-5, atol=1e-5)


def test_masked_teacher_tokens_get_no_teacher_probability():
    """Where the teacher's logit is −inf, p_T = 0: the logits' gradient there is softmax(s) alone."""
    case = _closed_form_case(vocab=50, n=3, mask=True)
    student_head, teacher_head, hidden, teacher_hidden, tokens, weights = case
    weights = torch.ones(3)
    loss, stats, grads = _forward_kl_chunk_closed_form(
        hidden.clone().requires_grad_(), teacher_hidden, tokens, weights, student_head, teacher_head
    )
    assert torch.isfinite(loss) and torch.isfinite(stats).all()
    masked = torch.isinf(teacher_head(teacher_hidden))
    grad_logits = torch.softmax(student_head(hidden), -1) - torch.softmax(teacher_head(teacher_hidden), -1)
    assert masked.any() and (grad_logits[masked] > 0).all()  # softmax(s) − 0
    torch.testing.assert_close(grads[0], grad_logits @ student_head.module.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_closed_form_equals_autograd_across_blocks_and_chunks(monkeypatch, frozen_head):
    """The whole chunked loss, blocks of 3 rows inside chunks of 4 and 5 positions, a masked teacher."""
    monkeypatch.setattr(losses, "_CPU_BLOCK_BYTES", 3 * 4 * 300)
    results = []
    for closed_form in (True, False):
        student_head, teacher_head, hidden, teacher_hidden, tokens, weights = _closed_form_case(300, mask=True)
        student_head.module.weight.requires_grad_(not frozen_head)
        hidden.requires_grad_()
        loss, stats = chunked_completion_loss(
            hidden,
            teacher_hidden,
            tokens,
            weights,
            student_head,
            teacher_head,
            LossConfig(chunk_size=5),
            closed_form_gradient=closed_form,
        )
        loss.backward()
        results.append((loss.detach(), stats, hidden.grad, student_head.module.weight.grad))
    for got, expected in zip(*results):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_token_fn", [cross_entropy, probability_weighted_cross_entropy])
def test_the_token_losses_closed_form_gives_autograds_values_and_gradients(per_token_fn):
    """SFT's cross-entropy and DFT's loss through a plain linear head take the closed-form chunk (softmax − onehot,
    in place, a block of rows at a time): the loss, the tokens' log-probability sum and the gradients of the hidden
    states and of the head are autograd's over the unchunked logits, with zero weights and uneven chunks."""
    generator = torch.Generator().manual_seed(0)
    n, hidden_size, vocab = 37, 16, 300
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=generator))
    hidden = torch.randn(n, hidden_size, generator=generator, requires_grad=True)
    tokens = torch.randint(0, vocab, (n,), generator=generator)
    weights = torch.rand(n, generator=generator)
    weights[::5] = 0.0

    logp = torch.log_softmax(hidden @ head.weight.T, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    want = (per_token_fn(logp) * weights).sum()
    want_grads = torch.autograd.grad(want, [hidden, head.weight])

    project = output_head(HeadOnlyModel(head))
    assert project.plain_linear
    old_rows = losses._CPU_BLOCK_BYTES
    losses._CPU_BLOCK_BYTES = 3 * 4 * vocab  # blocks of 3 rows: the block bookkeeping is exercised
    try:
        loss, logp_sum = chunked_token_loss(hidden, tokens, weights, project, per_token_fn, chunk_size=10)
        got_grads = torch.autograd.grad(loss, [hidden, head.weight])
    finally:
        losses._CPU_BLOCK_BYTES = old_rows
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp_sum, (logp * weights).sum().detach(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sft_and_dft_hand_the_chunked_loss_the_functions_it_computes_in_closed_form():
    """The closed form is chosen by the loss function itself: a method wrapping it would silently take the
    autograd path (SFT did, until this was checked)."""
    from selfdistill.methods.dft import DFT
    from selfdistill.methods.sft import SFT

    assert SFT.per_token_loss is cross_entropy
    assert DFT.per_token_loss is probability_weighted_cross_entropy
