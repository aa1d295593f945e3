"""`results.json`: everything a run measured, gathered from its stage directories.

Built from the files on disk (not from memory), so `sdft report` can rebuild it for a finished
or a partly finished run. The schema is documented in docs/results-schema.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.continual.metrics import CI_METHOD, mean_ci, stream_metrics
from selfdistill.continual.runner import stage_dir
from selfdistill.files import read_json, write_json
from selfdistill.errors import UserError

FORMAT = "selfdistill-continual-v1"
METRIC_NAMES = ("acc", "bwt", "fwt", "forgetting", "prior_final", "prior_change", "drift_kl_final", "drift_nll_final")


def _stage_values(where: Path, tasks: list[str]) -> dict | None:
    """Scores, probes and drift of one finished stage; None while it is not finished."""
    if not (where / "done.json").is_file():
        return None
    done = read_json(where / "done.json")
    scores = [read_json(where / "eval" / t / "summary.json")["score"] for t in tasks]
    probes = read_json(where / "probes.json")["score"] if (where / "probes.json").is_file() else None
    drift = read_json(where / "drift.json") if (where / "drift.json").is_file() else {}
    return {"scores": scores, "prior": probes, "drift_kl": drift.get("kl_nats"), "drift_nll": drift.get("nll_nats"),
            "train_time_s": done.get("train_time_s"), "eval_time_s": done.get("eval_time_s")}


def _sequence(out: Path, method: str, seed: int, tasks: list[str], start: dict) -> dict:
    stages = [start]
    for k in range(1, len(tasks) + 1):
        values = _stage_values(stage_dir(out, method, seed, k), tasks)
        if values is None:
            break
        stages.append(values)
    complete = len(stages) == len(tasks) + 1
    seq = {
        "complete": complete,
        "stages_done": len(stages) - 1,
        "R": [s["scores"] for s in stages],
        "prior": [s["prior"] for s in stages],
        "prior_delta": [None if s["prior"] is None or start["prior"] is None else s["prior"] - start["prior"] for s in stages],
        "drift_kl": [s["drift_kl"] for s in stages],
        "drift_nll": [s["drift_nll"] for s in stages],
        "train_time_s": [s["train_time_s"] for s in stages[1:]],
        "eval_time_s": [s["eval_time_s"] for s in stages],
        "metrics": None,
    }
    if complete:
        metrics = stream_metrics(seq["R"])
        prior = seq["prior"]
        metrics["prior_final"] = prior[-1]
        metrics["prior_change"] = None if prior[-1] is None or prior[0] is None else prior[-1] - prior[0]
        metrics["drift_kl_final"] = seq["drift_kl"][-1]
        metrics["drift_nll_final"] = seq["drift_nll"][-1]
        seq["metrics"] = metrics
    return seq


def _per_stage_ci(rows: list[list]) -> list:
    """Mean and CI per position, across seeds (rows: one list per seed)."""
    return [mean_ci([r[i] for r in rows]) for i in range(len(rows[0]))] if rows else []


def collect(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        raise UserError(f"{out} is not a continual run directory (no config.json); run `sdft continual` first.")
    config = read_json(out / "config.json")
    tasks = [s["name"] for s in config["stream"]]
    start = _stage_values(out / "start", tasks)
    results = {"format": FORMAT, "run_dir": str(out), "config": config, "ci_method": CI_METHOD,
               "tasks": [], "methods": {}, "complete": False}
    for stage, name in zip(config["stream"], tasks):
        summary = out / "start" / "eval" / name / "summary.json"
        info = read_json(summary) if summary.is_file() else {}
        results["tasks"].append({"name": name, "builtin": stage.get("task"), "grader": info.get("grader", stage.get("grader")),
                                 "eval_count": info.get("count")})
    if start is None:
        return results
    results["start"] = {"scores": start["scores"], "prior": start["prior"], "eval_time_s": start["eval_time_s"]}
    complete = True
    for method in config["methods"]:
        seeds = {}
        for seed in config["seeds"]:
            seqs = _sequence(out, method["name"], seed, tasks, start)
            seeds[str(seed)] = seqs
            complete &= seqs["complete"]
        finished = [s for s in seeds.values() if s["complete"]]
        summary = None
        if finished:
            summary = {name: mean_ci([s["metrics"][name] for s in finished]) for name in METRIC_NAMES}
            summary["R"] = [_per_stage_ci([s["R"][k] for s in finished]) for k in range(len(tasks) + 1)]
            for key in ("prior", "prior_delta", "drift_kl", "drift_nll"):
                summary[key] = _per_stage_ci([s[key] for s in finished])
            summary["seeds"] = len(finished)
        results["methods"][method["name"]] = {"method": method["method"], "overrides": method["overrides"],
                                              "seeds": seeds, "summary": summary}
    results["complete"] = complete
    return results


def write_results(out_dir: str | Path) -> dict:
    results = collect(out_dir)
    write_json(Path(out_dir) / "results.json", results)
    return results


def summary_table(results: dict) -> str:
    """Plain-text table: per method, each task's score after each stage, then BWT, prior score, drift."""
    tasks = [t["name"] for t in results["tasks"]]
    lines = []
    header = f"{'method':<14}{'after':<16}" + "".join(f"{t[:12]:>13}" for t in tasks) + f"{'prior':>9}{'drift':>9}"
    lines.append(header)
    lines.append("-" * len(header))
    if "start" in results:
        row = f"{'(start)':<14}{'stage 0':<16}" + "".join(f"{v:>13.3f}" for v in results["start"]["scores"])
        prior = results["start"]["prior"]
        lines.append(row + (f"{prior:>9.3f}" if prior is not None else f"{'-':>9}") + f"{0.0:>9.3f}")
    for name, entry in results["methods"].items():
        s = entry["summary"]
        if s is None:
            lines.append(f"{name:<14}(not finished)")
            continue
        for k in range(1, len(tasks) + 1):
            stage = f"{k} {tasks[k - 1]}"[:15]
            row = f"{name:<14}{stage:<16}" + "".join(f"{c['mean']:>13.3f}" for c in s["R"][k])
            prior, drift = s["prior"][k]["mean"], s["drift_kl"][k]["mean"]
            row += f"{prior:>9.3f}" if prior is not None else f"{'-':>9}"
            row += f"{drift:>9.3f}" if drift is not None else f"{'-':>9}"
            lines.append(row)
        parts = []
        for key, label in (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "Forgetting")):
            v = s[key]["mean"]
            parts.append(f"{label} {v:+.3f}" if v is not None else f"{label} -")
        lines.append(f"{'':<14}" + "  ".join(parts))
    lines.append("scores: fraction correct (0-1); prior: prior-capability probe score; drift: KL from the starting "
                 "model, nats/token")
    return "\n".join(lines)


def dump(results: dict) -> str:
    return json.dumps(results, indent=2)
