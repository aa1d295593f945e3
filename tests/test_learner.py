"""The learner workspace on a tiny model that can copy (tests/toy.py), on SQLite and on PostgreSQL.

The tasks: every prompt is two keys, and the answer is one constant value per task ("alpha" answers
v3, "beta" v5). The starting model answers a bare key with some value, so it scores near 0; SFT
learns a task in a few steps and generalises to held-out prompts, and learning beta makes the
model answer v5 to alpha's prompts too: a round that forgets.
"""

import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from toy import KEYS

from selfdistill.errors import UserError
from selfdistill.learner import Learner
from selfdistill.learner import database as db

SETTINGS = [
    "model.precision=fp32",
    "data.teacher_template=plain",
    "train.batch_size=4",
    "train.micro_batch_size=4",
    "train.max_steps=12",
    "train.lr=3e-3",
    "train.warmup_ratio=0",
    "rollout.max_new_tokens=3",
    "loss.skip_first_tokens=0",
    "eval.max_new_tokens=3",
    "eval.batch_size=8",
    "eval.probes.limit=3",
    "eval.probes.max_new_tokens=4",
    "eval.drift.limit=2",
    "eval.drift.max_new_tokens=4",
    "learner.heldout_share=0.25",
]


def task_records(value: str, seed: int, n: int = 24) -> list[dict]:
    rng = random.Random(seed)
    prompts = sorted({f"{rng.choice(KEYS)} {rng.choice(KEYS)}" for _ in range(400)})
    rng.shuffle(prompts)
    return [{"prompt": p, "demonstration": value} for p in prompts[:n]]


def new_learner(root: Path, toy_model: str, database_url: str, method: str = "sft", extra=()) -> Learner:
    return Learner.init(
        root, model=toy_model, method=method, overrides=[*SETTINGS, *extra], database=database_url, echo=lambda _: None
    )


def rows(learner: Learner) -> dict:
    """Every table's rows without times and absolute paths: what two runs of the same rounds must share."""
    tables = {}
    with learner.db.transaction() as session:
        for model in (db.Workspace, db.Task, db.Record, db.Round, db.Version, db.Event):
            out = []
            for row in session.scalars(select(model)):
                values = {
                    c.name: getattr(row, c.key)
                    for c in model.__table__.columns
                    if c.name not in ("created_at", "added_at", "started_at", "finished_at", "at", "config")
                }
                if model is db.Workspace:
                    values.pop("base_model")
                out.append(values)
            tables[model.__tablename__] = sorted(out, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    return tables


def weights(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


def test_a_round_learns_and_is_promoted_and_a_forgetting_round_is_rejected(tmp_path, toy_model, database_url):
    learner = new_learner(tmp_path / "learner", toy_model, database_url)
    added = learner.add(task_records("v3", seed=0), "alpha")
    assert added == {"task": "alpha", "given": 24, "added": 24, "heldout": 6, "duplicates": 0}

    first = learner.round()
    alpha_before = first.metrics["current"]["tasks"]["alpha"]["score"]
    alpha_after = first.metrics["candidate"]["tasks"]["alpha"]["score"]
    assert (first.outcome, first.version) == ("promoted", 1)
    assert alpha_before <= 0.2 and alpha_after >= 0.8  # learned, on held-out prompts it never trained on
    served = Path(learner.model_path())
    assert served == (tmp_path / "learner" / "versions" / "v1").resolve()
    v1_weights = weights(served)

    learner.add(task_records("v5", seed=1), "beta")
    second = learner.round()
    assert (second.outcome, second.version) == ("rejected", 1)
    assert second.metrics["candidate"]["tasks"]["beta"]["score"] > second.metrics["current"]["tasks"]["beta"]["score"]
    failed = [c for c in second.decision["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["task alpha: score drop"]
    assert "task alpha: score drop" in second.decision["summary"]
    # What is served is unchanged, and the rejected candidate's weights are gone.
    assert Path(learner.model_path()) == served and weights(served) == v1_weights
    assert not (tmp_path / "learner" / "rounds" / "round-0002" / "train" / "final").exists()

    status = learner.status()
    assert status["current_version"] == 1 and [v["number"] for v in status["versions"]] == [0, 1]
    assert [r["outcome"] for r in status["rounds"]] == ["promoted", "rejected"]
    assert status["matrix"]["tasks"] == ["alpha", "beta"] and len(status["matrix"]["rows"]) == 4
    # The rejected round's demonstrations are pending again, for a round with other settings.
    assert status["pending"] == 18 and status["tasks"]["beta"] == {
        "grader": "contains",
        "train": 18,
        "heldout": 6,
        "pending": 18,
    }
    report = (tmp_path / "learner" / "report.html").read_text()
    assert "Serving version v1" in report and "task alpha: score drop" in report


def test_duplicates_are_dropped_and_a_bad_file_stores_nothing(tmp_path, toy_model, database_url):
    learner = new_learner(tmp_path / "learner", toy_model, database_url)
    with pytest.raises(UserError, match="nothing to learn"):
        learner.round()
    records = task_records("v3", seed=0, n=10)
    assert learner.add(records + records[:3], "alpha")["added"] == 10
    again = learner.add(records, "alpha")
    assert (again["added"], again["duplicates"]) == (0, 10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "k1 k2", "demonstration": "v3"}) + "\n" + json.dumps({"prompt": "k1 k3"}) + "\n"
    )
    with pytest.raises(UserError, match=r"bad.jsonl line 2.*demonstration"):
        learner.add(bad, "alpha")
    with pytest.raises(UserError, match="graded with 'contains'"):
        learner.add(records, "alpha", grader="exact")
    assert learner.status()["tasks"]["alpha"]["train"] + learner.status()["tasks"]["alpha"]["heldout"] == 10


def test_several_tasks_are_added_in_one_transaction(tmp_path, toy_model, database_url, monkeypatch):
    """A request's records for two tasks are stored together or not at all: a failure while the second task's
    rows are written leaves none of the first task's either; without it both are stored."""
    learner = new_learner(tmp_path / "learner", toy_model, database_url)
    sources = {"alpha": task_records("v3", seed=0, n=6), "beta": task_records("v5", seed=1, n=6)}
    real = Learner._heldout

    def failing(self, task, batch, new):
        if task == "beta":
            raise RuntimeError("the database went away")
        return real(self, task, batch, new)

    monkeypatch.setattr(Learner, "_heldout", failing)
    with pytest.raises(RuntimeError, match="went away"):
        learner.add_tasks(sources)
    assert learner.status()["tasks"] == {} and learner.pending() == 0
    monkeypatch.setattr(Learner, "_heldout", real)
    counts = learner.add_tasks(sources)
    assert [(c["task"], c["added"]) for c in counts] == [("alpha", 6), ("beta", 6)]
    assert sorted(learner.status()["tasks"]) == ["alpha", "beta"]


def _add_in_process(root: str, start: int, value: str) -> None:
    learner = Learner(root, echo=lambda _: None)
    for k in range(10):  # ten small batches, each its own transaction, racing the other process's
        learner.add(
            [{"prompt": f"k{start + k} k{k}", "demonstration": value}, {"prompt": "k0 k0", "demonstration": value}],
            "alpha",
        )


def test_two_processes_adding_at_once_lose_nothing(tmp_path, toy_model, database_url):
    root = tmp_path / "learner"
    new_learner(root, toy_model, database_url)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_in_process, args=(str(root), start, "v3")) for start in (100, 200)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    learner = Learner(root, echo=lambda _: None)
    with learner.db.transaction() as session:
        prompts = sorted(r.data["prompt"] for r in session.scalars(select(db.Record)))
    expected = sorted({f"k{s + k} k{k}" for s in (100, 200) for k in range(10)} | {"k0 k0"})
    assert prompts == expected  # all 21 distinct records, the shared one once


def test_rollback_serves_the_earlier_version_bit_for_bit(tmp_path, toy_model, database_url):
    from selfdistill.eval.evaluate import evaluate
    from selfdistill.eval.graders import get
    from selfdistill.models import load_model

    learner = new_learner(tmp_path / "learner", toy_model, database_url, extra=["gate.max_task_drop=null"])
    probe = [
        __import__("selfdistill.data.records", fromlist=["Record"]).Record(
            prompt=p["prompt"], demonstration="", answer="v3"
        )
        for p in task_records("v3", seed=7, n=8)
    ]

    def outputs(path: str) -> list[str]:
        examples: list[dict] = []
        model, tokenizer = load_model(path)
        evaluate(model, tokenizer, probe, get("contains"), max_new_tokens=3, batch_size=8, examples=examples)
        return [e["output"] for e in examples]

    learner.add(task_records("v3", seed=0), "alpha")
    learner.round()
    v1_outputs, v1_weights = outputs(learner.model_path()), weights(Path(learner.model_path()))
    learner.add(task_records("v5", seed=1), "beta")
    assert learner.round().outcome == "promoted"  # no drop check: the forgetting round goes live
    assert learner.current_version() == 2 and outputs(learner.model_path()) != v1_outputs

    learner.rollback(1)
    assert learner.current_version() == 1
    assert weights(Path(learner.model_path())) == v1_weights and outputs(learner.model_path()) == v1_outputs
    with pytest.raises(UserError, match="no version 7"):
        learner.rollback(7)
    events = [e["kind"] for e in _events(learner)]
    assert events[-1] == "rollback"

    exported = learner.export(2, tmp_path / "export")
    card = (exported / "README.md").read_text()
    assert "version 2 of a selfdistill learner" in card and "| v1 | 1 |" in card and "| v2 | 2 |" in card
    assert weights(exported) == weights(tmp_path / "learner" / "versions" / "v2")
    with pytest.raises(UserError, match="not empty"):
        learner.export(2, tmp_path / "export")


def _events(learner: Learner) -> list[dict]:
    with learner.db.transaction() as session:
        return [
            {"kind": e.kind, "round": e.round, "version": e.version}
            for e in session.scalars(select(db.Event).order_by(db.Event.id))
        ]


def test_a_round_while_another_runs_is_refused(tmp_path, toy_model, database_url):
    learner = new_learner(tmp_path / "learner", toy_model, database_url)
    learner.add(task_records("v3", seed=0, n=8), "alpha")
    other = Learner(tmp_path / "learner", echo=lambda _: None)
    with other._exclusive("another round"):
        with pytest.raises(UserError, match="a round is running"):
            learner.round()
        with pytest.raises(UserError, match="a round is running"):
            learner.rollback(0)


def _sdft(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SELFDISTILL_PROGRESS": "0", **(env or {})},
        timeout=600,
    )


_UNINTERRUPTED: dict[str, tuple] = {}  # per database backend: the rows and weights of the round run without a kill


@pytest.mark.parametrize("point", ["optimizer_step:3", "round_train", "round_evaluate", "round_gate", "round_promote"])
def test_a_kill_at_any_stage_of_a_round_then_round_again_equals_the_uninterrupted_run(
    tmp_path, toy_model, new_database_url, database_backend, point
):
    """SIGKILL inside training, after each stage's work and before the database records it: `round` again
    gives the rows (every table, times left out) and the weights of a round that was never interrupted."""

    def workspace(name: str) -> Path:
        root = tmp_path / name
        new_learner(root, toy_model, new_database_url()).add(task_records("v3", seed=0), "alpha")
        return root

    if database_backend not in _UNINTERRUPTED:
        root = workspace("plain")
        assert Learner(root, echo=lambda _: None).round().outcome == "promoted"
        _UNINTERRUPTED[database_backend] = (rows(Learner(root, echo=lambda _: None)), weights(root / "versions" / "v1"))
    root = workspace("killed")
    killed = _sdft("learn", "round", str(root), env={"SELFDISTILL_FAULT": point})
    assert killed.returncode == -9, killed.stderr[-2000:]
    learner = Learner(root, echo=lambda _: None)
    assert learner.round().outcome == "promoted"
    expected_rows, expected_weights = _UNINTERRUPTED[database_backend]
    assert weights(root / "versions" / "v1") == expected_weights
    for table, values in rows(learner).items():
        # Scores and decisions are equal; a log-likelihood measured in another process (the killed one) may
        # differ in its last bits (2e-8 relative seen) where that process summed in another order.
        assert _same(values, expected_rows[table]), table


def _same(a, b) -> bool:
    """Equal, floats to 1e-6 relative."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_the_commands(tmp_path, toy_model):
    """init, add, status (text and --json) and rollback on the command line; a mistake exits with status 2."""
    from typer.testing import CliRunner

    from selfdistill.cli import app

    def sdft(*args: str):
        return CliRunner().invoke(app, list(args))

    root = tmp_path / "learner"
    bad = _sdft("learn", "init", str(root), "--model", toy_model, "--set", "gate.max_task_drop=-1")
    assert bad.returncode == 2 and "gate.max_task_drop" in bad.stderr and not root.exists()
    assert (
        sdft("learn", "init", str(root), "--model", toy_model, *[a for s in SETTINGS for a in ("--set", s)]).exit_code
        == 0
    )
    data = tmp_path / "alpha.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_records("v3", seed=0, n=8)))
    added = sdft("learn", "add", str(root), str(data), "--task", "alpha")
    assert "alpha: 8 records added (2 held out for evaluation)" in added.output
    status = json.loads(sdft("learn", "status", str(root), "--json").output)
    assert status["method"] == "sdft" and status["pending"] == 6 and status["current_version"] == 0
    text = sdft("learn", "status", str(root)).output
    assert "pending demonstrations: alpha 6" in text and "| v0 |" in text and (root / "report.html").is_file()
    assert isinstance(sdft("learn", "rollback", str(root), "3").exception, UserError)


@pytest.mark.distributed
def test_a_round_in_two_processes_equals_a_round_in_one(tmp_path, toy_model):
    """`torchrun --nproc_per_node 2 sdft learn round` trains sharded and decides as a plain round does."""
    import torch
    from safetensors.torch import load_file

    data = tmp_path / "alpha.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_records("v3", seed=0)))
    launch = {"one": [sys.executable, "-m", "selfdistill.cli"]}
    launch["two"] = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "selfdistill.cli",
    ]
    env = {**os.environ, "SELFDISTILL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    for name, prefix in launch.items():
        root = tmp_path / name
        new_learner(root, toy_model, f"sqlite:///{root}.db").add(data, "alpha")
        done = subprocess.run(
            [*prefix, "learn", "round", str(root)], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("round 1: promoted; serving v1") == 1  # the first process reports, once
    one, two = (Learner(tmp_path / n, echo=lambda _: None) for n in ("one", "two"))
    r1, r2 = one.status()["rounds"][0], two.status()["rounds"][0]
    assert (r1["outcome"], r1["decision"]["summary"]) == (r2["outcome"], r2["decision"]["summary"])
    assert r1["metrics"]["candidate"]["tasks"]["alpha"]["score"] >= 0.8  # each learned
    for side in ("current", "candidate"):
        a, b = r1["metrics"][side]["tasks"]["alpha"], r2["metrics"][side]["tasks"]["alpha"]
        assert a["score"] == b["score"] and a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)
    w1, w2 = (load_file(str(tmp_path / n / "versions" / "v1" / "model.safetensors")) for n in ("one", "two"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=1e-4, msg=key)
    assert (tmp_path / "two" / "rounds" / "round-0001" / "train" / "metrics.jsonl").is_file()


def test_the_migrations_build_the_schema_the_code_uses(database_url):
    """Alembic's revisions, applied to an empty database, give exactly the tables and columns of the models;
    opening the database again (upgrade to head) changes nothing."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    first = db.Database(database_url)
    db.Database(database_url).dispose()
    with first.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), db.Base.metadata) == []
        assert MigrationContext.configure(connection).get_current_revision() == "0002"
    first.dispose()


def test_a_lora_round_keeps_its_adapter_and_the_next_round_trains_a_new_one(tmp_path, toy_model):
    """With model.lora.enabled a version is the merged weights with its adapter beside them; the next round
    starts from the merged weights (a fresh adapter), and SDFT, the default method, runs its rounds too."""
    learner = new_learner(
        tmp_path / "learner",
        toy_model,
        f"sqlite:///{tmp_path}/learner.db",
        method="sdft",
        extra=["model.lora.enabled=true", "model.lora.rank=8", "gate.min_gain=null", "gate.max_task_drop=null"],
    )
    learner.add(task_records("v3", seed=0, n=12), "alpha")
    first = learner.round()
    version = tmp_path / "learner" / "versions" / "v1"
    assert first.outcome == "promoted" and (version / "adapter" / "adapter_config.json").is_file()
    assert learner.status()["versions"][1]["kind"] == "lora"
    learner.add(task_records("v3", seed=1, n=12), "alpha")
    assert learner.round().outcome == "promoted"
    trained = json.loads((tmp_path / "learner" / "rounds" / "round-0002" / "train" / "run.json").read_text())
    assert trained["full_config"]["model"]["name"] == str(version)  # round 2 trained v1's merged weights


def test_a_database_of_the_first_schema_is_upgraded_in_place(database_url):
    """A learner created before the completions table existed (revision 0001) opens with its rows intact and
    the new table added (revision 0002)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import inspect, text

    engine = db.make_engine(database_url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(db.MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO workspace (id, created_at, base_model, settings, current_version) "
                "VALUES (1, '2026-12-01 00:00:00', 'old-model', '{}', 0)"
            )
        )
    assert "completions" not in inspect(engine).get_table_names()
    engine.dispose()
    upgraded = db.Database(database_url)
    assert "completions" in inspect(upgraded.engine).get_table_names()
    with upgraded.transaction() as session:
        assert upgraded.workspace(session).base_model == "old-model"
    upgraded.dispose()
