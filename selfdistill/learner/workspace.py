"""A learner workspace: one model that keeps learning as demonstrations arrive, one line of versions.

    WORKDIR/learner.json          which database holds the state (default: learner.db beside it)
    WORKDIR/learner.db            SQLite database (records, tasks, rounds, versions, events)
    WORKDIR/base/                 the base model's reference answers for drift
    WORKDIR/rounds/round-NNNN/    train/ (the training run), eval/current, eval/candidate, replay.jsonl
    WORKDIR/versions/vN/          the weights of promoted version N (a Hugging Face directory)

`add` stores records under a task, drops exact duplicates and keeps a seeded share of every task
aside (held out: evaluated, never trained on). `round` trains the served version on the
demonstrations added since the last round, evaluates the candidate and the served version on the
held-out records of every task seen so far, the probes and drift, and lets the gate decide. A
round is a sequence of stages recorded in the database (train, evaluate, gate, promote): killed at
any point, the next `round` continues where it was, and every stage is written so that doing it
again gives the same result. One round runs at a time (a lock the operating system releases when
its holder dies; on PostgreSQL also an advisory lock, for learners shared between machines).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from selfdistill.config import DEFAULT_METHOD, build, load_config, merge, parse_overrides
from selfdistill.continual import layout
from selfdistill.continual.config import EvalSettings
from selfdistill.continual.results import stage_values
from selfdistill.errors import UserError
from selfdistill.files import read_json, write_json, write_jsonl
from selfdistill.learner import database as db
from selfdistill.learner.gate import GateSettings, decide
from selfdistill.training.faults import fault

STATE_FILE = "learner.json"
STAGES = ("train", "evaluate", "gate", "promote", "done")
DEFAULT_GRADER = "contains"


@dataclass
class LearnerSettings:
    """What `init` fixes for the learner's life: the method and its training settings, the held-out share,
    the gate and the evaluation."""

    method: str = DEFAULT_METHOD
    config: dict = field(default_factory=dict)  # training config sections (model.name is the served version)
    heldout_share: float = 0.2
    seed: int = 0
    keep_rejected: bool = False  # keep a rejected candidate's weights (they are never served)
    gate: GateSettings = field(default_factory=GateSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.heldout_share, (int, float)) or not 0.0 <= self.heldout_share < 1.0:
            raise UserError(f"heldout_share: a fraction in [0, 1), got {self.heldout_share!r}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _settings_from(data: dict) -> LearnerSettings:
    data = dict(data)
    gate = build(GateSettings, data.pop("gate", {}) or {}, "gate.", unknown="unknown gate setting")
    evaluation = build(EvalSettings, data.pop("eval", {}) or {}, "eval.", unknown="unknown eval setting")
    known = {f.name for f in dataclasses.fields(LearnerSettings)} - {"gate", "eval"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(
            f"unknown learner setting {unknown[0]!r}; known: {', '.join(sorted(known | {'gate', 'eval'}))}."
        )
    return LearnerSettings(gate=gate, eval=evaluation, **data)


def record_digest(task: str, row: dict) -> str:
    return hashlib.sha256(
        json.dumps({"task": task, "record": row}, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def _digest_of(digests: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


@dataclass
class RoundResult:
    number: int
    outcome: str  # "promoted" or "rejected"
    version: int  # the version served after the round
    decision: dict
    metrics: dict


class Learner:
    """A learner workspace (see the module's docstring). `Learner.init` creates one, `Learner(WORKDIR)` opens it."""

    def __init__(self, workdir: str | Path, echo: Callable[[str], None] = print):
        self.root = Path(workdir).resolve()
        state = self.root / STATE_FILE
        if not state.is_file():
            raise UserError(
                f"{self.root} is not a learner workspace (no {STATE_FILE}); create one with `sdft learn init`."
            )
        self.database_url = read_json(state)["database"]
        self.db = db.Database(self.database_url)
        self.echo = echo
        with self.db.transaction() as session:
            workspace = self.db.workspace(session)
            self.base_model = workspace.base_model
            self.settings = _settings_from(workspace.settings)

    # --- creating -----------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        workdir: str | Path,
        *,
        model: str | None = None,
        method: str | None = None,
        config: str | Path | dict | None = None,
        overrides: list[str] | tuple = (),
        database: str | None = None,
        echo: Callable[[str], None] = print,
        **settings: Any,
    ) -> Learner:
        """Create a learner in `workdir` (new or empty). `config`: a training config (YAML path or
        mapping); `overrides`: `section.key=value` strings, where `gate.*`, `eval.*` and `learner.*`
        (heldout_share, seed, keep_rejected) set the learner's own settings and the rest training
        settings; `settings`: learner settings by name (heldout_share=..., gate={...}, eval={...})."""
        root = Path(workdir).resolve()
        if (root / STATE_FILE).exists():
            raise UserError(f"{root} already holds a learner; open it, or choose another directory.")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise UserError(f"{root} is not an empty directory; choose a new or empty one for the learner.")
        training: dict = {}
        if isinstance(config, (str, Path)):
            from selfdistill.config import read_yaml

            training = read_yaml(Path(config)) or {}
        elif isinstance(config, dict):
            training = dict(config)
        # The config file and the overrides may set the learner's own sections beside the training ones.
        training = merge(training, parse_overrides(list(overrides)))
        own = {k: training.pop(k) for k in ("gate", "eval") if k in training}
        own.update(training.pop("learner", {}) or {})
        settings = merge(own, settings)
        base = model or (training.get("model") or {}).get("name") or load_config().model.name
        if Path(base).exists():  # a directory or file: kept absolute, so the learner opens from anywhere
            base = str(Path(base).resolve())
        training.setdefault("model", {}).pop("name", None)
        chosen = method or training.pop("method", None) or settings.pop("method", None) or DEFAULT_METHOD
        training.pop("method", None)
        learner_settings = _settings_from({**settings, "method": chosen, "config": training})
        # Check the training settings now, as a round will build them, so a mistake is refused before anything is written.
        _round_config(learner_settings, base, root / "rounds" / "check")
        from selfdistill.models import load_tokenizer

        load_tokenizer(base)  # a wrong model name fails here, not in the first round
        url = database or f"sqlite:///{root / 'learner.db'}"
        root.mkdir(parents=True, exist_ok=True)
        database_ = db.Database(url)
        with database_.transaction() as session:
            if session.scalar(select(db.Workspace)) is not None:
                raise UserError(f"database {db.safe_url(url)} already holds a learner; give an empty database.")
            session.add(db.Workspace(id=1, base_model=base, settings=learner_settings.to_dict(), current_version=0))
            session.add(db.Version(number=0, parent=None, round=None, path=base, kind="base", data_digests=[]))
            session.add(db.Event(kind="init", version=0, detail={"base_model": base, "method": chosen}))
        database_.dispose()
        write_json(root / STATE_FILE, {"database": url})
        echo(f"learner created in {root}: base model {base}, method {chosen}, database {db.safe_url(url)}")
        return cls(root, echo=echo)

    # --- adding demonstrations ----------------------------------------------------------------

    def add(self, source: Any, task: str, *, grader: str | None = None, heldout: bool = False) -> dict:
        """Store records under `task`: a .jsonl file, a dataset (directory, hf:NAME, builtin:NAME) or a list of
        mappings/Records. Every record is checked before any is stored; exact duplicates (of stored records or
        within the batch) are dropped; a seeded share of the new ones is held out (all of them with
        `heldout=True`: an evaluation set of the user's). Returns the counts."""
        return self.add_tasks({task: source}, grader=grader, heldout=heldout)[0]

    def add_tasks(self, sources: dict[str, Any], *, grader: str | None = None, heldout: bool = False) -> list[dict]:
        """`add` for several tasks at once ({task: source}), in one transaction: every task's records are stored,
        or (a record that fails its check, a database error) none. Returns each task's counts."""
        from selfdistill.data.records import records_from

        batches = {}
        for task, source in sources.items():
            if not isinstance(task, str) or not task.strip():
                raise UserError("--task: give the task name the records belong to.")
            records = records_from(source, "add FILE" if isinstance(source, (str, Path)) else "add(records=...)")
            rows = [r.to_dict() for r in records]
            unique: dict[str, dict] = {}
            for row in rows:
                unique.setdefault(record_digest(task, row), row)
            batches[task] = (self._check_grader(task, grader), len(rows), unique)
        for attempt in range(5):  # a concurrent add of the same record wins the unique key: read again and retry
            try:
                with self.db.transaction() as session:
                    counts = [self._store(session, task, *batch, heldout) for task, batch in batches.items()]
                break
            except Exception as exc:  # noqa: BLE001
                from sqlalchemy.exc import IntegrityError

                if not isinstance(exc, IntegrityError) or attempt == 4:
                    raise
        for done in counts:
            self.echo(
                f"{done['task']}: {done['added']} records added ({done['heldout']} held out for evaluation), "
                f"{done['duplicates']} duplicates dropped"
            )
        return counts

    def _store(self, session, task: str, grader: str, given: int, unique: dict[str, dict], heldout: bool) -> dict:
        """One task's new records, inside the caller's transaction; returns its counts."""
        if session.get(db.Task, task) is None:
            session.add(db.Task(name=task, grader=grader))
            session.flush()
        batch = _digest_of(list(unique))
        stored = set(session.scalars(select(db.Record.digest).where(db.Record.digest.in_(list(unique)))))
        new = sorted(d for d in unique if d not in stored)
        held = set(new) if heldout else self._heldout(task, batch, new)
        for digest in new:
            split = "heldout" if digest in held else "train"
            session.add(db.Record(task=task, digest=digest, data=unique[digest], split=split, batch=batch))
        counts = {"task": task, "given": given, "added": len(new), "heldout": len(held), "duplicates": given - len(new)}
        session.add(db.Event(kind="add", detail=counts))
        return counts

    def _check_grader(self, task: str, grader: str | None) -> str:
        from selfdistill.eval import graders
        from selfdistill.tasks.catalog import TASKS

        if grader is not None and grader not in graders.names():
            raise UserError(f"--grader: unknown grader {grader!r}; choose one of {', '.join(graders.names())}.")
        with self.db.transaction() as session:
            existing = session.get(db.Task, task)
        if existing is not None:
            if grader is not None and grader != existing.grader:
                raise UserError(
                    f"task {task!r} is graded with {existing.grader!r}; leave out --grader or give the same one."
                )
            return existing.grader
        if grader is not None:
            return grader
        return TASKS[task].metrics[0].grader if task in TASKS else DEFAULT_GRADER

    def _heldout(self, task: str, batch: str, new: list[str]) -> set[str]:
        """The new records of a batch kept for evaluation: round(share x n) of them (at least one of two or
        more), chosen by a generator seeded with the learner's seed, the task and the batch."""
        share = self.settings.heldout_share
        if share <= 0 or not new:
            return set()
        rng = random.Random(f"{self.settings.seed}:{task}:{batch}")
        if len(new) == 1:
            return set(new) if rng.random() < share else set()
        count = min(len(new) - 1, max(1, round(share * len(new))))
        return set(rng.sample(new, count))

    # --- rounds -------------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """One round (or rollback) at a time: an flock on the workspace, which the operating system drops when
        its holder dies (kill -9 included), and on PostgreSQL a session advisory lock, dropped with the connection."""
        path = self.root / ".round.lock"
        handle = open(path, "a+")  # noqa: SIM115 - held for the whole round
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(
                    f"a round is running in {self.root} ({holder}); {what} must wait until it finishes."
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()}")
            handle.flush()
            with self._database_lock(what):
                yield
        finally:
            handle.close()

    @contextmanager
    def _database_lock(self, what: str) -> Iterator[None]:
        if self.db.engine.dialect.name != "postgresql":
            yield
            return
        key = int(hashlib.sha256(b"selfdistill-learner-round").hexdigest()[:15], 16)
        with self.db.engine.connect() as connection:
            if not connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                raise UserError(f"a round is running on this learner's database; {what} must wait until it finishes.")
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                connection.commit()

    def round(self, overrides: list[str] | tuple = ()) -> RoundResult | None:
        """Run a round, or continue the one a kill interrupted, to its decision. `overrides`: training settings
        (`section.key=value`) for this round only, recorded with it (e.g. a lower learning rate to retry
        demonstrations a round at the learner's settings forgot with).

        Under torchrun every process calls this: the first opens the round and holds the lock, all of them
        train (sharded, as `sdft train`), then the first alone evaluates, gates and promotes; the others
        return None once training is done."""
        with ExitStack() as held:
            procs = self._processes()
            number = self._start_round(list(overrides), procs, held)
            if self._stage(number) == "train":
                self._train(self._round_row(number), procs)
            if not procs.is_main:
                return None
            while (stage := self._stage(number)) != "done":
                {"evaluate": self._evaluate, "gate": self._gate, "promote": self._promote}[stage](
                    self._round_row(number)
                )
        with self.db.transaction() as session:
            row = session.get(db.Round, number)
            current = self.db.workspace(session).current_version
        self.write_report()
        return RoundResult(number, row.outcome, current, row.decision, row.metrics)

    def _processes(self):
        """This process's place: a plain process, or one of torchrun's (joining its group with the round's
        `distributed` settings)."""
        from selfdistill.models.distributed import setup_processes

        cfg = _round_config(self.settings, self.base_model, self.root / "rounds" / "check")
        return setup_processes(cfg.distributed)

    def _start_round(self, overrides: list[str], procs, held: ExitStack) -> int:
        """The round's number, on every process: the first takes the lock (kept in `held`) and opens the round,
        then tells the others its number, or the message they all stop with."""
        number = message = None
        if procs.is_main:
            try:
                held.enter_context(self._exclusive("another round"))
                number = self._open_round(overrides)
            except UserError as exc:
                message = str(exc)
        if procs.world > 1:
            import torch.distributed as dist

            shared = [number, message]
            dist.broadcast_object_list(shared, src=0)
            number, message = shared
        if message is not None:
            raise UserError(message)
        return number

    def _round_row(self, number: int) -> db.Round:
        with self.db.transaction() as session:
            return session.get(db.Round, number)

    def _stage(self, number: int) -> str:
        return self._round_row(number).stage

    def write_report(self) -> Path:
        """WORKDIR/report.html: versions, the scores over rounds, the gate's decisions, drift, pending."""
        from selfdistill.learner.report import write_learner_report

        return write_learner_report(self.status(), self.root)

    def _open_round(self, overrides: list[str]) -> int:
        """The unfinished round, or a new one over every pending demonstration (assigned to it in the same transaction)."""
        with self.db.transaction() as session:
            unfinished = session.scalar(select(db.Round).where(db.Round.stage != "done"))
            if unfinished is not None:
                self.echo(
                    f"round {unfinished.number}: continuing at its {unfinished.stage} stage, with its recorded settings"
                )
                return unfinished.number
            pending = list(
                session.scalars(
                    select(db.Record)
                    .where(db.Record.split == "train", db.Record.round.is_(None))
                    .order_by(db.Record.id)
                )
            )
            if not pending:
                raise UserError(
                    "nothing to learn: no demonstrations were added since the last round. Add some with `sdft learn add`."
                )
            number = (session.scalar(select(func.max(db.Round.number))) or 0) + 1
            parent = self.db.workspace(session).current_version
            version = session.get(db.Version, parent)
            last = session.scalar(select(func.max(db.Record.id)))
            cfg = _round_config(self.settings, self._model_path(version), self._round_dir(number) / "train", overrides)
            session.add(
                db.Round(
                    number=number,
                    parent_version=parent,
                    stage="train",
                    last_record=last,
                    data_digest=_digest_of([r.digest for r in pending]),
                    config=cfg.to_dict(),
                )
            )
            session.flush()
            for record in pending:
                record.round = number
            tasks = sorted({r.task for r in pending})
            session.add(
                db.Event(kind="round", round=number, version=parent, detail={"records": len(pending), "tasks": tasks})
            )
        self.echo(f"round {number}: {len(pending)} new demonstrations ({', '.join(tasks)}), from version {parent}")
        return number

    def _round_dir(self, number: int) -> Path:
        return self.root / "rounds" / f"round-{number:04d}"

    def _model_path(self, version: db.Version) -> str:
        return version.path if version.kind == "base" else str(self.root / version.path)

    def _records_of(self, number: int) -> tuple[list, list[str]]:
        from selfdistill.data.records import record_from_row

        with self.db.transaction() as session:
            rows = list(session.scalars(select(db.Record).where(db.Record.round == number).order_by(db.Record.id)))
        records = [record_from_row(r.data, f"record {r.id} (task {r.task})") for r in rows]
        return records, sorted({r.task for r in rows})

    def _train(self, row: db.Round, procs) -> None:
        from selfdistill.training.loop import train

        where = self._round_dir(row.number)
        final = where / "train" / "final"
        if not final.is_dir():  # final/ is renamed into place whole: present means trained
            records, tasks = self._records_of(row.number)
            cfg = load_config(overrides=row.config)
            self._replay_earlier_rounds(cfg, row.number, where)
            if procs.is_main:
                self.echo(
                    f"round {row.number}: training {cfg.method} on {len(records)} demonstrations ({', '.join(tasks)})"
                )
            train(cfg, records=records, resume=True, save_final=True)  # under torchrun: every process, sharded
        if not procs.is_main:
            return
        fault("round_train", row.number)
        # Checkpoints (optimizer, teacher) only serve resuming inside the round; the model is in final/.
        shutil.rmtree(where / "train" / "checkpoints", ignore_errors=True)
        self._advance(row.number, "evaluate")

    def _replay_earlier_rounds(self, cfg, number: int, where: Path) -> None:
        """A method that replays (sft_replay) with no replay file of the user's replays the prompts of earlier
        rounds' demonstrations, answered by the model being trained; with no earlier round, its built-in prompts."""
        replay = getattr(cfg, "replay", None)
        if replay is None or replay.data:
            return
        with self.db.transaction() as session:
            earlier = list(
                session.scalars(
                    select(db.Record).where(db.Record.round < number, db.Record.split == "train").order_by(db.Record.id)
                )
            )
        if earlier:
            path = write_jsonl(where / "replay.jsonl", [{"prompt": r.data["prompt"]} for r in earlier])
            replay.data = str(path)

    def _advance(self, number: int, stage: str, **fields: Any) -> None:
        with self.db.transaction() as session:
            row = session.get(db.Round, number)
            row.stage = stage
            for key, value in fields.items():
                setattr(row, key, value)

    # --- evaluation ---------------------------------------------------------------------------

    def _tasks_for(self, row: db.Round) -> list:
        """Every task with held-out records the round saw, as the continual loop's tasks; a record without
        `answer` is graded against its demonstration."""
        from selfdistill.continual.evaluation import StreamTask
        from selfdistill.data.records import record_from_row

        cfg = load_config(overrides=row.config)
        with self.db.transaction() as session:
            held = list(
                session.scalars(
                    select(db.Record)
                    .where(db.Record.split == "heldout", db.Record.id <= row.last_record)
                    .order_by(db.Record.id)
                )
            )
            graders = {t.name: t.grader for t in session.scalars(select(db.Task))}
        by_task: dict[str, list] = {}
        for r in held:
            data = dict(r.data)
            data.setdefault("answer", data["demonstration"])
            by_task.setdefault(r.task, []).append(record_from_row(data, f"record {r.id} (task {r.task})"))
        return [
            StreamTask(
                name,
                graders[name],
                [],
                records,
                self.settings.eval.max_new_tokens,
                teacher_template=cfg.data.teacher_template,
            )
            for name, records in sorted(by_task.items())
        ]

    def _evaluator(self, row: db.Round, tasks: list):
        from selfdistill.continual.evaluation import StageEvaluation

        cfg = load_config(overrides=row.config)

        def base_model():
            import torch

            from selfdistill.models import load_model

            return load_model(self.base_model, torch.float32)

        return StageEvaluation(
            tasks,
            self.settings.eval,
            self.root / "base" / "drift_answers.json",
            base_model,
            self.base_model,
            cfg.data.system_prompt,
            self.echo,
        )

    def _evaluate(self, row: db.Round) -> None:
        import torch

        from selfdistill.eval import drift as drift_mod
        from selfdistill.models import load_model
        from selfdistill.precision import resolve_precision

        where = self._round_dir(row.number)
        tasks = self._tasks_for(row)
        evaluator = self._evaluator(row, tasks)
        with self.db.transaction() as session:
            parent = session.get(db.Version, row.parent_version)
        models = {"current": self._model_path(parent), "candidate": str(where / "train" / "final")}
        self._reuse_served_evaluation(row, tasks, where / "eval")
        results = {}
        for side, path in models.items():
            model, tokenizer = load_model(path, torch.float32)
            seconds = evaluator.evaluate(model, tokenizer, where / "eval" / side, f"round {row.number} {side}")
            if not layout.done_file(where / "eval" / side).is_file():
                write_json(layout.done_file(where / "eval" / side), {"eval_time_s": seconds})
            precision = resolve_precision(self.settings.eval.precision, next(model.parameters()).device)
            reference = where / "eval" / "current_drift_answers.json"
            drift_settings = self.settings.eval.drift
            if drift_settings.enabled and side == "current" and drift_mod.load_base_answers(reference) is None:
                if row.parent_version == 0:  # the served version is the base: drift's own reference answers
                    answers = evaluator.drift_answers()
                else:
                    answers = drift_mod.base_answers(
                        model,
                        tokenizer,
                        prompts=drift_mod.drift_prompts()[: drift_settings.limit],
                        max_new_tokens=drift_settings.max_new_tokens,
                        batch_size=self.settings.eval.batch_size,
                        precision=precision,
                        base_name=path,
                    )
                drift_mod.save_base_answers(answers, reference)
            results[side] = _read_evaluation(where / "eval" / side, tasks)
            if drift_settings.enabled and side == "candidate":
                step = drift_mod.drift(drift_mod.load_base_answers(reference), model, precision=precision)
                results[side]["drift_from_current"] = step["kl_nats"]
                self.echo(
                    f"  round {row.number} candidate: drift from the served version = {step['kl_nats']:.4f} nats/token"
                )
            del model
        fault("round_evaluate", row.number)
        self._advance(row.number, "gate", metrics=results)

    def _reuse_served_evaluation(self, row: db.Round, tasks: list, target: Path) -> None:
        """The served version was evaluated in the newest earlier round that saw it (as its candidate, or as its
        served model). Greedy evaluation is deterministic, so every task whose held-out records are the same,
        the probes and drift are copied from there instead of generated again."""
        with self.db.transaction() as session:
            version = session.get(db.Version, row.parent_version)
            earlier = list(
                session.scalars(select(db.Round).where(db.Round.number < row.number).order_by(db.Round.number.desc()))
            )
        for r in earlier:
            side = (
                "current" if r.parent_version == version.number else "candidate" if r.number == version.round else None
            )
            if side is None or not r.metrics:
                continue
            source, into = self._round_dir(r.number) / "eval", target / "current"
            for task in tasks:
                if (r.metrics[side]["tasks"].get(task.name) or {}).get("heldout") == _heldout_digest(task):
                    done = layout.task_eval_dir(into, task.name)
                    if not done.exists():
                        shutil.copytree(layout.task_eval_dir(source / side, task.name), done)
            for name in ("probes", "probes.json", "drift.json"):
                origin, copy = source / side / name, into / name
                if origin.exists() and not copy.exists():
                    (shutil.copytree if origin.is_dir() else shutil.copyfile)(origin, copy)
            if side == "current" and (source / "current_drift_answers.json").is_file():
                if not (target / "current_drift_answers.json").exists():
                    shutil.copyfile(source / "current_drift_answers.json", target / "current_drift_answers.json")
            return

    def _gate(self, row: db.Round) -> None:
        _, new_tasks = self._records_of(row.number)
        decision = decide(self.settings.gate, row.metrics["current"], row.metrics["candidate"], new_tasks)
        self.echo(f"round {row.number}: {decision['summary']}")
        for reason in decision["reasons"]:
            self.echo(f"  {reason}")
        fault("round_gate", row.number)
        if decision["promote"]:
            self._advance(row.number, "promote", decision=decision)
            return
        with self.db.transaction() as session:
            stored = session.get(db.Round, row.number)
            stored.stage, stored.outcome, stored.decision, stored.finished_at = "done", "rejected", decision, db.now()
            # Its demonstrations are pending again (the round keeps their digest): a later round, with other
            # settings or more data, learns them instead of losing them with the rejected candidate.
            released = list(session.scalars(select(db.Record).where(db.Record.round == row.number)))
            for record in released:
                record.round = None
            session.add(
                db.Event(
                    kind="rejected",
                    round=row.number,
                    version=row.parent_version,
                    detail={"summary": decision["summary"], "released": len(released)},
                )
            )
        if not self.settings.keep_rejected:  # never served: only the round's numbers are kept
            shutil.rmtree(self._round_dir(row.number) / "train" / "final", ignore_errors=True)

    def _promote(self, row: db.Round) -> None:
        with self.db.transaction() as session:
            done = session.scalar(select(db.Version).where(db.Version.round == row.number))
            number = done.number if done else (session.scalar(select(func.max(db.Version.number))) or 0) + 1
            parent = session.get(db.Version, row.parent_version)
        target = self.root / "versions" / f"v{number}"
        source = self._round_dir(row.number) / "train" / "final"
        if source.is_dir():  # a kill after the rename leaves only the target: renamed already
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(source, target)
        fault("round_promote", row.number)
        kind = "lora" if (row.config.get("model") or {}).get("lora", {}).get("enabled") else "full"
        with self.db.transaction() as session:
            if session.scalar(select(db.Version).where(db.Version.round == row.number)) is None:
                session.add(
                    db.Version(
                        number=number,
                        parent=row.parent_version,
                        round=row.number,
                        path=str(target.relative_to(self.root)),
                        kind=kind,
                        data_digests=[*parent.data_digests, row.data_digest],
                        metrics=row.metrics["candidate"],
                    )
                )
            self.db.workspace(session).current_version = number
            stored = session.get(db.Round, row.number)
            stored.stage, stored.outcome, stored.finished_at = "done", "promoted", db.now()
            session.add(
                db.Event(kind="promoted", round=row.number, version=number, detail={"parent": row.parent_version})
            )
        self.echo(f"round {row.number}: version {number} is now served")

    # --- versions -----------------------------------------------------------------------------

    def current_version(self) -> int:
        with self.db.transaction() as session:
            return self.db.workspace(session).current_version

    def model_path(self, version: int | None = None) -> str:
        """The served version's weights (a directory, or the base model's name for version 0)."""
        with self.db.transaction() as session:
            number = self.db.workspace(session).current_version if version is None else version
            row = session.get(db.Version, number)
        if row is None:
            raise UserError(f"no version {number} in {self.root}; `sdft learn status` lists them.")
        return self._model_path(row)

    def lineage(self, version: int) -> list[dict]:
        """The versions `version` descends from, oldest first, and itself, without the base model (version 0):
        each {"number", "kind", "path"}, a round's training having started from the one before."""
        chain = []
        with self.db.transaction() as session:
            row = session.get(db.Version, version)
            if row is None:
                raise UserError(f"no version {version} in {self.root}; `sdft learn status` lists them.")
            while row is not None and row.number != 0:
                chain.append({"number": row.number, "kind": row.kind, "path": self._model_path(row)})
                row = session.get(db.Version, row.parent)
        return chain[::-1]

    def rollback(self, version: int) -> None:
        """Serve an earlier (or any stored) version again; refused while a round runs."""
        with self._exclusive("a rollback"):
            with self.db.transaction() as session:
                row = session.get(db.Version, version)
                if row is None:
                    raise UserError(f"no version {version} in {self.root}; `sdft learn status` lists them.")
                workspace = self.db.workspace(session)
                before = workspace.current_version
                workspace.current_version = version
                session.add(db.Event(kind="rollback", version=version, detail={"from": before}))
        self.write_report()
        self.echo(f"version {version} is now served (was {before})")

    def export(self, version: int, out: str | Path) -> Path:
        """A Hugging Face directory of `version`, whose README.md tells its learning history."""
        from selfdistill.learner.history import write_history_card

        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{out} exists and is not empty; export into a new or empty directory.")
        with self.db.transaction() as session:
            row = session.get(db.Version, version)
            if row is None:
                raise UserError(f"no version {version} in {self.root}; `sdft learn status` lists them.")
        if row.kind == "base":
            raise UserError(f"version 0 is the base model {row.path}; it has no weights of the learner's to export.")
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.root / row.path, tmp)
        write_history_card(tmp, self.status(), version)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        self.echo(f"version {version} exported to {out}")
        return out

    # --- what it holds ------------------------------------------------------------------------

    def pending(self) -> int:
        """Training records no round has taken yet (one count query: asked after every add by a server)."""
        with self.db.transaction() as session:
            query = select(func.count()).select_from(db.Record)
            return session.scalar(query.where(db.Record.split == "train", db.Record.round.is_(None)))

    def round_info(self, number: int | None = None) -> dict | None:
        """One round as `status()` shows it (None: the newest), or None when there is no such round."""
        with self.db.transaction() as session:
            if number is None:
                number = session.scalar(select(func.max(db.Round.number)))
            row = session.get(db.Round, number) if number is not None else None
            return _round_data(row) if row is not None else None

    def status(self) -> dict:
        """Everything `sdft learn status` shows, as plain data: versions, rounds, tasks, pending, matrix."""
        with self.db.transaction() as session:
            workspace = self.db.workspace(session)
            versions = list(session.scalars(select(db.Version).order_by(db.Version.number)))
            rounds = list(session.scalars(select(db.Round).order_by(db.Round.number)))
            tasks = list(session.scalars(select(db.Task).order_by(db.Task.name)))
            counts = session.execute(
                select(db.Record.task, db.Record.split, db.Record.round.is_(None), func.count()).group_by(
                    db.Record.task, db.Record.split, db.Record.round.is_(None)
                )
            ).all()
        per_task = _task_counts(tasks, counts)
        task_names = [t.name for t in tasks]
        return {
            "workspace": str(self.root),
            "database": db.safe_url(self.database_url),
            "base_model": workspace.base_model,
            "method": self.settings.method,
            "current_version": workspace.current_version,
            "versions": [_version_data(v) for v in versions],
            "rounds": [_round_data(r) for r in rounds],
            "tasks": per_task,
            "pending": sum(t["pending"] for t in per_task.values()),
            "matrix": {"tasks": task_names, "rows": _matrix_rows(rounds, task_names)},
            "last_decision": next((r.decision for r in reversed(rounds) if r.decision), None),
        }


def _task_counts(tasks: list[db.Task], counts) -> dict[str, dict]:
    """Per task: its grader and its records, training, held-out and pending (training records no round took)."""
    per_task = {t.name: {"grader": t.grader, "train": 0, "heldout": 0, "pending": 0} for t in tasks}
    for task, split, pending, count in counts:
        per_task[task][split] += count
        if split == "train" and pending:
            per_task[task]["pending"] += count
    return per_task


def _matrix_rows(rounds: list[db.Round], task_names: list[str]) -> list[dict]:
    """The accuracy matrix over rounds: per evaluated round, the served version's row and the candidate's."""
    rows = []
    for r in rounds:
        for side in ("current", "candidate") if r.metrics else ():
            scores = r.metrics[side]["tasks"]
            rows.append(
                {
                    "round": r.number,
                    "model": side,
                    "version": r.parent_version if side == "current" else None,
                    "outcome": r.outcome,
                    "scores": [scores.get(t, {}).get("score") for t in task_names],
                    "probes": r.metrics[side].get("probes"),
                    "drift_from_base": r.metrics[side].get("drift_from_base"),
                }
            )
    return rows


def _version_data(v: db.Version) -> dict:
    return {
        "number": v.number,
        "parent": v.parent,
        "round": v.round,
        "kind": v.kind,
        "path": v.path,
        "data_digests": v.data_digests,
        "created_at": v.created_at.isoformat(timespec="seconds"),
    }


def _round_data(r: db.Round) -> dict:
    return {
        "number": r.number,
        "parent_version": r.parent_version,
        "stage": r.stage,
        "outcome": r.outcome,
        "data_digest": r.data_digest,
        "decision": r.decision,
        "metrics": r.metrics,
        "started_at": r.started_at.isoformat(timespec="seconds"),
        "finished_at": r.finished_at.isoformat(timespec="seconds") if r.finished_at else None,
    }


def _round_config(settings: LearnerSettings, model: str, output_dir: Path, overrides: list[str] = ()):
    """The training Config of a round: the learner's settings (and the round's overrides), training the given
    model into `output_dir`."""
    data = merge(settings.config, parse_overrides(list(overrides)))
    data = merge(data, {"model": {"name": model}, "train": {"output_dir": str(output_dir)}})
    data["method"] = settings.method
    return load_config(overrides=data)


def _heldout_digest(task) -> str:
    """Which held-out records a task was evaluated on."""
    return _digest_of([record_digest(task.name, record.to_dict()) for record in task.eval])


def _read_evaluation(where: Path, tasks: list) -> dict:
    """The numbers the gate compares, read back from an evaluated directory as the continual results are."""
    names = [task.name for task in tasks]
    values = stage_values(where, names)
    return {
        "tasks": {
            name: {"score": score, "count": len(task.eval), "loglik": loglik, "heldout": _heldout_digest(task)}
            for name, task, score, loglik in zip(names, tasks, values["scores"], values["loglik"])
        },
        "probes": values["prior"],
        "drift_from_base": values["drift_kl"],
    }
