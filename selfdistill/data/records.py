"""Training and evaluation records, read from JSONL files or Hugging Face datasets.

A record is one example: the `prompt` the student sees (a string, or chat messages ending with
a user turn), the expert `demonstration`, optional teacher-only `context` (e.g. a source
document), an optional gold `answer` for grading, and any other columns kept as `meta`.
Every problem names the file, the line (1-based) and the field; a file that cannot be read also
names where its path was given (`origin`, e.g. "data.train (or --data)" or "--task"), so the
message points at the option or key the user actually wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError

FIELDS = ("prompt", "demonstration", "context", "answer")


@dataclass
class Record:
    prompt: str | list[dict]
    demonstration: str
    context: str | None = None
    answer: Any = None
    meta: dict = field(default_factory=dict)
    source: str = ""  # "file.jsonl line 12", for messages

    @property
    def question(self) -> str:
        """The text of the last user turn."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]

    def to_dict(self) -> dict:
        row = {"prompt": self.prompt, "demonstration": self.demonstration}
        if self.context is not None:
            row["context"] = self.context
        if self.answer is not None:
            row["answer"] = self.answer
        row.update(self.meta)
        return row


def _where(source: str, fieldname: str) -> str:
    return f"{source}, field {fieldname!r}"


def _validate_prompt(value: Any, source: str) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(
                f"{_where(source, 'prompt')}: the prompt is empty. Write the question, or remove the record."
            )
        return value
    if isinstance(value, list):
        if not value:
            raise UserError(
                f"{_where(source, 'prompt')}: the message list is empty. End it with the user turn to answer."
            )
        for i, msg in enumerate(value):
            if (
                not isinstance(msg, dict)
                or not isinstance(msg.get("role"), str)
                or not isinstance(msg.get("content"), str)
            ):
                raise UserError(
                    f"{_where(source, 'prompt')}: message {i} must be an object with string 'role' and 'content'."
                )
        if value[-1]["role"] != "user":
            raise UserError(
                f"{_where(source, 'prompt')}: the chat prompt ends with a {value[-1]['role']!r} turn; "
                "it must end with the user turn the model answers (put the expert answer in 'demonstration')."
            )
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(
        f"{_where(source, 'prompt')}: expected a string or a list of chat messages, got {type(value).__name__}. "
        'Write the prompt as a JSON string or as [{"role": "user", "content": ...}].'
    )


def record_from_row(row: Any, source: str, columns: dict | None = None, require_demonstration: bool = True) -> Record:
    """Validate one row (after the column mapping) into a Record."""
    if not isinstance(row, dict):
        raise UserError(
            f"{source}: expected a JSON object, got {type(row).__name__}. "
            'Write each record as one object, e.g. {"prompt": ..., "demonstration": ...}.'
        )
    columns = dict(columns or {})
    for ours in columns:
        if ours not in FIELDS:
            raise UserError(f"data.columns: unknown field {ours!r}; map one of {', '.join(FIELDS)} to a column.")
    take = {name: columns.get(name, name) for name in FIELDS}
    if take["prompt"] not in row:
        raise UserError(
            f"{_where(source, take['prompt'])}: missing (the prompt; map another column with data.columns)."
        )
    prompt = _validate_prompt(row[take["prompt"]], source)
    demo = row.get(take["demonstration"])
    if demo is None:
        if require_demonstration:
            raise UserError(
                f"{_where(source, take['demonstration'])}: missing (the expert demonstration). "
                "Add it to every record, or map another column with data.columns."
            )
        demo = ""
    if not isinstance(demo, str):
        raise UserError(
            f"{_where(source, take['demonstration'])}: expected a string, got {type(demo).__name__}. "
            "Write the demonstration as a JSON string."
        )
    if require_demonstration and not demo.strip():
        raise UserError(
            f"{_where(source, take['demonstration'])}: the demonstration is empty. "
            "Give every record an expert answer, or remove the record."
        )
    context = row.get(take["context"])
    if context is not None and not isinstance(context, str):
        raise UserError(
            f"{_where(source, take['context'])}: expected a string, got {type(context).__name__}. "
            "Write the context as a JSON string, or leave it out."
        )
    used = set(take.values())
    meta = {k: v for k, v in row.items() if k not in used}
    return Record(
        prompt=prompt, demonstration=demo, context=context, answer=row.get(take["answer"]), meta=meta, source=source
    )


def _check(origin: str | None, what: str = "path") -> str:
    """The end of a message about a source: where to fix it, when we know where it was given."""
    return f" Check the {what} given as {origin}." if origin else f" Check the {what}."


def records_from_rows(
    rows: Iterable[Any],
    name: str,
    columns: dict | None = None,
    require_demonstration: bool = True,
    origin: str | None = None,
) -> list[Record]:
    records = [
        record_from_row(row, f"{name} row {i + 1}", columns, require_demonstration) for i, row in enumerate(rows)
    ]
    if not records:
        point = f" Point {origin} at a dataset with records." if origin else ""
        raise UserError(f"{name}: no records (the dataset is empty).{point}")
    return records


def read_jsonl(path: Path, origin: str | None = None) -> list[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line, with clear errors; `origin` names where the
    path was given (an option or config key), for the message when the file cannot be read."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found.{_check(origin)}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a .jsonl file.{_check(origin)}") from None
    rows = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path} line {number}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8."
            ) from None
        try:
            rows.append((number, json.loads(text)))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path} line {number}, column {exc.colno}: malformed JSON ({exc.msg}). "
                "Fix that line: each line must be one complete JSON object."
            ) from None
    return rows


def builtin_path(name: str) -> Path:
    path = resources.files("selfdistill") / "resources" / f"{name}.jsonl"
    if not path.is_file():
        available = sorted(
            p.name[:-6] for p in (resources.files("selfdistill") / "resources").iterdir() if p.name.endswith(".jsonl")
        )
        raise UserError(f"Unknown built-in dataset {name!r}; available: {', '.join(available)}.")
    return Path(str(path))


def load_records(
    source: str | Path,
    columns: dict | None = None,
    split: str = "train",
    require_demonstration: bool = True,
    origin: str | None = None,
) -> list[Record]:
    """Records from a .jsonl file, a `save_to_disk` directory, `hf:NAME` (load_dataset) or `builtin:NAME`.

    `origin` says where `source` was given (e.g. "data.train (or --data)", "--task", "stream[1].train"):
    the caller knows, and a message about a missing or empty source names it."""
    text = str(source)
    if text.startswith("builtin:"):
        path = builtin_path(text.split(":", 1)[1])
    elif text.startswith("hf:"):
        import datasets

        try:
            ds = datasets.load_dataset(text[3:], split=split)
        except Exception as exc:  # noqa: BLE001 - any loader failure is the user's source
            raise UserError(f"{text}: could not load the dataset ({exc}).{_check(origin, 'name')}") from None
        return records_from_rows(ds, text, columns, require_demonstration, origin)
    else:
        path = Path(text)
        if path.is_dir():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as exc:  # noqa: BLE001
                point = f"Point {origin} at" if origin else "Give"
                raise UserError(
                    f"{path}: not a saved Hugging Face dataset ({exc}). {point} a .jsonl file or a directory "
                    "written by Dataset.save_to_disk."
                ) from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{path}: no split {split!r}; it has {', '.join(ds)}.")
                ds = ds[split]
            return records_from_rows(ds, str(path), columns, require_demonstration, origin)
    rows = read_jsonl(path, origin)
    if not rows:
        raise UserError(f"{path}: no records (the file is empty). Add records, one JSON object per line.")
    return [record_from_row(row, f"{path} line {number}", columns, require_demonstration) for number, row in rows]


def records_from(records: Any, argument: str, require_demonstration: bool = True) -> list[Record] | None:
    """Records from a file/dataset source, a list of mappings, or Records (None stays None); `argument`
    ("train(records=...)") is named by the messages."""
    if records is None:
        return None
    if isinstance(records, (str, Path)):
        return load_records(records, require_demonstration=require_demonstration, origin=argument)
    rows = list(records)
    if not rows:
        raise UserError(f"{argument}: no records (an empty list). Give at least one record.")
    if all(isinstance(r, Record) for r in rows):
        return rows
    return records_from_rows(rows, argument, require_demonstration=require_demonstration)
