"""Loaders that turn public datasets into records, from their upstream row formats.

Formats:
- `paper-tooluse`: the SDFT paper's tool-use data (ToolAlpaca): `prompt`, `golden_answer` (a list
  of {"Action", "Action_Input"}), optional `golden_response`. The demonstration is the golden
  response, or is written from the golden answer when that is absent.
- `paper-science`: the paper's science data: a chat list in `messages` or `prompt`, and
  `output_text` or an `answer` letter. A chat list ending with an assistant turn gives the
  demonstration itself.
- `huatuo`: HuatuoGPT-o1 medical data: `Question`, `Complex_CoT`, `Response`.
- `messages`: any chat data with a `messages` list ending in the assistant's answer.
- `records`: our own fields (prompt, demonstration, context, answer) with a column mapping.
- `auto`: picks one of the above from the first row's columns.

Sources: a .jsonl file, a `save_to_disk` directory, `hf:NAME` (datasets.load_dataset) or
`task:NAME` (a built-in task, split train/eval/ood, seed 0, default size).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfdistill.data.records import Record, load_records, read_jsonl, record_from_row
from selfdistill.errors import UserError

FORMATS = ("auto", "records", "paper-tooluse", "paper-science", "huatuo", "messages")


def _field(row: dict, name: str, where: str, kind: type | tuple = str) -> Any:
    if name not in row or row[name] is None:
        raise UserError(f"{where}, field {name!r}: missing.")
    if not isinstance(row[name], kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UserError(f"{where}, field {name!r}: expected {names}, got {type(row[name]).__name__}.")
    return row[name]


def _rest(row: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in used}


def demonstration_from_golden_answer(golden: list, where: str = "golden_answer") -> str:
    """'Action: X / Action Input: {...}' lines for each gold call (the paper's answer format)."""
    lines = []
    for i, call in enumerate(golden):
        if not isinstance(call, dict) or "Action" not in call:
            raise UserError(f"{where}, call {i}: expected an object with 'Action' and 'Action_Input'.")
        arguments = call.get("Action_Input", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        lines.append(f"Action: {call['Action']}\nAction Input: {arguments}")
    return "\n".join(lines)


def paper_tooluse_record(row: dict, where: str) -> Record:
    prompt = _field(row, "prompt", where)
    golden = _field(row, "golden_answer", where, list)
    demo = row.get("golden_response") or demonstration_from_golden_answer(golden, f"{where}, field 'golden_answer'")
    meta = _rest(row, ("prompt", "golden_response"))  # golden_answer stays: the toolalpaca grader reads it
    return record_from_row({"prompt": prompt, "demonstration": demo, **meta}, where)


def _split_chat(messages: list, where: str, name: str) -> tuple[list, str | None]:
    """(messages up to the last user turn, the final assistant turn's text or None)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}, field {name!r}: expected a non-empty list of chat messages.")
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        return messages[:-1], last.get("content")
    return messages, None


def paper_science_record(row: dict, where: str) -> Record:
    name = "messages" if "messages" in row else "prompt"
    chat, reply = _split_chat(_field(row, name, where, list), where, name)
    answer = row.get("answer")
    demo = row.get("output_text") or reply
    if not demo:
        if not isinstance(answer, str) or not answer.strip():
            raise UserError(
                f"{where}: no demonstration: give 'output_text', a final assistant message, or an 'answer' letter."
            )
        # No worked reasoning in the data: the demonstration carries the format and the letter.
        demo = (
            f"<reasoning>\nThe correct option is {answer.strip()}.\n</reasoning>\n<answer>\n{answer.strip()}\n</answer>"
        )
    meta = _rest(row, (name, "output_text", "answer"))
    return record_from_row({"prompt": chat, "demonstration": demo, "answer": answer, **meta}, where)


def huatuo_record(row: dict, where: str) -> Record:
    question = _field(row, "Question", where)
    thinking = _field(row, "Complex_CoT", where)
    response = _field(row, "Response", where)
    # HuatuoGPT-o1's own training layout: the reasoning, then the final response.
    demo = f"## Thinking\n\n{thinking}\n\n## Final Response\n\n{response}"
    meta = _rest(row, ("Question", "Complex_CoT"))  # Response stays, as the reference answer
    return record_from_row({"prompt": question, "demonstration": demo, **meta}, where)


def messages_record(row: dict, where: str) -> Record:
    chat, reply = _split_chat(_field(row, "messages", where, list), where, "messages")
    if not reply:
        raise UserError(
            f"{where}, field 'messages': the last message must be the assistant's answer (the demonstration)."
        )
    return record_from_row({"prompt": chat, "demonstration": reply, **_rest(row, ("messages",))}, where)


CONVERTERS: dict[str, Callable[[dict, str], Record]] = {
    "paper-tooluse": paper_tooluse_record,
    "paper-science": paper_science_record,
    "huatuo": huatuo_record,
    "messages": messages_record,
}


def detect_format(row: Any) -> str:
    if not isinstance(row, dict):
        return "records"
    if "golden_answer" in row:
        return "paper-tooluse"
    if "Complex_CoT" in row or {"Question", "Response"} <= set(row):
        return "huatuo"
    chat = row.get("messages", row.get("prompt"))
    if isinstance(chat, list) and "demonstration" not in row:
        return "paper-science" if ("output_text" in row or "answer" in row) else "messages"
    return "records"


def read_rows(source: str, split: str = "train") -> list[tuple[str, Any]]:
    """(where, row) for every row of a .jsonl file, a save_to_disk directory or hf:NAME."""
    if source.startswith("hf:"):
        import datasets

        try:
            ds = datasets.load_dataset(source[3:], split=split)
        except Exception as exc:  # noqa: BLE001 - any loader failure is the user's source
            raise UserError(f"{source}: could not load the dataset ({exc}).") from None
        return [(f"{source} row {i + 1}", row) for i, row in enumerate(ds)]
    path = Path(source)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path}: not a saved Hugging Face dataset ({exc}).") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{path}: no split {split!r}; it has {', '.join(ds)}.")
            ds = ds[split]
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(ds)]
    return [(f"{path} line {number}", row) for number, row in read_jsonl(path)]


def load_dataset_records(
    source: str | Path,
    format: str = "auto",
    columns: dict | None = None,
    split: str = "train",
    limit: int | None = None,
) -> list[Record]:
    """Records from any supported source and row format (see the module docstring)."""
    source = str(source)
    if format not in FORMATS:
        raise UserError(f"Unknown data format {format!r}; use one of {', '.join(FORMATS)}.")
    if source.startswith("task:"):
        from selfdistill.tasks import make_task

        splits = make_task(source[5:]).splits()
        if split not in splits:
            raise UserError(f"{source}: no split {split!r}; it has {', '.join(splits)}.")
        records = splits[split]
    elif format == "records" or columns:
        if format not in ("records", "auto"):
            raise UserError(f"A column mapping applies to the 'records' format only, not {format!r}.")
        records = load_records(source, columns, split)
    else:
        rows = read_rows(source, split)
        if not rows:
            raise UserError(f"{source}: no records (the dataset is empty).")
        chosen = detect_format(rows[0][1]) if format == "auto" else format
        if chosen == "records":
            records = [record_from_row(row, where) for where, row in rows]
        else:
            convert = CONVERTERS[chosen]
            records = []
            for where, row in rows:
                if not isinstance(row, dict):
                    raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}.")
                records.append(convert(row, where))
    return records[:limit] if limit else records
