"""Every `sdft` command line written in the README and docs/ is one the command accepts as written: the
command exists, every option is known, every value has the option's type and no argument is left over.
(A code example that does not parse is the first thing a newcomer copies and the first thing that fails.)
The Python examples are run elsewhere (test_api.py: the README's; test_methods.py: docs/adding-a-method.md)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from selfdistill.cli import app
from selfdistill.models.tiny import save_tiny

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every line inside a shell code block, continuations joined."""
    lines, fence, pending = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence is None or fence not in SHELL_FENCES:
            continue
        if pending is not None:
            start, before = pending
            line, number = before + " " + stripped, start
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        pending = None
        lines.append((number, line))
    return lines


def _names_only(words: list[str]) -> bool:
    """True for `sdft data ceiling`: command names and nothing else (prose naming a command)."""
    command = typer.main.get_command(app)
    for word in words:
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            return False
    return True


def _inline_commands(text: str) -> list[tuple[int, str]]:
    """Inline code spans that are a whole `sdft ...` command to copy (`sdft train config.yaml --set ...`), not
    prose naming a command (`sdft continual`) or a sketch with placeholders (`--workers N`, `RUN_DIR`, `...`)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for span in re.findall(r"`(sdft [^`]+)`", line):
            words = span.split()[1:]
            sketch = "..." in span or any(re.fullmatch(r"[A-Z][A-Z_]*", word) for word in words)
            if not sketch and not _names_only(words):
                found.append((number, span))
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `sdft`) for every documented `sdft` command line."""
    commands = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for number, line in _code_lines(text) + _inline_commands(text):
            words = shlex.split(line, comments=True)
            while words and ("=" in words[0] and not words[0].startswith("-")):  # VAR=value prefixes
                words = words[1:]
            if words[:1] == ["torchrun"]:  # torchrun ... --no-python sdft train ...
                words = words[words.index("sdft") :] if "sdft" in words else []
            if words[:1] in (["sdft"], [".venv/bin/sdft"]):
                commands.append((f"{document.relative_to(REPO)}:{number}", words[1:]))
    return commands


# The exception a command raises for arguments it does not accept. Typer may bundle its own copy of click,
# so the class is taken from typer's public BadParameter (a subclass of it) rather than imported from click.
UsageError = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


def _without_actions(command) -> None:
    """Make every sub-command's action a no-op: parsing, type conversion and checks of the values stay."""
    for sub in getattr(command, "commands", {}).values():
        _without_actions(sub)
    if not getattr(command, "commands", None):
        command.callback = lambda *args, **kwargs: None


def parse(argv: list[str]) -> None:
    """Parse `sdft ARGV` as the command would, down to the sub-command, without running it."""
    command = typer.main.get_command(app)
    _without_actions(command)
    command.main(list(argv), prog_name="sdft", standalone_mode=False)


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check():
    documents = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "docs/tasks.md", "docs/evaluation.md", "docs/vllm.md", "docs/diagnose.md"} <= documents
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{w} {' '.join(a)[:60]}" for w, a in COMMANDS])
def test_documented_command_parses(where, argv):
    try:
        parse(argv)
    except UsageError as exc:
        pytest.fail(f"{where}: `sdft {' '.join(argv)}`: {exc.format_message()}")


def test_a_command_that_does_not_parse_is_caught():
    with pytest.raises(UsageError, match="unexpected extra argument"):
        parse(["train", "config.yaml", "rollout.engine=vllm"])
    with pytest.raises(UsageError, match="No such option"):
        parse(["eval", "--modle", "x"])
    with pytest.raises(UsageError, match="No such command"):
        parse(["trian"])


def test_the_readme_first_steps_run_as_written(tmp_path):
    """The README's first CPU session, line by line, with a tiny model standing in for the embedded one (it
    takes the embedded model's place in the cache, where `smollm2-135m` is read from)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## First steps on a CPU", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("source ")]
    assert [line.split()[:2] for line in lines] == [["sdft", "data"], ["sdft", "train"], ["sdft", "eval"]]
    cache = tmp_path / "cache"
    save_tiny(cache / "models" / "smollm2-135m")
    env = {**os.environ, "SELFDISTILL_CACHE": str(cache), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for line in lines:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"`{line}` failed:\n{done.stderr[-2000:]}"
    run = tmp_path / "runs" / "first"
    assert (run / "final" / "model.safetensors").is_file()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["lr"] > 0 for s in steps)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["task"]["count"] == 10 and results["task"]["grader"] == "contains"
