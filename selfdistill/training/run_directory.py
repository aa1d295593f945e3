"""The run directory: what identifies a run, refusing one that would be misused, clear write errors.

Everything here that checks reads only: a run's inputs and its directory are checked before its
first write, so a refusal leaves the directory as it was.

`OUTPUT_DIR/run.json` records the run's settings; a directory holding a different run is never
reused silently. A failed write (full disk, no permission) becomes one `RunFailed` message that
names what could not be written and which checkpoint is intact. Under several processes
`check_shared_output_dir` first checks that they all see one and the same directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from selfdistill.config import Config
from selfdistill.errors import RunFailed, UserError
from selfdistill.files import write_atomic
from selfdistill.models.distributed import Processes
from selfdistill.registry import METHOD_INFO
from selfdistill.training.checkpoint import inside, latest_checkpoint

log = logging.getLogger(__name__)


def _fingerprint(cfg: Config) -> dict:
    """What identifies a run: an output directory holding a different run is not reused silently."""
    data = cfg.to_dict()
    data["train"] = {
        k: v for k, v in data["train"].items() if k not in ("output_dir", "save_every", "keep_last", "report_to")
    }
    return data


def _without_other_methods(fingerprint) -> dict | None:
    """A recorded fingerprint without sections that only other methods have: run.json files written
    before each method had its own settings class recorded every method's sections."""
    if not isinstance(fingerprint, dict):
        return None
    method = fingerprint.get("method")
    own = set(METHOD_INFO[method].own_sections) if method in METHOD_INFO else set()
    others = {s for info in METHOD_INFO.values() for s in info.own_sections} - own
    return {key: value for key, value in fingerprint.items() if key not in others}


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
        if not isinstance(previous, dict) or _without_other_methods(previous.get("config")) != _fingerprint(cfg):
            raise UserError(
                f"{out} already holds a different run (its run.json has other settings). "
                "Choose another train.output_dir, or pass --overwrite to replace it."
            )
        if not resume and latest_checkpoint(out) is not None:
            raise UserError(
                f"{out} already holds checkpoints of this run. Pass --resume to continue it, or --overwrite to start again."
            )
    return out


def check_resume(cfg: Config, resume: bool, overwrite: bool) -> None:
    """--resume with nothing to resume: a new or empty directory, or a run stopped before its first
    checkpoint, starts from step 0 with a warning (so a job script may always pass --resume); a
    directory holding files but no run of `sdft train` is refused, as a mistaken train.output_dir."""
    if not resume or overwrite:  # --overwrite starts again whatever is there
        return
    out = Path(cfg.train.output_dir)
    if latest_checkpoint(out) is not None or (out.exists() and not out.is_dir()):  # (a file: refused later)
        return
    if out.is_dir() and not (out / "run.json").is_file() and any(out.iterdir()):
        raise UserError(
            f"--resume: {out} holds no run to continue (no run.json; it was not written by `sdft train`). "
            "Check train.output_dir (-o), or leave out --resume to start a new run there."
        )
    if os.environ.get("RANK", "0") == "0":  # under torchrun the first process speaks for all
        log.warning("--resume: no checkpoint in %s; starting from step 0.", out / "checkpoints")


PROBE_PREFIX = ".selfdistill-probe-"


def _probe_base(out: Path, up: int) -> Path:
    """`out` without its last `up` parts (relative paths stay relative: each process resolves them itself)."""
    return Path(*out.parts[: len(out.parts) - up])


def check_shared_output_dir(cfg: Config, procs: Processes) -> None:
    """Under several processes, refuse a train.output_dir that is not one directory seen by all of them.

    Every process writes its shards of each checkpoint into one temporary directory there, which
    process 0 renames into place: on a disk local to each machine the checkpoint would miss the
    other machines' shards. The probe: process 0 makes `.selfdistill-probe-<random>` in the output
    directory (or its nearest existing parent, so nothing else is created), every process that
    sees it writes one empty file named by its rank, and every process looks up all of them by
    name (a directory listing may be cached on NFS). Process 0 then removes the probe; processes
    that did not see it wrote nothing. All processes learn every result and raise the same error.
    Cost: three small collectives and one empty file per process. Collective: every process calls it.
    """
    if not procs.sharded or procs.world == 1:
        return
    import secrets
    import shutil
    import socket

    import torch.distributed as dist

    out = Path(cfg.train.output_dir)
    plan: list = [None]
    probe = None
    if procs.is_main:
        up = next((up for up in range(len(out.parts) + 1) if _probe_base(out, up).is_dir()), None)
        nonce = secrets.token_hex(8)
        try:
            if up is not None:
                probe = _probe_base(out, up) / f"{PROBE_PREFIX}{nonce}"
                probe.mkdir()
                plan = [(up, nonce)]
        except OSError:
            probe = None  # not writable: the run directory's own first write reports that, with its reason
    try:
        dist.broadcast_object_list(plan, src=0)
        if plan[0] is None:
            return
        up, nonce = plan[0]
        here = _probe_base(out, up) / f"{PROBE_PREFIX}{nonce}"
        try:
            if here.is_dir():
                (here / f"rank-{procs.rank:05d}").open("x").close()
        except OSError:
            pass  # then this process sees at most the others' files, and the check below fails
        dist.barrier()
        seen = sum(_exists(here / f"rank-{r:05d}") for r in range(procs.world))
        reports: list = [None] * procs.world
        dist.all_gather_object(reports, (socket.gethostname(), seen))
    finally:
        if probe is not None:
            shutil.rmtree(probe, ignore_errors=True)
    if all(seen == procs.world for _, seen in reports):
        return
    raise UserError(_not_shared_message(out, reports, procs.world))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _not_shared_message(out: Path, reports: list, world: int) -> str:
    groups: dict[tuple[str, int], list[int]] = {}
    for rank, (host, seen) in enumerate(reports):
        if seen != world:
            groups.setdefault((host, seen), []).append(rank)
    what = "; ".join(
        f"process {ranks[0]} (on {host}) found {seen} of {world}"
        if len(ranks) == 1
        else f"processes {', '.join(map(str, ranks))} (on {host}) found {seen} of {world} each"
        for (host, seen), ranks in groups.items()
    )
    relative = (
        ""
        if out.is_absolute()
        else " (It is a relative path, which each process resolves from its own working directory.)"
    )
    return (
        f"train.output_dir {out} is not one directory shared by all {world} processes: of the probe files "
        f"each process wrote there, {what}. Every process writes its part of each checkpoint into "
        "train.output_dir, so it must be a path on a shared filesystem (NFS, Lustre, ...) that every node "
        f"mounts at the same place: set train.output_dir to such a path.{relative}"
    )


def prepare_output_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Check the output directory, then (with --overwrite) clear the previous run and record this one."""
    out = check_output_dir(cfg, resume, overwrite)
    with writing(out, "the run directory"):
        if overwrite and out.exists():
            import shutil

            # Everything a run writes (offline_targets.jsonl: offline distillation's fixed teacher answers;
            # replay.jsonl: sft_replay's answers of the starting model).
            for child in ("checkpoints", "final", "metrics.jsonl", "run.json", "offline_targets.jsonl", "replay.jsonl"):
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
