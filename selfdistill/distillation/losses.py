"""Token-level losses, as plain functions the training methods call.

- Per-token losses from a token's log-probability: `cross_entropy` (SFT), DFT's
  `probability_weighted_cross_entropy`, the `sampled_token_kl` estimator. `chunked_token_loss`
  sums one of them over completion positions.
- Divergences between the teacher's and the student's next-token distributions: `divergence`
  works on logits of any shape `[..., vocab]` and returns one value per position, summed over the
  vocabulary; `chunked_completion_loss` (SDFT, offline distillation) and `chunked_anchored_loss`
  (cross-entropy + KL to the starting model) are what training uses.

The chunked losses start from the final hidden states at completion positions and project them to
logits a chunk of positions at a time, working out each chunk's gradient right away (see
`_GradientsInForward`), so no more than `chunk × vocab` logits per model are alive at once, with
the same value and gradient as the unchunked computation.

Direction matters and is easy to get wrong (`F.kl_div(input, target)` is KL(target ‖ input)):
  forward_kl = KL(teacher ‖ student) = Σ p_T (log p_T − log p_S)   (what the paper's runs used)
  reverse_kl = KL(student ‖ teacher) = Σ p_S (log p_S − log p_T)   (what the paper derives)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from selfdistill.config import LossConfig


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dimension; 0 · log 0 counts as 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def divergence_from_logprobs(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5
) -> torch.Tensor:
    """The divergence between two normalised log-distributions over the last dimension."""
    if kind == "forward_kl":
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError("beta must lie in [0, 1]")
        # log M = log(β p_T + (1 − β) p_S), computed in log space; a zero weight drops its term.
        terms = []
        if beta > 0:
            terms.append(teacher_logp + math.log(beta))
        if beta < 1:
            terms.append(student_logp + math.log(1.0 - beta))
        mixture_logp = torch.logsumexp(torch.stack(terms), dim=0)
        out = torch.zeros(student_logp.shape[:-1], dtype=student_logp.dtype, device=student_logp.device)
        if beta > 0:
            out = out + beta * _kl(teacher_logp, mixture_logp)
        if beta < 1:
            out = out + (1.0 - beta) * _kl(student_logp, mixture_logp)
        return out
    raise ValueError(f"unknown divergence kind {kind!r}; expected forward_kl, reverse_kl or jsd")


def _top_k_logprobs(student_logp: torch.Tensor, teacher_logp: torch.Tensor, top_k: int, add_tail: bool):
    """Both distributions restricted to the teacher's top-k tokens (renormalised, or plus a tail bucket)."""
    index = teacher_logp.topk(min(top_k, teacher_logp.shape[-1]), dim=-1).indices
    picked = []
    for logp in (student_logp, teacher_logp):
        top = logp.gather(-1, index)
        mass = torch.logsumexp(top, dim=-1, keepdim=True)
        if add_tail:
            # log(1 − Σ top): the rest of the vocabulary as one bucket (clamped: mass can round to 1).
            tail = torch.log((-torch.expm1(mass.clamp(max=0.0))).clamp_min(1e-30))
            picked.append(torch.cat([top, tail], dim=-1))
        else:
            picked.append(top - mass)
    return picked[0], picked[1]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    top_k: int | None = None,
    add_tail: bool = False,
) -> torch.Tensor:
    """Per-position divergence between teacher and student, summed over the vocabulary.

    Returns a tensor of shape `logits.shape[:-1]`. The teacher side should carry no gradient
    (pass detached logits); bf16/fp16 inputs are computed in float32.
    """
    student_logp = torch.log_softmax(_at_least_fp32(student_logits), dim=-1)
    teacher_logp = torch.log_softmax(_at_least_fp32(teacher_logits), dim=-1)
    if top_k is not None:
        if top_k <= 0:
            raise ValueError("top_k must be positive")
        student_logp, teacher_logp = _top_k_logprobs(student_logp, teacher_logp, top_k, add_tail)
    return divergence_from_logprobs(student_logp, teacher_logp, kind, beta)


def sampled_token_kl(student_token_logp: torch.Tensor, teacher_token_logp: torch.Tensor) -> torch.Tensor:
    """Single-sample estimator of the reverse-KL gradient, per token.

    For tokens y sampled from the student, E[(log p_S(y) − log p_T(y)) ∇ log p_S(y)] is the
    per-token reverse-KL gradient; the coefficient is a constant (detached). Its value is not a
    divergence (it can be negative); use it for its gradient.
    """
    return (student_token_logp - teacher_token_logp).detach() * student_token_logp


def cross_entropy(token_logp: torch.Tensor) -> torch.Tensor:
    """SFT's loss of each token from its log-probability: −log p(y_t)."""
    return -token_logp


def probability_weighted_cross_entropy(token_logp: torch.Tensor) -> torch.Tensor:
    """DFT's loss of each token (Wu et al. 2025): −sg(p(y_t)) · log p(y_t), the probability held constant.

    It rescales the cross-entropy's gradient so that tokens the model finds very unlikely do not dominate.
    """
    return -token_logp.detach().exp() * token_logp


def output_head(model, without_adapter: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states -> logits, as the model's own forward would compute them.

    `without_adapter`: for a LoRA model whose head is itself adapted, the head's base layer (W0).
    """
    head = model.get_output_embeddings()
    if without_adapter and hasattr(head, "base_layer"):
        head = head.base_layer
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    scale = getattr(getattr(model, "config", None), "logit_scale", None)  # Cohere-style models scale logits

    def project(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    project.module = head  # whose trainable parameters the chunked losses differentiate
    # A bias-free linear map and nothing else: callers may apply `head.weight` in another form.
    project.plain_linear = isinstance(head, torch.nn.Linear) and head.bias is None and not cap and scale is None
    return project


def _trainable_parameters(head) -> list[torch.Tensor]:
    module = head if isinstance(head, torch.nn.Module) else getattr(head, "module", None)
    return [p for p in module.parameters() if p.requires_grad] if module is not None else []


class _GradientsInForward(torch.autograd.Function):
    """Σ over chunks of `chunk_loss(hidden[chunk])`, each chunk's gradient worked out in the forward pass.

    For every chunk of positions, one local autograd pass gives the chunk's loss and its gradient
    with respect to the chunk's hidden states and the head's parameters; then the chunk's logits
    are freed. Backward only scales the stored gradients by the incoming one. Recomputing each
    chunk in backward instead (activation checkpointing) runs the student's and the teacher's
    output head twice; this runs each once, with the same memory: one chunk of logits plus the
    gradient buffers (`[N, hidden]` and one head-sized tensor). A chunk may return its gradients
    itself (closed form), a parameter's as a function that adds it to the parameter's buffer.
    """

    @staticmethod
    def forward(ctx, chunk_loss, chunks: list[slice], num_stats: int, hidden: torch.Tensor, *params: torch.Tensor):
        grad_hidden = torch.zeros_like(hidden)
        # The head's gradient is summed over chunks in fp32 whatever the weights' dtype (a bf16 sum
        # over hundreds of chunks would round away the small ones); cast back once, in backward.
        grad_params = [
            torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device) for p in params
        ]
        ctx.param_dtypes = [p.dtype for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        stats = torch.zeros(num_stats, dtype=torch.float32, device=hidden.device)
        for part in chunks:
            with torch.enable_grad():
                chunk = hidden[part].detach().requires_grad_()
                out = chunk_loss(chunk, part)
                if len(out) == 3:  # the chunk worked out its own gradients (closed form)
                    loss, chunk_stats, grads = out
                else:
                    loss, chunk_stats = out
                    grads = torch.autograd.grad(loss, [chunk, *params], allow_unused=True)
            grad_hidden[part] = grads[0]
            for buffer, grad in zip(grad_params, grads[1:]):
                if callable(grad):  # adds itself to the buffer (closed form: one product, no head-sized temporary)
                    grad(buffer)
                elif grad is not None:
                    buffer += grad
            total += loss.detach().float()
            stats += chunk_stats.detach().float().reshape(num_stats)
        ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total, grad_stats):
        grad_hidden, *grad_params = ctx.saved_tensors
        return (
            None,
            None,
            None,
            grad_hidden * grad_total.to(grad_hidden.dtype),
            *((g * grad_total.to(g.dtype)).to(dtype) for g, dtype in zip(grad_params, ctx.param_dtypes)),
        )


def _chunked(
    chunk_loss, hidden: torch.Tensor, head, chunk_size: int, num_stats: int, chunks: list[slice] | None = None
):
    """(Σ chunk losses, Σ chunk stats) over chunks of `hidden`'s rows, differentiable in hidden and the head.

    `chunks` overrides the plain `chunk_size` cuts (importance sampling cuts at sequence ends).
    """
    if chunks is None:
        chunks = [slice(s, s + chunk_size) for s in range(0, hidden.shape[0], chunk_size)]
    params = _trainable_parameters(head)
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _GradientsInForward.apply(chunk_loss, chunks, num_stats, hidden, *params)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    stats = torch.zeros(num_stats, dtype=torch.float32, device=hidden.device)
    for part in chunks:
        loss, chunk_stats = chunk_loss(hidden[part], part)[:2]
        total += loss.float()
        stats += chunk_stats.float().reshape(num_stats)
    return total, stats


STAT_NAMES = ("divergence", "teacher_minus_student_logp", "teacher_entropy")


def _token_logp(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each position's log-probability of its token, from log-probs `[N, vocab]` and tokens `[N]`."""
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def _stats_and_weights(div, s_tok, t_tok, entropy, weights, importance, part):
    """A chunk's weighted sums of STAT_NAMES (no gradient), and the weights of its loss: `weights`,
    times the truncated importance weights when another engine sampled."""
    with torch.no_grad():
        stats = torch.stack([(div * weights).sum(), ((t_tok - s_tok) * weights).sum(), (entropy * weights).sum()])
    if importance is not None:
        weights = weights * importance.weights(s_tok, part)
    return stats, weights


def _chunk_loss(
    student_hidden,
    teacher_hidden,
    tokens,
    weights,
    student_head,
    teacher_head,
    settings: LossConfig,
    importance=None,
    part: slice | None = None,
):
    student_logits = student_head(student_hidden)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden).float()
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_logp = torch.log_softmax(teacher_logits, dim=-1)
    s_tok, t_tok = _token_logp(student_logp, tokens), _token_logp(teacher_logp, tokens)
    if settings.kind == "sampled_kl":
        per_token = sampled_token_kl(s_tok, t_tok)
        div = (s_tok - t_tok).detach()  # the single-sample reverse-KL estimate, for logging
    else:
        s_lp, t_lp = (student_logp, teacher_logp)
        if settings.top_k is not None:
            s_lp, t_lp = _top_k_logprobs(student_logp, teacher_logp, settings.top_k, settings.add_tail)
        per_token = divergence_from_logprobs(s_lp, t_lp, settings.kind, settings.beta)
        div = per_token.detach()
    with torch.no_grad():
        teacher_p = teacher_logp.exp()
        entropy = -torch.where(teacher_p > 0, teacher_p * teacher_logp, 0.0).sum(-1)  # 0 · log 0 counts as 0
    stats, weights = _stats_and_weights(div, s_tok, t_tok, entropy, weights, importance, part)
    return (per_token * weights).sum(), stats


# On CPU the closed-form chunk works through its logits a block of rows at a time, sized so that a block's
# float32 temporaries stay in cache (8 rows of a 49,152-token vocabulary: 1.5 MiB); elsewhere in one block.
_CPU_BLOCK_BYTES = 3 * 2**19
_FLOAT32_MIN = torch.finfo(torch.float32).min


def _block_rows(logits: torch.Tensor) -> int:
    """How many rows of `logits` [N, vocab] one block of the closed-form chunks holds (all N off a CPU)."""
    n, vocab = logits.shape
    return max(1, _CPU_BLOCK_BYTES // (4 * vocab) if logits.device.type == "cpu" else n)


def _softmax_rows_(logits: torch.Tensor) -> torch.Tensor:
    """Overwrite float32 `logits` [N, vocab] (the caller's own) with their softmax, a block of rows at a time
    (see `_forward_kl_rows_`); returns each row's logsumexp."""
    rows = _block_rows(logits)
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        block = logits[start : start + rows]
        top = block.amax(-1, keepdim=True)
        total = block.sub_(top).exp_().sum(-1, keepdim=True)
        block.div_(total)
        lse[start : start + rows] = (top + total.log())[:, 0]
    return lse


def _forward_kl_rows_(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Per row of logits s (student) and t (teacher): (KL(p_T ‖ p_S), H(p_T), logsumexp s, logsumexp t),
    overwriting `student_logits` (float32, the caller's own) with softmax(s) − p_T; `teacher_logits` is read only.

    With s' = s − max s, t' = t − max t, Z_S = Σ exp s', Z_T = Σ exp t' and p_T = exp(t') / Z_T:
        KL = Σ p_T (t' − s') − log Z_T + log Z_S,    H = log Z_T − Σ p_T t',
    row-wise dot products with exp(t'), so that no log-probability tensor is materialised. Why: each
    separate log-softmax, exp, KL or entropy pass over [positions × vocabulary] wrote a fresh tensor
    (50 MB a chunk at the default sizes, paid in page faults and memory traffic more than in arithmetic);
    here each block of rows is read from memory once and its small temporaries stay in cache.
    """
    n = student_logits.shape[0]
    rows = _block_rows(student_logits)
    # Per row: max s, max t, Z_S, Z_T, Σ exp(t') t', Σ exp(t') s'.
    sums = torch.empty(6, n, dtype=torch.float32, device=student_logits.device)
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        s, t = student_logits[block], teacher_logits[block]
        s_max, t_max = s.amax(-1, keepdim=True), t.amax(-1, keepdim=True).float()
        s_shifted = s.sub_(s_max)
        # A −inf teacher logit (a masked token) has p_T = 0; made finite, its 0 · t' terms stay 0.
        t_shifted = (t - t_max).clamp_min_(_FLOAT32_MIN)
        t_exp = t_shifted.exp()
        t_sum = t_exp.sum(-1, keepdim=True)
        t_dot_t, t_dot_s = torch.linalg.vecdot(t_exp, t_shifted), torch.linalg.vecdot(t_exp, s_shifted)
        s_exp = s_shifted.exp_()
        s_sum = s_exp.sum(-1, keepdim=True)
        s_exp.div_(s_sum).addcmul_(t_exp, -1.0 / t_sum)  # softmax(s) − p_T, in place
        sums[:, block] = torch.stack([s_max[:, 0], t_max[:, 0], s_sum[:, 0], t_sum[:, 0], t_dot_t, t_dot_s])
    s_max, t_max, s_sum, t_sum, t_dot_t, t_dot_s = sums
    log_z_s, log_z_t = s_sum.log(), t_sum.log()
    kl = (t_dot_t - t_dot_s) / t_sum - log_z_t + log_z_s
    entropy = log_z_t - t_dot_t / t_sum
    return kl, entropy, s_max + log_z_s, t_max + log_z_t


def _head_gradients(grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, weights: torch.Tensor):
    """[gradient of the hidden states, of the head's weight when trainable] from the logits' unweighted
    gradient `[N, vocab]`: each row's weight scales the `[N, hidden]` side of a product, not the logits.

    The head's gradient is a function that adds it to `_GradientsInForward`'s float32 buffer: for a
    float32 head one `addmm_` (128 ms a chunk on one thread, embedded model), not a head-sized product
    and then a sum (178 ms).
    """
    row_weights = weights[:, None].float()
    grad_logits = grad_logits.to(weight.dtype)
    grads = [((grad_logits @ weight).float() * row_weights).to(hidden.dtype)]
    if weight.requires_grad:
        scaled_hidden = (hidden.float() * row_weights).to(weight.dtype)

        def add_head_gradient(buffer: torch.Tensor) -> None:
            if buffer.dtype == weight.dtype:  # summed into the buffer by the product itself
                buffer.addmm_(grad_logits.T, scaled_hidden)
            else:
                buffer += grad_logits.T @ scaled_hidden

        grads.append(add_head_gradient)
    return grads


def _forward_kl_chunk_closed_form(
    student_hidden,
    teacher_hidden,
    tokens,
    weights,
    student_head,
    teacher_head,
    importance=None,
    part: slice | None = None,
):
    """Forward KL(teacher ‖ student) of one chunk with its gradient in closed form: (loss, stats, grads).

    d/ds Σ_v p_T (log p_T − log_softmax(s)) = softmax(s) − p_T, so the gradient with respect to
    the logits needs no autograd graph over the [chunk, vocab] tensors; the hidden states' and the
    head's gradients are two matrix products with it. The divergence, the teacher's entropy and the
    tokens' log-probabilities come from the raw logits (see `_forward_kl_rows_`).
    Same values as `_chunk_loss` for a bias-free linear head.
    """
    weight = student_head.module.weight
    with torch.no_grad():
        hidden = student_hidden.detach()
        logits = student_head(hidden).float()  # a fresh tensor: it becomes the logits' gradient
        teacher_logits = teacher_head(teacher_hidden)
        s_tok = _token_logp(logits, tokens)  # raw logits here; normalised below
        t_tok = _token_logp(teacher_logits, tokens).float()
        per_token, entropy, s_lse, t_lse = _forward_kl_rows_(logits, teacher_logits)
        s_tok, t_tok = s_tok - s_lse, t_tok - t_lse
        stats, weights = _stats_and_weights(per_token, s_tok, t_tok, entropy, weights, importance, part)
        grads = _head_gradients(logits, hidden, weight, weights)
    return (per_token * weights).sum(), stats, grads


def _plain_linear_head(head) -> bool:
    """A bias-free linear head whose only trainable parameter is its weight: the closed-form chunks' two
    gradient products cover all it trains."""
    module = getattr(head, "module", None)
    return getattr(head, "plain_linear", False) and all(p is module.weight for p in _trainable_parameters(head))


def _closed_form_applies(settings: LossConfig, student_head, closed_form_gradient: bool = True) -> bool:
    return (
        closed_form_gradient
        and settings.kind == "forward_kl"
        and settings.top_k is None
        and _plain_linear_head(student_head)
    )


def chunked_completion_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    student_head,
    teacher_head,
    settings: LossConfig,
    importance=None,
    closed_form_gradient: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_positions weight · divergence, from hidden states `[N, hidden]` at N completion positions.

    `settings` is the config's `loss` section (kind, beta, top_k, add_tail, chunk_size).
    `tokens[n]` is the sampled token predicted at position n (used by the sampled estimator and
    the logged teacher−student log-prob gap). Returns (weighted sum, stats) where stats holds
    the weighted sums of STAT_NAMES (no gradient). `importance` (a
    `selfdistill.sampling.importance.ImportanceSampling`) multiplies each position's weight by its
    truncated importance weight, from the student log-probs computed here, and records the ratios.
    `closed_form_gradient`: forward KL over the full vocabulary with a plain linear head works out
    each chunk's gradient in closed form (softmax(s) − p_T) instead of through autograd (see
    `_forward_kl_chunk_closed_form`); False always takes the autograd path.
    """
    teacher_hidden = teacher_hidden.detach()
    chunks = None
    if importance is not None:
        chunks = importance.chunks(settings.chunk_size)
        importance.prepare(student_hidden.detach(), tokens, student_head, settings.chunk_size)

    closed_form = _closed_form_applies(settings, student_head, closed_form_gradient)

    def chunk_loss(student_part: torch.Tensor, part: slice):
        inputs = (student_part, teacher_hidden[part], tokens[part], weights[part], student_head, teacher_head)
        if closed_form and torch.is_grad_enabled():  # without gradients the plain path does less
            return _forward_kl_chunk_closed_form(*inputs, importance, part)
        return _chunk_loss(*inputs, settings, importance, part)

    total, stats = _chunked(chunk_loss, student_hidden, student_head, settings.chunk_size, len(STAT_NAMES), chunks)
    return total, stats.cpu()


def _chunk_token_loss(hidden, tokens, weights, head, per_token_fn):
    logp = torch.log_softmax(head(hidden).float(), dim=-1)
    token_logp = _token_logp(logp, tokens)
    return (per_token_fn(token_logp) * weights).sum(), (token_logp.detach() * weights).sum()


def _token_chunk_closed_form(hidden, tokens, weights, head, probability_weighted: bool):
    """Cross-entropy (or DFT's probability-weighted cross-entropy) of one chunk with its gradient in closed form:
    (loss, Σ weight · log p(token), grads), the same values as `_chunk_token_loss` for a bias-free linear head.

    d/ds −log softmax(s)[y] = softmax(s) − onehot(y), times sg(p(y)) for DFT, so the logits' gradient is their
    softmax, computed in place, with 1 taken off at each token: no autograd graph over [chunk, vocab].
    """
    weight = head.module.weight
    with torch.no_grad():
        hidden = hidden.detach()
        logits = head(hidden).float()  # a fresh tensor: it becomes the logits' gradient
        token_logp = _token_logp(logits, tokens) - _softmax_rows_(logits)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        logits[rows, tokens] -= 1.0
        coefficient = token_logp.exp() if probability_weighted else torch.ones_like(token_logp)
        loss = (-coefficient * token_logp * weights).sum()
        grads = _head_gradients(logits, hidden, weight, weights * coefficient)
    return loss, (token_logp * weights).sum(), grads


def chunked_token_loss(
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    head,
    per_token_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 256,
):
    """Σ weight · per_token_fn(log p(token)) over positions, chunked like `chunked_completion_loss`.

    Returns (weighted loss sum, weighted sum of the tokens' log-probabilities). With
    `per_token_fn = cross_entropy` this is the loss of supervised fine-tuning. Cross-entropy and DFT's
    probability-weighted cross-entropy through a plain linear head work out each chunk's gradient in closed
    form (`_token_chunk_closed_form`), as SDFT's forward KL does: the two losses are compared by their speed.
    """
    closed_form = per_token_fn in (cross_entropy, probability_weighted_cross_entropy) and _plain_linear_head(head)

    def chunk_loss(part_hidden: torch.Tensor, part: slice):
        if closed_form and torch.is_grad_enabled():
            dft = per_token_fn is probability_weighted_cross_entropy
            return _token_chunk_closed_form(part_hidden, tokens[part], weights[part], head, dft)
        return _chunk_token_loss(part_hidden, tokens[part], weights[part], head, per_token_fn)

    total, logp_sum = _chunked(chunk_loss, hidden, head, chunk_size, 1)
    return total, logp_sum.reshape(()).cpu()


def _anchored_chunk(student_hidden, anchor_hidden, tokens, weights, student_head, anchor_head, beta: float):
    student_logp = torch.log_softmax(student_head(student_hidden).float(), dim=-1)
    with torch.no_grad():
        anchor_logp = torch.log_softmax(anchor_head(anchor_hidden).float(), dim=-1)
    token_logp = _token_logp(student_logp, tokens)
    kl = _kl(anchor_logp, student_logp)
    with torch.no_grad():
        stats = torch.stack([(token_logp * weights).sum(), (kl * weights).sum()])
    return ((beta * kl - token_logp) * weights).sum(), stats


def chunked_anchored_loss(
    student_hidden: torch.Tensor,
    anchor_hidden: torch.Tensor,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    student_head,
    anchor_head,
    beta: float,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ weight · (−log p_S(token) + β · KL(anchor ‖ student)) over positions, chunked like the other losses.

    The cross-entropy of SFT on the given tokens plus a forward KL, over the full vocabulary, from
    the anchor's (the starting model's) next-token distribution at the same positions. Returns
    (weighted loss sum, [Σ weight · log p_S(token), Σ weight · KL]).
    """
    anchor_hidden = anchor_hidden.detach()

    def chunk_loss(part_hidden: torch.Tensor, part: slice):
        return _anchored_chunk(
            part_hidden, anchor_hidden[part], tokens[part], weights[part], student_head, anchor_head, beta
        )

    total, stats = _chunked(chunk_loss, student_hidden, student_head, chunk_size, 2)
    return total, stats.cpu()
