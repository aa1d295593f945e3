"""Every training setting and its default, in one place.

Defaults are the official SDFT ones (Shenfeld et al. 2026, released code): lr 2e-5, 32 prompts
per optimizer step, one rollout per prompt at temperature 1, cosine schedule with warmup,
1024-token prompts and completions, bf16 on GPUs, EMA teacher at rate 0.01 every step, the first 3
completion tokens left out of the loss, forward KL(teacher || student) over the full vocabulary.

A config is a YAML file of nested sections mirroring these dataclasses, plus `section.key=value`
overrides from the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_type_hints

import yaml

from selfdistill.errors import UserError
from selfdistill.options import choices, coerce, is_choice, is_text, setting
from selfdistill.precision import Precision
from selfdistill.registry import DEFAULT_METHOD, METHOD_INFO, METHODS, EngineName, MethodName  # noqa: F401  (METHODS: re-exported)

# The choices of every multiple-choice setting: validation and `--help` read them from these types.
LossKind = Literal["forward_kl", "reverse_kl", "jsd", "sampled_kl"]
TeacherKind = Literal["ema", "frozen", "live"]
Overlong = Literal["error", "skip"]
Reporter = Literal["tensorboard", "wandb"]
RolloutEngine = EngineName  # a registered engine (registry.ENGINE_INFO)
ImportanceLevel = Literal["capped_token_mean", "sequence", "token", "off"]
SaveDtype = Literal["auto", "fp32", "bf16"]
GatherPrecision = Literal["auto", "fp32"]


_FINITE_NONNEGATIVE = "must be a finite number >= 0"


class Section:
    """Checks a section's types, choices and ranges as soon as it is built: LossConfig(kind="kl") and
    LossConfig(beta=5) raise a UserError naming the key. Checks that involve other sections are the
    Config's (`Config.__post_init__`)."""

    key: ClassVar[str] = ""  # the section's path in the config, for messages

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_fields(self, f"{self.key}.")
        self.check()

    def check(self) -> None:
        """The section's own ranges (values already have their types)."""

    def _require(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise UserError(f"Config value {self.key}.{name}: {rule}, got {getattr(self, name)!r}.")


@dataclass
class LoraConfig(Section):
    key: ClassVar[str] = "model.lora"

    enabled: bool = setting(False, "Train a LoRA adapter instead of all weights.")
    rank: int = setting(16, "LoRA rank r.")
    alpha: float = setting(32.0, "LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = setting(0.0, "Dropout on the LoRA input.")
    target_modules: Any = setting("all-linear", "Module names to adapt, or 'all-linear'.")


@dataclass
class ModelConfig(Section):
    key: ClassVar[str] = "model"

    name: str = setting("smollm2-135m", "Hub id, local directory, .gguf file, or 'smollm2-135m' (embedded).")
    precision: Precision = setting(
        "auto", "auto (bf16 on GPUs, fp32 on CPUs), fp32, or bf16 (bf16 autocast over fp32 master weights)."
    )
    load_dtype: Precision = setting(
        "auto",
        "Dtype the weights are loaded in: auto (fp32 for full fine-tuning, whose master "
        "weights stay fp32; bf16 for LoRA when computing in bf16), fp32, or bf16.",
    )
    trust_remote_code: bool = setting(False, "Allow the model repository's own Python code to run.")
    save_dtype: SaveDtype = setting(
        "auto",
        "Dtype of the weights in final/: auto (a run computing in bf16 saves in the dtype the loaded checkpoint "
        "was published in, usually bf16, the size vLLM and transformers serve; a run computing in fp32 saves "
        "fp32), fp32, or bf16.",
    )
    tf32: bool = setting(
        True,
        "CUDA: fp32 matrix products (the output head, an fp32 run) on TF32 tensor cores (inputs rounded to a "
        "10-bit mantissa, fp32 sums); false: full fp32 products. No effect on CPUs.",
    )
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig(Section):
    key: ClassVar[str] = "data"

    train: str | None = setting(
        None, "Training records: a .jsonl file, a saved HF dataset dir, 'hf:NAME', or 'builtin:demo'."
    )
    split: str = setting("train", "Split to read from a Hugging Face dataset.")
    columns: dict = setting({}, "Column mapping, e.g. {prompt: instruction, demonstration: golden_response}.")
    system_prompt: str | None = setting(None, "System message prepended to prompts given as plain strings.")
    teacher_template: str = setting(
        "paper", "Teacher prompt: 'paper', 'plain', or a template with {question} and {demonstration}."
    )
    max_prompt_tokens: int = setting(1024, "Longest student prompt, in tokens.")
    max_teacher_prompt_tokens: int = setting(2048, "Longest teacher prompt (question + demonstration), in tokens.")
    overlong: Overlong = setting(
        "error", "What to do with a prompt over its limit: 'error' or 'skip' (counted and logged)."
    )
    documents: str | None = setting(
        None, "Raw documents for cpt: .jsonl with a 'text' field, or .txt split on blank lines."
    )

    def check(self) -> None:
        template = self.teacher_template
        self._require(
            template in ("paper", "plain") or ("{question}" in template and "{demonstration}" in template),
            "teacher_template",
            "must be 'paper', 'plain', or a template of your own containing both {question} and {demonstration}",
        )
        self._require(self.max_prompt_tokens > 0, "max_prompt_tokens", "must be > 0")
        self._require(self.max_teacher_prompt_tokens > 0, "max_teacher_prompt_tokens", "must be > 0")


@dataclass
class RolloutConfig(Section):
    key: ClassVar[str] = "rollout"

    temperature: float = setting(1.0, "Sampling temperature of the student's rollouts.")
    top_p: float = setting(1.0, "Nucleus sampling mass.")
    max_new_tokens: int = setting(1024, "Longest completion, in tokens.")
    num_rollouts: int = setting(1, "Completions sampled per prompt.")
    batch_size: int = setting(16, "Prompts generated together in one batch.")
    ignore_eos: bool = setting(
        False, "Keep sampling past the end-of-turn token (fixed-length rollouts, for benchmarks)."
    )
    engine: RolloutEngine = setting(
        "decode", "decode (our KV-cache loop, any device) or vllm (in-process vLLM engine; optional extra)."
    )
    vllm_precision: Precision = setting(
        "auto", "vllm: the engine's precision: auto (as model.precision), fp32 or bf16."
    )
    vllm_gpu_memory: float = setting(
        0.3,
        "vllm on a GPU: the fraction of its memory the engine may take (weights + KV cache); training has the rest.",
    )
    importance_sampling: ImportanceLevel = setting(
        "capped_token_mean",
        "vllm: truncated importance weights, with r_t = p_trainer(y_t) / p_sampler(y_t): capped_token_mean "
        "(the SDFT authors'): each sequence weighted by mean_t min(C, r_t); sequence: by "
        "min(C, exp(mean_t log r_t)); token: each token by min(C, r_t); off: none.",
    )
    importance_cap: float = setting(
        2.0, "vllm: the importance weights' cap C, applied to r_t (or to the sequence's ratio)."
    )
    vllm_eager: bool = setting(
        False, "vllm on a GPU: run the engine without CUDA graphs (slower decoding, no graph capture at start)."
    )
    vllm_load_dir: str | None = setting(
        None,
        "vllm: directory for the engine's first load (the whole model in the engine's dtype, checked for free "
        "space first); default: the system's temporary directory (TMPDIR).",
    )
    vllm_sleep: bool = setting(
        True,
        "vllm on a GPU: between rollouts the engine sleeps (its weights copied to host memory, its KV cache "
        "freed), so the training step has that memory; it wakes for the next weight sync.",
    )

    def check(self) -> None:
        self._require(self.temperature >= 0, "temperature", "must be >= 0 (0 means greedy)")
        self._require(0.0 < self.top_p <= 1.0, "top_p", "must lie in (0, 1]")
        self._require(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        self._require(self.num_rollouts >= 1, "num_rollouts", "must be >= 1")
        self._require(self.batch_size > 0, "batch_size", "must be > 0")
        self._require(0 < self.vllm_gpu_memory < 1, "vllm_gpu_memory", "must be between 0 and 1")
        self._require(self.importance_cap > 0, "importance_cap", "must be > 0")


@dataclass
class LossConfig(Section):
    key: ClassVar[str] = "loss"

    kind: LossKind = setting(
        "forward_kl", "forward_kl (paper's runs), reverse_kl (paper's derivation), jsd, or sampled_kl."
    )
    beta: float = setting(0.5, "Teacher weight of the JSD mixture.")
    top_k: int | None = setting(
        None, "Sum the divergence over the teacher's top-k tokens only (None: full vocabulary)."
    )
    add_tail: bool = setting(False, "With top_k: keep the rest of the mass as one extra 'tail' bucket.")
    skip_first_tokens: int = setting(3, "Completion tokens at the start left out of the loss.")
    chunk_size: int = setting(256, "Completion positions whose logits are computed at once.")
    sft_weight: float = setting(
        0.0,
        "sdft: weight λ of an SFT term: loss = SDFT loss + λ · cross-entropy on the demonstration (each a "
        "mean over its own tokens; metrics.jsonl logs both). 0: the paper's SDFT.",
    )

    def check(self) -> None:
        self._require(0.0 <= self.beta <= 1.0, "beta", "must lie in [0, 1]")
        self._require(self.top_k is None or self.top_k > 0, "top_k", "must be a positive integer or null")
        self._require(self.skip_first_tokens >= 0, "skip_first_tokens", "must be >= 0")
        self._require(self.chunk_size > 0, "chunk_size", "must be > 0")
        self._require(self.sft_weight >= 0 and math.isfinite(self.sft_weight), "sft_weight", _FINITE_NONNEGATIVE)


@dataclass
class TeacherConfig(Section):
    key: ClassVar[str] = "teacher"

    kind: TeacherKind | None = setting(
        None,
        "ema (weights follow the student), frozen (initial weights), or live (the student). Unset: the method's "
        "own: ema, or the teacher of a method whose teacher is fixed (such a method refuses another kind).",
    )
    ema_rate: float = setting(0.01, "EMA rate a: teacher <- (1 - a) teacher + a student, after every optimizer step.")
    precision: Precision = setting(
        "auto",
        "The teacher's forward (no gradient): fp32 or bf16; auto: as model.precision, but bf16 on a CPU with "
        "bf16 instructions when model.precision is auto (2.5x faster there, the loss moved by 0.2%).",
    )

    def check(self) -> None:
        self._require(0.0 <= self.ema_rate <= 1.0, "ema_rate", "must lie in [0, 1]")


@dataclass
class TrainConfig(Section):
    key: ClassVar[str] = "train"

    lr: float = setting(2e-5, "Peak learning rate (AdamW).")
    batch_size: int = setting(32, "Prompts per optimizer step (global, across processes).")
    micro_batch_size: int = setting(4, "Sequences per forward/backward; the step accumulates over them.")
    epochs: float = setting(1.0, "Passes over the training records.")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps (overrides epochs).")
    warmup_ratio: float = setting(
        0.1,
        "Fraction of steps of linear warm-up before the cosine decay: warm-up step k of W (from 0) uses "
        "lr·(k+1)/(W+1), step W the full lr; no step runs at rate 0.",
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 disables).")
    seed: int = setting(42, "Seed for data order, sampling and initialisation.")
    output_dir: str = setting("runs/sdft", "Where checkpoints, metrics.jsonl and the final model go.")
    save_every: int = setting(0, "Save a checkpoint every N optimizer steps (0: only at the end).")
    keep_last: int = setting(2, "Checkpoints kept on disk.")
    report_to: list[Reporter] = setting(
        [],
        "Also log every step's metrics to: tensorboard (RUN/tensorboard/), wandb (RUN/wandb/; "
        "WANDB_MODE=offline works without a network). metrics.jsonl is always written.",
    )
    demonstration_logp_every: int = setting(
        10,
        "Methods that do not train on the demonstrations (SDFT) log their log-likelihood under the "
        "student prompt (metrics.jsonl: demonstration_logp) every N steps, at the cost of one forward "
        "without gradients of the step's prompts and demonstrations; 0: never. SFT always logs it.",
    )
    max_nonfinite_steps: int = setting(3, "Consecutive non-finite steps tolerated before the run stops.")
    activation_checkpointing: bool = setting(
        False,
        "Recompute each layer's activations in the backward pass (gradient checkpointing): less "
        "memory (the activations of one layer instead of all), one more student forward of compute.",
    )

    def check(self) -> None:
        self._require(self.lr > 0 and self.lr != float("inf"), "lr", "must be a finite number > 0")
        self._require(self.batch_size > 0, "batch_size", "must be > 0")
        self._require(self.micro_batch_size > 0, "micro_batch_size", "must be > 0")
        self._require(self.epochs > 0, "epochs", "must be > 0")
        self._require(self.max_steps is None or self.max_steps > 0, "max_steps", "must be > 0 or null")
        self._require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must lie in [0, 1)")
        self._require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        self._require(bool(str(self.output_dir).strip()), "output_dir", "may not be empty")
        self._require(self.save_every >= 0, "save_every", "must be >= 0 (0: only at the end)")
        self._require(self.keep_last >= 1, "keep_last", "must be >= 1")
        self._require(self.demonstration_logp_every >= 0, "demonstration_logp_every", "must be >= 0 (0: never)")
        self._require(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", "must be >= 0")


@dataclass
class DistributedConfig(Section):
    key: ClassVar[str] = "distributed"

    gather: GatherPrecision = setting(
        "auto",
        "Weights all-gathered in: auto (the compute dtype: bf16 in a bf16 run, half the bytes of fp32; gradients "
        "are still reduced in fp32), or fp32 (the master weights: a run's numbers then do not depend on its "
        "number of processes, at twice the communication).",
    )
    shard_size: int = setting(
        0,
        "Processes that shard the model among themselves; groups of them hold replicas (hybrid sharding: "
        "shard within a node, replicate across nodes). 0: the processes of one node (torchrun's "
        "LOCAL_WORLD_SIZE); must divide the number of processes.",
    )
    timeout_minutes: float = setting(
        60.0,
        "How long a process waits for the others at a collective before the run fails (rank 0 alone writes "
        "final/, about 28 GB at 14B in bf16).",
    )

    def check(self) -> None:
        self._require(self.shard_size >= 0, "shard_size", "must be >= 0 (0: the processes of one node)")
        self._require(
            self.timeout_minutes > 0 and math.isfinite(self.timeout_minutes), "timeout_minutes", "must be > 0"
        )


@dataclass
class Config:
    """The settings of a training run: the sections every method shares.

    A method with settings of its own subclasses it, adding its sections (sft_replay: `replay`), and
    registers the subclass in its entry (`MethodInfo.config`). `Config(method=NAME, ...)` builds the
    class of method NAME, so `Config(method="sft_replay", replay={"ratio": 0.5})` is an SFTReplayConfig.
    """

    method: MethodName = setting(DEFAULT_METHOD, "Training method.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __new__(cls, *args, **kwargs):
        if cls is Config:  # the method's own class (an unknown name is refused by the checks below)
            cls = config_class(kwargs.get("method", args[0] if args else DEFAULT_METHOD))
        _refuse_other_methods_sections(cls, kwargs, "")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        # The method, and every section: built from a mapping, e.g. Config(method="sft", train={"lr": 1e-4}),
        # or checked again (a section may have been changed since it was built).
        check_fields(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value.check()
        _check_method_settings(self)
        self.check_method()

    def check_method(self) -> None:
        """Checks of a method's own sections against the shared ones (a method's Config subclass adds them)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_class(method: object) -> type[Config]:
    """The Config class of `method`: its entry's subclass, or Config (also for a name that is not a method)."""
    info = METHOD_INFO.get(method) if isinstance(method, str) else None
    return (info.config_class if info is not None else None) or Config


# The teacher kind of a method whose teacher.kind chooses, when it is not set.
DEFAULT_TEACHER = "ema"


def _check_method_settings(cfg: Config) -> None:
    """The checks that involve the method and another section: what the registry says the method reads."""
    info = METHOD_INFO[cfg.method]
    _resolve_teacher(cfg, info)
    if cfg.loss.sft_weight and not info.reads("loss.sft_weight"):
        owners = " or ".join(f"method={m.name}" for m in METHOD_INFO.values() if m.reads("loss.sft_weight"))
        raise UserError(
            f"Config value loss.sft_weight: adds an SFT term to SDFT's loss; method {cfg.method!r} has no such term "
            f"(use {owners}, or leave it 0)."
        )


def _resolve_teacher(cfg: Config, info) -> None:
    """teacher.kind as the method runs it: unset means the method's own kind; a kind other than the one a
    method always uses is refused (it would be ignored).

    Only a value that differs from what the method does is refused, so a config written out by a run
    (which holds the kind it ran with) loads again. Sections shared by several methods (a continual
    config's `base`) leave teacher.kind out for methods with a fixed teacher (`for_method`).
    """
    fixed = info.step.fixed_teacher if info.step is not None else None
    if fixed is None:
        cfg.teacher.kind = cfg.teacher.kind or DEFAULT_TEACHER
        return
    if cfg.teacher.kind not in (None, fixed):
        raise UserError(
            f"Config value teacher.kind: method {cfg.method!r} always uses a {fixed} teacher (the starting model); "
            f"teacher.kind {cfg.teacher.kind!r} would be ignored. Leave teacher.kind unset, or set it to {fixed!r}."
        )
    cfg.teacher.kind = fixed


def for_method(data: dict, method: str) -> dict:
    """A copy of the config mapping `data`, shared by several methods, without the settings that `method`
    fixes (teacher.kind for a method with a fixed teacher) or does not have (another method's own
    sections): a shared section sets them for the others."""
    info = METHOD_INFO[method]
    out = copy.deepcopy(data)
    if info.step is not None and info.step.fixed_teacher and isinstance(out.get("teacher"), dict):
        out["teacher"].pop("kind", None)
    others = {s for other in METHOD_INFO.values() for s in other.own_sections} - set(info.own_sections)
    return {key: value for key, value in out.items() if key not in others}


def settings_of(obj: Any, prefix: str = ""):
    """(owning section, field, declared type, dotted key) of every setting of `obj`, sections walked in order."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from settings_of(value, f"{prefix}{f.name}.")
        else:
            yield obj, f, hints[f.name], f"{prefix}{f.name}"


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """A config value as its declared type (selfdistill.options.coerce), or a UserError naming its key."""
    return coerce(value, kind, f"Config value {key}", key.replace(".", " "))  # "unknown loss kind 'kl'"


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every setting of `obj` (and of its sections) against its declared type, storing what is
    converted (e.g. '1e-4' to 1e-4); a wrong type or an unknown choice is a UserError naming the key.
    A section given as a mapping is built. Run when a section is built and again by the Config."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, kind, value = f"{prefix}{f.name}", hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(kind):
            if isinstance(value, dict):
                value = build(kind, value, f"{key}.")
            elif isinstance(value, kind):
                check_fields(value, f"{key}.")
        setattr(obj, f.name, _coerce(value, kind, key))


def check_keys(data: dict, names: list[str], prefix: str = "", unknown: str = "Unknown config key") -> None:
    """Reject a key that is not a setting, suggesting the closest one."""
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f" Did you mean {prefix + close[0]!r}?"
                if close
                else f" Valid keys: {', '.join(prefix + n for n in names)}."
            )
            raise UserError(f"{unknown} {prefix + str(key)!r}.{hint}")


def build(cls: type, data: Any, prefix: str = "", unknown: str = "Unknown config key"):
    """A settings dataclass from a (YAML) mapping: every key checked, every value coerced to its type,
    sections built recursively; the class's own checks run on construction. Shared by every command's config."""
    where = prefix[:-1] if prefix.endswith(".") else prefix
    if not isinstance(data, dict):
        raise UserError(f"Config value {where or 'config'}: expected a section (mapping), got {data!r}.")
    if isinstance(cls, type) and issubclass(cls, Config):  # the method's own class, with its sections
        cls = config_class(data.get("method", DEFAULT_METHOD))
        _refuse_other_methods_sections(cls, data, prefix)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(data, list(fields), prefix, unknown)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, f"{prefix}{key}.", unknown)
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _refuse_other_methods_sections(cls: type, data: dict, prefix: str) -> None:
    """A section of another method's settings, set for a method that has none: refused naming both."""
    own = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        owners = [info.name for info in METHOD_INFO.values() if key in info.own_sections]
        if key not in own and owners:
            method = data.get("method", DEFAULT_METHOD)
            raise UserError(
                f"Config key {prefix}{key}: settings of method {' and '.join(owners)}; method {method!r} has no "
                f"{key} section, so they would be ignored. Remove the section, or set method to {owners[0]!r}."
            )


def merge(base: dict, update: dict) -> dict:
    """A new mapping: `update`'s values over `base`'s, section by section (neither is changed)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_NULL_TEXT = ("", "~", "null", "Null", "NULL")  # YAML's spellings of null


def parse_overrides(overrides: list[str], config_prefix: str = "") -> dict:
    """`a.b=value` strings to a nested dict. `config_prefix`: where the training Config's keys sit in a
    larger config (a stream config's `base.`), so that `base.data.system_prompt` is known as text too.

    A value is read as YAML (1e-4, true, null, [a, b], {key: value}), except where the key is a text
    setting of the Config (a str, a path or a choice): there the text is taken as typed, since YAML
    would read `You are: helpful` as a mapping, cut `Answer #1 first` at the '#' and refuse
    `{question} Example answer: {demonstration}`, all of them reasonable text. A quoted value ('...' or
    "...") is still unquoted there, and empty, ~ or null is null. Elsewhere (numbers, lists, mappings,
    keys that are not Config settings), a value YAML cannot read has no sensible reading: a UserError
    naming the override and how to write lists, mappings and text.
    """
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"Override {item!r}: write it as section.key=value, e.g. train.lr=1e-4.")
        key, raw = item.split("=", 1)
        setting = key.strip()
        if config_prefix and setting.startswith(config_prefix):
            setting = setting[len(config_prefix) :]
        value = _override_value(setting, raw.strip(), item)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _override_value(key: str, text: str, given: str) -> Any:
    """The value of one override; `key` is the Config setting it sets, `given` the override as typed."""
    if is_text(_declared_type(key)):
        if text in _NULL_TEXT:
            return None
        if text[:1] in ("'", '"'):
            try:
                quoted = yaml.safe_load(text)
            except yaml.YAMLError:
                quoted = None  # e.g. "it's" unbalanced: the text as typed
            if isinstance(quoted, str):
                return quoted
        return text
    if not text:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(
            f"Override {given!r}: YAML cannot read the value ({problem}). Write a list as [a, b], a "
            f"mapping as {{key: value}}, and text in quotes, e.g. --set '{given.split('=', 1)[0].strip()}=\"...\"'."
        ) from None


def _declared_type(key: str) -> Any:
    """The declared type of the setting `key` (e.g. 'data.system_prompt') of the Config or of a method's
    own sections ('replay.data'); None if there is none."""
    for root in config_classes():
        kind: Any = root
        for part in key.split("."):
            if not dataclasses.is_dataclass(kind) or part not in {f.name for f in dataclasses.fields(kind)}:
                kind = None
                break
            kind = get_type_hints(kind)[part]
        if kind is not None:
            return kind
    return None


def config_classes() -> list[type[Config]]:
    """Config, then every method's own Config subclass."""
    own = [info.config_class for info in METHOD_INFO.values() if info.config_class is not None]
    return [Config, *dict.fromkeys(own)]


def read_yaml(path: Path) -> Any:
    """A YAML config file's content; a missing file or bad syntax is a UserError naming the line."""
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist. Check the path of the YAML config.")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(
            f"Config file {path}{where}: invalid YAML ({getattr(exc, 'problem', exc)}). "
            "Fix the syntax there (indentation, brackets, quotes)."
        ) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the YAML file, then the overrides (`section.key=value` strings or a nested dict); validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise UserError(
                f"Config file {path}: the top level must be a mapping of sections "
                "(e.g. 'train:' with 'lr: 2e-5' indented below it)."
            )
        try:
            build(Config, data)
        except UserError as exc:
            raise UserError(f"Config file {path}: {exc}") from None
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return build(Config, data)


def describe_options() -> list[tuple[str, str, str]]:
    """(key, default, help) for every setting, for `--help`; a multiple-choice setting lists its choices."""
    rows: list[tuple[str, str, str]] = []
    shared = [f.name for f in dataclasses.fields(Config)]
    for cls in config_classes():  # the shared settings, then each method's own sections
        for owner, f, hint, key in settings_of(cls(method=_method_of(cls))):
            if cls is Config or key.split(".")[0] not in shared:
                rows.append(_option_row(owner, f, hint, key))
    return rows


def _method_of(cls: type[Config]) -> str:
    """A method whose Config class is `cls`."""
    return next((i.name for i in METHOD_INFO.values() if i.config_class is cls), DEFAULT_METHOD)


def _option_row(owner, f, hint, key) -> tuple[str, str, str]:
    text = f.metadata.get("help", "")
    if is_choice(hint):
        text += f" One of: {', '.join(choices(hint))}."
    return (key, repr(getattr(owner, f.name)), text)
