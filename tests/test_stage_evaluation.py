"""StageEvaluation on its own (as a caller other than `sdft continual` uses it), on a tiny random model."""

import copy

from selfdistill.continual import layout
from selfdistill.continual.config import DriftSettings, EvalSettings, ProbeSettings
from selfdistill.continual.evaluation import StageEvaluation, StreamTask
from selfdistill.continual.results import stage_values
from selfdistill.data.records import Record
from selfdistill.files import read_json, write_json
from selfdistill.models.tiny import tiny_model, tiny_tokenizer

WORDS = {"alpha": (["k0", "k1", "k2"], ["v0", "v1", "v2"]), "beta": (["k3", "k4"], ["v3", "v4"])}


def test_evaluates_every_task_once_and_reads_back(tmp_path):
    tokenizer = tiny_tokenizer([w for keys, values in WORDS.values() for w in keys + values])
    model = tiny_model(tokenizer)
    tasks = [
        StreamTask(
            name,
            "exact",
            train=[],
            eval=[Record(prompt=k, demonstration=v, answer=v) for k, v in zip(keys, values)],
            max_new_tokens=3,
            teacher_template="plain",
        )
        for name, (keys, values) in WORDS.items()
    ]
    settings = EvalSettings(
        batch_size=4,
        precision="fp32",
        probes=ProbeSettings(limit=2, max_new_tokens=3),
        drift=DriftSettings(limit=2, max_new_tokens=3),
    )
    loads, lines = [], []

    def start_model():
        loads.append(1)
        return copy.deepcopy(model), tokenizer

    evaluation = StageEvaluation(
        tasks,
        settings,
        tmp_path / "drift_answers.json",
        start_model,
        base_name="tiny",
        system_prompt=None,
        echo=lines.append,
    )
    where = tmp_path / "round-1"
    seconds = evaluation.evaluate(model, tokenizer, where, "round 1")
    assert seconds >= 0 and loads == [1]  # drift's reference answers came from the starting model, once
    summaries = {}
    for task in tasks:
        summary = read_json(layout.task_summary(where, task.name))
        assert 0.0 <= summary["score"] <= 1.0
        assert summary["count"] == len(task.eval) and summary["task"] == task.name
        assert summary["loglik"]["count"] == len(task.eval)  # the records have demonstrations
        summaries[task.name] = summary
    assert layout.probes_file(where).is_file() and layout.drift_file(where).is_file()
    assert (tmp_path / "drift_answers.json").is_file()
    assert len(lines) == len(tasks) + 2  # a line per task, the probes, drift

    # A stage counts as finished once its done.json is written (by the caller, as the runner does).
    write_json(layout.done_file(where), {"eval_time_s": seconds})
    values = stage_values(where, [t.name for t in tasks])
    assert values["scores"] == [summaries[t.name]["score"] for t in tasks]
    assert values["prior"] == read_json(layout.probes_file(where))["score"]
    assert values["drift_kl"] == read_json(layout.drift_file(where))["kl_nats"]
    assert values["eval_time_s"] == seconds

    # Evaluating the same directory again generates nothing: no file rewritten, no line, no model loaded.
    written = {p: p.stat().st_mtime_ns for p in where.rglob("*") if p.is_file()}
    fresh = StageEvaluation(tasks, settings, tmp_path / "drift_answers.json", start_model, "tiny", echo=lines.append)
    fresh.evaluate(model, tokenizer, where, "round 1")
    assert {p: p.stat().st_mtime_ns for p in where.rglob("*") if p.is_file()} == written
    assert len(lines) == len(tasks) + 2 and loads == [1]
