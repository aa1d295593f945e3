"""The whole continual pipeline on a tiny random model: results, report files, resuming."""

import json
import os
import shutil
import signal
import subprocess

import pytest
import yaml
from toy import KEYS, VALUES

from selfdistill.continual.config import load_continual_config
from selfdistill.continual.layout import stage_dir
from selfdistill.continual.runner import Runner
from selfdistill.errors import UserError
from selfdistill.models.tiny import save_tiny
from selfdistill.report import write_report

TASKS = {"alpha": (KEYS[:4], VALUES[:4]), "beta": (KEYS[4:], VALUES[4:])}


def write_stream(tmp_path, **changes) -> tuple:
    """Two file-based tasks and a config training sft and sdft on them, sized to run in seconds."""
    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        save_tiny(model_dir, extra_words=KEYS + VALUES)
    stream = []
    for name, (keys, values) in TASKS.items():
        rows = [{"prompt": k, "demonstration": v, "answer": v} for k, v in zip(keys, values)]
        for split in ("train", "eval"):
            (tmp_path / f"{name}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        stream.append(
            {
                "name": name,
                "train": f"{name}-train.jsonl",
                "eval": f"{name}-eval.jsonl",
                "grader": "contains",
                "teacher_template": "plain",
            }
        )
    config = {
        "output_dir": str(tmp_path / "run"),
        "seeds": [0],
        "base": {
            "model": {"name": str(model_dir), "precision": "fp32"},
            "rollout": {"max_new_tokens": 3, "batch_size": 4},
            "loss": {"skip_first_tokens": 0},
            "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0},
        },
        "stream": stream,
        "methods": [
            {"name": "sdft", "method": "sdft", "overrides": {"teacher": {"kind": "frozen"}}},
            {"name": "sft-fast", "method": "sft", "overrides": {"train": {"lr": 3e-3}}},
        ],
        "eval": {
            "max_new_tokens": 3,
            "batch_size": 8,
            "samples": 2,
            "probes": {"limit": 3, "max_new_tokens": 4},
            "drift": {"limit": 2, "max_new_tokens": 4},
        },
    }
    config.update(changes)
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


class CountingTrain:
    """train() that records each (method, stage dir) it trains, and can fail on one of them."""

    def __init__(self, fail_on: str | None = None):
        from selfdistill.training.loop import train

        self.train, self.calls, self.fail_on = train, [], fail_on

    def __call__(self, cfg, **kwargs):
        where = cfg.train.output_dir
        self.calls.append(where)
        if self.fail_on and self.fail_on in where:
            raise KeyboardInterrupt("simulated kill")
        return self.train(cfg, **kwargs)


def test_pipeline_writes_results_and_report_and_resumes_after_a_kill(tmp_path):
    path, _ = write_stream(tmp_path)
    cfg = load_continual_config(path)
    out = tmp_path / "run"

    # First invocation dies when sdft starts stage 2 (stage 1 is finished and evaluated).
    killer = CountingTrain(fail_on=os.path.join("sdft", "seed-0", "stage-2"))
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, train_fn=killer).run()
    assert (stage_dir(out, "sdft", 0, 1) / "done.json").is_file()
    assert not (stage_dir(out, "sdft", 0, 2) / "done.json").exists()
    stage1_done = (stage_dir(out, "sdft", 0, 1) / "done.json").stat().st_mtime_ns
    start_done = (out / "start" / "done.json").stat().st_mtime_ns

    # The same command again: stage 1 and the start evaluation are not redone.
    counter = CountingTrain()
    Runner(load_continual_config(path), train_fn=counter).run()
    trained = [os.path.relpath(c, out) for c in counter.calls]
    assert trained == [
        os.path.join("methods", "sdft", "seed-0", "stage-2", "train"),
        os.path.join("methods", "sft-fast", "seed-0", "stage-1", "train"),
        os.path.join("methods", "sft-fast", "seed-0", "stage-2", "train"),
    ]
    assert (stage_dir(out, "sdft", 0, 1) / "done.json").stat().st_mtime_ns == stage1_done
    assert (out / "start" / "done.json").stat().st_mtime_ns == start_done
    # Checkpoints (optimizer, teacher) of finished stages are cleaned up; the stage models stay.
    assert not (stage_dir(out, "sdft", 0, 1) / "train" / "checkpoints").exists()
    assert (stage_dir(out, "sdft", 0, 2) / "train" / "final" / "model.safetensors").is_file()

    # A third run has nothing left to train.
    idle = CountingTrain()
    Runner(load_continual_config(path), train_fn=idle).run()
    assert idle.calls == []

    paths = write_report(out)
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "selfdistill-continual-v1" and results["complete"] is True
    assert [t["name"] for t in results["tasks"]] == ["alpha", "beta"]
    assert results["tasks"][0]["eval_count"] == 4
    for name in ("sdft", "sft-fast"):
        entry = results["methods"][name]
        seq = entry["seeds"]["0"]
        assert len(seq["R"]) == 3 and all(len(row) == 2 for row in seq["R"])
        assert all(0.0 <= v <= 1.0 for row in seq["R"] for v in row)
        assert seq["R"][0] == results["start"]["scores"]
        assert len(seq["prior"]) == 3 and len(seq["drift_kl"]) == 3 and len(seq["train_time_s"]) == 2
        assert seq["drift_kl"][0] == pytest.approx(0.0, abs=1e-5)  # the start model against itself
        assert seq["prior_delta"][0] == 0.0 and len(seq["prior_delta"]) == 3
        assert seq["drift_kl"][2] > 0  # training moved the weights
        for metric in ("acc", "bwt", "fwt", "forgetting", "prior_final", "prior_change", "drift_kl_final"):
            cell = entry["summary"][metric]
            assert cell["n"] == 1 and cell["ci95"] is None and cell["mean"] == pytest.approx(seq["metrics"][metric])
        R = seq["R"]
        assert seq["metrics"]["bwt"] == pytest.approx(R[2][0] - R[1][0])
    # Per-example evaluation files for every stage and task.
    for k in (1, 2):
        for task in ("alpha", "beta"):
            lines = (stage_dir(out, "sft-fast", 0, k) / "eval" / task / "examples.jsonl").read_text().splitlines()
            assert len(lines) == 4 and {"prompt", "answer", "output", "score"} <= set(json.loads(lines[0]))

    html = paths["html"].read_text()
    assert paths["figures"] == 5  # frontier, accuracy matrix, demonstration log-likelihood, per-task, training
    assert html.count("<img") == 5 and html.count("src='data:image/png;base64,") == 5
    assert "http://" not in html and "https://" not in html  # self-contained
    assert '<table class="metrics">' in html and "BWT" in html and "Forgetting" in html
    assert "Sample outputs" in html and "Task: alpha" in html
    md = paths["markdown"].read_text()
    assert "| Method | Trains with | ACC | BWT |" in md
    for line in md.splitlines():
        if line.startswith("!["):
            assert (out / line.split("](")[1].rstrip(")")).is_file()


def test_a_kill_inside_a_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import selfdistill.training.loop as train_mod

    path, config = write_stream(tmp_path)
    config["methods"] = [{"name": "sft", "method": "sft", "overrides": {"train": {"max_steps": 4, "save_every": 1}}}]
    config["stream"] = config["stream"][:1]
    config["eval"]["probes"] = False
    path.write_text(yaml.safe_dump(config))
    steps_run = []
    real = train_mod._step_metrics

    def interrupting(step, *args):
        steps_run.append(step)
        if step == 2 and len(steps_run) == 2:  # first run only: as if SIGTERM arrived during step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(train_mod, "_step_metrics", interrupting)
    with pytest.raises(train_mod.TrainingStopped):
        Runner(load_continual_config(path)).run()
    Runner(load_continual_config(path)).run()
    assert steps_run == [1, 2, 3, 4]  # steps 1-2 were not trained again
    metrics = (stage_dir(tmp_path / "run", "sft", 0, 1) / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4]
    assert (stage_dir(tmp_path / "run", "sft", 0, 1) / "done.json").is_file()


def test_changed_method_settings_are_not_mixed_with_old_results(tmp_path):
    path, config = write_stream(tmp_path)
    cfg = load_continual_config(path)
    from selfdistill.continual.runner import prepare_run_dir

    prepare_run_dir(cfg, overwrite=False)
    config["methods"][0]["overrides"] = {"train": {"lr": 5e-4}}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="other settings"):
        prepare_run_dir(load_continual_config(path), overwrite=False)
    prepare_run_dir(load_continual_config(path), overwrite=True)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": [{"name": "x", "method": "sdtf"}]}, "unknown method 'sdtf'"),
        ({"methods": [{"name": "x", "method": "sft", "overides": {}}]}, "Did you mean 'overrides'"),
        ({"methods": [{"name": "x", "method": "sft", "overrides": {"train": {"lrr": 1}}}]}, "Did you mean 'train.lr'"),
        ({"stream": [{"task": "tooluze"}]}, "Unknown task 'tooluze'"),
        ({"stream": [{"name": "a", "train": "a.jsonl"}]}, "needs eval, grader"),
        ({"seeds": "zero"}, "'seeds' must be a list"),
        ({"evaluation": {}}, "unknown key 'evaluation'"),
        ({"eval": {"probes": {"limt": 3}}}, "Did you mean 'probes.limit'"),
    ],
)
def test_config_errors_name_the_file_and_field(tmp_path, change, message):
    path, config = write_stream(tmp_path)
    config.update(change)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=message) as info:
        load_continual_config(path)
    assert str(path) in str(info.value)


def test_cli_report_command_and_bad_config_exit_code(tmp_path):
    path, config = write_stream(tmp_path)
    config["methods"] = [{"name": "x", "method": "sdtf"}]
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", "continual", str(path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "unknown method 'sdtf'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", "report", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and "nothing: no such directory" in proc.stderr


def test_parallel_sequences_give_the_same_results_as_one_process(tmp_path):
    from selfdistill.continual.results import collect

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    serial_path, _ = write_stream(tmp_path / "a")
    Runner(load_continual_config(serial_path)).run()
    parallel_path, _ = write_stream(tmp_path / "b", workers=2)
    lines = []
    Runner(load_continual_config(parallel_path), echo=lines.append).run()
    assert any("2 method x seed sequences in 2 processes" in line for line in lines)
    serial, parallel = collect(tmp_path / "a" / "run"), collect(tmp_path / "b" / "run")
    for name in ("sdft", "sft-fast"):
        a, b = serial["methods"][name]["seeds"]["0"], parallel["methods"][name]["seeds"]["0"]
        assert b["complete"] and a["R"] == b["R"] and a["prior"] == b["prior"]
        assert b["drift_kl"] == pytest.approx(a["drift_kl"], abs=1e-4)
    # a rerun finds everything done (the workers wrote the same files as one process would)
    calls = CountingTrain()
    Runner(load_continual_config(parallel_path), train_fn=calls).run()
    assert calls.calls == []


def test_workers_must_be_a_positive_integer(tmp_path):
    path, _ = write_stream(tmp_path, workers=0)
    with pytest.raises(UserError, match="'workers' must be an integer >= 1"):
        load_continual_config(path)


def test_compare_is_the_one_stage_case_with_the_same_outputs(tmp_path):
    from typer.testing import CliRunner

    from selfdistill.cli import app

    path, config = write_stream(tmp_path)
    cli = CliRunner()
    result = cli.invoke(app, ["compare", str(path)])
    assert result.exit_code != 0 and "compare runs one task" in str(result.exception)
    config["stream"] = config["stream"][:1]
    config["eval"]["probes"] = False
    path.write_text(yaml.safe_dump(config))
    result = cli.invoke(app, ["compare", str(path), "--output-dir", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "ACC" in result.output
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(results["methods"]) == {"sdft", "sft-fast"} and results["complete"]
    assert results["methods"]["sdft"]["summary"]["bwt"]["mean"] is None  # one stage: no backward transfer
    assert results["methods"]["sdft"]["summary"]["prior_final"]["mean"] is None  # probes were off
    assert (tmp_path / "cmp" / "report.html").is_file() and (tmp_path / "cmp" / "report.md").is_file()


def test_shipped_demo_configs_load():
    from selfdistill.continual.settings import demo_config_path

    full = load_continual_config(demo_config_path(False))
    for quick in (False, True):
        cfg = load_continual_config(demo_config_path(quick))
        # Both methods over the same learning-rate grid of at least two values, nothing else different.
        assert [m.method for m in cfg.methods] == ["sdft", "sdft", "sft", "sft"]
        lrs = {g: [m.setting["train.lr"] for m in cfg.methods if m.group == g] for g in ("sdft", "sft")}
        assert lrs["sdft"] == lrs["sft"] and len(lrs["sdft"]) >= 2
        assert all(set(m.overrides) == {"train"} and set(m.overrides["train"]) == {"lr"} for m in cfg.methods)
        assert cfg.seeds == [0] and cfg.workers == 2  # two sequences train side by side
        assert cfg.eval.precision == "fp32" and cfg.base["model"]["precision"] == "fp32"  # pinned, not 'auto'
        # the quick demo is the full one cut down, not a different experiment
        assert cfg.base == full.base | {"train": cfg.base["train"]}
    # Both tasks, and at least 6 probes of each of the 4 kinds (24; 40 took the demo past 15 minutes).
    assert [s.task for s in full.stream] == ["tooluse", "knowledge"] and full.eval.probes.limit >= 24


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    path, config = write_stream(tmp_path)
    config["methods"] = config["methods"][1:]
    config["stream"] = config["stream"][:1]
    path.write_text(yaml.safe_dump(config))
    Runner(load_continual_config(path)).run()
    paths = write_report(tmp_path / "run")
    png = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png}",
            "--window-size=1200,2000",
            paths["html"].resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert png.stat().st_size > 20_000  # a blank page is a few kB; figures and tables make it larger
