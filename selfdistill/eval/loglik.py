"""Held-out demonstration log-likelihood: a continuous measure of what a model learned.

Greedy exact-match moves in steps of 1/n and misses a model that moved toward the
demonstrations without changing any greedy answer. This measures, for evaluation items that
have a demonstration, how likely the model finds that demonstration, teacher-forced:

- `student`: mean over items of the item's mean log p(demonstration token | student prompt,
  earlier demonstration tokens), in nats/token. The demonstration is tokenised on its own and
  closed by the end-of-turn token, exactly as SFT's training target is, so a rise here is
  progress on the very thing SFT optimises, measured on items neither method trained on.
- `teacher`: the same under the teacher prompt (the demonstration shown in the prompt), for
  reference: roughly how high copying can get.
- `student_answer`: the same restricted to the tokens of the record's gold `answer` inside the
  demonstration (when the answer is a string found there). The answer's tokens are located by
  character offsets in the demonstration's own tokenisation: tokenising the answer alone gives
  other tokens (a leading space, merges across the boundary).
- `student_first`: the first demonstration token only.

`items` keeps the per-item means, so a reader can put an interval across items around `student`.
"""

from __future__ import annotations

from statistics import mean

import torch

from selfdistill.data.prompts import PromptBuilder
from selfdistill.data.records import Record
from selfdistill.precision import autocast_context


@torch.no_grad()
def demonstration_token_logps(
    model, prompts: list[list[int]], demos: list[list[int]], precision: str
) -> list[list[float]]:
    """Per record, log p(token | prompt, earlier demonstration tokens) of every demonstration token, nats."""
    device = next(model.parameters()).device
    out = []
    for prompt, demo in zip(prompts, demos):
        ids = torch.tensor([prompt + demo], device=device)
        with autocast_context(device, precision):
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logp = logits.log_softmax(-1).gather(-1, torch.tensor(demo, device=device)[:, None])[:, 0]
        out.append(logp.tolist())
    return out


def answer_token_positions(text: str, answer, offsets: list[tuple[int, int]]) -> list[int]:
    """Indices of the tokens (given by their character offsets in `text`) that overlap `answer`'s
    last occurrence in `text`; empty when the answer is not a string found there."""
    if not isinstance(answer, str) or not answer.strip():
        return []
    start = text.rfind(answer.strip())
    if start < 0:
        return []
    end = start + len(answer.strip())
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def _demonstration_tokens(tokenizer, text: str, stop_id: int) -> tuple[list[int], list[tuple[int, int]] | None]:
    """The demonstration's ids (as PromptBuilder.encode makes them) and each token's character span."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in encoded["offset_mapping"]]
        if list(encoded["input_ids"]) != list(ids):
            offsets = None
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers have no offsets
        offsets = None
    return list(ids) + [stop_id], offsets


def heldout_loglik(
    model,
    tokenizer,
    records: list[Record],
    *,
    template: str = "plain",
    system_prompt: str | None = None,
    stop_token_id: int | None = None,
    precision: str = "fp32",
) -> dict | None:
    """The measures above for the records that have a demonstration; None when none has one."""
    kept = [r for r in records if isinstance(r.demonstration, str) and r.demonstration.strip()]
    if not kept:
        return None
    # No prompt limits: this is a measurement, and evaluation items are scored whole.
    builder = PromptBuilder.unlimited(tokenizer, template, system_prompt, stop_token_id)
    stop = builder.end_of_turn_id  # stop_token_id, else the chat template's end of turn
    demos, answers = [], []
    for record in kept:
        ids, offsets = _demonstration_tokens(tokenizer, record.demonstration, stop)
        demos.append(ids)
        answers.append(answer_token_positions(record.demonstration, record.answer, offsets) if offsets else [])
    students = [builder.student_ids(r) for r in kept]
    teachers = [builder.teacher_ids(r) for r in kept]
    student_lp = demonstration_token_logps(model, students, demos, precision)
    teacher_lp = demonstration_token_logps(model, teachers, demos, precision)
    per_item = [mean(lp) for lp in student_lp]
    answer_items = [mean(lp[i] for i in pos) for lp, pos in zip(student_lp, answers) if pos]
    return {
        "count": len(kept),
        "tokens": sum(len(d) for d in demos),
        "template": template,
        "student": mean(per_item),
        "teacher": mean(mean(lp) for lp in teacher_lp),
        "student_first": mean(lp[0] for lp in student_lp),
        "student_answer": mean(answer_items) if answer_items else None,
        "answer_count": len(answer_items),
        "items": [round(v, 5) for v in per_item],
    }
