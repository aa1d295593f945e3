"""Shared helpers of the reliability suite: a tiny training run, run in a forked child that may be killed.

The child is forked from the test process (torch and transformers already imported), which
makes each killed-and-resumed run cost a fraction of a second instead of a fresh interpreter.
It is still a separate process: SIGKILL ends it exactly where a crash would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from toy import KEYS, VALUES, toy_records

from selfdistill.config import load_config
from selfdistill.errors import RunFailed, RunStopped, UserError
from selfdistill.models.tiny import tiny_model, tiny_tokenizer
from selfdistill.training.faults import ENV


def run_config(out: Path, method: str = "sdft", lora: bool = False, **train):
    settings = {
        "output_dir": str(out),
        "batch_size": 4,
        "micro_batch_size": 2,
        "lr": 1e-3,
        "warmup_ratio": 0.25,
        "max_steps": 6,
        "save_every": 2,
        "keep_last": 2,
    }
    settings.update(train)
    model = {"precision": "fp32"}
    if lora:
        model["lora"] = {"enabled": True, "rank": 4, "alpha": 8}
    return load_config(
        overrides={
            "method": method,
            "model": model,
            "data": {"teacher_template": "plain"},
            "rollout": {"max_new_tokens": 4},
            "loss": {"skip_first_tokens": 0},
            "teacher": {"ema_rate": 0.1},
            "train": settings,
        }
    )


def tiny_setup():
    tok = tiny_tokenizer(KEYS + VALUES)
    return tiny_model(tok, seed=0), tok


def train_tiny(out: Path, resume: bool = False, overwrite: bool = False, **settings):
    """What a user's process does: build the model, then train (resuming from the run directory)."""
    from selfdistill.training.loop import train

    model, tok = tiny_setup()
    return train(
        run_config(out, **settings),
        records=toy_records(),
        model=model,
        tokenizer=tok,
        resume=resume,
        overwrite=overwrite,
    )


@dataclass
class Outcome:
    killed_by: int | None  # signal number that ended the child, if any
    exit_code: int | None
    message: str  # the UserError's message (exit 2), or a traceback (exit 3)
    log: str


def run_child(fn, *, fault: str | None = None, work: Path, timeout: float = 120.0, on_start=None) -> Outcome:
    """Run fn() in a forked child with SELFDISTILL_FAULT=fault; exit 0 ok, else the exception's exit status
    (UserError 2, RunFailed 1, RunStopped 128 + signal), 3 any other error."""
    work.mkdir(parents=True, exist_ok=True)
    message_file, log_file = work / "child.message", work / "child.log"
    for f in (message_file, log_file):
        f.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            os.environ.pop(ENV, None)
            if fault:
                os.environ[ENV] = fault
            handler = logging.FileHandler(log_file)
            logging.getLogger().addHandler(handler)
            logging.getLogger().setLevel(logging.INFO)
            fn()
            code = 0
        except (UserError, RunFailed, RunStopped) as exc:  # the exit status the command line gives
            message_file.write_text(str(exc))
            code = exc.exit_code
        except BaseException:  # noqa: BLE001
            message_file.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    if on_start is not None:
        on_start(pid)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {fault or ''} ran over {timeout}s")
        time.sleep(0.02)
    killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    read = lambda f: f.read_text() if f.is_file() else ""  # noqa: E731
    return Outcome(killed, code, read(message_file), read(log_file))


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (directories as 'dir'), to prove nothing changed."""
    root = Path(root)
    found = {}
    if not root.exists():
        return found
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found
