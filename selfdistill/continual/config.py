"""The continual-learning config: a stream of tasks, the methods to compare, seeds, evaluation.

A YAML file with these top-level keys (every key but `stream` and `methods` is optional):

    output_dir: runs/continual
    seeds: [0]                  # training seeds (train.seed); the task data does not change with them
    workers: 1                  # method x seed sequences run at once, each in its own process
    data_seed: 0                # seed of the built-in task generators (same records for every method/seed)
    base: {...}                 # a selfdistill.config.Config (sections model, train, rollout, ...), shared
    stream:                     # the tasks, trained in this order
      - task: tooluse           # a built-in task (`sdft data list`) ...
        size: 64                #   training records
        eval_size: 30           #   evaluation records
      - name: mine              # ... or files: records to train on, records (with `answer`) to score
        train: train.jsonl
        eval: eval.jsonl
        grader: contains
        teacher_template: plain
    methods:
      - name: sdft-lr1e-4       # label in results and plots
        method: sdft            # one of selfdistill.config.METHODS
        overrides: {train: {lr: 1e-4}}
    eval: {max_new_tokens: 64, batch_size: 16, precision: auto, samples: 3,
           probes: {enabled: true, limit: 40, max_new_tokens: 64}, drift: {enabled: true, limit: null}}

The teacher template of a stage is, first found: the method's `overrides.data.teacher_template`,
the stage's `teacher_template`, the built-in task's own template, the base config's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfdistill.config import Config, build, check_keys, load_config, merge, read_yaml
from selfdistill.errors import UserError
from selfdistill.precision import Precision
from selfdistill.registry import METHODS


@dataclass
class StageSpec:
    name: str | None  # None only until checked: a task from files must be named
    task: str | None = None  # built-in task name
    train: str | None = None  # records file (when not built-in)
    eval: str | None = None
    grader: str | None = None
    size: int | None = None
    eval_size: int | None = None
    teacher_template: str | None = None
    max_new_tokens: int | None = None  # evaluation budget for this task (else eval.max_new_tokens)


@dataclass
class MethodSpec:
    name: str
    method: str
    overrides: dict = field(default_factory=dict)


@dataclass
class ProbeSettings:
    enabled: bool = True
    limit: int | None = None
    max_new_tokens: int = 128


@dataclass
class DriftSettings:
    enabled: bool = True
    limit: int | None = None  # number of drift prompts (None: all)
    max_new_tokens: int = 64


@dataclass
class EvalSettings:
    max_new_tokens: int = 128
    batch_size: int = 16
    precision: Precision = "auto"  # resolved per device at run time, as for training
    samples: int = 3  # sample outputs per task shown in the report
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)


@dataclass
class ContinualConfig:
    stream: list[StageSpec]
    methods: list[MethodSpec]
    base: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    data_seed: int = 0
    output_dir: str = "runs/continual"
    keep_stage_models: bool = True  # False: keep only each method's newest stage model (saves disk)
    workers: int = 1  # method x seed sequences run at once, each in its own process
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage_config(self, method: MethodSpec, stage: StageSpec, seed: int, output_dir: Path) -> Config:
        """The training Config of one stage: base, the task's template, the method's overrides, seed, dir."""
        data: dict = merge({}, self.base)
        template = stage.teacher_template
        if template is None and stage.task:
            from selfdistill.tasks import get_task

            template = get_task(stage.task).teacher_template
        if template is not None:
            data.setdefault("data", {})["teacher_template"] = template
        data = merge(data, method.overrides)
        data["method"] = method.method
        data.setdefault("train", {}).update({"seed": seed, "output_dir": str(output_dir)})
        return load_config(overrides=data)


def _build(cls, data: Any, where: str):
    """A dataclass from a mapping (the training config's builder), naming `where` and the field on an error."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}.")
    if cls is EvalSettings:  # `probes: false` / `drift: false` switch a part off
        data = {k: {"enabled": False} if k in ("probes", "drift") and v is False else v for k, v in data.items()}
    try:
        return build(cls, data, "", unknown="unknown key")
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _stage(data: Any, where: str) -> StageSpec:
    if isinstance(data, str):  # shorthand: just a built-in task name
        data = {"task": data}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a task name or a mapping, got {data!r}.")
    data = dict(data)
    data.setdefault("name", data.get("task"))
    stage = _build(StageSpec, data, where)
    if stage.task:
        from selfdistill.tasks import get_task

        try:
            get_task(stage.task)
        except UserError as exc:
            raise UserError(f"{where}.task: {exc}") from None
        if stage.train or stage.eval:
            raise UserError(f"{where}: give either a built-in 'task' or 'train'/'eval' files, not both.")
    else:
        missing = [k for k in ("name", "train", "eval", "grader") if not getattr(stage, k)]
        if missing:
            raise UserError(f"{where}: a task from files needs {', '.join(missing)} (or give a built-in 'task').")
        from selfdistill.eval import graders

        if stage.grader not in graders.names():
            raise UserError(f"{where}.grader: unknown grader {stage.grader!r}; choose one of {', '.join(graders.names())}.")
    return stage


def _method(data: Any, where: str) -> MethodSpec:
    if isinstance(data, str):  # shorthand: a method name with the base settings
        data = {"name": data, "method": data}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a method name or a mapping, got {data!r}.")
    data = dict(data)
    data.setdefault("method", data.get("name"))
    spec = _build(MethodSpec, data, where)
    if spec.method not in METHODS:
        raise UserError(f"{where}.method: unknown method {spec.method!r}; choose one of {', '.join(METHODS)}.")
    if not isinstance(spec.overrides, dict):
        raise UserError(f"{where}.overrides: expected a mapping of config sections, e.g. {{train: {{lr: 1e-4}}}}.")
    return spec


def parse_config(data: Any, where: str = "config") -> ContinualConfig:
    """A validated ContinualConfig from a parsed YAML mapping; errors name `where` and the field."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: the top level must be a mapping (stream, methods, ...).")
    check_keys(data, [f.name for f in dataclasses.fields(ContinualConfig)], unknown=f"{where}: unknown key")
    for key in ("stream", "methods"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise UserError(f"{where}: '{key}' must be a non-empty list.")
    stream = [_stage(s, f"{where}: stream[{i}]") for i, s in enumerate(data["stream"])]
    methods = [_method(m, f"{where}: methods[{i}]") for i, m in enumerate(data["methods"])]
    for label, items in (("stream", [s.name for s in stream]), ("methods", [m.name for m in methods])):
        dupes = sorted({n for n in items if items.count(n) > 1})
        if dupes:
            raise UserError(f"{where}: {label} names must be unique; repeated: {', '.join(map(str, dupes))}.")
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"{where}: 'seeds' must be a list of integers, got {seeds!r}.")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise UserError(f"{where}: 'base' must be a mapping of config sections (model, train, ...).")
    cfg = ContinualConfig(
        stream=stream, methods=methods, base=base, seeds=seeds, data_seed=int(data.get("data_seed", 0)),
        output_dir=str(data.get("output_dir", "runs/continual")),
        keep_stage_models=bool(data.get("keep_stage_models", True)),
        workers=data.get("workers", 1),
        eval=_build(EvalSettings, data.get("eval") or {}, f"{where}: eval"),
    )
    if not isinstance(cfg.workers, int) or isinstance(cfg.workers, bool) or cfg.workers < 1:
        raise UserError(f"{where}: 'workers' must be an integer >= 1 (processes running sequences at once), got {cfg.workers!r}.")
    # Every method's stage config must load: report a bad override now, not after hours of training.
    for m in methods:
        try:
            cfg.stage_config(m, stream[0], seeds[0], Path(cfg.output_dir))
        except UserError as exc:
            raise UserError(f"{where}: method {m.name!r}: {exc}") from None
    return cfg


def load_continual_config(path: str | Path, overrides: dict | None = None) -> ContinualConfig:
    """Read a YAML stream config; `overrides` (a nested dict) is merged over the file first."""
    path = Path(path)
    data = read_yaml(path)
    if overrides and isinstance(data, dict):
        data = merge(data, overrides)
    # Relative data files are relative to the config file, so a config travels with its data.
    if isinstance(data, dict) and isinstance(data.get("stream"), list):
        for stage in data["stream"]:
            if isinstance(stage, dict):
                for key in ("train", "eval"):
                    if isinstance(stage.get(key), str) and not Path(stage[key]).is_absolute():
                        stage[key] = str(path.parent / stage[key])
    return parse_config(data, f"Config file {path}")
