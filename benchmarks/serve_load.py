"""`sdft serve` under load on loopback: K clients for T seconds while a round trains and a version is promoted.

    python -m benchmarks.serve_load --clients 4 --seconds 90 [--steps 12] [--demo-every 5] [--model toy]
        [--server-env OMP_NUM_THREADS=1] [--engine decode|vllm] [--tag _x]

A learner is created in a temporary directory on tests/toy.py's tiny copying model (`--model toy`, the
default) or on the embedded SmolLM2-135M-Instruct (`--model smollm2-135m`), with tests/test_learner.py's
settings (SFT, batch 4, `--steps` steps), and seeded with 24 demonstrations of task "alpha" (every prompt
is answered "v3"). `sdft serve` runs as a separate process on a free loopback port (`python -m
selfdistill.cli serve WORKDIR --port P --api-key KEY --max-new-tokens 8`). After one warm-up request,
K client threads loop: a chat completion (max_tokens 3), and every `--demo-every`-th request a POST
/v1/demonstrations of one new, unique record (task "alpha", demonstration "v3"). Each request's start,
latency, status and answering version (the `x-selfdistill-version` header, and `system_fingerprint` on
a chat) is recorded.

Phases, by the time a request started:
  before  T/3 seconds of load with no round;
  during  from POST /v1/rounds (the round trains in the server's child process) until the round is
          decided and, when promoted, the server answers with the new version;
  after   T/3 more seconds.
Per phase: requests, failures (a non-2xx status or an exception), p50 / p99 latency of chats and of
demonstrations, the versions that answered, and the cores in use on average (from /proc: the machine's
busy time, the server process, its round's process, this process's clients, and the rest: other work
on a shared machine, which the latencies depend on as much as on the round). At the end, every
demonstration that got a 2xx is looked up in the learner's database, and the round must have been
promoted. `--server-env NAME=VALUE` sets an environment variable of the server (and so of its rounds),
e.g. OMP_NUM_THREADS=1. Results: benchmarks/results/serve_load{tag}.json (the command, the machine,
the load average at each phase boundary, the round's stages over time and size, a per-second series).
The exit status is 0 only with no failed request, no missing demonstration and a promoted round.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEY = "load-test-key"
KEYS = [f"k{i}" for i in range(8)]


def _loadavg() -> str | None:
    path = Path("/proc/loadavg")
    return path.read_text().strip() if path.exists() else None


def _cpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (fields[0] is the state, fields[1] the parent)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def cpu_snapshot(server_pid: int) -> dict:
    """CPU seconds so far: the machine's busy time (all cores), the server process, its rounds (children, live
    or ended), and this process (the clients); what is left of the machine's busy time is other work."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    fields = _stat_fields(server_pid) or ["-"] * 20
    server = int(fields[11]) + int(fields[12]) if fields[11] != "-" else 0
    rounds = int(fields[13]) + int(fields[14]) if fields[13] != "-" else 0
    for child in _descendants(server_pid):
        if (f := _stat_fields(child)) is not None:
            rounds += int(f[11]) + int(f[12])  # a child's own children are descendants too
    me = os.times()
    return {
        "wall": time.monotonic(),
        "busy": (user + nice + system + irq + softirq + steal) / TICK,
        "server": server / TICK,
        "round": rounds / TICK,
        "clients": me.user + me.system,
    }


def cpu_use(a: dict, b: dict) -> dict:
    """Cores in use on average between two snapshots: the machine, each of ours, and the rest ("others")."""
    wall = b["wall"] - a["wall"]
    cores = {k: round((b[k] - a[k]) / wall, 2) for k in ("busy", "server", "round", "clients")} if wall > 0 else {}
    if cores:
        cores["others"] = round(cores["busy"] - cores["server"] - cores["round"] - cores["clients"], 2)
    return cores


class CpuSampler(threading.Thread):
    """A CPU snapshot every second, to line the latencies up with who used the cores."""

    def __init__(self, server_pid: int, t0: float):
        super().__init__(daemon=True)
        self.server_pid, self.t0 = server_pid, t0
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            snapshot = cpu_snapshot(self.server_pid)
            snapshot["t"] = snapshot["wall"] - self.t0
            self.samples.append(snapshot)
            if self.stop.wait(1.0):
                return


def make_learner(root: Path, model: str, steps: int):
    """A learner on the toy copying model (or the embedded model), seeded with 24 "alpha" demonstrations."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_learner import SETTINGS, task_records

    from selfdistill.learner import Learner

    settings = [s for s in SETTINGS if not s.startswith("train.max_steps=")] + [f"train.max_steps={steps}"]
    if model == "toy":
        from toy import copy_model

        model_dir = root.parent / "toy-model"
        copy, tokenizer = copy_model()
        copy.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        model = str(model_dir)
    else:  # a real model: its own learning rate, and the template its chat format needs
        settings = [s for s in settings if not s.startswith(("train.lr=", "data.teacher_template="))]
        settings.append("train.lr=1e-4")
    learner = Learner.init(root, model=model, method="sft", overrides=settings, echo=lambda _: None)
    learner.add(task_records("v3", 0), "alpha")
    return learner


class Load:
    """K client threads; each request's record goes to `self.requests`."""

    def __init__(self, url: str, model_id: str, clients: int, demo_every: int, seed: int = 0):
        self.url, self.model_id, self.clients, self.demo_every = url, model_id, clients, demo_every
        self.requests: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self._counter = itertools.count()
        self._seed = seed
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        self.t0 = time.monotonic()
        for thread in self.threads:
            thread.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _unique_prompt(self) -> str:
        """Six keys spelling a counter in base 8: a prompt no other request sends, in the toy model's vocabulary."""
        n = next(self._counter)
        return " ".join(KEYS[(n >> (3 * d)) & 7] for d in range(6))

    def _client(self, index: int) -> None:
        rng = random.Random(self._seed * 1000 + index)
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=300) as http:
            for n in itertools.count(1):
                if self.stop.is_set():
                    return
                entry: dict = {"client": index, "start": self.now()}
                began = time.perf_counter()
                try:
                    if n % self.demo_every == 0:
                        entry["kind"] = "demo"
                        entry["prompt"] = self._unique_prompt()
                        body = {"prompt": entry["prompt"], "demonstration": "v3", "task": "alpha"}
                        reply = http.post("/v1/demonstrations", json=body)
                        if reply.is_success:
                            entry["added"] = reply.json()["added"]
                    else:
                        entry["kind"] = "chat"
                        content = f"{rng.choice(KEYS)} {rng.choice(KEYS)}"
                        body = {
                            "model": self.model_id,
                            "messages": [{"role": "user", "content": content}],
                            "max_tokens": 3,
                        }
                        reply = http.post("/v1/chat/completions", json=body)
                        if reply.is_success:
                            answer = reply.json()
                            entry["fingerprint"] = answer["system_fingerprint"]
                            entry["tokens"] = answer["usage"]["completion_tokens"]
                    entry["status"] = reply.status_code
                    entry["version"] = reply.headers.get("x-selfdistill-version")
                    if not reply.is_success:
                        entry["error"] = reply.text[:300]
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    entry["status"] = None
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
                entry["latency_ms"] = (time.perf_counter() - began) * 1000
                self.requests.append(entry)


def _ok(entry: dict) -> bool:
    return entry.get("status") is not None and 200 <= entry["status"] < 300


def _phase_row(name: str, entries: list[dict], seconds: float) -> dict:
    chats = [e["latency_ms"] for e in entries if e["kind"] == "chat" and _ok(e)]
    demos = [e["latency_ms"] for e in entries if e.get("kind") == "demo" and _ok(e)]
    versions = sorted({int(e["version"]) for e in entries if e.get("version") is not None})
    return {
        "phase": name,
        "seconds": round(seconds, 1),
        "requests": len(entries),
        "failed": sum(not _ok(e) for e in entries),
        "req_per_s": round(len(entries) / seconds, 1) if seconds > 0 else None,
        "chats": len(chats),
        "chat_p50_ms": _percentile(chats, 50),
        "chat_p99_ms": _percentile(chats, 99),
        # Tokens per answer: a latency compares across versions only where their answers are as long.
        "chat_tokens_mean": round(
            sum(e.get("tokens", 0) for e in entries if e["kind"] == "chat" and _ok(e)) / len(chats), 2
        )
        if chats
        else None,
        "demos": len(demos),
        "demo_p50_ms": _percentile(demos, 50),
        "demo_p99_ms": _percentile(demos, 99),
        "versions": versions,
    }


def _series(entries: list[dict], end: float, samples: list[dict]) -> list[dict]:
    """Per second of the run: requests started, their median and largest latency, the versions that answered,
    and the cores in use over the sampler's second closest to it (machine, server, round, clients, others)."""
    out = []
    for second in range(int(end) + 1):
        rows = [e for e in entries if second <= e["start"] < second + 1]
        latencies = [e["latency_ms"] for e in rows]
        pairs = [(a, b) for a, b in zip(samples, samples[1:]) if a["t"] <= second + 0.5 < b["t"]]
        out.append(
            {
                "t": second,
                "requests": len(rows),
                "p50_ms": _percentile(latencies, 50),
                "max_ms": max(latencies) if latencies else None,
                "versions": sorted({int(e["version"]) for e in rows if e.get("version") is not None}),
                "cores": cpu_use(*pairs[0]) if pairs else None,
            }
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="K concurrent clients")
    parser.add_argument("--seconds", type=float, default=90, help="T: the before and after phases are T/3 each")
    parser.add_argument("--steps", type=int, default=12, help="training steps of the round")
    parser.add_argument("--demo-every", type=int, default=5, help="every Nth request of a client is a demonstration")
    parser.add_argument("--model", default="toy", help="'toy' (tests/toy.py) or 'smollm2-135m'")
    parser.add_argument("--round-timeout", type=float, default=1800, help="give up on the round after this long")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable of the server process (and so of its rounds), e.g. OMP_NUM_THREADS=1",
    )
    parser.add_argument("--keep", default=None, help="keep the learner in this (new) directory")
    parser.add_argument(
        "--engine", default="decode", help="the server's --engine: decode, or vllm (run in .venv-vllm; not --model toy)"
    )
    args = parser.parse_args(argv)

    started_load = _loadavg()
    scratch = tempfile.TemporaryDirectory(prefix="serve-load-")
    root = Path(args.keep).resolve() if args.keep else Path(scratch.name) / "learner"
    print(f"learner: {root} ({args.model}, {args.steps} steps)", flush=True)
    make_learner(root, args.model, args.steps)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = open(Path(scratch.name) / "server.log", "w")
    command = [sys.executable, "-m", "selfdistill.cli", "serve", str(root), "--port", str(port)]
    command += ["--api-key", KEY, "--max-new-tokens", "8", "--engine", args.engine]
    env = {**os.environ, **dict(item.split("=", 1) for item in args.server_env)}
    server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    result: dict = {
        "suite": "serve_load",
        "command": "python -m benchmarks.serve_load " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count()},
        "settings": vars(args) | {"max_tokens": 3, "server": " ".join(command[1:])},
        "load": {"start": started_load},
    }
    try:
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
        ready = time.monotonic()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}); see {server_log.name}")
            try:
                models = http.get("/v1/models")
                if models.is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - ready > 300:
                raise RuntimeError("the server did not answer /v1/models within 300 s")
            time.sleep(0.2)
        result["server_start_s"] = round(time.monotonic() - ready, 1)
        model_id = models.json()["data"][0]["id"]
        warm = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "k1 k2"}], "max_tokens": 3}
        )
        warm.raise_for_status()
        print(f"server up in {result['server_start_s']} s on {url}; load: {args.clients} clients", flush=True)

        load = Load(url, model_id, args.clients, args.demo_every)
        third = args.seconds / 3
        load.start()
        sampler = CpuSampler(server.pid, load.t0)
        sampler.start()
        marks = {"start": cpu_snapshot(server.pid)}
        time.sleep(third)

        result["load"]["round_posted"] = _loadavg()
        t_round = load.now()
        marks["round"] = cpu_snapshot(server.pid)
        posted = http.post("/v1/rounds", json={})
        if posted.status_code != 202:
            raise RuntimeError(f"POST /v1/rounds: {posted.status_code} {posted.text}")
        number = posted.json()["number"]
        print(f"round {number} started at {t_round:.1f} s", flush=True)
        stages: list[dict] = [{"t": round(t_round, 2), "stage": posted.json()["stage"]}]
        while True:
            round_ = http.get(f"/v1/rounds/{number}").json()
            if round_["stage"] != stages[-1]["stage"]:
                stages.append({"t": round(load.now(), 2), "stage": round_["stage"]})
                print(f"  {stages[-1]['t']:.1f} s: {round_['stage']}", flush=True)
            if round_["stage"] == "done":
                versions = http.get("/v1/versions").json()
                if round_["outcome"] != "promoted" or versions["served_version"] == versions["current_version"]:
                    break
            if load.now() - t_round > args.round_timeout:
                raise RuntimeError(f"round {number} not decided after {args.round_timeout} s")
            time.sleep(0.25)
        t_switched = load.now()
        marks["switched"] = cpu_snapshot(server.pid)
        stages.append({"t": round(t_switched, 2), "stage": f"served v{versions['served_version']}"})
        print(f"round {number} {round_['outcome']}; serving v{versions['served_version']} from {t_switched:.1f} s")
        result["load"]["round_decided"] = _loadavg()
        time.sleep(third)
        t_end = load.now()
        marks["end"] = cpu_snapshot(server.pid)
        load.stop.set()
        for thread in load.threads:
            thread.join(600)
        result["load"]["end"] = _loadavg()

        entries = sorted(load.requests, key=lambda e: e["start"])
        phases = {
            "before": [e for e in entries if e["start"] < t_round],
            "during": [e for e in entries if t_round <= e["start"] < t_switched],
            "after": [e for e in entries if e["start"] >= t_switched],
        }
        spans = {"before": t_round, "during": t_switched - t_round, "after": t_end - t_switched}
        rows = [_phase_row(name, phases[name], spans[name]) for name in phases]
        rows.append(_phase_row("all", entries, t_end))
        bounds = {"before": ("start", "round"), "during": ("round", "switched"), "after": ("switched", "end")}
        bounds["all"] = ("start", "end")
        for row in rows:  # cores in use during the phase: the whole machine, and whose
            cores = cpu_use(marks[bounds[row["phase"]][0]], marks[bounds[row["phase"]][1]])
            row.update({f"cores_{k}": v for k, v in cores.items()})
        sampler.stop.set()
        sampler.join(10)

        # Every demonstration the server accepted is in the database, once, as a new record.
        from sqlalchemy import select

        from selfdistill.learner import Learner
        from selfdistill.learner import database as db

        learner = Learner(root, echo=lambda _: None)
        with learner.db.transaction() as session:
            stored = {r.data["prompt"] for r in session.scalars(select(db.Record).where(db.Record.task == "alpha"))}
            # The round trains on what was pending when it started and evaluates every held-out record up to
            # then: the faster the before phase, the larger its evaluation.
            seen = session.get(db.Round, number).last_record
            records = list(session.scalars(select(db.Record).where(db.Record.id <= seen)))
            size = {
                "trained_on": sum(r.round == number for r in records),
                "held_out": sum(r.split == "heldout" for r in records),
            }
        accepted = [e for e in entries if e["kind"] == "demo" and _ok(e)]
        missing = [e["prompt"] for e in accepted if e["prompt"] not in stored]
        # Each client's requests run one after another, so the versions it sees never go back.
        backwards = 0
        for client in range(args.clients):
            seen = [int(e["version"]) for e in entries if e["client"] == client and e.get("version") is not None]
            backwards += sum(b < a for a, b in zip(seen, seen[1:]))
        mismatched = sum(
            1 for e in entries if e.get("fingerprint") is not None and e["fingerprint"] != f"v{e['version']}"
        )
        status = learner.status()
        result.update(
            {
                "phases": rows,
                "round": {
                    "number": number,
                    "outcome": round_["outcome"],
                    "decision": (round_.get("decision") or {}).get("summary"),
                    "training_steps": len(round_.get("training") or []),
                    "records": size,
                    "stages": stages,
                    "served_version": versions["served_version"],
                },
                "checks": {
                    "failed_requests": sum(r["failed"] for r in rows[:3]),
                    "demonstrations_accepted": len(accepted),
                    "demonstrations_not_new": sum(e.get("added") != 1 for e in accepted),
                    "demonstrations_missing_from_database": len(missing),
                    "alpha_records_in_database": len(stored),
                    "pending_after": status["pending"],
                    "version_went_back": backwards,
                    "fingerprint_header_mismatch": mismatched,
                    "promoted": round_["outcome"] == "promoted" and versions["served_version"] == number,
                },
                "errors": [e["error"] for e in entries if not _ok(e)][:20],
                "series": _series(entries, t_end, sampler.samples),
            }
        )
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        server_log.close()
        log_text = Path(server_log.name).read_text(errors="replace")
        result["server_log_tail"] = log_text.strip().splitlines()[-20:]
        result["server_tracebacks"] = log_text.count("Traceback")
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        out = HERE / "results" / f"serve_load{args.tag}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        scratch.cleanup()

    from benchmarks.common import table

    print()
    print(
        table(
            rows,
            [
                "phase",
                "seconds",
                "requests",
                "failed",
                "req_per_s",
                "chat_p50_ms",
                "chat_p99_ms",
                "chat_tokens_mean",
                "demo_p50_ms",
                "demo_p99_ms",
                "versions",
                "cores_busy",
                "cores_server",
                "cores_round",
                "cores_clients",
                "cores_others",
            ],
        )
    )
    print(json.dumps(result["checks"]))
    print(f"round: {json.dumps({k: result['round'][k] for k in ('outcome', 'records', 'stages')})}")
    print(f"load average: {result['load']}")
    print(f"results: {out}")
    checks = result["checks"]
    good = (
        checks["failed_requests"] == 0
        and checks["demonstrations_missing_from_database"] == 0
        and checks["promoted"]
        and checks["version_went_back"] == 0
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
