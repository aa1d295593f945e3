"""experiments/sweep.py on a tiny random model: jobs run as `sdft compare`, tables, finalists, rerun skips."""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from toy import KEYS, VALUES

from selfdistill.models.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent


def test_sweep_runs_jobs_picks_finalists_and_skips_finished_work(tmp_path):
    save_tiny(tmp_path / "tiny", extra_words=KEYS + VALUES)
    rows = [{"prompt": k, "demonstration": v, "answer": v} for k, v in zip(KEYS[:4], VALUES[:4])]
    for split in ("train", "eval"):
        (tmp_path / f"copy-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep = {
        "compare": {
            "base": {
                "model": {"name": str(tmp_path / "tiny"), "precision": "fp32"},
                "rollout": {"max_new_tokens": 3, "batch_size": 4},
                "loss": {"skip_first_tokens": 0},
                "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0},
            },
            "eval": {
                "max_new_tokens": 3,
                "batch_size": 8,
                "samples": 1,
                "probes": {"limit": 2, "max_new_tokens": 3},
                "drift": {"limit": 2, "max_new_tokens": 3},
            },
        },
        # relative task files: resolved against the sweep file's folder
        "tasks": [
            {
                "name": "copy",
                "train": "copy-train.jsonl",
                "eval": "copy-eval.jsonl",
                "grader": "contains",
                "teacher_template": "plain",
            }
        ],
        "seeds": [0],
        "finalists": {"per_task": 1, "seeds": [1], "include": ["sft"]},
        "variants": [
            {"name": "sft", "method": "sft"},
            {"name": "sdft-a", "method": "sdft", "overrides": {"teacher": {"kind": "frozen"}}},
            {"name": "sdft-b", "method": "sdft", "overrides": {"loss": {"kind": "reverse_kl"}}},
        ],
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "experiments.sweep",
        str(tmp_path / "sweep.yaml"),
        "--out",
        str(out),
        "--workers",
        "2",
        "--threads",
        "1",
    ]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    result = json.loads((out / "sweep.json").read_text())
    jobs = {(r["variant"], r["seed"]) for r in result["rows"]}
    # 3 first-pass jobs, then seed 1 of the named finalist and of the best of the two SDFT variants
    best = max(
        (s for s in result["summary"] if s["method"] == "sdft" and s["seeds"] == 1),
        key=lambda s: s["score"],
        default=None,
    )
    assert {("sft", 0), ("sdft-a", 0), ("sdft-b", 0), ("sft", 1)} <= jobs and len(jobs) == 5
    assert any(v.startswith("sdft") and seed == 1 for v, seed in jobs)
    for row in result["rows"]:
        assert 0.0 <= row["score"] <= 1.0 and row["steps"] == 2 and row["drift_kl"] >= 0.0
        run = out / "runs" / "copy" / f"{row['variant']}-s{row['seed']}"
        assert (run / "results.json").is_file() and (run / "report.html").is_file()
        assert not list(run.glob("methods/*/seed-*/stage-*/train/final"))  # weights removed once tabulated
        # stage 0 was evaluated once for the task and copied in, not recomputed per job
        assert json.loads((run / "start" / "done.json").read_text()) == json.loads(
            (out / "start" / "copy" / "start" / "done.json").read_text()
        )
    sft = next(s for s in result["summary"] if s["variant"] == "sft")
    assert sft["seeds"] == 2 and "±" in sft["score_text"]
    assert best is None or best["variant"] in {"sdft-a", "sdft-b"}
    table = (out / "sweep.md").read_text()
    assert "## copy" in table and "| sft | sft | 2 |" in table
    assert (out / "sweep.png").stat().st_size > 1000
    # a rerun finds every job done and starts nothing
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and " start " not in again.stdout and "all jobs done" in again.stdout


def test_finalists_are_the_best_sdft_variant_per_task_on_the_listed_tasks(monkeypatch):
    from experiments import sweep as sweep_module

    lines = [
        {"task": "a", "variant": "sdft-1", "method": "sdft", "score": 0.0, "prior_change": -0.2},
        {"task": "a", "variant": "sdft-2", "method": "sdft", "score": 0.0, "prior_change": -0.1},
        {"task": "b", "variant": "sdft-1", "method": "sdft", "score": 0.5, "prior_change": -0.3},
        {"task": "b", "variant": "sdft-2", "method": "sdft", "score": 0.25, "prior_change": 0.0},
    ]
    monkeypatch.setattr(sweep_module, "collect", lambda out, sweep: [])
    monkeypatch.setattr(sweep_module, "summarize", lambda rows, sweep: lines)
    spec = {
        "tasks": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
        "variants": [
            {"name": "sft", "method": "sft"},
            {"name": "sdft-1", "method": "sdft"},
            {"name": "sdft-2", "method": "sdft"},
        ],
        "finalists": {"per_task": 1, "seeds": [1, 2], "include": ["sft"], "tasks": ["a", "b"]},
    }
    jobs = {(j.task["name"], j.variant["name"], j.seed) for j in sweep_module.finalist_jobs(Path("."), spec)}
    # a: equal scores, the smaller prior drop wins; b: the higher score wins; c: not a finalist task
    assert jobs == {
        (t, v, s) for t, v in [("a", "sft"), ("a", "sdft-2"), ("b", "sft"), ("b", "sdft-1")] for s in (1, 2)
    }


def test_marker_table_counts_outputs_containing_each_string(tmp_path):
    from experiments.markers import marker_table

    def write(path, outputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"output": o}) + "\n" for o in outputs))

    write(tmp_path / "start/t/start/eval/t/examples.jsonl", ["prose", "Question: again"])
    write(
        tmp_path / "runs/t/sdft-s0/methods/sdft/seed-0/stage-1/eval/t/examples.jsonl",
        ["Thought: x Action: y", "Question: Thought:", "Action:"],
    )
    table = marker_table(tmp_path, "t", ["Thought:", "Action:", "Question:"]).splitlines()
    assert table[2] == "| starting model | 2 | 0 | 0 | 1 |"
    assert table[3] == "| sdft-s0 | 3 | 2 | 2 | 1 |"


def test_finalists_are_ranked_on_the_first_pass_seeds_only(monkeypatch):
    from experiments import sweep as sweep_module

    def row(variant, seed, score):
        return {
            "task": "a",
            "variant": variant,
            "method": "sdft",
            "seed": seed,
            "score": score,
            "prior_change": 0.0,
            "drift_kl": 0.1,
            "train_time_s": 1.0,
            "completion_length_last": 4.0,
            "start_score": 0.0,
            "prior_start": 0.5,
        }

    # sdft-1 won the first pass; its finalist seeds scored badly, which must not hand the place to sdft-2
    rows = [row("sdft-1", 0, 0.5), row("sdft-2", 0, 0.25), row("sdft-1", 1, 0.0), row("sdft-1", 2, 0.0)]
    monkeypatch.setattr(sweep_module, "collect", lambda out, sweep: rows)
    spec = {
        "tasks": [{"name": "a"}],
        "seeds": [0],
        "variants": [{"name": "sdft-1", "method": "sdft"}, {"name": "sdft-2", "method": "sdft"}],
        "finalists": {"per_task": 1, "seeds": [1, 2]},
    }
    jobs = {(j.variant["name"], j.seed) for j in sweep_module.finalist_jobs(Path("."), spec)}
    assert jobs == {("sdft-1", 1), ("sdft-1", 2)}
