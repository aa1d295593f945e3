"""Per-token teacher/student numbers along the student's own sampled completions.

This reproduces what one SDFT training step sees before any update (the EMA or frozen teacher
then still equals the student): the student samples completions from the student prompt with
the rollout settings and per-completion seeds training uses, and the same weights score those
very token ids after the student prompt and after the teacher prompt. Hidden states come from
the training code's own `completion_hidden`, so positions line up exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selfdistill.config import Config
from selfdistill.data.prompts import PromptBuilder
from selfdistill.data.records import Record
from selfdistill.distillation.losses import divergence, output_head
from selfdistill.methods.base import TrainItem, completion_hidden
from selfdistill.precision import autocast_context
from selfdistill.progress import progress_bar
from selfdistill.sampling import SamplingSettings, rollout_seed, sampling_from

TOP_N = 5  # top tokens shown per position, for the teacher and the student


@dataclass
class CompletionTrace:
    """One sampled completion and, per position j, the numbers for its token completion[j]."""

    record: int  # index of the record in the diagnosed sample
    rollout: int
    seed: int
    finished: bool  # False: the completion hit max_new_tokens
    token_ids: list[int]
    token_texts: list[str]
    student_logp: list[float]  # log p_student(sampled token | student prompt + earlier tokens)
    teacher_logp: list[float]  # log p_teacher(sampled token | teacher prompt + earlier tokens)
    divergence: list[float]  # per-position divergence (the configured kind), nats
    is_format: list[bool]
    in_loss: list[bool]  # False for the first loss.skip_first_tokens positions, which training leaves out
    teacher_top: list[list[tuple[int, str, float]]]  # (token id, text, probability), best first
    student_top: list[list[tuple[int, str, float]]]


@dataclass
class RecordTrace:
    index: int
    student_prompt: str
    teacher_prompt: str
    demonstration: str
    demo_first_token: str
    demo_first_student_p: float  # p of the demonstration's first token right after the student prompt
    demo_first_teacher_p: float  # ... and right after the teacher prompt
    completions: list[CompletionTrace] = field(default_factory=list)


def is_format_token(text: str, special: bool = False) -> bool:
    """A format token has no letter or digit: punctuation, brackets, quotes, JSON/markup syntax,
    whitespace and newlines; special tokens (end of turn) count as format too. Everything else
    is an answer (content) token. Deliberately simple: keywords such as 'Action' count as content."""
    return special or not any(ch.isalnum() for ch in text)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded completion.

    Decoding one token alone loses leading spaces (word-level tokenizers) or splits multi-byte
    characters (byte-level BPE), so each token's text is the growth of the decoded prefix.
    """
    texts, previous = [], ""
    for j in range(len(ids)):
        current = tokenizer.decode(ids[: j + 1], skip_special_tokens=False)
        if current.startswith(previous):
            texts.append(current[len(previous) :])
        else:  # the decoder rewrote earlier text (clean-up rules): fall back to the token alone
            texts.append(tokenizer.decode([ids[j]], skip_special_tokens=False))
        previous = current
    return texts


def _top(logp: torch.Tensor, tokenizer, n: int) -> list[list[tuple[int, str, float]]]:
    values, index = logp.topk(min(n, logp.shape[-1]), dim=-1)
    probs = values.exp().tolist()
    rows = []
    for ids, ps in zip(index.tolist(), probs):
        rows.append([(i, tokenizer.decode([i], skip_special_tokens=False), p) for i, p in zip(ids, ps)])
    return rows


@torch.no_grad()
def score_completion(model, item: TrainItem, cfg: Config, pad_token_id: int, tokenizer) -> dict:
    """Per-position numbers for one completion, from the student-prompt and teacher-prompt forwards."""
    precision = cfg.model.precision
    device = next(model.parameters()).device
    student_hidden, tokens = completion_hidden(model, [item], False, pad_token_id, precision)
    teacher_hidden, _ = completion_hidden(model, [item], True, pad_token_id, precision)
    head = output_head(model)
    # sampled_kl trains on a single-sample estimate of the reverse KL; show the exact reverse KL it estimates.
    kind = "reverse_kl" if cfg.loss.kind == "sampled_kl" else cfg.loss.kind
    out: dict = {
        "student_logp": [],
        "teacher_logp": [],
        "divergence": [],
        "teacher_top": [],
        "student_top": [],
        "first_student_logp": None,
        "first_teacher_logp": None,
    }
    # A chunk of positions at a time: [positions, vocab] logits for two models can be large.
    for start in range(0, tokens.shape[0], cfg.loss.chunk_size):
        part = slice(start, start + cfg.loss.chunk_size)
        with autocast_context(device, precision):
            student_logits = head(student_hidden[part]).float()
            teacher_logits = head(teacher_hidden[part]).float()
        student_logp = student_logits.log_softmax(-1)
        teacher_logp = teacher_logits.log_softmax(-1)
        picked = tokens[part, None]
        out["student_logp"] += student_logp.gather(-1, picked)[:, 0].tolist()
        out["teacher_logp"] += teacher_logp.gather(-1, picked)[:, 0].tolist()
        out["divergence"] += divergence(
            student_logits, teacher_logits, kind, beta=cfg.loss.beta, top_k=cfg.loss.top_k, add_tail=cfg.loss.add_tail
        ).tolist()
        out["teacher_top"] += _top(teacher_logp, tokenizer, TOP_N)
        out["student_top"] += _top(student_logp, tokenizer, TOP_N)
        if start == 0:  # the distributions right after each prompt, for the demonstration's first token
            out["first_student_logp"], out["first_teacher_logp"] = student_logp[0], teacher_logp[0]
    return out


def trace(model, tokenizer, records: list[Record], cfg: Config, stop_token_ids: list[int]) -> list[RecordTrace]:
    """Sample cfg.rollout.num_rollouts completions per record and score every position."""
    builder = PromptBuilder.from_config(tokenizer, cfg.data)
    encoded = builder.encode_all(records)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids[0]
    n = cfg.rollout.num_rollouts
    # The seed of a completion depends on its record's place in the sample, as on its place in
    # the data stream during training: the same --seed gives the same completions.
    seeds = [rollout_seed(cfg.train.seed, e.index, r) for e in encoded for r in range(n)]
    was_training = model.training
    model.eval()
    done = _sample(model, [e.student_ids for e in encoded for _ in range(n)], seeds, cfg, stop_token_ids, pad)
    special = set(tokenizer.all_special_ids) | set(stop_token_ids)
    results: list[RecordTrace] = []
    bar = progress_bar(total=len(done.ids), desc="diagnose: scoring")
    for position, e in enumerate(encoded):
        record = RecordTrace(
            index=e.index,
            student_prompt=tokenizer.decode(e.student_ids),
            teacher_prompt=tokenizer.decode(e.teacher_ids),
            demonstration=records[e.index].demonstration,
            demo_first_token=tokenizer.decode([e.demonstration_ids[0]]),
            demo_first_student_p=float("nan"),
            demo_first_teacher_p=float("nan"),
        )
        for r in range(n):
            k = position * n + r  # generation order: each record's rollouts in a row
            if not done.ids[k]:  # max_new_tokens >= 1 makes this impossible; guard the indexing below anyway
                continue
            completion, first_p = _completion_trace(
                model, tokenizer, cfg, e, r, seeds[k], done.ids[k], done.finished[k], pad, special
            )
            record.demo_first_student_p, record.demo_first_teacher_p = first_p
            record.completions.append(completion)
            bar.update(1)
        results.append(record)
    bar.close()
    model.train(was_training)
    return results


def _sample(model, prompts: list[list[int]], seeds: list[int], cfg: Config, stop_token_ids: list[int], pad: int):
    """The student's completions through the rollout engine (rollout.engine), as training samples them."""
    stop = [] if cfg.rollout.ignore_eos else list(stop_token_ids)
    settings = SamplingSettings.for_rollouts(cfg, stop_token_ids=stop, pad_token_id=pad, precision=cfg.model.precision)
    # Synced before generating (a shared engine may hold other weights), closed after.
    with sampling_from(model, settings, engine=cfg.rollout.engine, cfg=cfg) as sampler:
        return sampler.generate(prompts, seeds, desc="diagnose: student rollouts")


def _completion_trace(model, tokenizer, cfg: Config, e, rollout: int, seed: int, ids, finished, pad, special):
    """(one completion's per-position numbers, (p_student, p_teacher) of the demonstration's first token)."""
    item = TrainItem(
        record_index=e.index,
        prompt_ids=e.student_ids,
        completion=ids,
        loss_start=0,
        teacher_prompt_ids=e.teacher_ids,
        finished=finished,
    )
    scored = score_completion(model, item, cfg, pad, tokenizer)
    demo_first = e.demonstration_ids[0]
    first_p = (
        scored["first_student_logp"][demo_first].exp().item(),
        scored["first_teacher_logp"][demo_first].exp().item(),
    )
    texts = token_texts(tokenizer, ids)
    completion = CompletionTrace(
        record=e.index,
        rollout=rollout,
        seed=seed,
        finished=finished,
        token_ids=list(ids),
        token_texts=texts,
        student_logp=scored["student_logp"],
        teacher_logp=scored["teacher_logp"],
        divergence=scored["divergence"],
        is_format=[is_format_token(t, i in special) for t, i in zip(texts, ids)],
        in_loss=[j >= cfg.loss.skip_first_tokens for j in range(len(ids))],
        teacher_top=scored["teacher_top"],
        student_top=scored["student_top"],
    )
    return completion, first_p
