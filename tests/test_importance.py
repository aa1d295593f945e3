"""Truncated importance sampling in the chunked SDFT loss (no vLLM needed: sampler log-probs are given)."""

import math

import pytest
import torch
from toy import HeadOnlyModel

from selfdistill.config import ImportanceLevel, LossConfig, choices, load_config
from selfdistill.distillation.losses import chunked_completion_loss, divergence, output_head
from selfdistill.errors import UserError
from selfdistill.sampling.importance import LEVELS, PER_SEQUENCE, ImportanceSampling

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


def _run(importance, seed=0, chunk=4, closed_form=False):
    """(loss, hidden grad, head grad); `closed_form` takes the loss's closed-form forward-KL path."""
    head, teacher_head, hidden, teacher_hidden, tokens, _, _ = _setup(seed)
    hidden = hidden.clone().requires_grad_()
    if closed_form:
        head, teacher_head = output_head(HeadOnlyModel(head)), output_head(HeadOnlyModel(teacher_head))
    loss, _ = chunked_completion_loss(
        hidden,
        teacher_hidden,
        tokens,
        torch.ones(tokens.shape[0]),
        head,
        teacher_head,
        LossConfig(chunk_size=chunk),
        importance,
    )
    loss.backward()
    return loss.detach(), hidden.grad, (head.module if closed_form else head).weight.grad


def _reference(weights_per_position, seed=0):
    """Σ w · forward KL computed in one piece with plain autograd."""
    head, teacher_head, hidden, teacher_hidden, _, _, _ = _setup(seed)
    hidden = hidden.clone().requires_grad_()
    per_token = divergence(head(hidden), teacher_head(teacher_hidden).detach(), "forward_kl")
    loss = (per_token * weights_per_position).sum()
    loss.backward()
    return loss.detach(), hidden.grad, head.weight.grad


@pytest.mark.parametrize("level", LEVELS)
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


@pytest.mark.parametrize("level", PER_SEQUENCE)
def test_sequence_chunks_never_split_a_short_sequence(level):
    sequence = torch.cat([torch.full((k,), i) for i, k in enumerate([3, 7, 2, 5, 1])])
    chunks = ImportanceSampling(torch.zeros(len(sequence)), sequence, level=level).chunks(5)
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
    with pytest.raises(ValueError, match="importance sampling level"):
        ImportanceSampling(torch.zeros(2), torch.zeros(2, dtype=torch.long), level="off")


# The SDFT authors' form, the default: w_seq = mean over the sequence's loss tokens of min(C, r_t).


def _default_level() -> str:
    return load_config().rollout.importance_sampling


def test_config_default_is_the_mean_of_capped_token_ratios():
    assert _default_level() == "capped_token_mean"
    assert set(choices(ImportanceLevel)) == {*LEVELS, "off"}
    # Unquoted `off` is a YAML boolean; it still means the level "off" (on the command line and in files).
    assert load_config(overrides=["rollout.importance_sampling=off"]).rollout.importance_sampling == "off"
    assert load_config(overrides={"rollout": {"importance_sampling": False}}).rollout.importance_sampling == "off"
    with pytest.raises(UserError, match="rollout.importance_sampling"):
        load_config(overrides={"rollout": {"importance_sampling": True}})


def _hand_example():
    """Two sequences: [log 4, log 1/4] and [log 3, log 1/2, log 1] (log r_t = trainer − sampler)."""
    *_, trainer_logp = _setup()
    trainer_logp = trainer_logp[:5]
    log_r = torch.tensor([4.0, 0.25, 3.0, 0.5, 1.0]).log()
    return trainer_logp - log_r, torch.tensor([0, 0, 1, 1, 1])


@pytest.mark.parametrize(
    "level, expected",
    [
        # mean_t min(2, r_t): (2 + 1/4)/2 = 1.125 and (2 + 1/2 + 1)/3 = 7/6
        ("capped_token_mean", [1.125, 1.125, 7 / 6, 7 / 6, 7 / 6]),
        # min(2, exp(mean_t log r_t)): exp(0) = 1 and min(2, 1.5 ** (1/3)) = 1.5 ** (1/3)
        ("sequence", [1.0, 1.0, 1.5 ** (1 / 3), 1.5 ** (1 / 3), 1.5 ** (1 / 3)]),
        ("token", [2.0, 0.25, 2.0, 0.5, 1.0]),
    ],
)
def test_hand_computed_weights_of_each_level(level, expected):
    sampler, sequence = _hand_example()
    importance = ImportanceSampling(sampler, sequence, cap=2.0, level=level)
    *_, trainer_logp = _setup()
    importance.prepare(torch.zeros(5, 1), torch.zeros(5, dtype=torch.long), None, chunk_size=5)
    [chunk] = importance.chunks(5)
    got = importance.weights(trainer_logp[chunk], chunk)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("closed_form", [False, True])
@pytest.mark.parametrize("chunk", [2, 4, 100])
def test_default_weights_each_sequence_by_its_mean_capped_token_ratio(chunk, closed_form):
    """Loss and gradients through the chunked loss, against Σ w · KL with hand-computed weights.

    Chunks of 2 and 4 split the 7- and 5-token sequences (their means computed ahead), 100 none.
    The old default (min(C, exp(mean log r))) gives other weights here, so this test fails with it.
    """
    *_, sequence, trainer_logp = _setup()
    # log r_t spreads widely within each sequence, so capping each token differs from capping the mean.
    log_r = torch.cat([torch.linspace(-2.0, 2.0, k) + shift for k, shift in zip(LENGTHS, [0.0, 0.5, -0.3, 1.0])])
    importance = ImportanceSampling(trainer_logp - log_r, sequence, cap=2.0, level=_default_level())
    got = _run(importance, chunk=chunk, closed_form=closed_form)
    r = log_r.exp()
    capped = r.clamp(max=2.0)
    per_sequence = torch.stack([capped[sequence == i].mean() for i in range(len(LENGTHS))])
    old_default = torch.stack([log_r[sequence == i].mean().exp().clamp(max=2.0) for i in range(len(LENGTHS))])
    assert (per_sequence - old_default).abs().min() > 0.04  # the example tells the two forms apart
    expected = _reference(per_sequence[sequence])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Logged: every loss token's r_t before the cap, each once (long sequences included).
    summary = importance.summary()
    assert summary["importance_ratio_mean"] == pytest.approx(float(r.mean()), rel=1e-5)
    assert summary["importance_ratio_min"] == pytest.approx(float(r.min()), rel=1e-5)
    assert summary["importance_ratio_max"] == pytest.approx(float(r.max()), rel=1e-5)
    assert summary["importance_clipped_fraction"] == pytest.approx(float((r > 2.0).float().mean()))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 6])
def test_chunk_size_does_not_change_the_loss(level, chunk):
    """A sequence longer than the chunk gives the loss and gradients of one chunk holding everything."""
    *_, sequence, trainer_logp = _setup()
    log_r = torch.linspace(-1.5, 2.5, trainer_logp.shape[0])
    whole = _run(ImportanceSampling(trainer_logp - log_r, sequence, cap=2.0, level=level), chunk=10_000)
    importance = ImportanceSampling(trainer_logp - log_r, sequence, cap=2.0, level=level)
    split = _run(importance, chunk=chunk)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    count = len(LENGTHS) if level == "sequence" else sum(LENGTHS)
    assert sum(r.numel() for r in importance.ratios) == count  # each ratio logged once
