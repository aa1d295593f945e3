"""`sdft continual` checks every input before it writes anything: a mistake leaves no run directory (or
the existing one untouched), and the corrected rerun is accepted. The same for `sdft train`'s method files."""

import json

import pytest
import yaml
from test_continual_pipeline import write_stream
from typer.testing import CliRunner

from selfdistill import cli
from selfdistill.continual.config import load_continual_config
from selfdistill.continual.runner import Runner, prepare_run_dir
from selfdistill.errors import UserError


def _snapshot(directory):
    """Every file under `directory` with its bytes, to compare before and after a refused run."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_missing_stage_file_is_named_and_nothing_is_written_so_the_fixed_rerun_runs(tmp_path):
    path, config = write_stream(tmp_path)
    out = tmp_path / "run"
    moved = tmp_path / "beta-train.jsonl.away"
    (tmp_path / "beta-train.jsonl").rename(moved)
    with pytest.raises(UserError) as info:
        Runner(load_continual_config(path))
    message = str(info.value)
    assert "beta-train.jsonl: file not found" in message
    assert "stream[1].train" in message and "'beta'" in message and "data.train" not in message
    assert not out.exists()
    moved.rename(tmp_path / "beta-train.jsonl")
    runner = Runner(load_continual_config(path))  # the corrected rerun is not "a run with another stream"
    assert runner.out == out and (out / "config.json").is_file()


def test_a_bad_line_in_an_eval_file_is_refused_before_the_run_directory_exists(tmp_path):
    path, _ = write_stream(tmp_path)
    (tmp_path / "alpha-eval.jsonl").write_text('{"prompt": "k0", "answer": "v0"}\n{"answer": "v1"}\n')
    with pytest.raises(UserError, match=r"alpha-eval.jsonl line 2, field 'prompt'"):
        Runner(load_continual_config(path))
    assert not (tmp_path / "run").exists()


def test_a_wrong_model_name_is_refused_before_the_run_directory_exists(tmp_path):
    path, config = write_stream(tmp_path)
    config["base"]["model"]["name"] = str(tmp_path / "no-such-model")
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="model.name"):
        Runner(load_continual_config(path))
    assert not (tmp_path / "run").exists()


def test_a_method_file_missing_is_named_with_its_method_and_setting(tmp_path):
    path, config = write_stream(tmp_path)
    config["methods"].append(
        {"name": "replay", "method": "sft_replay", "overrides": {"replay": {"data": str(tmp_path / "nope.jsonl")}}}
    )
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError) as info:
        Runner(load_continual_config(path))
    message = str(info.value)
    assert "method 'replay'" in message and "nope.jsonl: file not found" in message and "replay.data" in message
    assert not (tmp_path / "run").exists()


def test_a_refused_overwrite_keeps_the_previous_run(tmp_path):
    path, config = write_stream(tmp_path)
    out = tmp_path / "run"
    prepare_run_dir(load_continual_config(path), overwrite=False)
    (out / "start").mkdir()
    (out / "start" / "done.json").write_text("{}")
    before = _snapshot(out)
    config["stream"][0]["train"] = "missing.jsonl"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="missing.jsonl: file not found"):
        Runner(load_continual_config(path), overwrite=True)
    assert _snapshot(out) == before


def test_a_changed_method_is_refused_before_config_json_or_any_method_json_changes(tmp_path):
    path, config = write_stream(tmp_path)
    out = tmp_path / "run"
    prepare_run_dir(load_continual_config(path), overwrite=False)
    before = _snapshot(out)
    # A new method listed before a changed one: neither may be recorded when the changed one is refused.
    config["methods"] = [{"name": "new", "method": "sft"}] + config["methods"]
    config["methods"][2]["overrides"] = {"train": {"lr": 5e-4}}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="'sft-fast' was run before with other settings"):
        prepare_run_dir(load_continual_config(path), overwrite=False)
    assert _snapshot(out) == before


def test_a_damaged_config_json_is_one_clear_message(tmp_path):
    path, _ = write_stream(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"stream": [')
    with pytest.raises(UserError, match=r"config.json is damaged .* --overwrite"):
        prepare_run_dir(load_continual_config(path), overwrite=False)


def test_the_continual_command_exits_2_naming_the_stage_and_writes_nothing(tmp_path):
    path, config = write_stream(tmp_path)
    config["stream"][1]["eval"] = "gone.jsonl"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(cli.app, ["continual", str(path)])
    assert isinstance(result.exception, UserError)
    assert "gone.jsonl: file not found" in str(result.exception) and "stream[1].eval" in str(result.exception)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "method, section, key",
    [("sft_replay", "replay", "data"), ("sft_reinvoke", "reinvoke", "prompts"), ("cpt", "data", "documents")],
)
def test_sdft_train_reads_the_method_files_before_writing_the_run_directory(tmp_path, method, section, key):
    import selfdistill
    from selfdistill.models.tiny import save_tiny

    model = save_tiny(tmp_path / "tiny", extra_words=["a", "b"])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a", "demonstration": "b"}) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    cfg = {
        "method": method,
        "model": {"name": str(model), "precision": "fp32"},
        "data": {"train": str(data)},
        "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 2, "micro_batch_size": 2},
    }
    cfg.setdefault(section, {})[key] = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError) as info:
        selfdistill.train(cfg)
    assert "nope.jsonl: file not found" in str(info.value) and f"{section}.{key}" in str(info.value)
    assert not out.exists()
