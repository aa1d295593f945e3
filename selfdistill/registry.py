"""Every training method, by name: the registry its readers read.

A method is one module under `selfdistill/methods/` that ends with a `METHOD = MethodInfo(...)`
entry: its class, its own settings (a Config subclass with its sections) and what its step
computes (`Step`). The registry finds the entries by importing the modules of that folder the
first time it is read; the config, `sdft train --help`, validation, the model card, `sdft plan`
and the tests read everything they need about a method from its entry. `register` adds a method
defined elsewhere (a user's own module).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

# The method a config without `method` trains with.
DEFAULT_METHOD = "sdft"


@dataclass(frozen=True)
class Step:
    """What one optimizer step of a method computes: `sdft plan` traces it, the model card states it.

    Declared here, not found by running the method, so that its readers need no model: the planner
    builds the micro-batch it traces from it, the card lists the settings the step reads and states
    what is fixed, and the config refuses a setting that contradicts it.
    """

    # The completions the loss is computed on: "demonstrations"; "rollouts" (the student's own samples,
    # drawn every step through rollout.engine); "teacher answers" (generated once, before training,
    # by the frozen teacher, at rollout.temperature and up to rollout.max_new_tokens tokens);
    # "documents" (pieces of raw text of up to data.max_prompt_tokens tokens).
    trains_on: str = "demonstrations"
    # The teacher model: None (none); "configured" (teacher.kind chooses: ema, frozen or live); or a
    # fixed kind, e.g. "frozen" (the starting model, never updated), which teacher.kind may not change.
    teacher: str | None = None
    # What the teacher's forward is shown: "demonstration" (the prompt with the demonstration, through
    # data.teacher_template) or "prompt" (what the student is shown, no demonstration).
    teacher_sees: str | None = None
    # The setting the teacher's forward depends on: "anchor.beta" (runs when non-zero) or
    # "offline.loss=divergence" (runs for that value); None: every step. A teacher declared is held
    # in memory either way.
    teacher_runs_if: str | None = None
    # The loss matches the teacher's next-token distributions (loss.kind, loss.top_k), leaving the
    # first loss.skip_first_tokens completion tokens out where `skips_first_tokens`.
    matches_teacher: bool = False
    skips_first_tokens: bool = False
    # A weight that, when non-zero, adds one more student forward over the demonstrations ("loss.sft_weight").
    demonstration_forward: str | None = None
    # A setting holding the optimizer steps of a second phase run after the first (sft_reinvoke:
    # "reinvoke.steps", SFT then the step declared here); None: one phase, the step declared here.
    second_phase: str | None = None

    @property
    def samples_training_prompts(self) -> bool:
        """Its rollouts complete the training records' prompts (sft_reinvoke's second phase samples general prompts)."""
        return self.trains_on == "rollouts" and self.second_phase is None

    @property
    def fixed_teacher(self) -> str | None:
        """The teacher kind the method always uses, or None where teacher.kind chooses (or there is no teacher)."""
        return None if self.teacher in (None, "configured") else self.teacher

    def teacher_runs(self, cfg) -> bool:
        """Whether the teacher's forward runs in a step of `cfg` (a Config)."""
        if self.teacher is None:
            return False
        if self.teacher_runs_if is None:
            return True
        key, _, wanted = self.teacher_runs_if.partition("=")
        value = setting_value(cfg, key)
        return str(value) == wanted if wanted else bool(value)

    def adds_demonstration_forward(self, cfg) -> bool:
        return self.demonstration_forward is not None and bool(setting_value(cfg, self.demonstration_forward))


def setting_value(cfg, key: str):
    """The value of the dotted setting `key` ("anchor.beta") of a Config."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str  # one line: `sdft train --help` and the README list it
    target: str | type  # the selfdistill.methods.base.Method subclass, or "module:Class" (imported on first use)
    card: str  # one sentence for the trained model's card: how the model was trained
    # The method's settings: a selfdistill.config.Config subclass adding its own sections (e.g. `replay`),
    # or "module:Class"; None: the shared Config. A section of another method's is refused for it.
    config: str | type | None = None
    # Keys of shared sections that this method alone reads (e.g. "loss.sft_weight"): the model card
    # shows them only for this method, and a non-default value is refused for the others.
    settings: tuple[str, ...] = ()
    # What a step computes. None: not declared; the card then shows the shared and own settings only,
    # and `sdft plan` refuses the method, saying that this is what it lacks.
    step: Step | None = None

    @property
    def on_policy(self) -> bool:
        """It samples from the student while training."""
        return self.step is not None and self.step.trains_on == "rollouts"

    @property
    def config_class(self) -> type | None:
        """The method's Config subclass (None: the shared Config)."""
        return _resolve(self.config) if self.config is not None else None

    @property
    def own_sections(self) -> tuple[str, ...]:
        """The config sections only this method has (the fields its Config subclass adds)."""
        cls = self.config_class
        if cls is None:
            return ()
        root = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)][-1]  # the shared Config
        shared = {f.name for f in dataclasses.fields(root)}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in shared)

    def reads(self, key: str) -> bool:
        """Whether `key` (section.setting) is one of this method's own settings."""
        return any(key == own or key.startswith(own + ".") for own in self.settings + self.own_sections)


def _resolve(target: str | type):
    """A class given as itself or as "module:Class"."""
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    return target


class _Methods(MutableMapping):
    """name -> MethodInfo: the entries of the method modules, found at the first look-up.

    Ordered with the default method first, then by name. A mapping that can be changed
    (`register`, or a test's monkeypatch.setitem) like the dict it stands for.
    """

    def __init__(self) -> None:
        self._entries: dict[str, MethodInfo] | None = None

    def _all(self) -> dict[str, MethodInfo]:
        if self._entries is None:
            found = _discover("selfdistill.methods")
            self._entries = {i.name: i for i in sorted(found, key=lambda i: (i.name != DEFAULT_METHOD, i.name))}
        return self._entries

    def __getitem__(self, name: str) -> MethodInfo:
        return self._all()[name]

    def __setitem__(self, name: str, info: MethodInfo) -> None:
        self._all()[name] = info

    def __delitem__(self, name: str) -> None:
        del self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


def _discover(package: str) -> list[MethodInfo]:
    """The `METHOD` entries of the modules of `package` (imported here, by name)."""
    spec = importlib.util.find_spec(package)
    found = []
    for module in pkgutil.iter_modules(spec.submodule_search_locations):
        entry = getattr(importlib.import_module(f"{package}.{module.name}"), "METHOD", None)
        if isinstance(entry, MethodInfo):
            found.append(entry)
    return found


METHOD_INFO: MutableMapping[str, MethodInfo] = _Methods()


def register(info: MethodInfo) -> None:
    """Make a method defined outside selfdistill/methods/ (a module of your own) available by its name."""
    METHOD_INFO[info.name] = info


class _Summaries(Mapping):
    """name -> one-line description, read from METHOD_INFO at each look-up (so an added entry shows)."""

    def __getitem__(self, name: str) -> str:
        return METHOD_INFO[name].summary

    def __iter__(self) -> Iterator[str]:
        return iter(METHOD_INFO)

    def __len__(self) -> int:
        return len(METHOD_INFO)

    def __repr__(self) -> str:
        return repr(dict(self))


# name -> one-line description (what `sdft train --help` and the README list).
METHODS: Mapping[str, str] = _Summaries()


class MethodName(str):
    """The type of `Config.method`: a registered method's name.

    A multiple-choice setting whose choices are read from METHOD_INFO when a config is checked
    (`choices()`), not fixed when this module is imported, so a registered entry is all the config
    needs to accept a method.
    """

    @staticmethod
    def choices() -> tuple[str, ...]:
        return tuple(METHOD_INFO)


def method_class(name: str):
    """The Method subclass registered under `name`."""
    return _resolve(METHOD_INFO[name].target)


# -- rollout engines ------------------------------------------------------------------------------
# Every engine that samples completions, by name, declared as the methods are: adding one is its
# module under `selfdistill/sampling/` plus one `EngineInfo` entry here (docs/rollout-engines.md).


@dataclass(frozen=True)
class EngineInfo:
    name: str
    summary: str  # one line: what the engine is and what it needs
    target: str  # "module:Class" of the selfdistill.sampling.base.Sampler subclass


ENGINE_INFO: dict[str, EngineInfo] = {
    entry.name: entry
    for entry in (
        EngineInfo(
            "decode",
            "Our KV-cache decode loop, sampling from the trainer's model itself (any device).",
            "selfdistill.sampling.decode:DecodeSampler",
        ),
        EngineInfo(
            "vllm",
            "An in-process vLLM engine with a copy of the weights, synced before every rollout (optional extra).",
            "selfdistill.sampling.vllm_engine:VLLMSampler",
        ),
    )
}


class EngineName(str):
    """The type of `rollout.engine`: a registered engine's name.

    Its choices are read from ENGINE_INFO when a value is checked (`choices()`), as for `MethodName`,
    so a registered entry is all the config needs to accept an engine.
    """

    @staticmethod
    def choices() -> tuple[str, ...]:
        return tuple(ENGINE_INFO)


def engine_class(name: str):
    """The Sampler subclass registered under `name` (imported on first use: vLLM's module only when asked)."""
    if name not in ENGINE_INFO:
        from selfdistill.errors import UserError

        raise UserError(f"Unknown rollout engine {name!r}; choose one of {', '.join(ENGINE_INFO)}.")
    module, _, attr = ENGINE_INFO[name].target.partition(":")
    return getattr(importlib.import_module(module), attr)
