"""A settings sweep made of `sdft compare` runs: many variants x tasks x seeds, in parallel, tabulated.

    python -m experiments.sweep experiments/small_models/sweep.yaml --out runs/sweep --workers 2
    python -m experiments.sweep experiments/small_models/sweep.yaml --out runs/sweep --table-only

Every job is one `sdft compare` run (one task, one method variant, one seed) in its own run
directory, so each has the product's usual results.json, report and per-example files. The
starting model is evaluated once per task and that stage-0 directory is copied into every job
(the runner skips a finished stage 0), which saves a third of the work on small settings.

The sweep file holds `compare` (a stream config without stream/methods: base, eval, data_seed),
`tasks` (stream entries), `variants` (method entries, most important first), `seeds`, and
`finalists` ({per_task: k, seeds: [...], include: [names], tasks: [names]}); a variant's optional `tasks: [names]`
limits it to those tasks. Once every first-pass job has
finished, the k best SDFT variants of each task (by first-pass new-task score, then by the smaller
drop in prior-capability score) and the `include` names are run again with the extra seeds (on the
finalists' `tasks` only, when given).

`--deadline S` stops starting jobs S seconds after the start (running ones finish), so a sweep
fits a time budget; rerunning the same command skips jobs whose results exist. The table
(sweep.md, sweep.json, sweep.csv) and a plot (sweep.png) are rewritten after every job.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class Job:
    task: dict
    variant: dict
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task['name']}/{self.variant['name']}-s{self.seed}"


def task_name(entry: dict) -> str:
    return entry.get("name") or entry["task"]


def load_sweep(path: Path) -> dict:
    sweep = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("compare", "tasks", "variants"):
        if key not in sweep:
            sys.exit(f"{path}: missing top-level key {key!r} (need compare, tasks, variants).")
    for entry in sweep["tasks"]:
        entry["name"] = task_name(entry)
        for key in ("train", "eval"):  # task files are relative to the sweep file, like in a stream config
            if isinstance(entry.get(key), str) and not Path(entry[key]).is_absolute():
                entry[key] = str((path.parent / entry[key]).resolve())
    names = [v["name"] for v in sweep["variants"]]
    if len(set(names)) != len(names):
        sys.exit(f"{path}: variant names must be unique.")
    return sweep


def job_config(sweep: dict, job: Job, run_dir: Path) -> dict:
    config = copy.deepcopy(sweep["compare"])
    config.update(
        {
            "stream": [job.task],
            "methods": [method_entry(job.variant)],
            "seeds": [job.seed],
            "output_dir": str(run_dir),
            "keep_stage_models": False,
        }
    )
    return config


def run_dir_of(out: Path, job: Job) -> Path:
    return out / "runs" / job.task["name"] / f"{job.variant['name']}-s{job.seed}"


def finished(out: Path, job: Job) -> bool:
    return (run_dir_of(out, job) / "results.json").is_file()


# --- stage 0 once per task -------------------------------------------------------------------


def evaluate_start(config_path: str) -> None:
    """Entry point of the per-task stage-0 process (`--start CONFIG`)."""
    from selfdistill.continual.config import load_continual_config
    from selfdistill.continual.runner import Runner

    Runner(load_continual_config(config_path)).evaluate_start()


def start_dir(out: Path, task: dict) -> Path:
    return out / "start" / task["name"]


# --- running ---------------------------------------------------------------------------------


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def launch(out: Path, sweep: dict, job: Job, threads: int) -> subprocess.Popen:
    run_dir = run_dir_of(out, job)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "start" / "done.json").is_file():
        shutil.rmtree(run_dir / "start", ignore_errors=True)
        shutil.copytree(start_dir(out, job.task) / "start", run_dir / "start")
    config = run_dir / "sweep-job.yaml"
    config.write_text(yaml.safe_dump(job_config(sweep, job, run_dir), sort_keys=False))
    log = open(run_dir / "log.txt", "a")
    return subprocess.Popen(
        [sys.executable, "-m", "selfdistill.cli", "compare", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env(threads),
    )


def run_starts(out: Path, sweep: dict, workers: int, threads: int) -> None:
    procs = []
    for task in sweep["tasks"]:
        where = start_dir(out, task)
        if (where / "start" / "done.json").is_file():
            continue
        where.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(sweep["compare"])
        config.update({"stream": [task], "methods": [method_entry(sweep["variants"][0])], "output_dir": str(where)})
        path = where / "sweep-start.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log = open(where / "log.txt", "a")
        procs.append(
            (
                task["name"],
                subprocess.Popen(
                    [sys.executable, "-m", "experiments.sweep", "--start", str(path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env(threads),
                ),
            )
        )
        while sum(p.poll() is None for _, p in procs) >= workers:
            time.sleep(0.5)
    for name, proc in procs:
        if proc.wait() != 0:
            sys.exit(f"stage-0 evaluation of {name} failed; see {start_dir(out, {'name': name}) / 'log.txt'}")
        print(f"stage 0 of {name} evaluated", flush=True)


def run_jobs(
    out: Path, sweep: dict, jobs: list[Job], workers: int, threads: int, deadline: float | None, started: float
) -> list[Job]:
    """Runs the jobs (skipping finished ones); returns those not started before the deadline."""
    queue = [j for j in jobs if not finished(out, j)]
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    while queue or running:
        while queue and len(running) < workers and (deadline is None or time.time() - started < deadline):
            job = queue.pop(0)
            running[job.name] = (job, launch(out, sweep, job, threads), time.time())
            print(f"[{time.time() - started:6.0f} s] start {job.name}", flush=True)
        if not running:
            break
        time.sleep(1.0)
        for name, (job, proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode == 0:  # the trained weights are not needed for the table (540 MB each on the 135M model)
                for final in run_dir_of(out, job).glob("methods/*/seed-*/stage-*/train/final"):
                    shutil.rmtree(final, ignore_errors=True)
            status = (
                "done"
                if proc.returncode == 0
                else f"FAILED ({proc.returncode}, see {run_dir_of(out, job) / 'log.txt'})"
            )
            print(f"[{time.time() - started:6.0f} s] {status} {job.name} in {time.time() - t0:.0f} s", flush=True)
            write_tables(out, sweep)
    return queue


# --- results ---------------------------------------------------------------------------------


def row_of(out: Path, job: Job) -> dict | None:
    path = run_dir_of(out, job) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    entry = results["methods"][job.variant["name"]]["seeds"].get(str(job.seed))
    if not entry or not entry.get("complete"):
        return None
    curve = [
        json.loads(line)
        for line in (
            run_dir_of(out, job)
            / "methods"
            / job.variant["name"]
            / f"seed-{job.seed}"
            / "stage-1"
            / "train"
            / "metrics.jsonl"
        )
        .read_text()
        .splitlines()
        if line.strip()
    ]
    return {
        "task": job.task["name"],
        "variant": job.variant["name"],
        "method": job.variant.get("method", job.variant["name"]),
        "seed": job.seed,
        "start_score": entry["R"][0][0],
        "score": entry["R"][1][0],
        "prior_start": entry["prior"][0],
        "prior": entry["prior"][1],
        "prior_change": entry["prior_delta"][1],
        "drift_kl": entry["drift_kl"][1],
        "drift_nll": entry["drift_nll"][1],
        "train_time_s": entry["train_time_s"][0],
        "steps": len(curve),
        "loss_first": curve[0]["loss"] if curve else None,
        "loss_last": curve[-1]["loss"] if curve else None,
        "completion_length_first": curve[0].get("completion_length") if curve else None,
        "completion_length_last": curve[-1].get("completion_length") if curve else None,
    }


def all_jobs(sweep: dict, seeds: list[int]) -> list[Job]:
    # Variant-major order: with a deadline, every task gets the most important variants first.
    return [
        Job(task, variant, seed)
        for variant in sweep["variants"]
        for seed in seeds
        for task in sweep["tasks"]
        if task["name"] in variant.get("tasks", [task["name"]])
    ]


def method_entry(variant: dict) -> dict:
    """The variant as a stream config's method entry (without the sweep's own `tasks` key)."""
    return {k: v for k, v in variant.items() if k != "tasks"}


def collect(out: Path, sweep: dict) -> list[dict]:
    rows = []
    for task in sweep["tasks"]:
        for path in sorted((out / "runs" / task["name"]).glob("*-s*/results.json")):
            name, _, seed = path.parent.name.rpartition("-s")
            variant = next((v for v in sweep["variants"] if v["name"] == name), None)
            if variant is not None:
                row = row_of(out, Job(task, variant, int(seed)))
                if row:
                    rows.append(row)
    return rows


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize(rows: list[dict], sweep: dict) -> list[dict]:
    """One line per task x variant: means (± sample sd over seeds) of the row fields."""
    lines = []
    for task in sweep["tasks"]:
        for variant in sweep["variants"]:
            group = [r for r in rows if r["task"] == task["name"] and r["variant"] == variant["name"]]
            if not group:
                continue
            line = {"task": task["name"], "variant": variant["name"], "method": group[0]["method"], "seeds": len(group)}
            for key in ("score", "prior_change", "drift_kl", "train_time_s", "completion_length_last"):
                values = [r[key] for r in group if r[key] is not None]
                line[key] = statistics.mean(values) if values else None
                line[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
                line[key + "_text"] = _mean_sd(values)
            line["start_score"] = group[0]["start_score"]
            line["prior_start"] = group[0]["prior_start"]
            lines.append(line)
    return lines


def describe(variant: dict) -> str:
    return json.dumps(variant.get("overrides", {}), separators=(",", ":")).replace('"', "")


def write_tables(out: Path, sweep: dict) -> None:
    rows = collect(out, sweep)
    lines = summarize(rows, sweep)
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "summary": lines, "sweep": sweep}, indent=1))
    if rows:
        with open(out / "sweep.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    by_name = {v["name"]: v for v in sweep["variants"]}
    md = [
        "# Sweep results",
        "",
        "Scores are fractions of the task's evaluation items (greedy); prior change is the",
        "change in the prior-capability probe score from the starting model; drift is KL(start || model) in",
        "nats/token on general prompts. With several seeds: mean ± sample standard deviation.",
        "",
    ]
    for task in sweep["tasks"]:
        group = sorted((line for line in lines if line["task"] == task["name"]), key=lambda l: -(l["score"] or 0))
        if not group:
            continue
        md += [
            f"## {task['name']} (starting model: score {group[0]['start_score']:.3f}, probes {group[0]['prior_start']:.3f})",
            "",
            "| variant | method | seeds | new-task score | prior change | drift (nats) | train s | completion len | settings |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for line in group:
            md.append(
                f"| {line['variant']} | {line['method']} | {line['seeds']} | {line['score_text']} | "
                f"{line['prior_change_text']} | {line['drift_kl_text']} | {line['train_time_s_text']} | "
                f"{line['completion_length_last_text']} | {describe(by_name[line['variant']])} |"
            )
        md.append("")
    (out / "sweep.md").write_text("\n".join(md))
    plot(out, sweep, lines)


def plot(out: Path, sweep: dict, lines: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t["name"] for t in sweep["tasks"] if any(l["task"] == t["name"] for l in lines)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.6), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        # Settings that land on the same point share one label (several SDFT settings often tie).
        points: dict[tuple, list[dict]] = {}
        for line in (l for l in lines if l["task"] == name):
            points.setdefault((round(line["score"] or 0.0, 4), round(line["prior_change"] or 0.0, 4)), []).append(line)
        for (score, change), group in points.items():
            methods = {l["method"] for l in group}
            colour = "tab:blue" if methods == {"sdft"} else "tab:orange" if "sdft" not in methods else "tab:purple"
            ax.scatter(score, change, color=colour, s=30)
            ax.annotate(
                ", ".join(l["variant"] for l in group),
                (score, change),
                fontsize=6,
                xytext=(4, -2),
                textcoords="offset points",
            )
        ax.set_xlim(-0.05, 1.05)  # scores are fractions: the same scale in every panel
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{name}: each point one setting (blue SDFT, orange other, purple both)", fontsize=9)
        ax.set_xlabel("new-task score after training (fraction correct)")
        ax.set_ylabel("change in prior-capability score")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)


def finalist_jobs(out: Path, sweep: dict) -> list[Job]:
    """Reruns with more seeds: per task, its best SDFT variants and the named ones."""
    spec = sweep.get("finalists") or {}
    # Rank on the first-pass seeds only: the finalists' own extra seeds must not change who the
    # finalists are when the command is rerun.
    first_pass = [r for r in collect(out, sweep) if r["seed"] in sweep.get("seeds", [0])]
    lines = summarize(first_pass, sweep)
    jobs = []
    for task in sweep["tasks"]:
        if task["name"] not in spec.get("tasks", [task["name"]]):
            continue
        sdft = [l for l in lines if l["task"] == task["name"] and l["method"] == "sdft"]
        sdft.sort(key=lambda l: (-(l["score"] or 0), -(l["prior_change"] or 0)))
        names = list(
            dict.fromkeys(list(spec.get("include", [])) + [l["variant"] for l in sdft[: spec.get("per_task", 0)]])
        )
        jobs += [
            Job(task, v, seed)
            for seed in spec.get("seeds", [])
            for v in sweep["variants"]
            if v["name"] in names and task["name"] in v.get("tasks", [task["name"]])
        ]
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", help="sweep YAML")
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--workers", type=int, default=1, help="jobs at once (one process each)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per job (default: cores / workers)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no new job starts")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the tables from finished jobs")
    parser.add_argument("--start", help=argparse.SUPPRESS)  # internal: evaluate stage 0 of one task config
    args = parser.parse_args()
    if args.start:
        evaluate_start(args.start)
        return
    if not args.sweep:
        parser.error("give the sweep YAML")
    sweep = load_sweep(Path(args.sweep))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        write_tables(out, sweep)
        print((out / "sweep.md").read_text())
        return
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    started = time.time()
    run_starts(out, sweep, args.workers, threads)
    left = run_jobs(out, sweep, all_jobs(sweep, sweep.get("seeds", [0])), args.workers, threads, args.deadline, started)
    if not left and (sweep.get("finalists") or {}).get("seeds"):
        jobs = finalist_jobs(out, sweep)
        print("finalists: " + ", ".join(sorted({j.task["name"] + "/" + j.variant["name"] for j in jobs})), flush=True)
        left = run_jobs(out, sweep, jobs, args.workers, threads, args.deadline, started)
    write_tables(out, sweep)
    print(f"{len(left)} jobs not started before the deadline" if left else "all jobs done")
    print(f"table: {out / 'sweep.md'}  plot: {out / 'sweep.png'}  wall-clock {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
