"""Every training method, by name: the one list the config, the CLI help, validation and the docs read.

Adding a method is one entry here plus its module under `selfdistill/methods/`. This module
imports nothing heavy (no torch), so the config and `sdft --help` can read it quickly; the
method's class is imported only when a run asks for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    target: str  # "module:Class" of the selfdistill.methods.base.Method subclass


_ENTRIES = (
    MethodInfo(
        "sdft",
        "Self-Distillation Fine-Tuning: the student's own samples, scored by the demonstration-conditioned teacher.",
        "selfdistill.methods.sdft:SDFT",
    ),
    MethodInfo(
        "sft",
        "Supervised fine-tuning: cross-entropy on the demonstration tokens (+ end of turn).",
        "selfdistill.methods.sft:SFT",
    ),
    MethodInfo(
        "dft",
        "Dynamic Fine-Tuning: SFT's token loss weighted by the token's (constant) probability.",
        "selfdistill.methods.dft:DFT",
    ),
    MethodInfo(
        "offline_distill",
        "The demonstration-conditioned teacher answers once before training; the student learns those answers.",
        "selfdistill.methods.offline_distill:OfflineDistill",
    ),
    MethodInfo(
        "cpt",
        "Continued pre-training: next-token loss on raw documents (data.documents, or the records' context).",
        "selfdistill.methods.cpt:CPT",
    ),
    MethodInfo(
        "sft_replay",
        "SFT with replay: replay.ratio of every step's examples are the starting model's own answers to general prompts.",
        "selfdistill.methods.sft_replay:SFTReplay",
    ),
    MethodInfo(
        "sft_kl",
        "SFT anchored to the starting model: cross-entropy + anchor.beta x KL(starting model || student) per token.",
        "selfdistill.methods.sft_kl:SFTKL",
    ),
    MethodInfo(
        "sft_reinvoke",
        "SFT, then on-policy distillation from the initial model on general prompts to recover old skills.",
        "selfdistill.methods.sft_reinvoke:SFTReinvoke",
    ),
)

METHOD_INFO: dict[str, MethodInfo] = {entry.name: entry for entry in _ENTRIES}
# name -> one-line description (what `sdft train --help` and the README list).
METHODS: dict[str, str] = {entry.name: entry.summary for entry in _ENTRIES}
# The config's type for `method`, built from the same list so the two cannot disagree.
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


def method_class(name: str):
    """The Method subclass registered under `name` (imported on first use)."""
    module, _, attr = METHOD_INFO[name].target.partition(":")
    return getattr(importlib.import_module(module), attr)
