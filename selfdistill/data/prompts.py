"""Student and teacher prompts, as token ids.

The student sees the record's prompt through the model's chat template. The teacher sees the
same conversation with its last user turn rewritten by the teacher template, which shows the
demonstration (and the record's `context`, when present). The sampled completion is later
appended to both as token ids, so student and teacher positions line up exactly.

Each prompt is tokenized once, here; the loop only concatenates ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from selfdistill.data.records import Record
from selfdistill.errors import UserError

log = logging.getLogger(__name__)

TEACHER_TEMPLATES = {
    # The paper's wording, verbatim (Shenfeld et al. 2026).
    "paper": (
        "\n{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    ),
    # Without "including the thinking process", which makes small models answer in free prose.
    "plain": (
        "{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own."
    ),
}
CONTEXT_PREFIX = "Here is some relevant information:\n{context}\n\n"


def resolve_template(template: str) -> str:
    text = TEACHER_TEMPLATES.get(template, template)
    if "{question}" not in text or "{demonstration}" not in text:
        raise UserError(
            f"Teacher template {template!r}: use 'paper', 'plain', or a template containing {{question}} and {{demonstration}}."
        )
    return text


def teacher_turn(record: Record, template: str) -> str:
    """The teacher's last user turn: question and demonstration (and context) in the template."""
    text = resolve_template(template)
    fields = {"question": record.question, "demonstration": record.demonstration, "context": record.context or ""}
    body = text.replace("{question}", fields["question"]).replace("{demonstration}", fields["demonstration"])
    if "{context}" in text:
        return body.replace("{context}", fields["context"])
    if record.context:
        return CONTEXT_PREFIX.replace("{context}", record.context) + body
    return body


# The assistant text `end_of_turn_token_id` has the chat template render, to find what follows it.
_TURN_PROBE = "selfdistill end-of-turn probe"


def end_of_turn_token_id(tokenizer) -> int:
    """The token the chat template ends an assistant turn with: what a demonstration ends with.

    Not always the tokenizer's EOS (Gemma-3's is <eos>, its turns end with <end_of_turn>), nor the first
    id of the generation config's EOS list (Llama-3.1's is <|end_of_text|>, its turns end with <|eot_id|>).
    Found by rendering a one-answer conversation and reading the token right after the answer's text;
    the tokenizer's EOS when the template cannot render one, or puts no special token there.
    """
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return eos
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template raises whatever its own checks or Jinja raise
        return eos
    at = text.rfind(_TURN_PROBE) if isinstance(text, str) else -1
    if at < 0:
        return eos
    after = tokenizer.encode(text[at + len(_TURN_PROBE) :].lstrip(" "), add_special_tokens=False)
    # A control token (special or added), not a word, nor the unknown-word token a word may become.
    control = (set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))) - {
        tokenizer.unk_token_id
    }
    return after[0] if after and after[0] in control else eos


@dataclass
class EncodedRecord:
    """One record's token ids: what the student and the teacher are shown, and the demonstration."""

    index: int
    student_ids: list[int]
    teacher_ids: list[int]
    demonstration_ids: list[int]  # demonstration + end-of-turn token: the SFT target


@dataclass(eq=False)
class PromptBuilder:
    """Turns records into student and teacher prompts (token ids) with one teacher template.

    A prompt over its limit raises a UserError, or with `overlong="skip"` leaves its record out (the
    reason is kept in `skipped`). `end_of_turn_id` ends a demonstration (default: the token the chat
    template ends an assistant turn with, `end_of_turn_token_id`).
    """

    tokenizer: Any = field(repr=False)
    template: str = "paper"
    system_prompt: str | None = None
    max_prompt_tokens: int = 1024
    max_teacher_prompt_tokens: int = 2048
    overlong: str = "error"
    end_of_turn_id: int | None = None
    skipped: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(
                "The tokenizer has no chat template, so prompts cannot be formatted as conversations. "
                "Use an instruction-tuned model or set tokenizer.chat_template and save the tokenizer."
            )
        resolve_template(self.template)
        if self.end_of_turn_id is None:
            self.end_of_turn_id = end_of_turn_token_id(self.tokenizer)

    @classmethod
    def from_config(cls, tokenizer, data, end_of_turn_id: int | None = None) -> PromptBuilder:
        """The builder a run's `data` settings describe (template, system prompt, limits, overlong policy)."""
        return cls(
            tokenizer,
            data.teacher_template,
            data.system_prompt,
            data.max_prompt_tokens,
            data.max_teacher_prompt_tokens,
            data.overlong,
            end_of_turn_id,
        )

    @classmethod
    def unlimited(
        cls, tokenizer, template: str, system_prompt: str | None, end_of_turn_id: int | None = None
    ) -> PromptBuilder:
        """A builder without prompt limits, for measurements, which take every item whole."""
        return cls(tokenizer, template, system_prompt, 10**9, 10**9, end_of_turn_id=end_of_turn_id)

    def student_messages(self, record: Record) -> list[dict]:
        if isinstance(record.prompt, str):
            messages = [{"role": "user", "content": record.prompt}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return messages
        return [dict(m) for m in record.prompt]

    def teacher_messages(self, record: Record) -> list[dict]:
        messages = self.student_messages(record)
        messages[-1] = {"role": "user", "content": teacher_turn(record, self.template)}
        return messages

    def encode_messages(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def student_ids(self, record: Record) -> list[int]:
        """The student prompt's token ids (no length check)."""
        return self.encode_messages(self.student_messages(record))

    def teacher_ids(self, record: Record) -> list[int]:
        """The teacher prompt's token ids (no length check)."""
        return self.encode_messages(self.teacher_messages(record))

    def demonstration_ids(self, text: str) -> list[int]:
        """A demonstration's token ids and the end-of-turn token: the SFT target."""
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.end_of_turn_id]

    def encode(self, record: Record, index: int = 0) -> EncodedRecord | None:
        """Token ids for one record; None when it is over a limit and overlong='skip'."""
        student = self.student_ids(record)
        teacher = self.teacher_ids(record)
        for ids, limit, what, option in (
            (student, self.max_prompt_tokens, "student prompt", "data.max_prompt_tokens"),
            (
                teacher,
                self.max_teacher_prompt_tokens,
                "teacher prompt (question + demonstration)",
                "data.max_teacher_prompt_tokens",
            ),
        ):
            if len(ids) > limit:
                message = f"{record.source or f'record {index}'}: the {what} has {len(ids)} tokens, over the limit {limit} ({option})."
                if self.overlong == "skip":
                    self.skipped.append(message)
                    log.warning("skipped: %s", message)
                    return None
                raise UserError(message + " Raise the limit or set data.overlong=skip to leave such records out.")
        return EncodedRecord(
            index=index,
            student_ids=student,
            teacher_ids=teacher,
            demonstration_ids=self.demonstration_ids(record.demonstration),
        )

    def encode_all(self, records: list[Record]) -> list[EncodedRecord]:
        if not records:
            raise UserError("No records to train on: the list of records given is empty.")
        encoded = [self.encode(r, i) for i, r in enumerate(records)]
        kept = [e for e in encoded if e is not None]
        if not kept:
            raise UserError(f"All {len(records)} records are over the prompt limits; nothing to train on.")
        return kept
