"""The closed-form forward-KL chunk gradient equals the autograd one (values, hidden and head gradients)."""

import pytest
import torch
from toy import HeadOnlyModel

from selfdistill.config import LossConfig
from selfdistill.distillation.losses import _closed_form_applies, chunked_completion_loss, output_head
from selfdistill.sampling.importance import ImportanceSampling


def _run(closed_form: bool, importance_level=None, frozen_head=False):
    g = torch.Generator().manual_seed(0)
    n, dim, vocab = 23, 8, 31
    head = torch.nn.Linear(dim, vocab, bias=False)
    teacher = torch.nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g))
        teacher.weight.copy_(torch.randn(vocab, dim, generator=g))
    head.weight.requires_grad_(not frozen_head)
    hidden = torch.randn(n, dim, generator=g).requires_grad_()
    teacher_hidden = torch.randn(n, dim, generator=g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    importance = None
    if importance_level:
        sequence = torch.tensor([i // 5 for i in range(n)])
        importance = ImportanceSampling(torch.randn(n, generator=g) - 3.0, sequence, level=importance_level)
    settings = LossConfig(chunk_size=4)
    assert _closed_form_applies(settings, output_head(HeadOnlyModel(head)), closed_form) == closed_form
    loss, stats = chunked_completion_loss(
        hidden,
        teacher_hidden,
        tokens,
        weights,
        output_head(HeadOnlyModel(head)),
        output_head(HeadOnlyModel(teacher)),
        settings,
        importance,
        closed_form_gradient=closed_form,
    )
    loss.backward()
    return loss.detach(), stats, hidden.grad, head.weight.grad


@pytest.mark.parametrize("level", [None, "sequence", "token"])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_closed_form_matches_autograd(level, frozen_head):
    closed = _run(True, level, frozen_head)
    plain = _run(False, level, frozen_head)
    for a, b in zip(closed, plain):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert closed[2].abs().sum() > 0
