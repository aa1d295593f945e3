"""The run directory: what identifies a run, refusing one that would be misused, clear write errors.

`OUTPUT_DIR/run.json` records the run's settings; a directory holding a different run is never
reused silently. A failed write (full disk, no permission) becomes one `RunFailed` message that
names what could not be written and which checkpoint is intact.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.checkpoint import inside, latest_checkpoint
from selfdistill.config import Config
from selfdistill.errors import RunFailed, UserError
from selfdistill.files import write_atomic


def _fingerprint(cfg: Config) -> dict:
    """What identifies a run: an output directory holding a different run is not reused silently."""
    data = cfg.to_dict()
    data["train"] = {
        k: v for k, v in data["train"].items() if k not in ("output_dir", "save_every", "keep_last", "report_to")
    }
    return data


def check_output_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Refuse an output directory that would be misused; reads only, so a refusal changes nothing."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir {out} is a file, not a directory. Choose another train.output_dir.")
    run_file = out / "run.json"
    if run_file.is_file() and not overwrite:
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(
                f"{run_file} is damaged ({exc}), so this directory's run cannot be identified. "
                "Choose another train.output_dir, or pass --overwrite to start a new run there."
            ) from None
        if not isinstance(previous, dict) or previous.get("config") != _fingerprint(cfg):
            raise UserError(
                f"{out} already holds a different run (its run.json has other settings). "
                "Choose another train.output_dir, or pass --overwrite to replace it."
            )
        if not resume and latest_checkpoint(out) is not None:
            raise UserError(
                f"{out} already holds checkpoints of this run. Pass --resume to continue it, or --overwrite to start again."
            )
    return out


def prepare_output_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Check the output directory, then (with --overwrite) clear the previous run and record this one."""
    out = check_output_dir(cfg, resume, overwrite)
    with writing(out, "the run directory"):
        if overwrite and out.exists():
            import shutil

            # Everything a run writes (offline_targets.jsonl: offline distillation's fixed teacher answers).
            for child in ("checkpoints", "final", "metrics.jsonl", "run.json", "offline_targets.jsonl"):
                target = inside(out, child)
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(
            out / "run.json", json.dumps({"config": _fingerprint(cfg), "full_config": cfg.to_dict()}, indent=2)
        )
    return out


class writing:
    """Turn a failed write (full disk, no permission) into one clear message; what was written stays."""

    def __init__(self, out: Path, what: str):
        self.out, self.what = Path(out), what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or not issubclass(kind, OSError):
            return False
        last = latest_checkpoint(self.out) if self.out.is_dir() else None
        kept = (
            f"The last complete checkpoint, {last}, is intact" if last else "No checkpoint of this run was written yet"
        )
        raise RunFailed(
            f"Could not write {self.what} in {self.out}: {exc.strerror or exc}"
            f"{' (' + exc.filename + ')' if getattr(exc, 'filename', None) else ''}. {kept}; "
            "free disk space or fix the permissions, then run the same command with --resume."
        ) from None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; a line cut short by a crash mid-append is dropped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows
