"""The dashboard (`GET /` of `sdft serve`) rendered by headless Chromium against a real server: the DOM after
the page's script ran shows the served version, the accuracy matrix, the versions with their gate decisions,
the pending demonstrations and a running round's loss curve, and user text (a task named like markup) stays
text."""

import html
import re
import shutil
import subprocess

import httpx
import pytest
from test_learner import task_records
from test_serve import KEY, Server

from selfdistill.learner import Learner
from selfdistill.serve.host import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TASK = "<img src=x onerror=alert(1)>"  # a task name that is markup: shown as text, or the test fails

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")


def chromium(tmp_path, url: str, *args: str) -> str:
    """Chromium's output for `url` once the page's script ran (5 s of virtual time: two polls)."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            *args,
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout


def text_of(dom: str, element_id: str) -> str:
    """The text of the element with this id in Chromium's serialised DOM (tags dropped, entities decoded)."""
    found = re.search(rf'<(\w+)\b[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', dom, re.S)
    assert found, f"no #{element_id} in the page"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(2))).strip()


def table(dom: str, element_id: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The table's serialised HTML, and its rows: (the row's attributes, its cells' text)."""
    found = re.search(rf'<table\b[^>]*\bid="{element_id}"[^>]*>(.*?)</table>', dom, re.S)
    assert found, f"no table #{element_id} in the page"
    rows = [
        (attrs, [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[hd]\b[^>]*>(.*?)</t[hd]>", tr)])
        for attrs, tr in re.findall(r"<tr\b([^>]*)>(.*?)</tr>", found.group(1), re.S)
    ]
    return found.group(1), rows


def test_dashboard_shows_versions_matrix_pending_and_a_live_round_with_user_text_as_text(
    learner_dir,
    tmp_path,
):
    learner = Learner(learner_dir, echo=lambda _: None)
    learner.add(task_records("v3", 0), TASK)
    first = learner.round()
    learner.add(task_records("v5", 1), "beta")
    second = learner.round()  # learning beta forgets the first task: rejected
    assert (first.outcome, second.outcome) == ("promoted", "rejected")

    with Server(learner_dir) as server:
        page = httpx.get(server.url + "/", timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert not re.search(r"<(link|img|iframe)\b|\bsrc=", page.text)  # self-contained: loads nothing

        dom = chromium(tmp_path, server.url + "/", "--dump-dom")
        assert text_of(dom, "served-version") == text_of(dom, "current-version") == "1"
        assert text_of(dom, "training") == "no round running"
        assert text_of(dom, "error") == ""
        assert "<img" not in dom  # the task name was never parsed as markup ...
        raw, rows = table(dom, "matrix")
        assert "&lt;img src=x onerror=alert(1)&gt;" in raw  # ... but shown as text
        assert rows[0][1] == ["round", "model", "outcome", TASK, "beta", "probes", "drift from base"]
        matrix = {(cells[0], cells[1]): (attrs, cells) for attrs, cells in rows[1:]}
        _, promoted = matrix[("1", "candidate \u2192 v1")]
        assert promoted[2] == "promoted"
        assert promoted[3] == f"{first.metrics['candidate']['tasks'][TASK]['score']:.2f}" == "1.00"
        assert matrix[("1", "served v0")][1][4] == "\u2013"  # beta was not a task yet
        attrs, rejected = matrix[("2", "candidate")]
        assert 'class="rejected"' in attrs and rejected[2] == "rejected"
        assert rejected[4] == f"{second.metrics['candidate']['tasks']['beta']['score']:.2f}"

        _, versions = table(dom, "versions")
        assert [cells[:2] for _, cells in versions[1:]] == [["v1", "served, current"], ["v0", ""]]
        assert versions[1][1][-1] == first.decision["summary"]
        assert text_of(dom, "decision-summary") == f"round 2: {second.decision['summary']}"
        assert f"task {TASK}: score drop" in second.decision["summary"]  # user text in a decision, shown as text
        _, checks = table(dom, "decision")
        assert [cells[0] for _, cells in checks[1:]] == [c["name"] for c in second.decision["checks"]]
        _, pending = table(dom, "pending")
        counts = learner.status()["tasks"]
        assert {cells[0]: cells[-1] for _, cells in pending[1:]} == {t: str(c["pending"]) for t, c in counts.items()}
        assert text_of(dom, "pending-total") == str(learner.status()["pending"]) != "0"

        # A round started over HTTP (long enough to still run when Chromium looks): its loss curve so far.
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        started = http.post("/v1/rounds", json={"settings": ["train.max_steps=100000", "train.lr=5e-4"]})
        assert started.status_code == 202, started.text
        try:
            assert wait_for(lambda: len(http.get("/v1/status").json()["training"] or []) >= 3, 120)
            dom = chromium(tmp_path, server.url + "/", "--dump-dom")
            assert re.match(r"round 3 \(from v1\), train stage: step \d+, loss \d+\.\d{4}", text_of(dom, "training"))
            points = re.search(r'<polyline\b[^>]*\bpoints="([^"]*)"', dom)
            assert points and len(points.group(1).split()) >= 3
            png = tmp_path / "dashboard.png"
            chromium(tmp_path, server.url + "/", f"--screenshot={png}", "--window-size=1200,1000")
            assert png.stat().st_size > 20_000  # a blank page is a few kB; tables and the curve make it larger
        finally:
            server.app.state.runner.process.terminate()  # the round would train for minutes
