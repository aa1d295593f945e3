"""Truncated importance sampling in the chunked SDFT loss (no vLLM needed: sampler log-probs are given)."""

import math

import pytest
import torch

from selfdistill.config import load_config
from selfdistill.errors import UserError
from selfdistill.importance import ImportanceSampling
from selfdistill.losses import LossSettings, chunked_completion_loss, divergence

VOCAB, DIM = 11, 6
LENGTHS = [3, 7, 2, 5]  # one sequence (7) longer than the chunk of 4 used below


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    head = torch.nn.Linear(DIM, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, DIM, generator=g))
    teacher_head = torch.nn.Linear(DIM, VOCAB, bias=False)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.randn(VOCAB, DIM, generator=g))
    hidden = torch.randn(n, DIM, generator=g)
    teacher_hidden = torch.randn(n, DIM, generator=g)
    tokens = torch.randint(0, VOCAB, (n,), generator=g)
    sequence = torch.cat([torch.full((k,), i) for i, k in enumerate(LENGTHS)])
    trainer_logp = torch.log_softmax(head(hidden).detach(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    return head, teacher_head, hidden, teacher_hidden, tokens, sequence, trainer_logp


def _run(importance, seed=0, chunk=4):
    head, teacher_head, hidden, teacher_hidden, tokens, _, _ = _setup(seed)
    hidden = hidden.clone().requires_grad_()
    loss, _ = chunked_completion_loss(
        hidden,
        teacher_hidden,
        tokens,
        torch.ones(tokens.shape[0]),
        head,
        teacher_head,
        LossSettings(chunk_size=chunk),
        importance,
    )
    loss.backward()
    return loss.detach(), hidden.grad, head.weight.grad


def _reference(weights_per_position, seed=0):
    """Σ w · forward KL computed in one piece with plain autograd."""
    head, teacher_head, hidden, teacher_hidden, _, _, _ = _setup(seed)
    hidden = hidden.clone().requires_grad_()
    per_token = divergence(head(hidden), teacher_head(teacher_hidden).detach(), "forward_kl")
    loss = (per_token * weights_per_position).sum()
    loss.backward()
    return loss.detach(), hidden.grad, head.weight.grad


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_weights_are_one_when_sampler_and_trainer_agree(level):
    *_, sequence, trainer_logp = _setup()
    importance = ImportanceSampling(trainer_logp.clone(), sequence, cap=2.0, level=level)
    with_is = _run(importance)
    without = _run(None)
    for a, b in zip(with_is, without):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    summary = importance.summary()
    assert summary["importance_ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert summary["importance_ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert summary["importance_clipped_fraction"] == 0.0


def test_sequence_weight_is_capped_exp_of_mean_log_ratio():
    *_, sequence, trainer_logp = _setup()
    # Per-sequence offsets of the sampler: ratio exp(+1.5) > 2 (capped), exp(-0.5), exp(+0.3), exp(+3) (capped).
    # Within a sequence the offsets vary around the mean, so mean-of-log differs from log-of-mean.
    offsets = torch.tensor([1.5, -0.5, 0.3, 3.0])
    wiggle = torch.cat([torch.linspace(-0.4, 0.4, k) for k in LENGTHS])
    sampler = trainer_logp - offsets[sequence] - wiggle
    importance = ImportanceSampling(sampler, sequence, cap=2.0, level="sequence")
    got = _run(importance)
    expected_seq = torch.minimum(offsets.exp(), torch.tensor(2.0))
    expected = _reference(expected_seq[sequence])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    summary = importance.summary()
    assert summary["importance_ratio_max"] == pytest.approx(math.exp(3.0), rel=1e-5)
    assert summary["importance_ratio_min"] == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert summary["importance_clipped_fraction"] == pytest.approx(0.5)
    assert summary["importance_ratio_mean"] == pytest.approx(float(offsets.exp().mean()), rel=1e-5)


def test_token_level_weights_each_token():
    *_, sequence, trainer_logp = _setup()
    offsets = torch.linspace(-2.0, 2.0, trainer_logp.shape[0])
    importance = ImportanceSampling(trainer_logp - offsets, sequence, cap=2.0, level="token")
    got = _run(importance, chunk=3)
    expected = _reference(offsets.exp().clamp(max=2.0))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert importance.summary()["importance_clipped_fraction"] == pytest.approx(
        float((offsets.exp() > 2).float().mean())
    )


def test_sequence_chunks_never_split_a_short_sequence():
    sequence = torch.cat([torch.full((k,), i) for i, k in enumerate([3, 7, 2, 5, 1])])
    chunks = ImportanceSampling(torch.zeros(len(sequence)), sequence, level="sequence").chunks(5)
    covered = [i for c in chunks for i in range(c.start, c.stop)]
    assert covered == list(range(len(sequence)))
    for c in chunks:
        ids = set(sequence[c].tolist())
        if 1 in ids:  # the long sequence (7 > 5) is split, alone in its chunks
            assert ids == {1}
        else:  # every other sequence lies wholly inside one chunk
            for sid in ids:
                assert (sequence[c] == sid).sum() == (sequence == sid).sum()


def test_config_rejects_unknown_engine_and_level():
    with pytest.raises(UserError, match="rollout.engine"):
        load_config(overrides=["rollout.engine=vlm"])
    with pytest.raises(UserError, match="rollout.importance_sampling"):
        load_config(overrides=["rollout.importance_sampling=both"])
    cfg = load_config()
    assert cfg.rollout.engine == "decode" and cfg.rollout.importance_cap == 2.0
