"""What every method shares: the items of a step, and hidden states at completion positions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from selfdistill.data.order import data_order
from selfdistill.data.prompts import EncodedRecord
from selfdistill.distillation.losses import chunked_token_loss, cross_entropy, output_head
from selfdistill.models.batching import pad_batch
from selfdistill.models.distributed import (
    Processes,
    backbone,
    default_device,
    max_across,
    reshard_all,
    sum_across,
)
from selfdistill.precision import autocast_context, resolve_precision


@dataclass
class TrainItem:
    """One sequence of an optimizer step: a prompt, the completion trained on, and which tokens count."""

    record_index: int
    prompt_ids: list[int]  # what the student is shown
    completion: list[int]  # the tokens the loss is computed on (sampled, or the demonstration)
    loss_start: int = 0  # completion tokens before this index are left out of the loss
    teacher_prompt_ids: list[int] | None = None  # what the teacher is shown, when there is one
    finished: bool = True  # False: the rollout hit max_new_tokens
    extra: dict = field(default_factory=dict)

    @property
    def loss_tokens(self) -> int:
        return max(0, len(self.completion) - self.loss_start)


def demonstration_items(records: list[EncodedRecord]) -> list[TrainItem]:
    """One item per record: its demonstration as the completion, after the student prompt (what SFT trains on)."""
    return [TrainItem(r.index, r.student_ids, r.demonstration_ids) for r in records]


def micro_batches(items: list, size: int, procs: Processes) -> list[tuple[list, bool]]:
    """(micro-batch, counted) pairs: `items` in micro-batches of `size`, as many on every process.

    Under FSDP2 every process must run the same number of forwards and backwards (each gathers
    weights and reduces gradients with the others), but processes can hold different numbers of
    items: a process with fewer micro-batches repeats its last one, marked not counted (weight 0).
    """
    batches = [items[s : s + size] for s in range(0, len(items), size)]
    rounds = max_across(procs, len(batches))
    return [(batches[min(k, len(batches) - 1)], k < len(batches)) for k in range(rounds)]


def completion_hidden(
    model, items: list[TrainItem], use_teacher_prompt: bool, pad_id: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict each counted completion token.

    Returns (hidden [N, d], tokens [N]) over all items, in item order. Only the backbone runs on
    the whole sequence; projecting to the vocabulary is left to the chunked loss.
    """
    rows, rows_index, positions, tokens = [], [], [], []
    for row, item in enumerate(items):
        prompt = item.teacher_prompt_ids if use_teacher_prompt else item.prompt_ids
        rows.append(prompt + item.completion)
        for j in range(item.loss_start, len(item.completion)):
            rows_index.append(row)
            positions.append(len(prompt) - 1 + j)  # the position whose output predicts completion[j]
            tokens.append(item.completion[j])
    device = next(model.parameters()).device
    ids, mask = pad_batch(rows, pad_id)
    with autocast_context(device, precision, cache=False):
        hidden = backbone(model)(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    index_rows = torch.tensor(rows_index, dtype=torch.long, device=device)
    index_pos = torch.tensor(positions, dtype=torch.long, device=device)
    return hidden[index_rows, index_pos], torch.tensor(tokens, dtype=torch.long, device=device)


class Method:
    """A training method. The loop calls, per optimizer step:

    `build_items(examples, seeds, step)` (no gradient: rollouts, targets), then for each micro-batch
    `loss(items)` -> (Σ per-token loss, stats), and `after_step()` once the weights moved.
    The loop divides by the step's total number of loss tokens (across processes), so every
    counted token of the step weighs the same, whatever the micro-batching.

    A method is one module under selfdistill/methods/ ending with its registry entry, `METHOD`
    (docs/adding-a-method.md walks through one). Its parts are built from the config and handed
    in by `selfdistill.methods.build.build_method`, as its entry's `Step` declares them: `teacher`
    (a `TeacherScoring`) where the step has a teacher, `rollouts` (a `Rollouts`) where it trains on
    the student's samples; None otherwise.
    """

    # Reuse a frozen teacher's scores of completions it already scored (offline_distill's fixed targets).
    cache_teacher_scores = False

    def __init__(
        self,
        cfg,
        model,
        tokenizer,
        builder,
        stop_token_ids: list[int],
        pad_token_id: int,
        records=None,
        *,
        procs: Processes | None = None,
        teacher=None,
        rollouts=None,
    ):
        self.cfg = cfg
        self.records = records  # the raw records, for methods that need more than the encoded prompts
        self.model = model
        self.tokenizer = tokenizer
        self.builder = builder
        self.stop_token_ids = list(stop_token_ids)  # every id that ends a sampled turn (models.stop_token_ids)
        self.pad_token_id = pad_token_id
        self.procs = procs or Processes(0, 1, torch.device("cpu"))  # the processes training together
        self.teacher = teacher
        self.rollouts = rollouts
        self.compute_device, self.precision = compute_precision(cfg, model)

    @classmethod
    def check_inputs(cls, cfg) -> None:
        """Read the files of its own that the method reads in its set-up, which runs after the run directory
        is written, so that a bad one is refused before anything is written (default: none)."""

    def training_examples(self, records: list[EncodedRecord]) -> list:
        """What the data order runs over (records by default; cpt: document pieces)."""
        return records

    def step_examples(self, examples: list, positions: list[int], step: int) -> list:
        """This process's examples of optimizer step `step`, at global stream positions `positions`
        (sft_replay: some of them come from the replay set instead)."""
        return [examples[data_order(len(examples), self.cfg.train.seed, p)] for p in positions]

    def token_loss(self, hidden: torch.Tensor, tokens: torch.Tensor, per_token_fn=cross_entropy):
        """(Σ per_token_fn(log p(token)), Σ log p(token)) over the rows of `hidden`, through the
        student's head, chunked; the default is SFT's cross-entropy."""
        ones = torch.ones(tokens.shape[0], device=hidden.device)
        return chunked_token_loss(hidden, tokens, ones, output_head(self.model), per_token_fn, self.cfg.loss.chunk_size)

    def supervised_loss(self, items: list[TrainItem], per_token_fn=cross_entropy) -> tuple[torch.Tensor, dict]:
        """SFT's loss on the items' completions given the student prompts: (Σ per_token_fn(log p),
        {"demonstration_logp_sum": Σ log p}) over the counted tokens."""
        hidden, tokens = completion_hidden(self.model, items, False, self.pad_token_id, self.precision)
        loss, logp_sum = self.token_loss(hidden, tokens, per_token_fn)
        return loss, {"demonstration_logp_sum": float(logp_sum)}

    def sum_across(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes training together (for losses normalised by global counts)."""
        return sum_across(self.procs, values)

    def total_steps(self, steps: int, examples: list) -> int:
        """Optimizer steps of the whole run, given those the data and epochs call for over `examples`."""
        return steps

    def setup(self, examples: list, *, total_steps: int, resuming: bool) -> None:
        """Work done once before training (e.g. generating offline targets). `resuming`: the run directory
        already holds checkpoints, so the starting model is no longer what `self.model` holds."""

    def build_items(self, examples: list, seeds: list[int], step: int) -> tuple[list[TrainItem], dict]:
        raise NotImplementedError

    def loss(self, items: list[TrainItem]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step that was taken."""

    def demonstration_logp(self, records: list[EncodedRecord], step: int) -> dict:
        """Σ log p(demonstration | student prompt) over this process's records, before the step's update.

        SFT gets this from its own loss; a method that never scores the demonstrations (SDFT trains
        on its own samples) pays one forward without gradients for it, so it is measured every
        `train.demonstration_logp_every` steps (0: never). The loop divides the sum by the token
        count into `demonstration_logp` in metrics.jsonl: the same quantity as SFT's, so the two
        methods' training curves can be drawn on one axis.
        """
        every = self.cfg.train.demonstration_logp_every
        if not every or step % every or not records:
            return {}
        start = time.perf_counter()
        logp_sum, tokens = 0.0, 0
        with torch.no_grad():
            for batch, counted in micro_batches(
                demonstration_items(records), self.cfg.train.micro_batch_size, self.procs
            ):
                hidden, targets = completion_hidden(self.model, batch, False, self.pad_token_id, self.precision)
                _, part = self.token_loss(hidden, targets)
                if counted:
                    logp_sum += float(part)
                    tokens += int(targets.shape[0])
        reshard_all(self.model)
        return {
            "demonstration_logp_sum": logp_sum,
            "demonstration_logp_count": float(tokens),
            "time_demonstration_logp": time.perf_counter() - start,
        }

    def checkpointed_module(self):
        """The teacher's own copy, which a sharded checkpoint holds beside the student; None without one."""
        return self.teacher.module if self.teacher is not None else None

    # Checkpointed method state (the teacher's weights), files in the checkpoint directory.
    def save_state(self, directory) -> None:
        if self.teacher is not None:
            self.teacher.save(directory)

    def load_state(self, directory) -> None:
        if self.teacher is not None:
            self.teacher.load(directory)


def compute_precision(cfg, model) -> tuple[torch.device, str]:
    """The device a method computes on and its precision ('fp32' or 'bf16'): model.precision with 'auto'
    decided for the model's device (a model still on the meta device, to be filled after sharding,
    will live on this process's device)."""
    device = next(model.parameters()).device
    if device.type == "meta":
        device = default_device()
    return device, resolve_precision(cfg.model.precision, device)
