"""The one training loop, shared by every method.

Per optimizer step: take the step's prompts (this process's share), let the method build the
step's items (SDFT: rollouts), count the step's loss tokens across all processes, accumulate
Σ per-token loss / total tokens over micro-batches (so every counted token of the step weighs
the same, whatever the micro-batching or the number of processes), sum gradients across
processes, clip, step AdamW and the cosine schedule, then let the method update its teacher.

Gradients are summed across processes explicitly (one flat all-reduce) instead of through a
DDP wrapper: the methods run the model's backbone and output head separately, and the
global-token normalisation above already gives each process's loss its share, so a plain sum
makes N processes compute exactly what one process computes on the same global batch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from selfdistill.checkpoint import inside, latest_checkpoint, load_checkpoint, replace_dir, save_checkpoint
from selfdistill.config import Config
from selfdistill.data import PromptBuilder, Record, load_records
from selfdistill.errors import UserError
from selfdistill.faults import fault
from selfdistill.methods import get_method
from selfdistill.models import apply_lora, load_model, save_model, stop_token_id
from selfdistill.progress import progress_bar
from selfdistill.rollout import rollout_seed

log = logging.getLogger(__name__)


class TrainingStopped(UserError):
    """The run stopped on purpose (signal) or because it could not go on (non-finite steps)."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_dir: Path | None
    metrics: list[dict] = field(default_factory=list)
    model: object = None
    tokenizer: object = None


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_records: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_records, generator=generator).tolist()


def data_order(num_records: int, seed: int, position: int) -> int:
    """Record index at stream position `position`: epochs are successive seeded permutations."""
    epoch, offset = divmod(position, num_records)
    return _epoch_permutation(num_records, seed, epoch)[offset]


def total_steps(cfg: Config, num_records: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * num_records / cfg.train.batch_size))


def _fingerprint(cfg: Config) -> dict:
    """What identifies a run: an output directory holding a different run is not reused silently."""
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("output_dir", "save_every", "keep_last")}
    return data


def check_output_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Refuse an output directory that would be misused; reads only, so a refusal changes nothing."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir {out} is a file, not a directory. Choose another train.output_dir.")
    run_file = out / "run.json"
    if run_file.is_file() and not overwrite:
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(
                f"{run_file} is damaged ({exc}), so this directory's run cannot be identified. "
                "Choose another train.output_dir, or pass --overwrite to start a new run there."
            ) from None
        if not isinstance(previous, dict) or previous.get("config") != _fingerprint(cfg):
            raise UserError(
                f"{out} already holds a different run (its run.json has other settings). "
                "Choose another train.output_dir, or pass --overwrite to replace it."
            )
        if not resume and latest_checkpoint(out) is not None:
            raise UserError(f"{out} already holds checkpoints of this run. Pass --resume to continue it, or --overwrite to start again.")
    return out


def prepare_output_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Check the output directory, then (with --overwrite) clear the previous run and record this one."""
    out = check_output_dir(cfg, resume, overwrite)
    with _writing(out, "the run directory"):
        if overwrite and out.exists():
            import shutil

            # Everything a run writes (offline_targets.jsonl: offline distillation's fixed teacher answers).
            for child in ("checkpoints", "final", "metrics.jsonl", "run.json", "offline_targets.jsonl"):
                target = inside(out, child)
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "run.json", json.dumps({"config": _fingerprint(cfg), "full_config": cfg.to_dict()}, indent=2))
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _writing:
    """Turn a failed write (full disk, no permission) into one clear message; what was written stays."""

    def __init__(self, out: Path, what: str):
        self.out, self.what = Path(out), what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or not issubclass(kind, OSError):
            return False
        last = latest_checkpoint(self.out) if self.out.is_dir() else None
        kept = f"The last complete checkpoint, {last}, is intact" if last else "No checkpoint of this run was written yet"
        raise TrainingStopped(
            f"Could not write {self.what} in {self.out}: {exc.strerror or exc}"
            f"{' (' + exc.filename + ')' if getattr(exc, 'filename', None) else ''}. {kept}; "
            "free disk space or fix the permissions, then run the same command with --resume."
        ) from None


def _read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; a line cut short by a crash mid-append is dropped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _sum_across(accelerator: Accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def _sum_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="sum")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop at the end of the current step.

    A second signal stops at once: the step in flight is dropped, and so is a checkpoint being
    written (it is still in its temporary directory), so the newest complete checkpoint stays.
    """

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.requested is not None:
                raise TrainingStopped(f"Stopped at once by a second signal ({name}); the newest complete checkpoint "
                                      "is kept. Run the same command with --resume to continue from it.")
            self.requested = name

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)


def train(cfg: Config, *, records: list[Record] | None = None, model=None, tokenizer=None, resume: bool = False,
          overwrite: bool = False, save_final: bool = True) -> TrainResult:
    """Train `cfg.method` on the records (or `cfg.data.train`). Pass `model`/`tokenizer` to train in memory.

    Every input is read and checked (data, output directory, model, prompts) before anything is
    written, so a mistake leaves the disk as it was.
    """
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed)
    if records is None:  # read the data first: a bad file should not wait for a model load
        if not cfg.data.train:
            raise UserError("No training data: set data.train (a .jsonl file, a dataset directory, hf:NAME or builtin:NAME).")
        records = load_records(cfg.data.train, cfg.data.columns, cfg.data.split)
    out = check_output_dir(cfg, resume, overwrite)
    if model is None:
        model, tokenizer = load_model(cfg.model.name, torch.float32, cfg.model.trust_remote_code)
    if cfg.model.lora.enabled:
        lora = cfg.model.lora
        model = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    model.to(accelerator.device)
    model.train()
    model.config.use_cache = False  # training forwards need no cache; generation turns it on itself
    if cfg.train.activation_checkpointing:
        # Non-reentrant checkpointing also works with frozen embeddings (LoRA) without extra hooks; it is
        # active only in training mode, so rollouts and the teacher's no-grad forwards are unaffected.
        # (transformers 5 renamed gradient_checkpointing_enable; 4.x has only the old name.)
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
    stop_id = stop_token_id(model, tokenizer)
    builder = PromptBuilder(
        tokenizer, cfg.data.teacher_template, cfg.data.system_prompt, cfg.data.max_prompt_tokens,
        cfg.data.max_teacher_prompt_tokens, cfg.data.overlong, stop_id,
    )
    encoded = builder.encode_all(records)
    method = get_method(cfg.method)(cfg, model, tokenizer, builder, stop_id, tokenizer.pad_token_id, records)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    examples = method.training_examples(encoded)
    steps = method.total_steps(total_steps(cfg, len(examples)))
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.train.warmup_ratio * steps), steps)

    start_step = 0
    nonfinite = {"in_row": 0, "total": 0}
    checkpoint = latest_checkpoint(out) if resume and not overwrite else None
    if checkpoint is not None:  # read before anything is written: a damaged checkpoint changes nothing
        state = load_checkpoint(checkpoint, model, method, optimizer, scheduler)
        start_step = state["step"]
        nonfinite.update(state.get("nonfinite", {}))
        log.info("resumed from %s (step %d of %d)", checkpoint, start_step, steps)
    out = prepare_output_dir(cfg, resume, overwrite) if accelerator.is_main_process else out
    accelerator.wait_for_everyone()
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process and metrics_path.exists():
        # Lines logged after the checkpoint we continue from (all lines, for a fresh start) are redone.
        with _writing(out, "metrics.jsonl"):
            kept = [r for r in _read_metrics(metrics_path) if r["step"] <= start_step]
            _write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    method.setup(examples)
    if builder.skipped:
        log.warning("%d records skipped for being over the prompt limits", len(builder.skipped))

    rank, world = accelerator.process_index, accelerator.num_processes
    batch, micro = cfg.train.batch_size, cfg.train.micro_batch_size
    history: list[dict] = []
    bar = progress_bar(total=steps, desc=f"{cfg.method} training") if accelerator.is_main_process else None
    if bar:
        bar.update(start_step)
    save = functools.partial(_save, accelerator, out, steps=steps, model=model, tokenizer=tokenizer, method=method,
                             optimizer=optimizer, scheduler=scheduler, cfg=cfg, nonfinite=nonfinite)
    with _StopFlag() as stop:
        for step in range(start_step, steps):
            step_start = time.perf_counter()
            done = step + 1
            positions = list(range(step * batch, (step + 1) * batch))[rank::world]
            mine = [examples[data_order(len(examples), cfg.train.seed, p)] for p in positions]
            seeds = [rollout_seed(cfg.train.seed, p, r) for p in positions for r in range(cfg.rollout.num_rollouts)]
            items, build_stats = method.build_items(mine, seeds, step)
            fault("rollout", done)
            local_tokens = sum(i.loss_tokens for i in items)
            (global_tokens,) = _sum_across(accelerator, [float(local_tokens)])

            loss_sum, loss_stats, backward_time = 0.0, {}, 0.0
            for start in range(0, len(items), micro):
                loss, stats = method.loss(items[start:start + micro])
                if loss.requires_grad and global_tokens > 0:
                    t0 = time.perf_counter()
                    (loss / global_tokens).backward()
                    backward_time += time.perf_counter() - t0
                    fault("backward", done)
                loss_sum = loss_sum + loss.detach().double()  # stays on the device; read once per step, below
                for k, v in stats.items():
                    loss_stats[k] = loss_stats.get(k, 0.0) + v
            _sum_gradients(accelerator, params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
            keys = sorted(set(loss_stats) | set(build_stats))
            totals = _sum_across(accelerator, [float(loss_sum)] + [float(loss_stats.get(k, build_stats.get(k, 0.0))) for k in keys])
            loss_total, summed = totals[0], dict(zip(keys, totals[1:]))

            finite = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
            update_time = 0.0
            if finite:
                optimizer.step()
                fault("optimizer_step", done)
                t0 = time.perf_counter()
                method.after_step()
                update_time = time.perf_counter() - t0
                nonfinite["in_row"] = 0
            else:  # the weights, the optimizer's moments and the teacher stay as they were
                nonfinite["in_row"] += 1
                nonfinite["total"] += 1
                log.warning("step %d: non-finite loss or gradient; step skipped, teacher not updated "
                            "(%d in a row, %d in this run)", done, nonfinite["in_row"], nonfinite["total"])
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            elapsed = time.perf_counter() - step_start
            record = _step_metrics(done, loss_total, global_tokens, summed, scheduler, grad_norm, elapsed,
                                   backward_time, update_time, finite)
            record["nonfinite_steps"] = nonfinite["total"]
            history.append(record)
            if accelerator.is_main_process:
                line = json.dumps(record) + "\n"
                with _writing(out, "metrics.jsonl"), metrics_path.open("a", encoding="utf-8") as f:
                    half = len(line) // 2
                    f.write(line[:half])
                    fault("metrics", done, on_hit=f.flush)
                    f.write(line[half:])
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
            if nonfinite["in_row"] > cfg.train.max_nonfinite_steps:
                last = latest_checkpoint(out)
                raise TrainingStopped(
                    f"Training stopped at step {done}: {nonfinite['in_row']} steps in a row had a non-finite loss or "
                    f"gradient (limit train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). "
                    + (f"The last good checkpoint, {last}, is intact; " if last else "No checkpoint was written; ")
                    + "lower train.lr, or use model.precision=fp32, then resume or start again."
                )
            periodic = cfg.train.save_every and done % cfg.train.save_every == 0 and done < steps
            if periodic or stop.requested:
                save(done)
            if stop.requested:
                if bar:
                    bar.close()
                raise TrainingStopped(f"Stopped by {stop.requested} after step {done}; checkpoint written. "
                                      "Run the same command with --resume to continue.")
        if bar:
            bar.close()
        final_dir = None
        if start_step < steps or latest_checkpoint(out) is None:
            save(steps)
        if save_final and accelerator.is_main_process:
            final_dir = out / "final"
            tmp = out / ".final.tmp"
            import shutil

            with _writing(out, "the final model"):
                try:
                    shutil.rmtree(tmp, ignore_errors=True)
                    save_model(model, tokenizer, tmp)
                    fault("final", steps)
                    replace_dir(tmp, final_dir)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=out, steps=steps, final_dir=final_dir, metrics=history, model=model, tokenizer=tokenizer)


def _save(accelerator, out, done, *, steps, model, tokenizer, method, optimizer, scheduler, cfg, nonfinite):
    if accelerator.is_main_process:
        with _writing(out, f"the checkpoint of step {done}"):
            save_checkpoint(out, done, model, tokenizer, method, optimizer, scheduler,
                            {"total_steps": steps, "method": cfg.method, "nonfinite": dict(nonfinite)},
                            cfg.train.keep_last)
    accelerator.wait_for_everyone()


def _step_metrics(step, loss_total, tokens, summed, scheduler, grad_norm, elapsed, backward_time, update_time, finite):
    per_token = max(tokens, 1.0)
    sequences = max(summed.pop("sequences", 0.0), 1.0)
    record = {
        "step": step,
        "loss": loss_total / per_token,
        "loss_tokens": int(tokens),
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "finite": finite,
        "time_step": elapsed,
        "time_teacher_update": update_time,
        "time_student_backward": backward_time,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }
    for name in ("divergence", "teacher_minus_student_logp", "teacher_entropy", "demonstration_logp"):
        if name in summed:
            record[name] = summed.pop(name) / per_token
    if "completion_tokens" in summed:
        record["completion_length"] = summed.pop("completion_tokens") / sequences
        record["clipped_ratio"] = summed.pop("clipped", 0.0) / sequences
    for name, value in summed.items():  # timings: summed over processes, reported per process
        record[name] = value
    return record
