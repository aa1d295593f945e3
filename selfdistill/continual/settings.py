"""The settings of `sdft continual`, `sdft compare` and `sdft demo` beyond the stream config, with their
defaults and checks (see selfdistill.options); each builds the ContinualConfig it runs."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from selfdistill.config import parse_overrides
from selfdistill.continual.config import ContinualConfig, load_continual_config, parse_config
from selfdistill.errors import UserError
from selfdistill.options import as_tuples, check_types, setting

WORKERS_HELP = "Method x seed sequences run at once, each in its own process (overrides the config's workers)."
GRID_HELP = (
    "Run every method at each value: section.key=v1,v2 (e.g. train.lr=1e-4,3e-4); repeat for more keys. "
    "Sets that key of the shared grid; a method's own grid still wins."
)


def stream_overrides(
    output_dir: str | None, overrides: tuple[str, ...] | list[str], workers: int | None = None, grid=()
) -> dict:
    """The stream config's keys the options set, as a nested mapping to merge over the config."""
    data = parse_overrides(list(overrides), config_prefix="base.") if overrides else {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise UserError(f"--grid {item!r}: write it as section.key=value1,value2, e.g. train.lr=1e-4,3e-4.")
        data.setdefault("grid", {})[key.strip()] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    if output_dir:
        data["output_dir"] = output_dir
    if workers is not None:
        data["workers"] = workers
    return data


@dataclass(frozen=True, kw_only=True)
class StreamSettings:
    """How `sdft continual` runs a stream config."""

    config: Path = setting(help="Stream config YAML (stream, methods, seeds, base, eval).")
    output_dir: str | None = setting(None, "Run directory (overrides output_dir).")
    overrides: tuple[str, ...] = setting((), "Override a key of the stream config, e.g. seeds=[0,1].")
    overwrite: bool = setting(False, "Delete the results already in the run directory first.")
    workers: int | None = setting(None, WORKERS_HELP)
    grid: tuple[str, ...] = setting((), GRID_HELP)

    def __post_init__(self) -> None:
        check_types(self)
        as_tuples(self, "overrides", "grid")
        self.config_overrides()  # checks --set and --grid

    def config_overrides(self) -> dict:
        return stream_overrides(self.output_dir, self.overrides, self.workers, self.grid)

    def stream_config(self) -> ContinualConfig:
        return load_continual_config(self.config, self.config_overrides())


@dataclass(frozen=True, kw_only=True)
class CompareSettings(StreamSettings):
    """How `sdft compare` compares methods on one task: a one-stage stream config, or just a built-in task."""

    config: Path | None = setting(None, "Stream config YAML with one stage (optional with --task).")
    task: str | None = setting(None, "A built-in task to compare on (replaces the config's stream).")
    methods: str | None = setting(None, "Comma-separated methods with base settings, e.g. sdft,sft.")

    def stream_config(self) -> ContinualConfig:
        data = self.config_overrides()
        if self.task:
            data["stream"] = [{"task": self.task}]
        if self.methods:
            data["methods"] = [m.strip() for m in self.methods.split(",") if m.strip()]
        if self.config is not None:
            cfg = load_continual_config(self.config, data)
        else:
            data.setdefault("methods", ["sdft", "sft"])
            data.setdefault("output_dir", "runs/compare")
            if "stream" not in data:
                raise UserError("Give a config file or --task NAME (a built-in task, see `sdft data list`).")
            cfg = parse_config(data, "compare")
        if len(cfg.stream) != 1:
            raise UserError(
                f"compare runs one task; the config's stream has {len(cfg.stream)}. Use `sdft continual` "
                "for a stream, or --task NAME."
            )
        return cfg


def demo_config_path(quick: bool) -> Path:
    """The shipped demo's stream config (the quick one: a smaller version)."""
    return Path(str(resources.files("selfdistill") / "resources" / ("demo-quick.yaml" if quick else "demo.yaml")))


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """Which version of the demo `sdft demo` runs, and where."""

    quick: bool = setting(False, "A smaller version (under 5 minutes on 2 CPU cores).")
    output_dir: str | None = setting(None, "Run directory (default runs/demo or runs/demo-quick).")
    fresh: bool = setting(False, "Start again instead of continuing an earlier demo run.")
    show_config: bool = setting(False, "Print the demo's config file (to copy and edit) and exit.")
    workers: int | None = setting(None, WORKERS_HELP)

    def __post_init__(self) -> None:
        check_types(self)

    def config_path(self) -> Path:
        return demo_config_path(self.quick)

    def stream_config(self) -> ContinualConfig:
        return load_continual_config(self.config_path(), stream_overrides(self.output_dir, (), self.workers))
