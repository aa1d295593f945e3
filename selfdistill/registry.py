"""Every training method, by name: the one place a method is declared.

Adding a method is its module under `selfdistill/methods/` plus one `MethodInfo` entry here; the
config, `sdft train --help`, validation, the model card and the tests read everything they need
about it from that entry. This module imports nothing heavy (no torch), so the config and
`sdft --help` can read it quickly; a method's class is imported only when a run asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str  # one line: `sdft train --help` and the README list it
    target: str  # "module:Class" of the selfdistill.methods.base.Method subclass
    card: str  # one sentence for the trained model's card: how the model was trained
    # It samples from the student while training, so the rollout, loss and teacher settings matter
    # (the model card shows them only for such methods).
    on_policy: bool = False
    # Config sections or keys that this method alone reads (e.g. "replay", "loss.sft_weight"): the
    # model card shows them only for this method, and validation checks them only for it.
    settings: tuple[str, ...] = ()

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
            on_policy=True,
            settings=("loss.sft_weight",),
        ),
        MethodInfo(
            "sft",
            "Supervised fine-tuning: cross-entropy on the demonstration tokens (+ end of turn).",
            "selfdistill.methods.sft:SFT",
            "Supervised fine-tuning: trained with cross-entropy on the demonstrations.",
        ),
        MethodInfo(
            "dft",
            "Dynamic Fine-Tuning: SFT's token loss weighted by the token's (constant) probability.",
            "selfdistill.methods.dft:DFT",
            "Dynamic Fine-Tuning: trained with cross-entropy on the demonstrations, each token's loss weighted by "
            "its probability under the model (held constant).",
        ),
        MethodInfo(
            "offline_distill",
            "The demonstration-conditioned teacher answers once before training; the student learns those answers.",
            "selfdistill.methods.offline_distill:OfflineDistill",
            "Offline distillation: the starting model, shown each demonstration, answered once before training, "
            "and the model was trained on those answers.",
            settings=("offline",),
        ),
        MethodInfo(
            "cpt",
            "Continued pre-training: next-token loss on raw documents (data.documents, or the records' context).",
            "selfdistill.methods.cpt:CPT",
            "Continued pre-training: trained with the next-token loss on raw documents.",
            settings=("data.documents",),
        ),
        MethodInfo(
            "sft_replay",
            "SFT with replay: replay.ratio of every step's examples are the starting model's own answers to "
            "general prompts.",
            "selfdistill.methods.sft_replay:SFTReplay",
            "SFT with replay: trained with cross-entropy on the demonstrations, a share of every step given to "
            "examples of the starting model's own behaviour.",
            settings=("replay",),
        ),
        MethodInfo(
            "sft_kl",
            "SFT anchored to the starting model: cross-entropy + anchor.beta x KL(starting model || student) per token.",
            "selfdistill.methods.sft_kl:SFTKL",
            "SFT anchored to the starting model: trained with cross-entropy on the demonstrations plus a KL penalty "
            "toward the starting model's next-token distributions.",
            settings=("anchor",),
        ),
        MethodInfo(
            "sft_reinvoke",
            "SFT, then on-policy distillation from the initial model on general prompts to recover old skills.",
            "selfdistill.methods.sft_reinvoke:SFTReinvoke",
            "SFT, then on-policy distillation from the starting model on general prompts to recover earlier skills.",
            on_policy=True,
            settings=("reinvoke",),
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
