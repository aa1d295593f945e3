"""Grids of settings in comparisons: expansion into labelled runs, results per grid point, resume, frontier."""

import json
import os

import pytest
import yaml
from test_continual_pipeline import CountingTrain, write_stream

from selfdistill.continual.config import format_value, load_continual_config, parse_config
from selfdistill.continual.layout import stage_dir
from selfdistill.continual.results import summary_table
from selfdistill.continual.runner import Runner
from selfdistill.errors import UserError
from selfdistill.report import write_report

MINIMAL = {"stream": [{"task": "knowledge", "size": 8}]}


def test_a_grid_expands_into_one_labelled_method_per_point():
    cfg = parse_config(
        {
            **MINIMAL,
            "grid": {"train.lr": ["1e-4", 2.0e-4]},
            "methods": [
                {"name": "sdft", "method": "sdft", "overrides": {"teacher": {"kind": "frozen"}}},
                {"name": "sft", "method": "sft", "grid": {"train": {"lr": [3.0e-5]}}},
                {"name": "plain", "method": "sft", "grid": {}},
            ],
        }
    )
    names = [m.name for m in cfg.methods]
    assert names == ["sdft@lr=1e-4", "sdft@lr=2e-4", "sft@lr=3e-5", "plain"]
    first = cfg.methods[0]
    # YAML reads 1e-4 as text; a grid means a number. The method's own overrides are kept.
    assert first.setting == {"train.lr": 1e-4} and first.group == "sdft" and first.family == "sdft"
    assert first.overrides == {"teacher": {"kind": "frozen"}, "train": {"lr": 1e-4}}
    assert cfg.methods[3].group is None and cfg.methods[3].family == "plain" and cfg.methods[3].setting == {}
    # The setting reaches the training config of the point.
    assert cfg.stage_config(cfg.methods[1], cfg.stream[0], 0, "out").train.lr == pytest.approx(2e-4)
    assert cfg.stage_config(cfg.methods[1], cfg.stream[0], 0, "out").teacher.kind == "frozen"


def test_several_keys_give_every_combination_with_readable_labels():
    cfg = parse_config(
        {
            **MINIMAL,
            "methods": [
                {"name": "sdft", "method": "sdft", "grid": {"train.lr": [1.0e-4, 5.0e-5], "teacher.ema_rate": [0.05]}}
            ],
        }
    )
    assert [m.name for m in cfg.methods] == ["sdft@lr=1e-4,ema_rate=0.05", "sdft@lr=5e-5,ema_rate=0.05"]
    assert format_value(2.5e-4) == "2.5e-4" and format_value(0.05) == "0.05" and format_value(True) == "true"


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"lr": [1.0e-4]}, "must name a config section and setting"),
        ({"train.lr": 1.0e-4}, "expected a non-empty list"),
        ({"train.lr": []}, "expected a non-empty list"),
        ({"train.lr": [1.0e-4, 1.0e-4]}, "repeated values"),
        ({"train.nonsense": [1]}, "nonsense"),
    ],
)
def test_bad_grids_are_rejected_naming_the_field(grid, message):
    with pytest.raises(UserError, match=message) as info:
        parse_config({**MINIMAL, "methods": [{"name": "sft", "method": "sft", "grid": grid}]})
    assert "methods[0]" in str(info.value) or "method 'sft@" in str(info.value)  # the entry or its grid point


def test_grid_results_keep_the_value_and_a_half_finished_grid_resumes(tmp_path):
    path, config = write_stream(
        tmp_path,
        grid={"train.lr": [1.0e-3, 3.0e-3]},
        methods=[{"name": "sdft", "method": "sdft", "overrides": {"teacher": {"kind": "frozen"}}}, "sft"],
    )
    config["stream"] = config["stream"][:1]  # one task keeps the four sequences fast
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    names = ["sdft@lr=1e-3", "sdft@lr=3e-3", "sft@lr=1e-3", "sft@lr=3e-3"]

    # The first invocation dies when the third grid point starts training.
    killer = CountingTrain(fail_on=os.path.join("sft@lr=1e-3", "seed-0"))
    with pytest.raises(KeyboardInterrupt):
        Runner(load_continual_config(path), train_fn=killer).run()
    assert [(stage_dir(out, n, 0, 1) / "done.json").is_file() for n in names] == [True, True, False, False]
    done = [(stage_dir(out, n, 0, 1) / "done.json").stat().st_mtime_ns for n in names[:2]]
    half = write_report(out)["data"]
    assert half["complete"] is False and half["methods"]["sft@lr=1e-3"]["summary"] is None

    # Again: only the unfinished points train; the finished ones are not touched.
    counter = CountingTrain()
    Runner(load_continual_config(path), train_fn=counter).run()
    assert [os.path.relpath(c, out).split(os.sep)[1] for c in counter.calls] == names[2:]
    assert [(stage_dir(out, n, 0, 1) / "done.json").stat().st_mtime_ns for n in names[:2]] == done

    paths = write_report(out)
    results = json.loads(paths["results"].read_text())
    assert results["complete"] is True and list(results["methods"]) == names
    for name in names:
        entry = results["methods"][name]
        lr = 1e-3 if name.endswith("1e-3") else 3e-3
        assert entry["group"] == name.split("@")[0] and entry["setting"] == {"train.lr": lr}
        assert entry["overrides"]["train"]["lr"] == lr
        # The continuous measures are kept with every number of the point.
        seq = entry["seeds"]["0"]
        assert len(seq["loglik"]) == 2 and seq["loglik"][1][0] is not None and seq["loglik_change"][1][0]["n"] == 4
    frontier = results["frontier"]
    assert frontier["same_grid"] is True
    assert frontier["groups"]["sdft"]["points"] == names[:2] and frontier["groups"]["sft"]["grid"] == {
        "train.lr": [1e-3, 3e-3]
    }
    assert set(frontier["points"]) == set(names)
    assert frontier["points"]["sft@lr=3e-3"]["label"] == "lr=3e-3"
    # One comparison per shared setting and measure, and a finding computed from them.
    assert {(c["setting"], c["measure"]) for c in frontier["comparisons"]} >= {
        ("lr=1e-3", "new_task"),
        ("lr=3e-3", "drift"),
    }
    assert frontier["finding"]["headline"].startswith("At equal settings (2 shared grid points), sdft vs sft")
    table = summary_table(results)
    assert (
        table.startswith("Finding: ")
        and "Grids: sdft: train.lr in {1e-3, 3e-3}; sft: train.lr in {1e-3, 3e-3}" in table
    )
    assert "Held-out demonstration log-likelihood" in table
    html = paths["html"].read_text()
    assert (
        "<h2>Finding</h2>" in html
        and "Frontier over each method" in html
        and "Held-out demonstration log-likelihood" in html
    )


def test_frontier_draws_one_line_per_method_through_its_grid(tmp_path):
    from selfdistill.report.frontier_plots import frontier_figure

    results = _fake_results()
    fig = frontier_figure(results)
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        by_label = {line.get_label(): line for line in lines}
        # one line per method entry (through its three grid points) and the starting model
        assert set(by_label) == {"sdft (sdft)", "sft (sft)", "starting model"}
        assert len(by_label["sdft (sdft)"].get_xdata()) == 3 and len(by_label["sft (sft)"].get_xdata()) == 3
    # end of the stream + one panel per stage, prior and drift rows
    assert len(fig.axes) == 2 * 3
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"lr=1e-4", "lr=2e-4", "lr=5e-4"} <= texts


def test_labels_of_grid_points_on_one_spot_are_stacked_not_drawn_over_each_other():
    import matplotlib.pyplot as plt

    from selfdistill.report.frontier_plots import _place_labels

    fig, ax = plt.subplots()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    # SDFT's two grid points and SFT's first land within a hair of each other; SFT's second is far away.
    _place_labels(ax, [(0.1, 0.5, "a", "C0"), (0.1, 0.52, "b", "C0"), (0.11, 0.5, "c", "C1"), (0.8, 0.2, "d", "C1")])
    offsets = {t.get_text(): t.xyann for t in ax.texts}
    assert len({offsets[k] for k in "abc"}) == 3  # three distinct places for the three coinciding points
    assert offsets["d"] == offsets["a"]  # a lone point keeps the default place
    plt.close(fig)


def _fake_results() -> dict:
    """results.json of a two-task stream, two methods over the same three learning rates (no files needed)."""
    from selfdistill.continual import frontier

    def cell(v):
        return {"mean": v, "ci95": None, "n": 1, "values": [v]}

    methods = {}
    for g, method in enumerate(("sdft", "sft")):
        for j, lr in enumerate((1e-4, 2e-4, 5e-4)):
            score = 0.1 * j + 0.3 * g
            R = [[0.0, 0.0], [score, 0.0], [score, score]]
            seq = {
                "complete": True,
                "R": R,
                "prior": [0.5, 0.5 - 0.05 * j, 0.5 - 0.1 * j],
                "drift_kl": [0.0, 0.1 * j, 0.2 * j],
                "drift_kl_ci": [None, [0.0, 0.3], [0.0, 0.5]],
                "loglik_change": [
                    [None, None],
                    [{"mean": 0.1, "ci95": [0.0, 0.2]}, None],
                    [{"mean": 0.2, "ci95": [0.1, 0.3]}, {"mean": 0.3, "ci95": [0.2, 0.4]}],
                ],
            }
            summary = {
                "seeds": 1,
                "R": [[cell(v) for v in row] for row in R],
                "prior": [cell(v) for v in seq["prior"]],
                "drift_kl": [cell(v) for v in seq["drift_kl"]],
                "acc": cell(score),
            }
            methods[f"{method}@lr={format_value(lr)}"] = {
                "method": method,
                "group": method,
                "setting": {"train.lr": lr},
                "seeds": {"0": seq},
                "summary": summary,
            }
    results = {
        "tasks": [{"name": "a", "eval_count": 16}, {"name": "b", "eval_count": 16}],
        "prior_count": 40,
        "start": {"scores": [0.0, 0.0], "prior": 0.5},
        "methods": methods,
    }
    results["frontier"] = frontier.analyse(results)
    return results


def test_the_finding_marks_differences_within_the_noise():
    results = _fake_results()
    found = results["frontier"]["finding"]
    # 40 probes: 0.5 vs 0.5 is no difference; new-task 0.3 apart on 16 items per task is outside the Wilson intervals.
    assert "prior-capability probe scores did not differ beyond the noise" in found["headline"]
    details = [d for d in found["details"] if d.startswith("lr=1e-4, prior")]
    assert details and details[0].endswith("(within the noise)")
    new_task = next(
        c for c in results["frontier"]["comparisons"] if c["setting"] == "lr=5e-4" and c["measure"] == "new_task"
    )
    assert new_task["better"] == "sft" and new_task["values"] == {"sdft": pytest.approx(0.2), "sft": pytest.approx(0.5)}


def test_the_grid_option_of_compare_and_continual():
    from selfdistill.continual.settings import stream_overrides

    data = stream_overrides(None, [], None, ["train.lr=1e-4,3e-4"])
    cfg = parse_config({**MINIMAL, **data, "methods": ["sdft", "sft"]})
    assert [m.name for m in cfg.methods] == ["sdft@lr=1e-4", "sdft@lr=3e-4", "sft@lr=1e-4", "sft@lr=3e-4"]
    with pytest.raises(UserError, match="section.key=value1,value2"):
        stream_overrides(None, [], None, ["train.lr"])


def test_a_shared_base_may_set_a_teacher_kind_that_a_method_with_a_fixed_teacher_fixes():
    """The base and a stage are shared by every method: a teacher kind set there is for the methods whose
    teacher.kind chooses; a method with a fixed teacher keeps its own. Its own override is refused."""
    cfg = parse_config(
        {
            **MINIMAL,
            "base": {"teacher": {"kind": "live", "precision": "fp32"}},
            "methods": ["sdft", "sft_kl", "sft_reinvoke", "sft"],
        }
    )
    kinds = {m.name: cfg.stage_config(m, cfg.stream[0], 0, "out").teacher for m in cfg.methods}
    assert {name: t.kind for name, t in kinds.items()} == {
        "sdft": "live",
        "sft_kl": "frozen",
        "sft_reinvoke": "frozen",
        "sft": "live",
    }
    assert kinds["sft_kl"].precision == "fp32"  # the rest of the shared section still reaches it
    with pytest.raises(UserError, match=r"method 'kl'.*teacher.kind: method 'sft_kl' always uses a frozen teacher"):
        parse_config(
            {**MINIMAL, "methods": [{"name": "kl", "method": "sft_kl", "overrides": {"teacher": {"kind": "ema"}}}]}
        )
