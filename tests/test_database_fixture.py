"""The database fixtures of conftest.py: every test here runs on SQLite and on a throwaway PostgreSQL server."""

import multiprocessing

import sqlalchemy as sa

ROWS_PER_WRITER = 50

metadata = sa.MetaData()
rows = sa.Table(
    "rows",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("writer", sa.Integer, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.UniqueConstraint("writer", "n"),
)


def _engine(url: str) -> sa.Engine:
    # SQLite: a writer waits for the other's lock (up to 60 s) rather than failing after the default 5 s.
    connect_args = {"timeout": 60} if url.startswith("sqlite") else {}
    return sa.create_engine(url, connect_args=connect_args)


def _write_rows(url: str, writer: int, start) -> None:
    """In a process of its own: insert ROWS_PER_WRITER rows, each in its own transaction."""
    engine = _engine(url)
    try:
        start.wait(timeout=60)  # both writers begin together
        for n in range(ROWS_PER_WRITER):
            with engine.begin() as connection:
                connection.execute(rows.insert().values(writer=writer, n=n))
    finally:
        engine.dispose()


def test_the_url_is_of_the_backend_the_test_runs_on(database_url, database_backend):
    assert sa.make_url(database_url).get_backend_name() == database_backend


def test_two_processes_writing_at_once_lose_no_row(database_url):
    engine = _engine(database_url)
    metadata.create_all(engine)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [context.Process(target=_write_rows, args=(database_url, writer, start)) for writer in (1, 2)]
    for process in writers:
        process.start()
    try:
        for process in writers:
            process.join(timeout=120)
    finally:
        for process in writers:
            if process.is_alive():
                process.kill()
                process.join()
    assert [process.exitcode for process in writers] == [0, 0]

    with engine.connect() as connection:
        written = connection.execute(sa.select(rows.c.writer, rows.c.n)).all()
    engine.dispose()
    assert len(written) == 2 * ROWS_PER_WRITER
    assert sorted(written) == [(writer, n) for writer in (1, 2) for n in range(ROWS_PER_WRITER)]


def test_each_database_handed_out_is_empty_and_independent(database_url, new_database_url):
    other_url = new_database_url()
    assert other_url != database_url
    first, second = _engine(database_url), _engine(other_url)
    assert sa.inspect(first).get_table_names() == []
    assert sa.inspect(second).get_table_names() == []

    metadata.create_all(first)
    with first.begin() as connection:
        connection.execute(rows.insert(), [{"writer": 1, "n": n} for n in range(3)])
    assert sa.inspect(second).get_table_names() == []

    metadata.create_all(second)
    with second.begin() as connection:
        connection.execute(rows.insert().values(writer=2, n=0))
    with first.connect() as connection:
        assert connection.execute(sa.select(rows.c.writer, rows.c.n).order_by(rows.c.n)).all() == [
            (1, 0),
            (1, 1),
            (1, 2),
        ]
    with second.connect() as connection:
        assert connection.execute(sa.select(rows.c.writer, rows.c.n)).all() == [(2, 0)]
    first.dispose()
    second.dispose()
