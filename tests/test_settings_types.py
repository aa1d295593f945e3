"""Every setting's value against its declared type: `--set` values read for the type they set (text as
typed, the rest as YAML, a value YAML cannot read one line and exit 2), and a wrong type refused when
a Config section or a command's settings are built, naming the key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfdistill import cli
from selfdistill.config import Config, LoraConfig, ModelConfig, load_config, parse_overrides
from selfdistill.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "{question} Example answer: {demonstration}"


def test_a_set_value_yaml_cannot_read_is_one_line_naming_the_option_and_how_to_quote(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", "train", "--set", "train.lr=[1e-4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())  # as printed, a long line may be wrapped
    assert "Traceback" not in result.stderr
    assert message.startswith("error: Override 'train.lr=[1e-4': YAML cannot read the value")
    assert "text in quotes, e.g. --set 'train.lr=\"...\"'" in message
    assert not list(tmp_path.iterdir())  # nothing written


def test_sdft_train_takes_text_settings_as_typed(monkeypatch, capsys):
    from selfdistill.training import loop

    seen = {}

    def fake_train(cfg, **_):
        seen["cfg"] = cfg
        raise UserError("stop here")  # the config reached training: no model is loaded

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "sdft",
            "train",
            "--set",
            f"data.teacher_template={TEMPLATE}",
            "--set",
            "data.system_prompt=You are: helpful",
            "--set",
            "train.lr=1e-4",
        ],
    )
    with pytest.raises(SystemExit) as exit_status:
        cli.main()
    assert exit_status.value.code == 2 and "stop here" in capsys.readouterr().err
    cfg = seen["cfg"]
    assert cfg.data.teacher_template == TEMPLATE
    assert cfg.data.system_prompt == "You are: helpful"
    assert cfg.train.lr == 1e-4


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("data.system_prompt=Answer #1 first, then: the rest", "system_prompt", "Answer #1 first, then: the rest"),
        ("data.system_prompt=[be brief]", "system_prompt", "[be brief]"),
        ('data.system_prompt="quoted: text"', "system_prompt", "quoted: text"),
        ("data.system_prompt='single'", "system_prompt", "single"),
        ("data.system_prompt=\"it's", "system_prompt", "\"it's"),  # unbalanced quote: as typed
        ("data.system_prompt=null", "system_prompt", None),
        ("data.system_prompt=", "system_prompt", None),
        ("data.split=2023", "split", "2023"),  # text, not the number YAML would read
        ("data.train=runs/a: b.jsonl", "train", "runs/a: b.jsonl"),
    ],
)
def test_a_text_setting_takes_the_override_as_typed(override, key, value):
    assert getattr(load_config(overrides=[override]).data, key) == value


def test_other_overrides_are_still_read_as_yaml():
    cfg = load_config(
        overrides=[
            "train.lr=1e-4",  # PyYAML reads 1e-4 as text; the float setting converts it
            "train.max_steps=7",
            "train.report_to=[tensorboard]",
            "model.lora.enabled=yes",
            "model.lora.target_modules=[q_proj, v_proj]",
            "data.columns={prompt: instruction}",
            "loss.top_k=null",
            "rollout.importance_sampling=off",
            "loss.kind=jsd",
        ]
    )
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.report_to) == (1e-4, 7, ["tensorboard"])
    assert cfg.model.lora.enabled is True and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.columns == {"prompt": "instruction"} and cfg.loss.top_k is None
    assert cfg.rollout.importance_sampling == "off" and cfg.loss.kind == "jsd"
    # keys that are no Config setting (a stream config's) are read as YAML too
    assert parse_overrides(["seeds=[0, 1]", "base.train.lr=1e-4"]) == {
        "seeds": [0, 1],
        "base": {"train": {"lr": "1e-4"}},
    }


@pytest.mark.parametrize(
    "override, problem",
    [
        ("train.max_steps={3", "Override 'train.max_steps={3': YAML cannot read the value"),
        ("data.columns={prompt: [a}", "Override 'data.columns={prompt: [a}': YAML cannot read the value"),
        ("seeds=[0, 1", "Override 'seeds=[0, 1': YAML cannot read the value"),
    ],
)
def test_an_override_yaml_cannot_read_is_a_user_error(override, problem):
    with pytest.raises(UserError, match=r"^" + problem.replace("[", r"\[").replace("{", r"\{")):
        parse_overrides([override])


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"data": {"system_prompt": 42}}, "Config value data.system_prompt: expected str, got 42"),
        (
            {"data": {"system_prompt": {"You are": "helpful"}}},
            "Config value data.system_prompt: expected str, got a mapping ({'You are': 'helpful'})",
        ),
        (
            {"data": {"teacher_template": ["paper"]}},
            "Config value data.teacher_template: expected str, got a list (['paper'])",
        ),
        ({"model": {"name": 7}}, "Config value model.name: expected str, got 7"),
        ({"model": {"trust_remote_code": 5}}, "Config value model.trust_remote_code: expected bool, got 5"),
        ({"model": {"trust_remote_code": "maybe"}}, "Config value model.trust_remote_code: expected bool, got 'maybe'"),
        ({"model": {"lora": {"rank": True}}}, "Config value model.lora.rank: expected int, got True"),
        ({"train": {"seed": 1.5}}, "Config value train.seed: expected int, got 1.5"),
        ({"train": {"lr": [1e-4]}}, "Config value train.lr: expected float, got a list ([0.0001])"),
        ({"train": {"lr": False}}, "Config value train.lr: expected float, got False"),
        ({"train": {"report_to": {"tensorboard": 1}}}, "Config value train.report_to: expected a list, got a mapping"),
        ({"data": {"columns": ["prompt"]}}, "Config value data.columns: expected a mapping, got a list"),
        ({"data": {"columns": "{prompt: [a"}}, "Config value data.columns: expected a mapping such as {key: value}"),
        ({"loss": {"top_k": "many"}}, "Config value loss.top_k: expected int, got 'many'"),
        ({"data": 5}, "Config value data: expected a section (mapping), got 5"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_when_built_naming_the_key(sections, message):
    with pytest.raises(UserError) as error:
        Config(**sections)
    assert str(error.value).startswith(message)


def test_a_wrong_type_in_a_yaml_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  system_prompt: {You are: helpful}\n")
    with pytest.raises(UserError, match=f"^Config file {path}: Config value data.system_prompt: expected str, got a"):
        load_config(path)
    path.write_text("train:\n  lr: 1e-4\n  epochs: 2\n")  # 1e-4: text to PyYAML, a float to the setting
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)


def test_values_with_one_reading_are_converted(tmp_path):
    cfg = Config(
        model={"trust_remote_code": 1, "lora": {"rank": 8.0, "enabled": "on"}},
        train={"lr": "3e-4", "epochs": 2, "output_dir": tmp_path / "run", "report_to": "tensorboard,wandb"},
        data={"train": tmp_path / "d.jsonl"},
    )
    assert cfg.model.trust_remote_code is True and cfg.model.lora.enabled is True
    assert cfg.model.lora.rank == 8 and isinstance(cfg.model.lora.rank, int)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.epochs, float)
    assert cfg.train.output_dir == str(tmp_path / "run") and cfg.data.train == str(tmp_path / "d.jsonl")
    assert cfg.train.report_to == ["tensorboard", "wandb"]
    # a nested section given as a mapping is built, not kept as a mapping
    assert isinstance(ModelConfig(lora={"rank": 4}).lora, LoraConfig)


def test_a_commands_settings_check_their_types_naming_the_option(tmp_path):
    from selfdistill.diagnosis.settings import DiagnoseSettings
    from selfdistill.eval.settings import EvalSettings, EvaluateSettings
    from selfdistill.memory_plan.settings import PlanSettings

    with pytest.raises(UserError, match=r"^--temperature: expected float, got 'hot'\.$"):
        EvaluateSettings(temperature="hot")
    with pytest.raises(UserError, match=r"^--n-samples: expected int, got True\.$"):
        EvaluateSettings(n_samples=True)
    with pytest.raises(UserError, match=r"^--processes: expected int, got a list"):
        PlanSettings(processes=[2])
    settings = EvalSettings(model=tmp_path / "m", task="t.jsonl", out=str(tmp_path / "out"), limit=3.0)
    assert settings.model == str(tmp_path / "m") and settings.out == tmp_path / "out" and settings.limit == 3
    assert DiagnoseSettings(grader="exact", out=tmp_path / "d").grader == ("exact",)


def test_a_stream_configs_base_settings_take_text_as_typed_too():
    from selfdistill.continual.settings import stream_overrides

    data = stream_overrides(None, ["base.data.system_prompt=You are: helpful", "base.train.batch_size=4"])
    assert data["base"]["data"]["system_prompt"] == "You are: helpful"
    assert data["base"]["train"]["batch_size"] == 4
    with pytest.raises(UserError, match=r"Override 'base\.train\.lr=\[1e-4'.*--set 'base\.train\.lr="):
        stream_overrides(None, ["base.train.lr=[1e-4"])
