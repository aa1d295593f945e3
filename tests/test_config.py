"""The one typed config: choices validated at construction, one builder and merge, one method list."""

import re
import subprocess
import sys
import typing

import pytest

from selfdistill import registry
from selfdistill.config import (
    Config,
    LossConfig,
    LossKind,
    TrainConfig,
    build,
    choices,
    describe_options,
    load_config,
    merge,
)
from selfdistill.errors import UserError
from selfdistill.registry import METHODS, MethodName, method_class


def test_a_bad_choice_fails_when_the_config_is_built():
    with pytest.raises(UserError, match="Config value method: unknown method 'sdftt'.*did you mean 'sdft'"):
        Config(method="sdftt")
    with pytest.raises(UserError, match="loss.kind: unknown loss kind 'kl'"):
        LossConfig(kind="kl")
    with pytest.raises(UserError, match="model.precision: unknown model precision 'fp16'"):
        Config(model={"precision": "fp16"})
    with pytest.raises(UserError, match="train.lr: must be a finite number > 0"):
        Config(train={"lr": -1.0})
    with pytest.raises(UserError, match="train.batch_size: expected int, got 'many'"):
        TrainConfig(batch_size="many")


def test_each_section_checks_its_own_ranges_when_built():
    with pytest.raises(UserError, match=re.escape("Config value loss.beta: must lie in [0, 1], got 5.0.")):
        LossConfig(beta=5)
    with pytest.raises(UserError, match=re.escape("Config value train.micro_batch_size: must be > 0, got 0.")):
        TrainConfig(micro_batch_size=0)
    section = LossConfig()
    section.beta = 2.0  # changed after it was built: the Config checks its sections again
    with pytest.raises(UserError, match="loss.beta: must lie in"):
        Config(loss=section)


def test_a_bad_value_gives_the_same_message_from_the_api_a_yaml_file_and_the_cli(tmp_path):
    with pytest.raises(UserError) as direct:
        Config(loss={"beta": 5})
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  beta: 5\n")
    with pytest.raises(UserError) as from_yaml:
        load_config(path)
    assert str(from_yaml.value) == f"Config file {path}: {direct.value}"
    with pytest.raises(UserError) as from_overrides:
        load_config(overrides=["loss.beta=5"])
    assert str(from_overrides.value) == str(direct.value)
    cli = subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", "train", str(path), "-o", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    shown = " ".join(cli.stderr.split())  # as printed, lines joined (a long path may be wrapped)
    assert cli.returncode == 2 and "Config file" in shown and "c.yaml" in shown and str(direct.value) in shown


def test_method_checks_read_the_registry():
    with pytest.raises(UserError, match=r"loss.sft_weight: adds an SFT term.*\(use method=sdft, or leave it 0\)"):
        Config(method="sft", loss={"sft_weight": 0.5})
    with pytest.raises(UserError, match="replay.ratio: 0.05 of train.batch_size 4 is 0 replay examples"):
        Config(method="sft_replay", replay={"ratio": 0.05}, train={"batch_size": 4})
    # A section of another method's, set for a method that has none: refused, naming both.
    with pytest.raises(UserError, match="Config key replay: settings of method sft_replay; method 'sft' has no replay"):
        Config(method="sft", replay={"ratio": 0.05}, train={"batch_size": 4})
    with pytest.raises(UserError, match="Config key anchor: settings of method sft_kl; method 'sdft' has no anchor"):
        load_config(overrides=["anchor.beta=0.5"])


@pytest.mark.parametrize("name", [m for m in METHODS if registry.METHOD_INFO[m].step.fixed_teacher])
def test_a_teacher_kind_that_contradicts_a_fixed_teacher_is_refused_naming_the_method_and_the_key(name, tmp_path):
    fixed = registry.METHOD_INFO[name].step.fixed_teacher
    other = next(kind for kind in ("ema", "live") if kind != fixed)
    message = rf"teacher.kind: method '{name}' always uses a {fixed} teacher.*teacher.kind '{other}' would be ignored"
    with pytest.raises(UserError, match=message):
        Config(method=name, teacher={"kind": other})
    with pytest.raises(UserError, match=message):
        load_config(overrides=[f"method={name}", f"teacher.kind={other}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"method: {name}\nteacher:\n  kind: {other}\n")
    with pytest.raises(UserError, match=message):
        load_config(path)
    # Unset, or set to what the method does, is accepted; the config then holds the kind that runs, so a
    # config written out by a run (run.json) loads again.
    for given in ({}, {"teacher": {"kind": fixed}}):
        cfg = Config(method=name, **given)
        assert cfg.teacher.kind == fixed and Config(**cfg.to_dict()).teacher.kind == fixed
    # The rest of the teacher section (its precision) is the method's to read.
    assert Config(method=name, teacher={"precision": "fp32"}).teacher.precision == "fp32"


def test_teacher_kind_unset_is_ema_where_the_method_lets_it_choose():
    assert Config().teacher.kind == "ema" and Config(method="sft").teacher.kind == "ema"
    assert Config(teacher={"kind": "live"}).teacher.kind == "live"
    assert ("teacher.kind", "'ema'") in [row[:2] for row in describe_options()]


def test_sections_can_be_given_as_mappings_and_values_are_coerced():
    cfg = Config(method="sft", train={"lr": "1e-4", "max_steps": 3}, loss=LossConfig(kind="jsd"))
    assert cfg.method == "sft" and cfg.train.lr == 1e-4 and cfg.train.max_steps == 3 and cfg.loss.kind == "jsd"
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched keys keep their defaults
    assert (
        cfg.to_dict()
        == load_config(
            overrides={"method": "sft", "train": {"lr": 1e-4, "max_steps": 3}, "loss": {"kind": "jsd"}}
        ).to_dict()
    )


def test_load_config_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dft\ntrain:\n  lr: 1.0e-4\n  seed: 7\n")
    cfg = load_config(path, ["train.lr=3e-4", "loss.kind=reverse_kl"])
    assert (cfg.method, cfg.train.lr, cfg.train.seed, cfg.loss.kind) == ("dft", 3e-4, 7, "reverse_kl")
    path.write_text("train:\n  lrr: 1\n")
    with pytest.raises(UserError, match=f"Config file {path}: Unknown config key 'train.lrr'. Did you mean 'train.lr'"):
        load_config(path)


def test_merge_is_deep_and_changes_neither_input():
    base = {"train": {"lr": 1, "seed": 2}, "method": "sft"}
    update = {"train": {"lr": 3}, "loss": {"kind": "jsd"}}
    merged = merge(base, update)
    assert merged == {"train": {"lr": 3, "seed": 2}, "method": "sft", "loss": {"kind": "jsd"}}
    assert base == {"train": {"lr": 1, "seed": 2}, "method": "sft"} and update["train"] == {"lr": 3}


def test_one_method_list_feeds_the_type_the_classes_and_the_help():
    assert choices(MethodName) == tuple(METHODS)
    assert typing.get_type_hints(Config)["method"] == MethodName
    for name in METHODS:
        assert method_class(name).__name__  # every entry points at an importable class
    help_rows = {key: text for key, _, text in describe_options()}
    assert all(name in help_rows["method"] for name in METHODS)
    assert "One of: forward_kl, reverse_kl, jsd, sampled_kl" in help_rows["loss.kind"]


def test_every_command_shares_the_choices():
    from selfdistill.continual.config import EvalSettings
    from selfdistill.diagnosis.settings import DIVERGENCES
    from selfdistill.precision import PRECISIONS

    assert DIVERGENCES == choices(LossKind)
    assert EvalSettings().precision == "auto" and Config().model.precision == "auto"
    with pytest.raises(UserError, match="unknown precision 'fp64'"):
        build(EvalSettings, {"precision": "fp64"})
    assert set(PRECISIONS) == set(choices(typing.get_type_hints(EvalSettings)["precision"]))
