"""The one training loop, shared by every method, as a recipe: set up, step, log, save.

    run = setup(...)                      read and check every input, build model, method, optimizer;
                                          shard them under torchrun; restore a checkpoint on --resume
    for each step: train_step(run, step)  the step's prompts -> method items -> micro-batch losses ->
                                          clip, AdamW, schedule, teacher update
                   log_step(run, record)  metrics.jsonl and the progress bar
                   save_checkpoint_now    every train.save_every steps, and on a stop signal
    save_final_model(run)                 final/, one Hugging Face directory

Per optimizer step every process takes its share of the step's prompts, the method builds the
step's items (SDFT: rollouts), and the loss is Σ per-token loss / (the step's loss tokens across
all processes), accumulated over micro-batches, so every counted token weighs the same whatever
the micro-batching or the number of processes. Under torchrun the model is sharded with FSDP2
(see `selfdistill.models.distributed`), which sums the gradients across processes: N processes compute
what one process computes on the same global batch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path

import torch

from selfdistill.config import Config
from selfdistill.data import PromptBuilder, Record, load_records
from selfdistill.errors import RunFailed, RunStopped, UserError
from selfdistill.files import write_jsonl
from selfdistill.methods import get_method
from selfdistill.methods.base import micro_batches
from selfdistill.methods.build import build_method
from selfdistill.models import apply_lora, load_model, save_model, stop_token_ids
from selfdistill.models.card import write_model_card
from selfdistill.models.distributed import (
    Processes,
    barrier,
    extremes_across,
    first_forward,
    max_across,
    reshard_all,
    setup_processes,
    shard_model,
    sum_across,
)
from selfdistill.models.loading import fetch_once_per_node, load_empty_model, portable_model_name, weights_dtype
from selfdistill.models.saving import final_dtype, record_base_model
from selfdistill.models.sharded import fill_from_files, init_lora, materialize, write_final
from selfdistill.precision import resolve_precision, set_fp32_matmuls
from selfdistill.progress import progress_bar
from selfdistill.registry import METHOD_INFO, setting_value
from selfdistill.sampling import engine_class
from selfdistill.sampling.base import rollout_seed
from selfdistill.training import statistics
from selfdistill.training.checkpoint import latest_checkpoint, load_checkpoint, replace_dir, save_checkpoint
from selfdistill.training.faults import fault
from selfdistill.training.run_directory import check_output_dir, prepare_output_dir, read_metrics, writing
from selfdistill.training.schedule import cosine_schedule
from selfdistill.training.stop_signals import StopFlag
from selfdistill.training.tracking import Tracker, open_tracker, require_backends

log = logging.getLogger(__name__)

# What a caller catches for "the run ended before its last step" (a deliberate stop or a failure).
TrainingStopped = (RunStopped, RunFailed)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_dir: Path | None
    metrics: list[dict] = field(default_factory=list)
    model: object = None
    tokenizer: object = None
    method: object = None  # the trained method, with what it holds (SDFT: `method.teacher`)
    processes: Processes | None = None  # where this process stood (rank, world, device mesh)


@dataclass
class TrainingRun:
    """Everything the loop's parts share."""

    cfg: Config
    procs: Processes
    out: Path
    model: object
    tokenizer: object
    method: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list
    examples: list
    steps: int
    start_step: int = 0
    nonfinite: dict = field(default_factory=lambda: {"in_row": 0, "total": 0})
    # Steps with loss tokens whose gradient was exactly zero: something trains nothing (see _count_zero_gradient).
    zero_grad: dict = field(default_factory=lambda: {"total": 0, "with_tokens": 0})
    history: list[dict] = field(default_factory=list)
    bar: object = None
    tracker: Tracker = field(default_factory=Tracker)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


def train(
    cfg: Config,
    *,
    records: list[Record] | None = None,
    model=None,
    tokenizer=None,
    resume: bool = False,
    overwrite: bool = False,
    save_final: bool = True,
) -> TrainResult:
    """Train `cfg.method` on the records (or `cfg.data.train`). Pass `model`/`tokenizer` to train in memory.

    Every input is read and checked (data, output directory, model, prompts) before anything is
    written, so a mistake leaves the disk as it was. Under torchrun every process calls this.
    """
    run = setup(cfg, records, model, tokenizer, resume, overwrite)
    try:
        final_dir = _run_steps(run, save_final)
    finally:
        run.tracker.close()
    barrier(run.procs)
    return TrainResult(
        output_dir=run.out,
        steps=run.steps,
        final_dir=final_dir,
        metrics=run.history,
        model=run.model,
        tokenizer=run.tokenizer,
        method=run.method,
        processes=run.procs,
    )


def _run_steps(run: TrainingRun, save_final: bool) -> Path | None:
    """Every remaining step, a checkpoint where asked (and on a stop signal), then final/."""
    cfg = run.cfg
    with StopFlag() as stop:
        for step in range(run.start_step, run.steps):
            record = train_step(run, step)
            log_step(run, record)
            done = step + 1
            _stop_if_nonfinite(run, done)
            # Processes may see a signal at different steps; they stop together (a checkpoint is collective).
            stopping = max_across(run.procs, int(stop.requested is not None)) > 0
            if stopping or (cfg.train.save_every and done % cfg.train.save_every == 0 and done < run.steps):
                save_checkpoint_now(run, done)
            if stopping:
                _close_bar(run)
                name = stop.requested or "SIGTERM"  # (sent to another process)
                raise RunStopped(
                    f"Stopped by {name} after step {done}; checkpoint written. "
                    "Run the same command with --resume to continue.",
                    signal.Signals[name],
                )
        _close_bar(run)
        if run.start_step < run.steps or latest_checkpoint(run.out) is None:
            save_checkpoint_now(run, run.steps)
        _fail_if_nothing_trained(run)
        return save_final_model(run) if save_final else None


# ---------------------------------------------------------------------------------------------
# Set-up


def setup(cfg: Config, records, model, tokenizer, resume: bool, overwrite: bool) -> TrainingRun:
    """Read and check the inputs, build model, method, optimizer and schedule; restore on --resume."""
    from transformers import set_seed

    from selfdistill.training.run_directory import check_shared_output_dir

    procs = setup_processes(cfg.distributed)
    set_fp32_matmuls(procs.device, cfg.model.tf32)
    check_shared_output_dir(cfg, procs)  # several processes: one train.output_dir seen by all, before any write
    set_seed(cfg.train.seed)  # Python, NumPy, torch and CUDA generators
    if records is None:  # read the data first: a bad file should not wait for a model load
        if not cfg.data.train:
            raise UserError(
                "No training data: set data.train (a .jsonl file, a dataset directory, hf:NAME or builtin:NAME)."
            )
        records = load_records(cfg.data.train, cfg.data.columns, cfg.data.split, origin="data.train (or --data)")
    if cfg.train.batch_size < procs.world:
        raise UserError(
            f"train.batch_size {cfg.train.batch_size} is smaller than the number of processes "
            f"({procs.world}): every process needs at least one prompt per step."
        )
    require_backends(cfg.train.report_to)  # a missing tracking package is bad input: before any write
    method_class = get_method(cfg.method)
    method_class.check_inputs(cfg)  # files read in the method's set-up, which comes after the first write
    out = check_output_dir(cfg, resume, overwrite)
    model, tokenizer, weights_dir = _build_model(cfg, procs, model, tokenizer)
    stop_ids = stop_token_ids(model, tokenizer)
    builder = PromptBuilder.from_config(tokenizer, cfg.data)  # demonstrations end with the template's end of turn
    encoded = builder.encode_all(records)
    step = METHOD_INFO[cfg.method].step
    if step is not None and step.samples_training_prompts:
        # Here, not at the rollout: a prompt too long for the engine would fail one process mid-run.
        engine_class(cfg.rollout.engine).check_prompts(cfg, model, records, encoded)
    shard, empty = None, False
    if procs.sharded:  # the teacher is copied from the student (in build_method) before sharding
        empty = weights_dir is not None  # built on the meta device: filled shard by shard below
        shard = functools.partial(shard_model, procs=procs, gather=cfg.distributed.gather, warm_up=not empty)
    method = build_method(
        cfg, model, tokenizer, builder, stop_ids, tokenizer.pad_token_id, records, procs=procs, shard=shard
    )
    model = method.model
    if empty:
        _fill_shards(cfg, procs, model, method.checkpointed_module(), weights_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    examples = method.training_examples(encoded)
    steps = method.total_steps(total_steps(cfg, len(examples)), examples)
    scheduler = cosine_schedule(optimizer, cfg.train.warmup_ratio, steps)
    run = TrainingRun(cfg, procs, out, model, tokenizer, method, optimizer, scheduler, params, examples, steps)
    _restore(run, resume and not overwrite)
    _prepare_outputs(run, resume, overwrite)
    method.setup(examples, total_steps=steps, resuming=latest_checkpoint(out) is not None)
    if builder.skipped:
        log.warning("%d records skipped for being over the prompt limits", len(builder.skipped))
    if procs.is_main:
        run.bar = progress_bar(total=steps, desc=f"{cfg.method} training")
        run.bar.update(run.start_step)
    run.tracker = open_tracker(cfg, out, procs.is_main)
    return run


def _build_model(cfg: Config, procs: Processes, model, tokenizer):
    """The student, in the dtype the run needs, with LoRA and checkpointing set up; and where its weights are.

    One process: loaded whole onto its device (weights directory None). Under torchrun, loaded by
    name: built on the meta device (no process ever holds the whole model), its shards filled from
    the returned weights directory once sharded (`_fill_shards`).
    """
    precision = resolve_precision(cfg.model.precision, procs.device)
    weights_dir = None
    if model is None:
        dtype = weights_dtype(cfg.model.load_dtype, precision, cfg.model.lora.enabled)
        source = fetch_once_per_node(cfg.model.name, procs)  # a hub id: this node's local copy
        if procs.sharded:
            model, tokenizer, weights_dir = load_empty_model(source, dtype, cfg.model.trust_remote_code)
        else:
            model, tokenizer = load_model(source, dtype, cfg.model.trust_remote_code, device=procs.device)
    if cfg.model.lora.enabled:
        lora = cfg.model.lora
        model = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        if weights_dir is None:
            init_lora(model, cfg.train.seed)  # the same adapter start in one process and in many
    if weights_dir is None:
        model.to(procs.device)
    model.train()
    model.config.use_cache = False  # training forwards need no cache; generation turns it on itself
    if cfg.train.activation_checkpointing:
        # Non-reentrant checkpointing also works with frozen embeddings (LoRA) and with FSDP2 (the
        # recomputation gathers a layer's weights again); it is active only in training mode, so
        # rollouts and the teacher's no-grad forwards are unaffected. (transformers 5 renamed
        # gradient_checkpointing_enable; 4.x has only the old name.)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"model.name {cfg.model.name}: the tokenizer has no chat template, so prompts cannot be formatted as "
            "conversations. Use an instruction-tuned model, or add a chat_template to its tokenizer_config.json."
        )
    return model, tokenizer, weights_dir


def _fill_shards(cfg: Config, procs: Processes, model, teacher, weights_dir: Path) -> None:
    """Allocate and fill the shards of a student (and teacher) built on the meta device.

    Each process reads only its own rows of every weight; the teacher's shards are read the same
    way (at the start the teacher's weights are the student's, W0 under LoRA).
    """
    for module in (model, teacher):
        if module is None:
            continue
        materialize(module, procs.device)
        fill_from_files(module, weights_dir)
    if cfg.model.lora.enabled:
        init_lora(model, cfg.train.seed)
    for module in (model, teacher):
        if module is not None:
            first_forward(module, procs)


def _restore(run: TrainingRun, resume: bool) -> None:
    """On --resume, load the newest checkpoint (read before anything is written: a damaged one changes nothing)."""
    checkpoint = latest_checkpoint(run.out) if resume else None
    if checkpoint is None:
        return
    state = load_checkpoint(checkpoint, run.model, run.method, run.optimizer, run.scheduler, run.procs)
    run.start_step = state["step"]
    run.nonfinite.update(state.get("nonfinite", {}))
    run.zero_grad.update(state.get("zero_grad", {}))
    log.info("resumed from %s (step %d of %d)", checkpoint, run.start_step, run.steps)


def _prepare_outputs(run: TrainingRun, resume: bool, overwrite: bool) -> None:
    """Record the run in its directory; metrics logged after the checkpoint we continue from are dropped."""
    if run.procs.is_main:
        prepare_output_dir(run.cfg, resume, overwrite)
        if run.metrics_path.exists():
            with writing(run.out, "metrics.jsonl"):
                write_jsonl(
                    run.metrics_path, [r for r in read_metrics(run.metrics_path) if r["step"] <= run.start_step]
                )
    barrier(run.procs)


def total_steps(cfg: Config, num_records: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * num_records / cfg.train.batch_size))


# ---------------------------------------------------------------------------------------------
# One optimizer step


def train_step(run: TrainingRun, step: int) -> dict:
    """One optimizer step (0-based `step`); returns its metrics record."""
    cfg, procs = run.cfg, run.procs
    started = time.perf_counter()
    done = step + 1
    positions = list(range(step * cfg.train.batch_size, done * cfg.train.batch_size))[procs.rank :: procs.world]
    mine = run.method.step_examples(run.examples, positions, step)
    seeds = [rollout_seed(cfg.train.seed, p, r) for p in positions for r in range(cfg.rollout.num_rollouts)]
    items, build_stats = run.method.build_items(mine, seeds, step)
    stats: dict[str, float] = {}
    statistics.combine(stats, build_stats)  # (a statistic named without its reduction fails here)
    fault("rollout", done)
    (global_tokens,) = sum_across(procs, [float(sum(i.loss_tokens for i in items))])
    loss_sum, loss_stats, backward_time = _accumulate_gradients(run, items, global_tokens, done)
    grad_norm = _clip_gradients(run)
    statistics.combine(stats, loss_stats)
    # Seconds are each process's own and are not added up: the slowest process's are logged.
    timings = {f"{k}_max": stats.pop(k) for k in list(stats) if k.startswith("time_")}
    keys = sorted(k for k in stats if not k.endswith(("_min", "_max")))
    totals = sum_across(procs, [loss_sum] + [float(stats[k]) for k in keys])
    loss_total, summed = totals[0], dict(zip(keys, totals[1:]))
    summed.update(extremes_across(procs, stats))
    summed.update({k.removesuffix("_max"): v for k, v in extremes_across(procs, timings).items()})
    finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
    lr = run.optimizer.param_groups[0]["lr"]  # this step's rate: after the update the scheduler holds the next
    update_time = _apply_update(run, finite, done)
    record = _step_metrics(
        done,
        loss_total,
        global_tokens,
        summed,
        lr,
        grad_norm,
        time.perf_counter() - started,
        backward_time,
        update_time,
        finite,
    )
    record["nonfinite_steps"] = run.nonfinite["total"]
    _count_zero_gradient(run, done, global_tokens, grad_norm, finite)
    record["zero_grad_steps"] = run.zero_grad["total"]
    return record


def _accumulate_gradients(run: TrainingRun, items: list, global_tokens: float, done: int):
    """Forward and backward over the micro-batches; returns (Σ loss, Σ stats, backward seconds).

    Every process runs as many micro-batches (`micro_batches`): a repeated one has weight 0 (no gradient).
    """
    loss_sum, loss_stats, backward_time = 0.0, {}, 0.0
    for batch, counted in micro_batches(items, run.cfg.train.micro_batch_size, run.procs):
        loss, stats = run.method.loss(batch)
        if loss.requires_grad and global_tokens > 0:
            t0 = time.perf_counter()
            (loss * ((1.0 if counted else 0.0) / global_tokens)).backward()
            backward_time += time.perf_counter() - t0
            fault("backward", done)
        if counted:
            loss_sum = loss_sum + loss.detach().double()  # stays on the device; read once per step
            statistics.combine(loss_stats, stats)
    # The root unit stays gathered after a forward until its backward; a step without loss tokens
    # (no backward anywhere) must free it too, or the teacher update would meet whole weights.
    reshard_all(run.model)
    return float(loss_sum), loss_stats, backward_time


def _clip_gradients(run: TrainingRun) -> float:
    """Clip to train.max_grad_norm (the norm over all processes' shards); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.train.max_grad_norm or float("inf"))
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def _apply_update(run: TrainingRun, finite: bool, done: int) -> float:
    """AdamW step and teacher update when the step is finite; returns the teacher update's seconds."""
    update_time = 0.0
    if finite:
        run.optimizer.step()
        fault("optimizer_step", done)
        t0 = time.perf_counter()
        run.method.after_step()
        update_time = time.perf_counter() - t0
        run.nonfinite["in_row"] = 0
    else:  # the weights, the optimizer's moments and the teacher stay as they were
        run.nonfinite["in_row"] += 1
        run.nonfinite["total"] += 1
        log.warning(
            "step %d: non-finite loss or gradient; step skipped, teacher not updated (%d in a row, %d in this run)",
            done,
            run.nonfinite["in_row"],
            run.nonfinite["total"],
        )
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return update_time


def _count_zero_gradient(run: TrainingRun, done: int, tokens: float, grad_norm: float, finite: bool) -> None:
    """Counts steps that had loss tokens but a gradient norm of exactly 0, and warns at the first.

    A real loss over real tokens never has an exactly zero gradient; one that does means the
    trainable weights are cut off from the loss (for example a student computed with its adapter
    switched off), and the run would otherwise end looking normal with nothing learned.
    """
    if not tokens or not finite:
        return
    run.zero_grad["with_tokens"] += 1
    if grad_norm != 0.0:
        return
    run.zero_grad["total"] += 1
    if run.zero_grad["total"] == 1:
        log.warning(
            "step %d: %d loss tokens but a gradient of exactly 0; the trainable weights do not reach the loss (%s)",
            done,
            int(tokens),
            _training_settings(run),
        )


def _training_settings(run: TrainingRun) -> str:
    """The settings that decide which weights the loss reaches, for messages."""
    cfg = run.cfg
    parts = [f"method={cfg.method}", f"model.lora.enabled={cfg.model.lora.enabled}"]
    teacher = run.method.teacher
    if teacher is not None:
        parts += [f"teacher.kind={teacher.kind}", f"loss.kind={cfg.loss.kind}"]
    info = METHOD_INFO[cfg.method]
    for key in (*info.settings, *info.own_sections):  # the method's own settings, as its entry names them
        value = setting_value(cfg, key)
        parts += [f"{key}.{k}={v}" for k, v in vars(value).items()] if is_dataclass(value) else [f"{key}={value}"]
    return ", ".join(parts)


def _fail_if_nothing_trained(run: TrainingRun) -> None:
    """Status 1 for a run in which every step with loss tokens had a zero gradient."""
    counts = run.zero_grad
    if counts["with_tokens"] and counts["total"] == counts["with_tokens"]:
        raise RunFailed(
            f"Nothing was trained: all {counts['total']} steps with loss tokens had a gradient of exactly 0, so the "
            f"weights never moved. These settings train nothing: {_training_settings(run)}. "
            "Please report this combination; change one of them to train."
        )


def _stop_if_nonfinite(run: TrainingRun, done: int) -> None:
    limit = run.cfg.train.max_nonfinite_steps
    if run.nonfinite["in_row"] <= limit:
        return
    last = latest_checkpoint(run.out)
    _close_bar(run)
    raise RunFailed(
        f"Training stopped at step {done}: {run.nonfinite['in_row']} steps in a row had a non-finite loss or "
        f"gradient (limit train.max_nonfinite_steps={limit}). "
        + (f"The last good checkpoint, {last}, is intact; " if last else "No checkpoint was written; ")
        + "lower train.lr, or use model.precision=fp32, then resume or start again."
    )


def _step_metrics(step, loss_total, tokens, summed, lr, grad_norm, elapsed, backward_time, update_time, finite):
    record = {
        "step": step,
        "loss": loss_total / max(tokens, 1.0),
        "loss_tokens": int(tokens),
        "lr": lr,
        "grad_norm": float(grad_norm),
        "finite": finite,
        "time_step": elapsed,
        "time_teacher_update": update_time,
        "time_student_backward": backward_time,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }
    record.update(statistics.logged(summed, tokens))  # each statistic reduced as its name says
    return record


# ---------------------------------------------------------------------------------------------
# Logging


def log_step(run: TrainingRun, record: dict) -> None:
    """The one per-step logging point: metrics.jsonl (appended, main process) and the progress bar."""
    run.history.append(record)
    if not run.procs.is_main:
        return
    line = json.dumps(record) + "\n"
    with writing(run.out, "metrics.jsonl"), run.metrics_path.open("a", encoding="utf-8") as f:
        half = len(line) // 2
        f.write(line[:half])
        fault("metrics", record["step"], on_hit=f.flush)
        f.write(line[half:])
    run.tracker.log(record, record["step"])
    if run.bar:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{record['loss']:.4f}")


def _close_bar(run: TrainingRun) -> None:
    if run.bar:
        run.bar.close()
        run.bar = None


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint_now(run: TrainingRun, done: int) -> None:
    """A checkpoint of step `done` (every process takes part under torchrun)."""
    extra = {
        "total_steps": run.steps,
        "method": run.cfg.method,
        "nonfinite": dict(run.nonfinite),
        "zero_grad": dict(run.zero_grad),
    }
    with writing(run.out, f"the checkpoint of step {done}"):
        save_checkpoint(
            run.out,
            done,
            run.model,
            run.tokenizer,
            run.method,
            run.optimizer,
            run.scheduler,
            extra,
            run.cfg.train.keep_last,
            run.procs,
        )


def save_final_model(run: TrainingRun) -> Path | None:
    """final/: one Hugging Face directory (merged weights for LoRA), written aside and renamed into place.

    Under torchrun every process takes part in gathering one parameter at a time; only the main
    process writes, and no process ever holds the whole model.
    """
    import shutil

    final_dir, tmp = run.out / "final", run.out / ".final.tmp"
    dtype = final_dtype(run.cfg.model.save_dtype, run.method.precision, run.model)
    if run.procs.sharded:
        if run.procs.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(run.procs)
        if not run.procs.is_main:
            write_final(run.model, run.tokenizer, tmp, is_main=False, dtype=dtype)
            return None
    with writing(run.out, "the final model"):
        try:
            if run.procs.sharded:
                write_final(run.model, run.tokenizer, tmp, is_main=True, dtype=dtype)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                save_model(run.model, run.tokenizer, tmp, dtype=dtype)
            record_base_model(tmp, portable_model_name(run.cfg.model.name))
            # metrics.jsonl, not run.history: after a resume the history holds only the steps since.
            write_model_card(
                tmp, run.cfg, read_metrics(run.metrics_path), records=len(run.examples), precision=run.method.precision
            )
            fault("final", run.steps)
            replace_dir(tmp, final_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final_dir
