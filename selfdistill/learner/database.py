"""The learner's state in a database: records, tasks, rounds, versions and the log of what happened.

SQLite inside the workspace by default (`sqlite:///WORKDIR/learner.db`), PostgreSQL by URL for a
team sharing one learner (`postgresql+psycopg://user@host/db`). The schema is created and upgraded
by Alembic (`selfdistill/learner/migrations/`); `open_database` brings any database to the newest
revision before it is used. Weights stay files in the workspace; the database holds only what
describes them.

Every change the learner makes is one transaction (`Database.transaction`), so a kill at any
moment leaves the rows of before or after, never half of a change.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from selfdistill.errors import UserError

MIGRATIONS = Path(__file__).parent / "migrations"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Workspace(Base):
    """One row: what the learner was created with, and which version is served."""

    __tablename__ = "workspace"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    base_model: Mapped[str] = mapped_column(String(1024))
    # The learner's settings as given to `init` (method, training config, held-out share, gate, evaluation).
    settings: Mapped[dict] = mapped_column(JSON)
    current_version: Mapped[int] = mapped_column(Integer, default=0)


class Task(Base):
    """A task demonstrations are added under; how its held-out records are scored."""

    __tablename__ = "tasks"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    grader: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Record(Base):
    """One demonstration. `split` is "train" or "heldout" (evaluation only, never trained on);
    `round` is the round that trained on it (None: pending)."""

    __tablename__ = "records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(ForeignKey("tasks.name"), index=True)
    # sha256 of the task name and the record's fields: an exact duplicate is dropped.
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    data: Mapped[dict] = mapped_column(JSON)
    split: Mapped[str] = mapped_column(String(16))
    batch: Mapped[str] = mapped_column(String(64), index=True)
    added_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    round: Mapped[int | None] = mapped_column(ForeignKey("rounds.number"), nullable=True, index=True)


class Round(Base):
    """One round: train the parent version on the pending demonstrations, evaluate, gate, promote.

    `stage` is where the round is ("train", "evaluate", "gate", "promote", "done"); a round that was
    killed continues there. `outcome` is "promoted" or "rejected" once done."""

    __tablename__ = "rounds"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_version: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The newest record id the round saw: its held-out sets are the held-out records up to it.
    last_record: Mapped[int] = mapped_column(Integer)
    data_digest: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    decision: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Version(Base):
    """A model that was (or is) served: version 0 is the base model, each promoted round adds one."""

    __tablename__ = "versions"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    round: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True)
    # A directory relative to the workspace, or the base model's name for version 0.
    path: Mapped[str] = mapped_column(String(1024))
    kind: Mapped[str] = mapped_column(String(16))  # "base", "full" or "lora" (merged weights + adapter/)
    data_digests: Mapped[list] = mapped_column(JSON)  # of every round in its lineage, oldest first
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Event(Base):
    """What happened, in order: init, add, round started, promoted, rejected, rollback."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    kind: Mapped[str] = mapped_column(String(32))
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class Completion(Base):
    """A completion the server returned: what the model saw and wrote, so a correction by its id stores a
    demonstration for exactly that prompt."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # "chat" (prompt: messages) or "text" (prompt: a string)
    prompt: Mapped[dict] = mapped_column(JSON)  # {"prompt": messages or text}
    output: Mapped[str] = mapped_column(String)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


def _sqlite_pragmas(engine: Engine) -> None:
    """SQLite for several processes: WAL (readers do not block the writer), a wait instead of
    "database is locked", and every transaction taking the write lock at BEGIN, so two writers
    queue instead of deadlocking on a read lock each wants to upgrade."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN is replaced by ours below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60})
            _sqlite_pragmas(engine)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # noqa: BLE001 - a malformed URL or a missing driver is the user's to fix
        raise UserError(f"database {url!r}: {exc}") from None


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (creates it in an empty database)."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines describe every check on every open
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Database:
    """The learner's database: an engine and short transactions."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        try:
            upgrade(self.engine)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, UserError):
                raise
            raise UserError(f"database {safe_url(url)}: could not open or upgrade it ({exc}).") from None

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose changes are committed together at the end, or not at all."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def workspace(self, session: Session) -> Workspace:
        row = session.scalar(select(Workspace).where(Workspace.id == 1))
        if row is None:
            raise UserError(f"database {safe_url(self.url)} holds no learner; run `sdft learn init` first.")
        return row

    def dispose(self) -> None:
        self.engine.dispose()


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url
