"""A throwaway PostgreSQL server for the tests: initdb into a temporary directory, serve, delete.

The server listens on 127.0.0.1 at a free port (and on a Unix socket inside its own temporary
directory), trusts every local connection, and runs with fsync off: nothing in it has to survive.
When the tests run as root (as in CI), initdb and postgres refuse to, so both run as the `postgres`
OS user (or `nobody`), which then owns the temporary directory.

    server = PostgresServer(find_postgres_bindir())
    server.start()
    url = server.create_database("learner")  # postgresql+psycopg://postgres@127.0.0.1:PORT/learner
    ...
    server.stop()

Measured on the 2-core development machine, the directory in /dev/shm: initdb and start until it accepts
connections 0.3-0.5 s, CREATE DATABASE 6-10 ms, DROP DATABASE about 10 ms. With the directory on its
disk instead: 1.2-1.6 s, and 100-300 ms per CREATE DATABASE.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

SUPERUSER = "postgres"
HOST = "127.0.0.1"
NEEDED = ("initdb", "postgres")
# Speed over durability: a crash loses a test database, nothing more. The WAL is capped (it may live in RAM).
FAST_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_wal_size=64MB",
    "min_wal_size=32MB",
)
# The server's directory goes to this tmpfs when it has room: in RAM, starting and CREATE DATABASE run
# 4 and 20 times faster than on the development machine's disk, even with fsync off (timings above).
RAM_DIR = Path("/dev/shm")
RAM_DIR_MIN_FREE = 1 << 30  # Docker's default /dev/shm is 64 MB: too small, use the disk then
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name  # /usr/lib/postgresql/15/bin -> 15
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_postgres_bindir() -> Path | None:
    """The directory holding initdb and postgres: where PATH's initdb points, else the newest
    /usr/lib/postgresql/*/bin (Debian and Ubuntu keep them there, outside PATH). None if neither has them."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)  # /usr/local/bin/initdb may link elsewhere
    candidates += [Path(d) for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in NEEDED):
            return bindir
    return None


def _server_account() -> pwd.struct_passwd | None:
    """The OS user to run initdb and postgres as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, but no `postgres` (or `nobody`) OS user to run the PostgreSQL server as")


def _traversable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _parent_dir(account: pwd.struct_passwd | None) -> Path:
    """Where to make the server's directory: RAM if there is room, else the temporary directory."""
    candidates = [RAM_DIR, Path(tempfile.gettempdir()).resolve(), Path("/tmp")]
    for parent in candidates:
        try:
            free = os.statvfs(parent)
        except OSError:
            continue
        if parent == RAM_DIR and free.f_bavail * free.f_frsize < RAM_DIR_MIN_FREE:
            continue
        if not os.access(parent, os.W_OK | os.X_OK):
            continue
        # The server's user must reach its directory: a root-only TMPDIR will not do.
        if account is not None and not _traversable_by_others(parent):
            continue
        return parent
    raise RuntimeError(f"no directory to put a PostgreSQL server in (tried {', '.join(map(str, candidates))})")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path, *, start_timeout: float = 30.0):
        self.bindir = Path(bindir)
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.base: Path | None = None  # data directory, Unix socket and log
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None
        self._admin: psycopg.Connection | None = None
        self._account = _server_account()

    # --- running the binaries -------------------------------------------------------------

    def _popen_kwargs(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no PGDATA/PGPORT from outside
        env.update(LC_ALL="C", TZ="UTC")
        kwargs = {"env": env, "cwd": self.base}
        if self._account is not None:
            kwargs.update(user=self._account.pw_uid, group=self._account.pw_gid, extra_groups=[])
            env.update(HOME=str(self.base), USER=self._account.pw_name, LOGNAME=self._account.pw_name)
        return kwargs

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        began = time.monotonic()
        # The Unix socket lives in it too, and a socket's path may not exceed about 100 characters.
        self.base = Path(tempfile.mkdtemp(prefix="selfdistill-pg-", dir=_parent_dir(self._account)))
        atexit.register(self.stop)
        try:
            if self._account is not None:
                os.chown(self.base, self._account.pw_uid, self._account.pw_gid)
            self._initdb()
            for attempt in range(5):
                self.port = _free_port()
                if self._serve(retry_on_bind_error=attempt < 4):
                    break
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _initdb(self) -> None:
        command = [
            str(self.bindir / "initdb"),
            *("-D", str(self.base / "data")),
            *("--auth=trust", "-U", SUPERUSER, "--encoding=UTF8", "--locale=C"),
            *("--no-sync", "--no-instructions"),
        ]
        result = subprocess.run(command, capture_output=True, text=True, **self._popen_kwargs())
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit {result.returncode}): {' '.join(command)}\n{result.stdout}\n{result.stderr}"
            )

    def _serve(self, retry_on_bind_error: bool) -> bool:
        """Start postgres and wait until it accepts connections. False if the port was taken meanwhile."""
        command = [
            str(self.bindir / "postgres"),
            *("-D", str(self.base / "data")),
            *("-k", str(self.base), "-h", HOST, "-p", str(self.port)),
        ]
        for setting in FAST_SETTINGS:
            command += ["-c", setting]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **self._popen_kwargs()
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                self._process = None
                tail = self.log_tail()
                if retry_on_bind_error and ("could not bind" in tail or "could not create any TCP/IP" in tail):
                    return False
                raise RuntimeError(f"PostgreSQL exited (code {code}) while starting; its log ends:\n{tail}")
            try:
                self._admin = self._connect("postgres", connect_timeout=2)
                return True
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"PostgreSQL did not accept connections on {HOST}:{self.port} within "
                        f"{self.start_timeout:.0f} s ({error}); its log ends:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Immediate shutdown (SIGQUIT, what `pg_ctl stop -m immediate` sends), then delete everything."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGQUIT)
                try:
                    self._process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        atexit.unregister(self.stop)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- databases ------------------------------------------------------------------------

    def _connect(self, dbname: str, **kwargs) -> psycopg.Connection:
        # Through the Unix socket in our own directory: it cannot be another server that took the port, and
        # postgres creates it only once it listens on HOST:port (it exits if it cannot).
        return psycopg.connect(
            host=str(self.base), port=self.port, user=SUPERUSER, dbname=dbname, autocommit=True, **kwargs
        )

    def _admin_connection(self) -> psycopg.Connection:
        if self._process is None:
            raise RuntimeError("the PostgreSQL server is not running")
        if self._admin is None or self._admin.closed:
            self._admin = self._connect("postgres")
        return self._admin

    def url(self, name: str) -> str:
        """The SQLAlchemy URL of database `name` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """Create an empty database `name` (letters, digits, underscores; at most 63) and return its SQLAlchemy URL."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a plain database name (letters, digits, _; at most 63): {name!r}")
        admin = self._admin_connection()
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if admin.info.server_version >= 150000:
            # Copy template1's files (6 ms in RAM) rather than write them through the WAL, 15's default (12 ms).
            statement += sql.SQL(" STRATEGY FILE_COPY")
        admin.execute(statement)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, ending any connections still open to it."""
        admin = self._admin_connection()
        statement = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
        if admin.info.server_version >= 130000:
            statement += sql.SQL(" WITH (FORCE)")
        admin.execute(statement)
