"""Graders: `(output, record) -> score in [0, 1]`, looked up by name with `get(name)`.

`record` is the evaluation record as a dict (`Record.to_dict()`): the gold answer is in
`record["answer"]`; task-specific fields (e.g. `golden_answer` for tool use, `pattern` for
`regex`, `tolerance` for `numeric`) are kept beside it.

Two graders reproduce the SDFT paper's evaluation scripts (as described in the release that
accompanies Shenfeld et al. 2026):
- `choice_tag` (science Q&A): the text inside `<answer>...</answer>`, stripped, equals the gold letter.
- `toolalpaca` (tool use): the multiset of actions matched by `Action:\\s*(\\w+)` equals the gold
  actions, and the dict merged from every JSON object after `Action Input:` equals the dict
  merged from the gold `Action_Input`s. The paper's regex takes each JSON object up to the
  first `}`, so an argument that is itself an object cannot parse and the call scores 0;
  `toolalpaca` keeps that behaviour so numbers match the paper. `toolalpaca_robust` parses
  each object with a real JSON decoder, so nested arguments are compared correctly.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

from selfdistill.errors import UserError

Grader = Callable[[str, dict], float]

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: Any) -> str:
    """Lower case, punctuation to spaces, runs of whitespace to one space."""
    return " ".join(str(text).lower().translate(_PUNCT).split())


def _answers(record: dict) -> list:
    """The gold answer(s): a list in `answer` means any of them is accepted."""
    if "answer" not in record or record["answer"] is None:
        raise UserError(f"{record.get('source') or 'record'}: this grader needs a gold 'answer' field.")
    answer = record["answer"]
    return list(answer) if isinstance(answer, (list, tuple)) else [answer]


def exact(output: str, record: dict) -> float:
    """The whole output equals a gold answer, after normalization."""
    got = normalize(output)
    return float(any(got == normalize(a) for a in _answers(record)))


def contains(output: str, record: dict) -> float:
    """A gold answer appears in the output as whole words, after normalization."""
    got = f" {normalize(output)} "
    return float(any(normalize(a) and f" {normalize(a)} " in got for a in _answers(record)))


def regex(output: str, record: dict) -> float:
    """`record["pattern"]` (or, without one, the gold answer used as a pattern) is found in the output."""
    pattern = record.get("pattern") or record.get("answer")
    if not isinstance(pattern, str):
        raise UserError(f"{record.get('source') or 'record'}: the regex grader needs a string 'pattern' (or 'answer').")
    try:
        return float(re.search(pattern, output, flags=re.IGNORECASE | re.DOTALL) is not None)
    except re.error as exc:
        raise UserError(f"{record.get('source') or 'record'}: bad regular expression {pattern!r} ({exc}).") from None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    """The last number written in the text (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(output: str, record: dict) -> float:
    """The last number in the output is within `tolerance` (absolute, default 1e-6) of a gold number.

    The last number is taken because worked answers end with the result ("... so 3 + 4 = 7").
    """
    got = last_number(output)
    if got is None:
        return 0.0
    tolerance = float(record.get("tolerance", 1e-6))
    for answer in _answers(record):
        gold = answer if isinstance(answer, (int, float)) else last_number(str(answer))
        if gold is not None and math.isclose(got, float(gold), rel_tol=0.0, abs_tol=tolerance):
            return 1.0
    return 0.0


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def choice_tag(output: str, record: dict) -> float:
    """The paper's science grader: `<answer>X</answer>`, stripped, equals the gold answer.

    With several tags the last one counts (the final answer); no tag scores 0.
    """
    found = _ANSWER_TAG.findall(output)
    if not found:
        return 0.0
    return float(found[-1].strip() == str(_answers(record)[0]).strip())


# --- tool use (ToolAlpaca) ---------------------------------------------------------------

_ACTION = re.compile(r"Action:\s*(\w+)")
_PAPER_INPUT = re.compile(r"Action Input:\s*(\{.*?\})", re.DOTALL)  # stops at the first "}"
_INPUT_MARK = re.compile(r"Action Input:\s*")


def _merge(objects: list) -> dict:
    merged: dict = {}
    for obj in objects:
        if isinstance(obj, dict):
            merged.update(obj)
    return merged


def _gold_calls(record: dict) -> tuple[Counter, dict]:
    gold = record.get("golden_answer")
    if gold is None:
        gold = record.get("answer")
    if isinstance(gold, str):
        try:
            gold = json.loads(gold)
        except json.JSONDecodeError:
            gold = None
    if not isinstance(gold, list) or not all(isinstance(g, dict) and "Action" in g for g in gold):
        raise UserError(
            f"{record.get('source') or 'record'}: the toolalpaca grader needs 'golden_answer', "
            'a list of {"Action": name, "Action_Input": json-string}.'
        )
    inputs = []
    for call in gold:
        value = call.get("Action_Input", "{}")
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError:
                value = {}
        inputs.append(value)
    return Counter(str(g["Action"]) for g in gold), _merge(inputs)


def _paper_inputs(output: str) -> list:
    objects = []
    for text in _PAPER_INPUT.findall(output):
        try:
            objects.append(json.loads(text))
        except json.JSONDecodeError:
            continue  # the paper's script skips inputs that do not parse
    return objects


def _robust_inputs(output: str) -> list:
    decoder = json.JSONDecoder()
    objects = []
    for mark in _INPUT_MARK.finditer(output):
        start = output.find("{", mark.end())
        # Only an object that starts right after the marker (whitespace aside) belongs to it.
        if start < 0 or output[mark.end() : start].strip():
            continue
        try:
            value, _ = decoder.raw_decode(output, start)
        except json.JSONDecodeError:
            continue
        objects.append(value)
    return objects


def _toolalpaca(output: str, record: dict, parse_inputs) -> float:
    gold_actions, gold_input = _gold_calls(record)
    actions = Counter(_ACTION.findall(output))
    return float(actions == gold_actions and _merge(parse_inputs(output)) == gold_input)


def toolalpaca(output: str, record: dict) -> float:
    """The paper's tool-use grader (reproduces its numbers; nested JSON arguments fail to parse)."""
    return _toolalpaca(output, record, _paper_inputs)


def toolalpaca_robust(output: str, record: dict) -> float:
    """Like `toolalpaca`, but each `Action Input` object is read by a JSON decoder (nested objects work)."""
    return _toolalpaca(output, record, _robust_inputs)


def toolalpaca_partial(output: str, record: dict) -> float:
    """Partial credit for tool calls: 1 for the right calls with the right arguments (as
    `toolalpaca_robust`), 0.5 for the right actions with wrong or unreadable arguments, else 0.

    It shows a model that learned which API to call before it learned to fill in the call.
    """
    gold_actions, gold_input = _gold_calls(record)
    if Counter(_ACTION.findall(output)) != gold_actions:
        return 0.0
    return 1.0 if _merge(_robust_inputs(output)) == gold_input else 0.5


# --- LLM as judge --------------------------------------------------------------------------

JUDGE_PROMPT = (
    "You are grading an answer to a question against a reference answer.\n\n"
    "Question:\n{question}\n\nReference answer:\n{answer}\n\nAnswer to grade:\n{output}\n\n"
    "Reply with exactly one word: CORRECT if the answer agrees with the reference, "
    "PARTIALLY_CORRECT if it is right only in part, or INCORRECT otherwise."
)


class JudgeGrader:
    """Asks an OpenAI-compatible chat endpoint for CORRECT / PARTIALLY_CORRECT / INCORRECT.

    Configure with arguments or the environment: SDFT_JUDGE_BASE_URL (e.g.
    http://localhost:8000/v1), SDFT_JUDGE_MODEL, SDFT_JUDGE_API_KEY (falls back to
    OPENAI_API_KEY). CORRECT scores 1, INCORRECT 0, PARTIALLY_CORRECT `partial_credit`
    (default 0.5). The judge is asked at temperature 0 so a rerun gives the same verdicts.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        partial_credit: float = 0.5,
        timeout: float = 60.0,
        prompt: str = JUDGE_PROMPT,
    ):
        self.base_url = (
            base_url or os.environ.get("SDFT_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or ""
        ).rstrip("/")
        self.model = model or os.environ.get("SDFT_JUDGE_MODEL")
        self.api_key = api_key or os.environ.get("SDFT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""
        if not self.base_url or not self.model:
            raise UserError(
                "The judge grader needs an endpoint: set SDFT_JUDGE_BASE_URL (an OpenAI-compatible URL ending in /v1) "
                "and SDFT_JUDGE_MODEL (and SDFT_JUDGE_API_KEY if the server needs one)."
            )
        self.partial_credit = partial_credit
        self.timeout = timeout
        self.prompt = prompt

    def verdict(self, output: str, record: dict) -> str:
        question = record.get("prompt")
        if isinstance(question, list):
            question = question[-1]["content"]
        content = self.prompt.format(question=question, answer=record.get("answer"), output=output)
        body = json.dumps(
            {"model": self.model, "temperature": 0, "messages": [{"role": "user", "content": content}]}
        ).encode()
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
            text = reply["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as exc:
            raise UserError(f"Judge endpoint {self.base_url}/chat/completions failed: {exc}") from None
        # PARTIALLY_CORRECT and INCORRECT both contain "CORRECT": test the longer words first.
        upper = text.upper().replace(" ", "_")
        for word in ("PARTIALLY_CORRECT", "INCORRECT", "CORRECT"):
            if word in upper:
                return word
        return "UNPARSED"

    def __call__(self, output: str, record: dict) -> float:
        return {"CORRECT": 1.0, "PARTIALLY_CORRECT": self.partial_credit}.get(self.verdict(output, record), 0.0)


GRADERS: dict[str, Grader] = {
    "exact": exact,
    "contains": contains,
    "regex": regex,
    "numeric": numeric,
    "choice_tag": choice_tag,
    "toolalpaca": toolalpaca,
    "toolalpaca_robust": toolalpaca_robust,
    "toolalpaca_partial": toolalpaca_partial,
}


# Where each grader reads the gold answer of a record: one of these fields, not null. Checked on every
# record before the model generates, so a file without them fails in a second, not after the run.
GOLD_FIELDS: dict[str, tuple[str, ...]] = {
    "exact": ("answer",),
    "contains": ("answer",),
    "regex": ("pattern", "answer"),
    "numeric": ("answer",),
    "choice_tag": ("answer",),
    "toolalpaca": ("golden_answer", "answer"),
    "toolalpaca_robust": ("golden_answer", "answer"),
    "toolalpaca_partial": ("golden_answer", "answer"),
    "judge": ("answer",),
}


def check_gold_fields(name: str, rows: list[tuple[str, dict]], how: str) -> None:
    """A UserError naming the grader, `how` it was chosen, its field and the first record without it.

    `rows` are (where, record as the grader sees it) pairs, e.g. ("data.jsonl line 3", {...})."""
    fields = GOLD_FIELDS.get(name, ())
    lacking = [where for where, row in rows if fields and all(row.get(f) is None for f in fields)]
    if not lacking:
        return
    wanted = " or ".join(repr(f) for f in fields)
    count = f" ({len(lacking)} of {len(rows)} records have none)" if len(lacking) > 1 else ""
    raise UserError(
        f"{lacking[0]}: no {wanted} field, which the grader {name!r} ({how}) reads the gold answer from{count}. "
        "Add it, or choose another grader with --grader."
    )


def names() -> list[str]:
    return sorted([*GRADERS, "judge"])


def get(name: str, **options) -> Grader:
    """The grader called `name`; `judge` is built from `options` and the environment."""
    if name == "judge":
        return JudgeGrader(**options)
    if name not in GRADERS:
        raise UserError(f"Unknown grader {name!r}; choose one of {', '.join(names())}.")
    return GRADERS[name]
