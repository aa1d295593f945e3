"""Writing results so that a crash never leaves a half-written file behind.

Every file the package writes for a user (run settings, metrics, results, reports, caches) goes
through `write_atomic`: the content lands in a temporary file beside the target, is flushed to
disk (fsync), then renamed over the target, and the directory entry is flushed too. A kill at any
moment leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write `content` to `path` atomically (temp file + fsync + rename); parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: str | Path, value: Any) -> Path:
    """`value` as indented UTF-8 JSON, written atomically."""
    return write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line, written atomically."""
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
