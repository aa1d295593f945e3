"""Messages name what the user actually gave: the option or key of a missing file, the argument of an empty
list, a run directory that does not exist; --resume with nothing to resume says so; a stop is not an error;
no help text loses a bracketed part to the terminal markup."""

import json
import logging
import re
import signal

import click
import pytest
import typer
from typer.testing import CliRunner

from selfdistill import cli
from selfdistill.errors import RunStopped, UserError
from selfdistill.models.tiny import save_tiny


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny model, four records and `sdft train` arguments for one quick step into tmp_path/run."""
    model = save_tiny(tmp_path / "tiny", extra_words=["a", "b"])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a", "demonstration": "b"}) + "\n" for _ in range(4)))
    args = ["train", "--method", "sft", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "run")]
    args += ["--max-steps", "1", "--batch-size", "2", "-s", "model.precision=fp32", "-s", "train.micro_batch_size=2"]
    return args


def test_a_missing_task_file_names_the_task_option_not_data_train(tmp_path):
    from selfdistill.tasks.resolve import resolve_task

    with pytest.raises(UserError) as info:
        resolve_task(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl: file not found" in str(info.value)
    assert "--task" in str(info.value) and "data.train" not in str(info.value)


def test_a_missing_data_file_still_names_data_train(tmp_path, tiny_run):
    args = [str(tmp_path / "gone.jsonl") if a.endswith("d.jsonl") else a for a in tiny_run]
    result = CliRunner().invoke(cli.app, args)
    assert isinstance(result.exception, UserError)
    assert "gone.jsonl: file not found" in str(result.exception) and "data.train (or --data)" in str(result.exception)


def test_a_loader_without_an_origin_names_no_option(tmp_path):
    from selfdistill.data.records import load_records

    with pytest.raises(UserError) as info:
        load_records(tmp_path / "nope.jsonl")
    assert "file not found" in str(info.value) and "data.train" not in str(info.value)


def test_training_on_an_empty_list_of_records_says_so(tmp_path, tiny_run):
    import selfdistill
    from selfdistill.training.loop import train

    model = tiny_run[tiny_run.index("--model") + 1]
    cfg = selfdistill.Config(method="sft", model={"name": model}, train={"output_dir": str(tmp_path / "run")})
    with pytest.raises(UserError) as info:
        selfdistill.train(cfg, records=[])
    assert "train(records=...)" in str(info.value) and "empty" in str(info.value)
    assert "over the prompt limits" not in str(info.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError) as info:  # the loop itself, as the continual runner calls it
        train(cfg, records=[])
    assert "No records to train on" in str(info.value) and "over the prompt limits" not in str(info.value)


def test_report_of_a_directory_that_does_not_exist_says_so(tmp_path):
    result = CliRunner().invoke(cli.app, ["report", str(tmp_path / "nosuch")])
    assert isinstance(result.exception, UserError)
    assert "no such directory" in str(result.exception) and "config.json" not in str(result.exception)
    assert not (tmp_path / "nosuch").exists()


def test_data_make_help_keeps_the_optional_files():
    result = CliRunner().invoke(cli.app, ["data", "make", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "ood.jsonl" in result.output and "documents.jsonl" in result.output


def _commands(command, path=()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


def test_no_help_text_loses_a_bracketed_part_to_markup():
    # Rich reads [word ...] as a style tag and drops it; a number in brackets ([0, 1]) is left alone.
    tag = re.compile(r"\[[a-z#/@][^\[\]]*\]")
    for path, command in _commands(typer.main.get_command(cli.app)):
        texts = [command.help or "", command.epilog or ""] + [getattr(p, "help", None) or "" for p in command.params]
        wanted = [" ".join(m.split()) for text in texts for m in tag.findall(text)]
        if wanted:
            output = CliRunner().invoke(cli.app, [*path, "--help"], env={"COLUMNS": "400"}).output
            shown = " ".join(output.split())
            assert [w for w in wanted if w not in shown] == [], path


def test_resume_in_a_new_directory_warns_and_starts_from_step_0(tmp_path, tiny_run, caplog):
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(cli.app, [*tiny_run, "--resume"])
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"--resume: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting from step 0." in warned
    assert (tmp_path / "run" / "final").is_dir()


def test_resume_of_a_directory_holding_no_run_is_refused_and_changes_nothing(tmp_path, tiny_run):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a run")
    result = CliRunner().invoke(cli.app, [*tiny_run, "--resume"])
    assert isinstance(result.exception, UserError)
    assert "--resume" in str(result.exception) and "holds no run" in str(result.exception)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "exc, status",
    [
        (RunStopped("Stopped by SIGTERM after step 3; checkpoint written.", signal.SIGTERM), 143),
        (KeyboardInterrupt(), 130),
    ],
)
def test_a_deliberate_stop_is_not_reported_as_an_error(monkeypatch, capsys, exc, status):
    def app():
        raise exc

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == status
    err = capsys.readouterr().err
    assert err.startswith("Stopped by ") and "error" not in err.lower() and "Traceback" not in err
