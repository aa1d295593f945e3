"""`sdft learn demo`: the embedded SmolLM2-135M-Instruct keeps learning over four rounds, behind a gate.

The rounds, each on the demonstrations added just before it:

1. tool calls (32 demonstrations of the built-in tooluse task), lr 1e-4, 8 steps of 8;
2. facts about a fictional world (16 demonstrations of the knowledge task) at lr 3e-4, 32 steps of 4:
   the setting in which SFT took the continual demo's tool calls to 0;
3. the same facts again (a rejected round's demonstrations are pending again) at lr 1e-4;
4. 32 more tool calls, at the learner's settings.

Evaluation sets are added whole as held-out records (`heldout=True`): the tooluse task's 16 requests
on APIs not in training and the knowledge task's 10 paraphrased questions, as in `sdft demo`.

The method, sft_replay, was picked by running these rounds with each candidate (2026-12-07, 2 cores):
with plain SFT the gate refused both facts rounds (each took the tool calls from 0.625 to 0.000 and
0.438) and the model served at the end knew no fact (tool calls 0.688, facts 0.000); with sft_replay
(a quarter of every step replays earlier rounds' prompts, answered by the model being trained) the
facts round at 1e-4 kept the tool calls (0.562 before and after) and was promoted, so the model served
at the end knows both (tool calls 0.562, facts 0.400). SDFT alone learns nothing graded at this scale
in this few steps (`sdft demo`). Everything is fp32, so the numbers do not depend on the CPU. Running
the demo again continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from selfdistill.learner.workspace import Learner

SETTINGS = [
    "model.precision=fp32",
    "data.max_prompt_tokens=512",
    "train.batch_size=8",
    "train.micro_batch_size=8",
    "train.max_steps=8",
    "train.epochs=100",
    "train.lr=1e-4",
    "train.warmup_ratio=0",
    "eval.batch_size=16",
    "eval.precision=fp32",
    "eval.max_new_tokens=48",
    "eval.probes.limit=12",
    "eval.probes.max_new_tokens=32",
    "eval.drift.limit=6",
    "eval.drift.max_new_tokens=32",
    "learner.heldout_share=0",  # the tasks' own evaluation sets are added as held-out records
    # 16 and 10 held-out items, 12 probes: one item is 0.0625, 0.1 and 0.083 of a score.
    "gate.max_task_drop=0.125",
    "gate.max_probe_drop=0.17",
]
FACTS = ["train.max_steps=32", "train.batch_size=4", "train.micro_batch_size=4"]
# Settings of a method beside those above, when the demo runs another method (--method).
METHOD_SETTINGS = {
    "sft_replay": ["replay.max_new_tokens=48"],  # a tool call is 25-40 tokens; general answers are cut there
    "sdft": ["rollout.max_new_tokens=40", "teacher.kind=frozen"],
}


@dataclass
class DemoRound:
    title: str
    adds: list[tuple[str, str, slice]] = field(default_factory=list)  # (task, split, which records)
    overrides: list[str] = field(default_factory=list)


ROUNDS = [
    DemoRound("tool calls", [("tooluse", "eval", slice(None)), ("tooluse", "train", slice(0, 32))]),
    DemoRound(
        "facts at lr 3e-4",
        [("knowledge", "eval", slice(None)), ("knowledge", "train", slice(None))],
        ["train.lr=3e-4", *FACTS],
    ),
    DemoRound("the same facts at lr 1e-4", [], FACTS),
    DemoRound("more tool calls", [("tooluse", "train", slice(32, 64))]),
]
SIZES = {"tooluse": 64, "knowledge": 16}


def run_demo(workdir: str | Path, method: str = "sft_replay", echo: Callable[[str], None] = print) -> dict:
    """Create (or continue) the demo learner in `workdir` and run its rounds; returns its status."""
    from selfdistill.tasks.catalog import make_task

    root = Path(workdir)
    if (root / "learner.json").is_file():
        learner = Learner(root, echo=echo)
    else:
        settings = SETTINGS + METHOD_SETTINGS.get(method, [])
        learner = Learner.init(root, model="smollm2-135m", method=method, overrides=settings, echo=echo)
    data = {name: make_task(name, 0, size) for name, size in SIZES.items()}
    for number, step in enumerate(ROUNDS, start=1):
        finished = [r for r in learner.status()["rounds"] if r["stage"] == "done"]
        if len(finished) >= number:
            continue
        echo(f"\n== round {number}: {step.title} ==")
        for task, split, part in step.adds:
            records = data[task].splits()[split][part]
            learner.add(records, task, heldout=split == "eval")
        learner.round(step.overrides)
    return learner.status()
