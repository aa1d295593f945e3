"""A toy task where copying from the demonstration is possible, and a tiny model that can copy.

Keys k0..kN map to values by a fixed random permutation. The student prompt holds only the key;
the teacher prompt also shows the value as the demonstration. A tiny random Llama is first
pre-trained (plain next-token loss) to (a) copy the demonstrated value when it is shown and
(b) answer a bare key with *some* value — but never the toy mapping itself, since those
pre-training values are drawn at random. The student therefore starts near chance (1/N)
without the demonstration, while the teacher is near-perfect: the mapping can only be
learned from the teacher's signal.
"""

from __future__ import annotations

import functools
import random

import torch

from selfdistill.data import PromptBuilder, Record
from selfdistill.models.batching import pad_batch
from selfdistill.models.tiny import tiny_model, tiny_tokenizer

NUM_KEYS = 8
KEYS = [f"k{i}" for i in range(NUM_KEYS)]
VALUES = [f"v{i}" for i in range(NUM_KEYS)]


def toy_records(seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    values = VALUES[:]
    rng.shuffle(values)
    return [Record(prompt=k, demonstration=v, answer=v) for k, v in zip(KEYS, values)]


@functools.cache
def _pretrained_state(template: str, steps: int, seed: int):
    tokenizer = tiny_tokenizer(KEYS + VALUES)
    torch.manual_seed(seed)
    model = tiny_model(tokenizer, hidden_size=64, layers=2, heads=4, seed=seed)
    builder = PromptBuilder(tokenizer, template=template)
    rng = random.Random(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    eos = tokenizer.eos_token_id
    for _ in range(steps):
        rows, targets = [], []
        for _ in range(32):
            key, value = rng.choice(KEYS), rng.choice(VALUES)
            record = Record(prompt=key, demonstration=value)
            # Half teacher-style (copy the shown value), half student-style (a bare key answered
            # with a random value: the answer format, no mapping).
            prompt = builder.encode_messages(
                builder.teacher_messages(record) if rng.random() < 0.5 else builder.student_messages(record)
            )
            answer = tokenizer.convert_tokens_to_ids([value]) + [eos]
            rows.append(prompt + answer)
            targets.append(len(prompt))
        ids, mask = pad_batch(rows, tokenizer.pad_token_id)
        labels = ids.clone()
        labels[mask == 0] = -100
        for i, start in enumerate(targets):
            labels[i, :start] = -100
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return tokenizer, {k: v.clone() for k, v in model.state_dict().items()}


def copy_model(template: str = "plain", steps: int = 300, seed: int = 0):
    """(model, tokenizer): a fresh copy of the pre-trained copying model (cached per session)."""
    tokenizer, state = _pretrained_state(template, steps, seed)
    model = tiny_model(tokenizer, hidden_size=64, layers=2, heads=4, seed=seed)
    model.load_state_dict(state)
    return model, tokenizer


def greedy_accuracy(model, tokenizer, records: list[Record], teacher: bool = False, template: str = "plain") -> float:
    from selfdistill.sampling.decode import generate

    builder = PromptBuilder(tokenizer, template=template)
    prompts = [
        builder.encode_messages(builder.teacher_messages(r) if teacher else builder.student_messages(r))
        for r in records
    ]
    out = generate(
        model,
        prompts,
        stop_token_ids=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=3,
        temperature=0,
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out.ids]
    return sum(t == r.answer for t, r in zip(texts, records)) / len(records)


class HeadOnlyModel(torch.nn.Module):
    """A model that is only its output head, for the losses' tests: `output_head(HeadOnlyModel(linear))`."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def get_output_embeddings(self):
        return self.head
