"""The run directory's layout is a file format: run directories written earlier must still be read."""

import ast
from pathlib import Path

from selfdistill.continual import layout

PACKAGE = Path(__file__).resolve().parents[1] / "selfdistill"


def test_paths_of_a_run_directory_are_the_ones_written_so_far():
    out = Path("RUN")
    stage = layout.stage_dir(out, "sdft@lr=1e-4", 2, 3)
    assert stage == out / "methods" / "sdft@lr=1e-4" / "seed-2" / "stage-3"
    assert layout.stage_dir(out, "sdft", 0, 0) == layout.start_dir(out) == out / "start"
    assert layout.config_file(out) == out / "config.json"
    assert layout.method_file(out, "sft") == out / "methods" / "sft" / "method.json"
    assert layout.drift_answers_file(out) == out / "start" / "drift_answers.json"
    assert layout.done_file(stage) == stage / "done.json"
    assert layout.trained_file(stage) == stage / "trained.json"
    assert layout.final_model(stage) == stage / "train" / "final"
    assert layout.checkpoints_dir(stage) == stage / "train" / "checkpoints"
    assert layout.train_metrics(stage) == stage / "train" / "metrics.jsonl"
    assert layout.documents_file(stage) == stage / "documents.jsonl"
    assert layout.task_summary(stage, "tooluse") == stage / "eval" / "tooluse" / "summary.json"
    assert layout.task_examples(stage, "tooluse") == stage / "eval" / "tooluse" / "examples.jsonl"
    assert layout.probes_dir(stage) == stage / "probes"
    assert layout.probes_file(stage) == stage / "probes.json"
    assert layout.drift_file(stage) == stage / "drift.json"


def test_results_and_report_read_the_layout_not_the_runner():
    readers = [PACKAGE / "continual" / "results.py", *sorted((PACKAGE / "report").glob("*.py"))]
    for path in readers:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert "selfdistill.continual.runner" not in imported, path.name
