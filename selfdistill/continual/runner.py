"""The continual-learning loop: for every method and seed, train the stream's tasks one after another.

Everything a finished step wrote stays in the run directory (laid out as `selfdistill.continual.layout`
describes); a rerun skips it. Every file is written to a temporary name and renamed, so a kill leaves
either the old state or the new one. Greedy evaluation is deterministic, so the starting model is
evaluated once and its scores are row 0 of every method's and seed's matrix.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from selfdistill.continual import layout
from selfdistill.continual.config import ContinualConfig, MethodSpec
from selfdistill.continual.evaluation import LENIENT_GRADERS, StageEvaluation, StreamTask
from selfdistill.data.records import load_records
from selfdistill.errors import RunStopped, UserError
from selfdistill.files import read_json, write_json, write_jsonl
from selfdistill.training.stop_signals import StopSignalsForwarded

log = logging.getLogger(__name__)


def _template(cfg: ContinualConfig, stage) -> str:
    """The stage's teacher template without any method's override: the stage's, the task's, the base's."""
    if stage.teacher_template:
        return stage.teacher_template
    if stage.task:
        from selfdistill.tasks import get_task

        return get_task(stage.task).teacher_template
    from selfdistill.config import load_config

    return load_config(overrides=copy.deepcopy(cfg.base)).data.teacher_template


def build_tasks(cfg: ContinualConfig) -> list[StreamTask]:
    from selfdistill.tasks import Metric, get_task, make_task

    tasks = []
    for i, stage in enumerate(cfg.stream):
        budget = stage.max_new_tokens or cfg.eval.max_new_tokens
        template = _template(cfg, stage)
        if stage.task:
            spec = get_task(stage.task)
            data = make_task(stage.task, cfg.data_seed, stage.size)
            evals = data.eval[: stage.eval_size] if stage.eval_size else data.eval
            lenient = spec.metrics[1] if len(spec.metrics) > 1 else None
            tasks.append(
                StreamTask(
                    stage.name, spec.metrics[0].grader, data.train, evals, budget, data.documents, lenient, template
                )
            )
        else:
            where = f"stream[{i}].{{}} of the stream config (task {stage.name!r})"
            train = load_records(stage.train, origin=where.format("train"))
            evals = load_records(stage.eval, require_demonstration=False, origin=where.format("eval"))
            if stage.size:
                train = train[: stage.size]
            if stage.eval_size:
                evals = evals[: stage.eval_size]
            partial = LENIENT_GRADERS.get(stage.grader)
            lenient = Metric("partial", partial) if partial else None
            if stage.lenient:
                lenient = Metric("lenient", stage.lenient["grader"], stage.lenient.get("answer_field", "answer"))
            tasks.append(
                StreamTask(stage.name, stage.grader, train, evals, budget, lenient=lenient, teacher_template=template)
            )
    return tasks


def _fingerprint(cfg: ContinualConfig) -> dict:
    """What every stored result depends on: changing it makes the old results meaningless."""
    data = cfg.to_dict()
    return {k: data[k] for k in ("stream", "base", "data_seed", "eval")}


def check_inputs(cfg: ContinualConfig) -> None:
    """Read now what the run reads later (the starting model's tokenizer, each method's own files), so
    a mistake is refused before the run directory is written. (The stream's records are read by
    build_tasks, the config's fields and every method's stage configs checked when it was parsed.)"""
    from selfdistill.methods import get_method
    from selfdistill.models import load_tokenizer

    for method in cfg.methods:
        for stage in cfg.stream:
            stage_cfg = cfg.stage_config(method, stage, cfg.seeds[0], Path(cfg.output_dir))
            try:
                get_method(stage_cfg.method).check_inputs(stage_cfg)
            except UserError as exc:
                raise UserError(f"method {method.name!r}, stage {stage.name!r}: {exc}") from None
    start = cfg.stage_config(cfg.methods[0], cfg.stream[0], cfg.seeds[0], Path(cfg.output_dir)).model
    load_tokenizer(start.name, start.trust_remote_code)  # a wrong model.name fails here, not after config.json


def prepare_run_dir(cfg: ContinualConfig, overwrite: bool) -> Path:
    """Check the run directory against this config (reading only), then clear it (--overwrite) and record
    the config and the methods. Every refusal comes before the first change to the directory."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a directory. Choose another output_dir (-o).")
    saved = layout.config_file(out)
    previous = _read_saved(saved) if saved.is_file() and not overwrite else None
    if previous is not None and _fingerprint_of(previous) != _fingerprint(cfg):
        raise UserError(
            f"{out} holds a run with another stream, base config or evaluation settings. "
            "Choose another output_dir, or pass --overwrite to start again."
        )
    entries = {m.name: {"name": m.name, "method": m.method, "overrides": m.overrides} for m in cfg.methods}
    if not overwrite:
        for name, entry in entries.items():
            path = layout.method_file(out, name)
            if path.is_file() and _read_saved(path) != entry:
                raise UserError(
                    f"{out}: method {name!r} was run before with other settings; give the changed "
                    "entry a new name, or pass --overwrite to start again."
                )
    if overwrite and out.exists():
        for child in layout.OVERWRITTEN:
            target = out / child
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    data = cfg.to_dict()
    if previous is not None:  # keep the methods of earlier invocations, so the report shows them all
        data["methods"] = [m for m in previous.get("methods", []) if m["name"] not in entries] + data["methods"]
        data["seeds"] = sorted(set(previous.get("seeds", [])) | set(cfg.seeds))
    write_json(saved, data)
    for name, entry in entries.items():
        write_json(layout.method_file(out, name), entry)
    return out


def _read_saved(path: Path):
    """A JSON file an earlier invocation wrote; a damaged one is the user's to resolve, not a traceback."""
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{path} is damaged ({exc}), so the run it belongs to cannot be identified. "
            "Choose another output_dir, or pass --overwrite to start again."
        ) from None


def _fingerprint_of(saved: dict) -> dict:
    return {k: saved.get(k) for k in ("stream", "base", "data_seed", "eval")}


class Runner:
    """Runs (or continues) every method x seed sequence of a stream config."""

    def __init__(
        self,
        cfg: ContinualConfig,
        *,
        overwrite: bool = False,
        echo: Callable[[str], None] = print,
        train_fn: Callable | None = None,
        prepared: bool = False,
    ):
        self.cfg = cfg
        self.echo = echo
        # Every input is read before the run directory is written: a mistake must not leave a config.json
        # behind that the corrected rerun is then refused as "another stream".
        self.tasks = build_tasks(cfg)
        if prepared:  # a worker process of a parallel run, whose parent checked and prepared everything
            self.out = Path(cfg.output_dir)
        else:
            check_inputs(cfg)
            self.out = prepare_run_dir(cfg, overwrite)
        self._start_model = None
        # The evaluation `sdft continual` shares with every other user of stage directories.
        self.evaluation = StageEvaluation(
            self.tasks,
            cfg.eval,
            layout.drift_answers_file(self.out),
            self.start_model,
            base_name=self.model_name(),
            system_prompt=(cfg.base.get("data") or {}).get("system_prompt"),
            echo=echo,
        )
        from selfdistill.training.loop import train

        self.train_fn = train_fn or train  # a test can count calls or interrupt here

    # --- models -------------------------------------------------------------------------------

    def model_name(self) -> str:
        return self.cfg.stage_config(self.cfg.methods[0], self.cfg.stream[0], 0, self.out).model.name

    def start_model(self):
        """(model, tokenizer) of the starting model, loaded once; callers get a copy to train."""
        if self._start_model is None:
            import torch

            from selfdistill.models import load_model

            base = self.cfg.stage_config(self.cfg.methods[0], self.cfg.stream[0], 0, self.out)
            self.echo(f"loading {base.model.name}")
            self._start_model = load_model(base.model.name, torch.float32, base.model.trust_remote_code)
        model, tokenizer = self._start_model
        return copy.deepcopy(model), tokenizer

    def load_stage_model(self, directory: Path):
        import torch

        from selfdistill.models import load_model

        return load_model(str(directory), torch.float32)

    # --- the loop -----------------------------------------------------------------------------

    def evaluate_start(self) -> None:
        """Stage 0: the starting model on every task, the probes and the drift reference answers."""
        start = layout.start_dir(self.out)
        if not layout.done_file(start).is_file():
            self.echo("stage 0: evaluating the starting model")
            if self.cfg.eval.drift.enabled:  # the reference answers first, outside the evaluation's time
                self.evaluation.drift_answers()
            model, tokenizer = self.start_model()
            seconds = self.evaluation.evaluate(model, tokenizer, start, "start")
            write_json(layout.done_file(start), {"stage": 0, "eval_time_s": seconds, "finished": time.time()})

    def run(self) -> None:
        self.evaluate_start()
        sequences = [(method, seed) for method in self.cfg.methods for seed in self.cfg.seeds]
        workers = min(self.cfg.workers, len(sequences))
        if workers <= 1:
            for method, seed in sequences:
                self.run_sequence(method, seed)
            return
        # Method x seed sequences are independent: run them in separate processes, each with its
        # share of the cores. On a small CPU two one-thread processes do more work than one
        # two-thread process (generation's small matrix products scale poorly across threads).
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        self.echo(f"running {len(sequences)} method x seed sequences in {workers} processes of {threads} thread(s)")
        context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
        # Workers get a process group of their own, so a terminal's Ctrl-C reaches this process only, and
        # this process passes every stop signal on exactly once: a worker in training checkpoints and stops
        # (a second signal stops it at once), none is left running after this process has gone.
        with (
            StopSignalsForwarded() as stop,
            ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=os.setpgrp) as pool,
        ):
            futures = [
                pool.submit(_run_sequence_process, self.cfg, method.name, seed, threads) for method, seed in sequences
            ]
            try:
                for future in as_completed(futures):
                    future.result()  # re-raises a sequence's error here; the others' finished stages stay on disk
            except BrokenProcessPool:
                if stop.signum is None:
                    raise
                # A worker outside its training loop (evaluating) ends on the signal itself.
                raise RunStopped(
                    f"Stopped by {signal.Signals(stop.signum).name}; finished stages and checkpoints are kept",
                    stop.signum,
                ) from None

    def run_sequence(self, method: MethodSpec, seed: int) -> None:
        n = len(self.tasks)
        done = [
            k for k in range(1, n + 1) if layout.done_file(layout.stage_dir(self.out, method.name, seed, k)).is_file()
        ]
        first = max(done, default=0) + 1  # stages finish in order, so the newest done one is where to go on
        if first > n:
            self.echo(f"[{method.name} seed {seed}] all {n} stages already done")
            return
        model = tokenizer = None
        for k in range(first, n + 1):
            task, where = self.tasks[k - 1], layout.stage_dir(self.out, method.name, seed, k)
            label = f"[{method.name} seed {seed}] stage {k}/{n} {task.name}"
            trained = layout.trained_file(where)
            if not trained.is_file() and model is None:  # the model this stage starts from: the previous stage's
                previous = layout.stage_dir(self.out, method.name, seed, k - 1)
                model, tokenizer = self.start_model() if k == 1 else self.load_stage_model(layout.final_model(previous))
            if trained.is_file():
                model, tokenizer = self.load_stage_model(layout.final_model(where))
                train_time = read_json(trained)["train_time_s"]
            else:
                self.echo(f"{label}: training ({method.method})")
                cfg = self.cfg.stage_config(method, self.cfg.stream[k - 1], seed, layout.train_dir(where))
                if task.documents and not cfg.data.documents:  # cpt reads raw documents of knowledge tasks
                    docs = write_jsonl(layout.documents_file(where), [{"text": d} for d in task.documents])
                    cfg.data.documents = str(docs)
                t0 = time.perf_counter()
                # A fresh method per stage: the SDFT teacher starts from the model this stage starts with.
                result = self.train_fn(
                    cfg, records=task.train, model=model, tokenizer=tokenizer, resume=True, save_final=True
                )
                model, tokenizer = _merged(result.model), result.tokenizer
                train_time = time.perf_counter() - t0
                write_json(trained, {"stage": k, "task": task.name, "steps": result.steps, "train_time_s": train_time})
            eval_time = self.evaluation.evaluate(model, tokenizer, where, label)
            write_json(
                layout.done_file(where),
                {
                    "stage": k,
                    "task": task.name,
                    "train_time_s": train_time,
                    "eval_time_s": eval_time,
                    "finished": time.time(),
                },
            )
            # Checkpoints (optimizer, teacher) only serve resuming inside a stage; the model is in final/.
            shutil.rmtree(layout.checkpoints_dir(where), ignore_errors=True)
            if not self.cfg.keep_stage_models and k > 1:
                previous = layout.stage_dir(self.out, method.name, seed, k - 1)
                shutil.rmtree(layout.final_model(previous), ignore_errors=True)


def _merged(model):
    """The trained model as the next stage (and a resumed run, which loads final/) sees it: a LoRA
    adapter merged into the weights, so the next stage trains a fresh adapter on plain weights
    instead of wrapping the adapter-carrying model a second time."""
    from selfdistill.models import is_lora

    return model.merge_and_unload() if is_lora(model) else model


def _run_sequence_process(cfg: ContinualConfig, method_name: str, seed: int, threads: int) -> None:
    """One method x seed sequence in a worker process of a parallel run (ContinualConfig.workers > 1)."""
    import torch

    from selfdistill.progress import ENV, LABEL_ENV, quiet_third_party_bars

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Live bars of several processes on one terminal garble each other: each worker reports in whole
    # lines, labelled with its sequence (SELFDISTILL_PROGRESS=0 still silences them).
    if os.environ.get(ENV) != "0":
        os.environ[ENV] = "lines"
    os.environ[LABEL_ENV] = f"[{method_name} seed {seed}]"
    quiet_third_party_bars()
    runner = Runner(cfg, prepared=True, echo=lambda line: print(line, flush=True))
    runner.run_sequence(next(m for m in cfg.methods if m.name == method_name), seed)
