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
        overrides: {train: {max_steps: 16}}   # optional: settings for this stage only (a method's override wins)
      - name: mine              # ... or files: records to train on, records (with `answer`) to score
        train: train.jsonl
        eval: eval.jsonl
        grader: contains
        teacher_template: plain
        lenient: {grader: contains, answer_field: answers}   # optional second, lenient score
    methods:
      - name: sdft-lr1e-4       # label in results and plots
        method: sdft            # one of selfdistill.registry.METHODS
        overrides: {train: {lr: 1e-4}}
      - name: sft
        method: sft
        grid: {train.lr: [1.0e-4, 2.0e-4]}   # one run per value: sft@lr=1e-4, sft@lr=2e-4
    grid: {train.lr: [1.0e-4, 2.0e-4]}       # the grid of every method that has no `grid` of its own
    eval: {max_new_tokens: 64, batch_size: 16, precision: auto, samples: 3,
           probes: {enabled: true, limit: 40, max_new_tokens: 64}, drift: {enabled: true, limit: null}}

A grid (`grid: {section.key: [values]}`, or nested `{train: {lr: [...]}}`; several keys give every
combination) expands one method entry into one labelled method per grid point: its name is
`<name>@<key>=<value>[,...]` (e.g. `sdft@lr=1e-4`), its `group` the entry's name and its `setting`
the point's values, set over the entry's `overrides`. The report draws each group as one line
through its grid points. Numbers written like `1e-4` (which YAML reads as text) are read as numbers.

The teacher template of a stage is, first found: the method's `overrides.data.teacher_template`,
the stage's `teacher_template`, the built-in task's own template, the base config's.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from selfdistill.config import (
    Config,
    Section,
    build,
    check_fields,
    check_keys,
    for_method,
    load_config,
    merge,
    read_yaml,
)
from selfdistill.errors import UserError
from selfdistill.precision import Precision
from selfdistill.registry import MethodName


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
    overrides: dict = field(default_factory=dict)  # config sections for this stage only, e.g. {train: {max_steps: 16}}
    lenient: dict | None = (
        None  # files only: {grader, answer_field} of a lenient score, e.g. {grader: contains, answer_field: answers}
    )


@dataclass
class MethodSpec:
    name: str
    method: MethodName  # a registered method; checked when built
    overrides: dict = field(default_factory=dict)
    group: str | None = None  # the method entry a grid point came from (its name); None: not from a grid
    setting: dict = field(default_factory=dict)  # the grid point, {"train.lr": 1e-4}

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def family(self) -> str:
        """The line this method belongs to on the frontier: its grid's entry, or itself."""
        return self.group or self.name


@dataclass
class ProbeSettings(Section):
    key: ClassVar[str] = "eval.probes"

    enabled: bool = True
    limit: int | None = None
    max_new_tokens: int = 128


@dataclass
class DriftSettings(Section):
    key: ClassVar[str] = "eval.drift"

    enabled: bool = True
    limit: int | None = None  # number of drift prompts (None: all)
    max_new_tokens: int = 64


@dataclass
class EvalSettings(Section):
    key: ClassVar[str] = "eval"

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
    grid: dict = field(default_factory=dict)  # the grid of every method entry without its own (before expansion)

    def __post_init__(self) -> None:
        if isinstance(self.seeds, int):  # `seeds: 3` means one seed
            self.seeds = [self.seeds]
        if not isinstance(self.seeds, list) or not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise UserError(f"'seeds' must be a list of integers, got {self.seeds!r}.")
        if not isinstance(self.base, dict):
            raise UserError("'base' must be a mapping of config sections (model, train, ...).")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise UserError(
                f"'workers' must be an integer >= 1 (processes running sequences at once), got {self.workers!r}."
            )

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
        data = merge(data, stage.overrides)  # the stage's own settings, then the method's (its grid) over them
        # The base and the stage are shared by every method: what they set that this method fixes (a teacher
        # kind, for a method whose teacher is fixed) is meant for the others. The method's own overrides are
        # its own: one that contradicts it is refused when the config is built.
        data = merge(for_method(data, method.method), method.overrides)
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
    if not isinstance(stage.overrides, dict):
        raise UserError(f"{where}.overrides: expected a mapping of config sections, e.g. {{train: {{max_steps: 16}}}}.")
    if stage.task:
        from selfdistill.tasks import get_task

        try:
            get_task(stage.task)
        except UserError as exc:
            raise UserError(f"{where}.task: {exc}") from None
        if stage.train or stage.eval:
            raise UserError(f"{where}: give either a built-in 'task' or 'train'/'eval' files, not both.")
        if stage.lenient is not None:
            raise UserError(
                f"{where}.lenient: a built-in task has its own lenient score; 'lenient' is for tasks from files."
            )
    else:
        missing = [k for k in ("name", "train", "eval", "grader") if not getattr(stage, k)]
        if missing:
            raise UserError(f"{where}: a task from files needs {', '.join(missing)} (or give a built-in 'task').")
        from selfdistill.eval import graders

        if stage.grader not in graders.names():
            raise UserError(
                f"{where}.grader: unknown grader {stage.grader!r}; choose one of {', '.join(graders.names())}."
            )
        if stage.lenient is not None:
            lenient = stage.lenient
            if (
                not isinstance(lenient, dict)
                or set(lenient) - {"grader", "answer_field"}
                or lenient.get("grader") not in graders.names()
            ):
                raise UserError(
                    f"{where}.lenient: expected {{grader: <one of {', '.join(graders.names())}>, "
                    f"answer_field: <record field with the accepted answers>}}, got {lenient!r}."
                )
    return stage


def _method(data: Any, where: str) -> MethodSpec:
    if isinstance(data, str):  # shorthand: a method name with the base settings
        data = {"name": data, "method": data}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a method name or a mapping, got {data!r}.")
    data = dict(data)
    data.setdefault("method", data.get("name"))
    data.pop("grid", None)  # expanded by _methods
    return _build(MethodSpec, data, where)  # the method is one of the registered ones, the overrides a mapping


def _flatten(data: dict, prefix: str = "") -> dict:
    """{"train": {"lr": [...]}} and {"train.lr": [...]} both to {"train.lr": [...]}."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _number(value):
    # YAML 1.1 reads 1e-4 (no dot) as text; a grid of learning rates written that way means numbers.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_grid(data: Any, where: str) -> dict[str, list]:
    """A validated grid: dotted config keys (section.key) to non-empty lists of distinct values."""
    if not isinstance(data, dict):
        raise UserError(
            f"{where}: expected a mapping of config keys to lists of values, e.g. {{train.lr: [1.0e-4, 2.0e-4]}}."
        )
    grid = {}
    for key, values in _flatten(data).items():
        if "." not in key:
            raise UserError(f"{where}: key {key!r} must name a config section and setting, e.g. train.lr.")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{key}: expected a non-empty list of values, got {values!r}.")
        values = [_number(v) for v in values]
        if any(isinstance(v, (dict, list)) for v in values):
            raise UserError(f"{where}.{key}: grid values must be single values (numbers, text, true/false).")
        if len({repr(v) for v in values}) != len(values):
            raise UserError(f"{where}.{key}: repeated values in {values!r}.")
        grid[key] = values
    return grid


def format_value(value) -> str:
    """A short label for a grid value: 1e-4 rather than 0.0001, 2.5e-4, 0.05, 3, true."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            for digits in range(0, 8):
                text = f"{value:.{digits}e}"
                if float(text) == value:
                    mantissa, exponent = text.split("e")
                    return f"{mantissa}e{int(exponent)}"
        return f"{value:g}"
    return str(value)


def grid_label(setting: dict) -> str:
    """`lr=1e-4,kind=ema`: the last part of each key, unless two keys share it."""
    shorts = [key.split(".")[-1] for key in setting]
    names = [key if shorts.count(short) > 1 else short for key, short in zip(setting, shorts)]
    return ",".join(f"{name}={format_value(v)}" for name, v in zip(names, setting.values()))


def expand_grid(spec: MethodSpec, data: Any, shared: dict, where: str) -> list[MethodSpec]:
    """One MethodSpec per point of the entry's grid (its own, else the shared one); the entry itself without one."""
    own = data.get("grid") if isinstance(data, dict) else None
    grid = parse_grid(own, f"{where}.grid") if own is not None else shared
    if not grid:
        return [spec]
    points = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    out = []
    for point in points:
        overrides = copy.deepcopy(spec.overrides)
        for key, value in point.items():
            node = overrides
            *sections, leaf = key.split(".")
            for section in sections:
                node = node.setdefault(section, {})
                if not isinstance(node, dict):
                    raise UserError(f"{where}.grid: {key!r} runs into a setting that is not a section.")
            node[leaf] = value
        out.append(
            MethodSpec(
                name=f"{spec.name}@{grid_label(point)}",
                method=spec.method,
                overrides=overrides,
                group=spec.name,
                setting=point,
            )
        )
    return out


def parse_config(data: Any, where: str = "config") -> ContinualConfig:
    """A validated ContinualConfig from a parsed YAML mapping; errors name `where` and the field."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: the top level must be a mapping (stream, methods, ...).")
    check_keys(data, [f.name for f in dataclasses.fields(ContinualConfig)], unknown=f"{where}: unknown key")
    for key in ("stream", "methods"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise UserError(f"{where}: '{key}' must be a non-empty list.")
    stream = [_stage(s, f"{where}: stream[{i}]") for i, s in enumerate(data["stream"])]
    shared_grid = parse_grid(data.get("grid") or {}, f"{where}: grid")
    methods = [
        point
        for i, m in enumerate(data["methods"])
        for point in expand_grid(_method(m, f"{where}: methods[{i}]"), m, shared_grid, f"{where}: methods[{i}]")
    ]
    for label, items in (("stream", [s.name for s in stream]), ("methods", [m.name for m in methods])):
        dupes = sorted({n for n in items if items.count(n) > 1})
        if dupes:
            raise UserError(f"{where}: {label} names must be unique; repeated: {', '.join(map(str, dupes))}.")
    evaluation = _build(EvalSettings, data.get("eval") or {}, f"{where}: eval")
    try:
        cfg = ContinualConfig(
            stream=stream,
            methods=methods,
            base=data.get("base") or {},
            seeds=data.get("seeds", [0]),
            data_seed=int(data.get("data_seed", 0)),
            output_dir=str(data.get("output_dir", "runs/continual")),
            keep_stage_models=bool(data.get("keep_stage_models", True)),
            workers=data.get("workers", 1),
            eval=evaluation,
            grid={k: list(v) for k, v in shared_grid.items()},
        )
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    # Every method's stage config must load: report a bad override now, not after hours of training.
    for m in methods:
        try:
            for stage in stream:
                cfg.stage_config(m, stage, cfg.seeds[0], Path(cfg.output_dir))
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
