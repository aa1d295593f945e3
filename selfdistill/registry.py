"""Every training method, by name: the one place a method is declared.

Adding a method is its module under `selfdistill/methods/` plus one `MethodInfo` entry here; the
config, `sdft train --help`, validation, the model card, `sdft plan` and the tests read everything
they need about it from that entry (what a step computes: its `Step`). This module imports nothing heavy (no torch), so the config and
`sdft --help` can read it quickly; a method's class is imported only when a run asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


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
    target: str  # "module:Class" of the selfdistill.methods.base.Method subclass
    card: str  # one sentence for the trained model's card: how the model was trained
    # Config sections or keys that this method alone reads (e.g. "replay", "loss.sft_weight"): the
    # model card shows them only for this method, and validation checks them only for it.
    settings: tuple[str, ...] = ()
    # What a step computes. None: not declared; the card then shows the shared and own settings only,
    # and `sdft plan` refuses the method, saying that this is what it lacks.
    step: Step | None = None

    @property
    def on_policy(self) -> bool:
        """It samples from the student while training."""
        return self.step is not None and self.step.trains_on == "rollouts"

    def reads(self, key: str) -> bool:
        """Whether `key` (section.setting) is one of this method's own settings."""
        return any(key == own or key.startswith(own + ".") for own in self.settings)


METHOD_INFO: dict[str, MethodInfo] = {
    entry.name: entry
    for entry in (
        MethodInfo(
            "sdft",
            "Self-Distillation Fine-Tuning: the student's own samples, scored by the demonstration-conditioned teacher.",
            "selfdistill.methods.sdft:SDFT",
            "Self-Distillation Fine-Tuning: trained on its own sampled answers, toward the next-token distributions "
            "of a teacher (the same network, shown the demonstration).",
            settings=("loss.sft_weight",),
            step=Step(
                trains_on="rollouts",
                teacher="configured",
                teacher_sees="demonstration",
                matches_teacher=True,
                skips_first_tokens=True,
                demonstration_forward="loss.sft_weight",
            ),
        ),
        MethodInfo(
            "sft",
            "Supervised fine-tuning: cross-entropy on the demonstration tokens (+ end of turn).",
            "selfdistill.methods.sft:SFT",
            "Supervised fine-tuning: trained with cross-entropy on the demonstrations.",
            step=Step(),
        ),
        MethodInfo(
            "dft",
            "Dynamic Fine-Tuning: SFT's token loss weighted by the token's (constant) probability.",
            "selfdistill.methods.dft:DFT",
            "Dynamic Fine-Tuning: trained with cross-entropy on the demonstrations, each token's loss weighted by "
            "its probability under the model (held constant).",
            step=Step(),
        ),
        MethodInfo(
            "offline_distill",
            "The demonstration-conditioned teacher answers once before training; the student learns those answers.",
            "selfdistill.methods.offline_distill:OfflineDistill",
            "Offline distillation: the starting model, shown each demonstration, answered once before training, "
            "and the model was trained on those answers.",
            settings=("offline",),
            step=Step(
                trains_on="teacher answers",
                teacher="frozen",
                teacher_sees="demonstration",
                teacher_runs_if="offline.loss=divergence",
                matches_teacher=True,
                skips_first_tokens=True,
            ),
        ),
        MethodInfo(
            "cpt",
            "Continued pre-training: next-token loss on raw documents (data.documents, or the records' context).",
            "selfdistill.methods.cpt:CPT",
            "Continued pre-training: trained with the next-token loss on raw documents.",
            settings=("data.documents",),
            step=Step(trains_on="documents"),
        ),
        MethodInfo(
            "sft_replay",
            "SFT with replay: replay.ratio of every step's examples are the starting model's own answers to "
            "general prompts.",
            "selfdistill.methods.sft_replay:SFTReplay",
            "SFT with replay: trained with cross-entropy on the demonstrations, a share of every step given to "
            "examples of the starting model's own behaviour.",
            settings=("replay",),
            # Its replay answers are generated before training; a step trains on them as on demonstrations.
            step=Step(),
        ),
        MethodInfo(
            "sft_kl",
            "SFT anchored to the starting model: cross-entropy + anchor.beta x KL(starting model || student) per token.",
            "selfdistill.methods.sft_kl:SFTKL",
            "SFT anchored to the starting model: trained with cross-entropy on the demonstrations plus a KL penalty "
            "toward the starting model's next-token distributions.",
            settings=("anchor",),
            step=Step(teacher="frozen", teacher_sees="prompt", teacher_runs_if="anchor.beta"),
        ),
        MethodInfo(
            "sft_reinvoke",
            "SFT, then on-policy distillation from the initial model on general prompts to recover old skills.",
            "selfdistill.methods.sft_reinvoke:SFTReinvoke",
            "SFT, then on-policy distillation from the starting model on general prompts to recover earlier skills.",
            settings=("reinvoke",),
            # The second phase's step: the student's samples of general prompts, scored by the starting model.
            step=Step(
                trains_on="rollouts",
                teacher="frozen",
                teacher_sees="prompt",
                matches_teacher=True,
                second_phase="reinvoke.steps",
            ),
        ),
    )
}


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
    """The Method subclass registered under `name` (imported on first use)."""
    module, _, attr = METHOD_INFO[name].target.partition(":")
    return getattr(importlib.import_module(module), attr)
