"""The learner's HTML report, from a hand-written `Learner.status()`: 3 rounds over 2 tasks, round 2 rejected,
one task named by a user who tried to inject a script."""

from __future__ import annotations

import re
from html import escape

from selfdistill.learner.report import write_learner_report

EVIL = "<script>alert(1)</script>"
TASKS = ["arith", EVIL]


def _side(scores: list[float], probes: float, base_drift: float, drift: float | None = None) -> dict:
    side = {
        "tasks": {t: {"score": s, "count": 20, "loglik": -1.5} for t, s in zip(TASKS, scores)},
        "probes": probes,
        "drift_from_base": base_drift,
    }
    if drift is not None:
        side["drift_from_current"] = drift
    return side


def _check(name: str, value: float, limit: float, rule: str = "<=") -> dict:
    passed = value <= limit if rule == "<=" else value >= limit
    return {"name": name, "value": value, "limit": limit, "passed": passed, "rule": rule}


def _round(number: int, parent: int, outcome: str, checks: list[dict], current: dict, candidate: dict) -> dict:
    failed = [c for c in checks if not c["passed"]]
    summary = f"promoted: all {len(checks)} checks passed" if not failed else f"rejected: {failed[0]['name']} FAILED"
    return {
        "number": number,
        "parent_version": parent,
        "stage": "done",
        "outcome": outcome,
        "data_digest": f"{number:064x}",
        "decision": {"promote": not failed, "summary": summary, "checks": checks, "reasons": []},
        "metrics": {"current": current, "candidate": candidate},
        "started_at": "2025-01-01T00:00:00",
        "finished_at": "2025-01-01T01:00:00",
    }


def _version(number: int, parent: int | None, round_: int | None, kind: str) -> dict:
    return {
        "number": number,
        "parent": parent,
        "round": round_,
        "kind": kind,
        "path": f"versions/v{number}",
        "data_digests": [],
        "created_at": "2025-01-01T00:00:00",
    }


def _status() -> dict:
    rounds = [
        _round(
            1,
            0,
            "promoted",
            [_check("new task arith: score gain", 0.5, 0.0, ">="), _check("probes: score drop", 0.01, 0.05)],
            _side([0.10, 0.20], 0.60, 0.0),
            _side([0.60, 0.25], 0.59, 0.012, 0.012),
        ),
        _round(
            2,
            1,
            "rejected",
            [_check(f"new task {EVIL}: score gain", 0.30, 0.0, ">="), _check("task arith: score drop", 0.35, 0.05)],
            _side([0.60, 0.25], 0.59, 0.012),
            _side([0.25, 0.55], 0.50, 0.090, 0.081),
        ),
        _round(
            3,
            1,
            "promoted",
            [_check(f"new task {EVIL}: score gain", 0.20, 0.0, ">="), _check("task arith: score drop", 0.02, 0.05)],
            _side([0.60, 0.25], 0.59, 0.012),
            _side([0.58, 0.45], 0.58, 0.030, 0.019),
        ),
    ]
    rows = []
    for r in rounds:
        for side in ("current", "candidate"):
            m = r["metrics"][side]
            rows.append(
                {
                    "round": r["number"],
                    "model": side,
                    "version": r["parent_version"] if side == "current" else None,
                    "outcome": r["outcome"],
                    "scores": [m["tasks"][t]["score"] for t in TASKS],
                    "probes": m["probes"],
                    "drift_from_base": m["drift_from_base"],
                }
            )
    return {
        "workspace": "/tmp/learner",
        "database": "sqlite:///learner.db",
        "base_model": "smollm2-135m",
        "method": "sdft",
        "current_version": 2,
        "versions": [_version(0, None, None, "base"), _version(1, 0, 1, "full"), _version(2, 1, 3, "full")],
        "rounds": rounds,
        "tasks": {
            "arith": {"grader": "exact", "train": 40, "heldout": 20, "pending": 5},
            EVIL: {"grader": "exact", "train": 30, "heldout": 20, "pending": 0},
        },
        "pending": 5,
        "matrix": {"tasks": TASKS, "rows": rows},
        "last_decision": rounds[-1]["decision"],
    }


def test_report_shows_versions_scores_decisions_and_escapes_task_names(tmp_path):
    status = _status()
    page = write_learner_report(status, tmp_path)
    assert page == tmp_path / "report.html" and page.is_file()
    html = page.read_text(encoding="utf-8")

    assert "Serving version v2" in html
    for r in status["rounds"]:
        assert escape(r["decision"]["summary"]) in html
    assert "candidate (rejected)" in html and "<span class='bad'>rejected</span>" in html
    for score in ("0.600", "0.250", "0.550", "0.580", "0.450"):
        assert score in html
    assert "FAILED" in html and "+0.3500" in html  # the failed check with its value

    assert escape(EVIL) in html
    assert "<script" not in html

    images = re.findall(r"src='([^']+\.png)'", html)
    assert len(images) == 2
    for src in images:
        assert (tmp_path / src).is_file() and (tmp_path / src).stat().st_size > 0


def test_report_without_rounds_and_rewrite_drops_stale_figures(tmp_path):
    status = _status()
    write_learner_report(status, tmp_path)
    other = tmp_path / "report_files" / "matrix.png"  # a continual report's figure in the same directory
    other.write_bytes(b"png")
    empty = {**status, "rounds": [], "matrix": {"tasks": TASKS, "rows": []}, "current_version": 0}
    empty["versions"] = status["versions"][:1]
    html = write_learner_report(empty, tmp_path).read_text(encoding="utf-8")
    assert "No round has been evaluated yet" in html and "<script" not in html
    assert sorted(p.name for p in (tmp_path / "report_files").iterdir()) == ["matrix.png"]
