"""SFT with replay: every step mixes a fixed share of examples of the model's old behaviour into the new data.

Of every optimizer step's `train.batch_size` examples, round(`replay.ratio` × batch size) come from
the replay set and the rest from the training records; the replay slots are spread evenly over
the step. Replay examples are trained on exactly like the demonstrations (cross-entropy).

The replay set is `replay.data` (records; any record without a demonstration is answered by the
starting model) or, by default, the built-in general prompts answered by the starting model
itself, greedily. Self-generated replay needs no outside data: the targets are what the model
already says, so rehearsing them pulls the weights back toward the starting model's behaviour on
general requests while the demonstrations pull toward the new task. A run uses as many replay
prompts as it will draw (the first of a seeded shuffle), so a short run answers few of them.

The answers are generated once, before the first step, and stored in the run directory
(`replay.jsonl`, one line per prompt, written as each batch finishes): a run stopped while they
were being generated continues from the last batch written, and a resumed run reuses them.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from selfdistill.config import Config, Section
from selfdistill.data.order import data_order
from selfdistill.data.prompts import EncodedRecord
from selfdistill.data.records import Record, load_records
from selfdistill.errors import UserError
from selfdistill.files import write_atomic
from selfdistill.methods.base import TrainItem, completion_hidden
from selfdistill.methods.sft import SFT
from selfdistill.models.distributed import barrier
from selfdistill.options import setting
from selfdistill.progress import progress_bar
from selfdistill.registry import MethodInfo, Step
from selfdistill.sampling import SamplingSettings, sampling_from

REPLAY_FILE = "replay.jsonl"


@dataclass
class ReplaySettings(Section):
    key: ClassVar[str] = "replay"

    ratio: float = setting(
        0.25, "sft_replay: share of every step's examples drawn from the replay set.", "replay share of each step"
    )
    data: str | None = setting(
        None,
        "sft_replay: replay records (.jsonl / dataset, like data.train). Records without a demonstration are "
        "answered by the starting model. Default: the built-in general prompts, answered by the starting model.",
        "replay data",
    )
    max_new_tokens: int = setting(
        128, "sft_replay: longest answer the starting model writes for a replay prompt.", "longest replay answer"
    )

    def check(self) -> None:
        self._require(0.0 <= self.ratio < 1.0, "ratio", "must lie in [0, 1) (some of every step must be new data)")
        self._require(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")


@dataclass
class SFTReplayConfig(Config):
    replay: ReplaySettings = field(default_factory=ReplaySettings)

    def check_method(self) -> None:
        replayed = replay_per_step(self.replay.ratio, self.train.batch_size)
        if not (0 < replayed < self.train.batch_size or self.replay.ratio == 0):
            raise UserError(
                f"Config value replay.ratio: {self.replay.ratio} of train.batch_size {self.train.batch_size} is "
                f"{replayed} replay examples a step; it must be at least 1 and leave at least one slot for the "
                "training records (change either)."
            )


def replay_per_step(ratio: float, batch_size: int) -> int:
    """Replay examples in a step of `batch_size` examples: round(ratio × batch_size), halves up."""
    return math.floor(ratio * batch_size + 0.5)


def replay_slots(batch_size: int, ratio: float) -> list[bool]:
    """Which of a step's `batch_size` slots are replay: round(ratio × batch_size) of them, spread evenly."""
    count = replay_per_step(ratio, batch_size)
    return [(j + 1) * count // batch_size > j * count // batch_size for j in range(batch_size)]


def replay_records(source: str | None) -> list[Record]:
    """The replay records: a user's file, or the built-in general prompts (to be answered by the model)."""
    if source:
        return load_records(source, require_demonstration=False, origin="replay.data")
    from selfdistill.data.general import general_prompts

    return [
        Record(prompt=p, demonstration="", source=f"built-in general prompt {k}")
        for k, p in enumerate(general_prompts())
    ]


class SFTReplay(SFT):
    """SFT whose steps also hold replay examples, trained on the same way."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = replay_slots(self.cfg.train.batch_size, self.cfg.replay.ratio)
        self.replay: list[EncodedRecord] = []

    # -- which examples a step trains on --------------------------------------------------------

    @classmethod
    def check_inputs(cls, cfg) -> None:
        if cfg.replay.data:
            replay_records(cfg.replay.data)

    def total_steps(self, steps: int, examples: list) -> int:
        """train.epochs counts passes over the training records, of which a step now holds fewer."""
        train = self.cfg.train
        if not train.max_steps:
            new_per_step = len(self.slots) - sum(self.slots)
            steps = max(1, math.ceil(train.epochs * len(examples) / new_per_step))
        return steps

    def step_examples(self, examples, positions, step):
        batch, replayed = len(self.slots), sum(self.slots)
        out = []
        for p in positions:
            slot = p - step * batch
            before = sum(self.slots[:slot])  # replay slots ahead of this one in the step
            if self.slots[slot]:
                position = step * replayed + before
                out.append(self.replay[data_order(len(self.replay), self.cfg.train.seed + 1, position)])
            else:
                position = step * (batch - replayed) + slot - before
                out.append(examples[data_order(len(examples), self.cfg.train.seed, position)])
        return out

    # -- the replay set -------------------------------------------------------------------------

    def setup(self, examples, *, total_steps: int, resuming: bool) -> None:
        if sum(self.slots):
            self.replay = self._replay_set(total_steps, resuming)

    def _replay_set(self, steps: int, resuming: bool) -> list[EncodedRecord]:
        records = replay_records(self.cfg.replay.data)
        if not records:
            raise UserError(f"Config value replay.data: {self.cfg.replay.data} holds no records.")
        # As many as the run draws, the first of a seeded shuffle: a short run answers only those.
        order = list(range(len(records)))
        random.Random(self.cfg.train.seed).shuffle(order)
        order = order[: min(len(records), steps * sum(self.slots))]
        prompts = {k: self.builder.student_ids(records[k]) for k in order}
        answers = self._stored_answers(prompts)
        missing = [k for k in order if not records[k].demonstration and k not in answers]
        if missing:
            self._generate(missing, prompts, answers, records, resuming)
        encoded = []
        for position, k in enumerate(order):
            ids = self.builder.demonstration_ids(records[k].demonstration) if records[k].demonstration else answers[k]
            # Negative indices mark replay examples (the training records count from 0).
            encoded.append(EncodedRecord(-1 - position, prompts[k], [], ids))
        return encoded

    def _path(self) -> Path:
        return Path(self.cfg.train.output_dir) / REPLAY_FILE

    def _stored_answers(self, prompts: dict[int, list[int]]) -> dict[int, list[int]]:
        """Answers an earlier start of this run wrote, for the prompts that are still the same."""
        path = self._path()
        answers, kept = {}, []
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: answered again
                    continue
                if prompts.get(row.get("index")) == row.get("prompt_ids"):
                    answers[row["index"]] = row["answer_ids"]
                    kept.append(line)
            if self.procs.is_main and text != "".join(line + "\n" for line in kept):
                write_atomic(path, "".join(line + "\n" for line in kept))  # appends start on a clean line
        barrier(self.procs)  # every process has read the file before any appends to it
        return answers

    def _generate(self, missing: list[int], prompts, answers: dict, records: list[Record], resuming: bool) -> None:
        if resuming:
            raise UserError(
                f"{self._path()}: the replay answers are incomplete but the run already has checkpoints, so the "
                "starting model that must write them is gone. Start the run again (--overwrite)."
            )
        path, batch = self._path(), self.cfg.rollout.batch_size
        # The starting model's greedy answers, through the run's rollout engine (rollout.engine); its own
        # settings come from the run's config, its context from the longest prompt it answers here.
        new, stops, pad = self.cfg.replay.max_new_tokens, self.stop_token_ids, self.pad_token_id
        settings = SamplingSettings(new, stops, pad, temperature=0.0, batch_size=batch, precision=self.precision)
        longest = max(len(prompts[k]) for k in missing)
        engine = self.cfg.rollout.engine
        bar = progress_bar(total=len(missing), desc="replay answers (starting model)") if self.procs.is_main else None
        with sampling_from(self.model, settings, engine=engine, cfg=self.cfg, max_prompt_tokens=longest) as sampler:
            for start in range(0, len(missing), batch):  # each batch written as it finishes: a stop loses one
                part = missing[start : start + batch]
                completions = sampler.generate([prompts[k] for k in part], None)
                rows = []
                for k, ids in zip(part, completions.ids):
                    answers[k] = ids
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    rows.append(
                        {
                            "index": k,
                            "prompt": records[k].prompt,
                            "answer": text,
                            "prompt_ids": prompts[k],
                            "answer_ids": ids,
                        }
                    )
                if self.procs.is_main:
                    with path.open("a", encoding="utf-8") as f:
                        f.write("".join(json.dumps(row) + "\n" for row in rows))
                if bar is not None:
                    bar.update(len(part))
        if bar is not None:
            bar.close()

    # -- the loss -------------------------------------------------------------------------------

    def build_items(self, records, seeds, step):
        items, stats = super().build_items(records, seeds, step)
        stats["replay_examples_total"] = float(sum(r.index < 0 for r in records))
        return items, stats

    def loss(self, items: list[TrainItem]):
        """SFT's loss over all the step's examples; the demonstrations' and the replay's log-likelihood logged apart."""
        hidden, tokens = completion_hidden(self.model, items, False, self.pad_token_id, self.precision)
        replayed = [i.record_index < 0 for i in items for _ in range(i.loss_tokens)]
        total = torch.zeros((), device=hidden.device)
        stats = {}
        for name, wanted in (("demonstration_logp", False), ("replay_logp", True)):
            # Row indices from Python, not a boolean mask: the same rows, and no data-dependent shape.
            rows = torch.tensor(
                [k for k, r in enumerate(replayed) if r == wanted], dtype=torch.long, device=hidden.device
            )
            loss, logp_sum = self.token_loss(
                hidden.index_select(0, rows), tokens.index_select(0, rows), self.per_token_loss
            )
            total = total + loss
            stats[f"{name}_sum"], stats[f"{name}_count"] = float(logp_sum), float(rows.shape[0])
        return total, stats


METHOD = MethodInfo(
    "sft_replay",
    "SFT with replay: replay.ratio of every step's examples are the starting model's own answers to general prompts.",
    SFTReplay,
    "SFT with replay: trained with cross-entropy on the demonstrations, a share of every step given to "
    "examples of the starting model's own behaviour.",
    config=SFTReplayConfig,
    # Its replay answers are generated before training; a step trains on them as on demonstrations.
    step=Step(),
)
