"""The benchmark runner's arithmetic: which steps count and how ratios are formed (no training here)."""

import pytest

from benchmarks import run


def _run(step_seconds: list[float], examples: int = 32) -> dict:
    return {"per_step": {"time_step": step_seconds}, "examples_per_step": examples, "peak_rss_mb": 1.0, "losses": []}


def test_each_repetitions_ratio_is_against_the_baseline_run_beside_it():
    sft = [_run([10.0, 12.0, 11.0]), _run([20.0]), _run([10.0])]
    sdft = [_run([15.0, 15.0, 30.0]), {"error": "worker died"}, _run([13.0])]
    # median 15 ÷ median 11, the failed repetition skipped with its pair, then 13 ÷ 10
    assert run._repetition_ratios(sdft, sft) == pytest.approx([15 / 11, 1.3])


def test_compare_reports_the_repetition_ratios_and_their_spread(monkeypatch):
    seconds = iter([[10.0], [14.0], [16.0], [10.0]])  # rep 1: A then B; rep 2: B then A
    runner = lambda spec: _run(next(seconds))  # noqa: E731
    result = run.compare("t", {"a": (runner, {}), "b": (runner, {})}, reps=2, baseline="a")
    row = next(r for r in result["rows"] if r["side"] == "b")
    assert row["repetition_ratios"] == pytest.approx([1.4, 1.6])
    assert row["ratio_spread"] == pytest.approx(0.2)


def test_a_run_with_no_step_after_its_warmup_is_refused(capsys):
    with pytest.raises(SystemExit):
        run.main(["sdft_vs_sft", "--steps", "2", "--warmup", "2"])
    assert "leaves no measured step" in capsys.readouterr().err


def test_the_readmes_speed_sentence_is_the_committed_benchmark_result():
    import json
    import statistics
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    for results, side in [
        ("sdft_vllm_p32_steady.json", "sdft_vllm_bf16_auto"),
        ("sdft_vllm_p32_steady_avx2.json", "sdft_vllm_fp32"),
    ]:
        row = next(
            r for r in json.loads((root / "benchmarks" / "results" / results).read_text())["rows"] if r["side"] == side
        )
        ratios = row["repetition_ratios"]
        assert len(ratios) >= 3
        assert f"**{statistics.median(ratios):.2f}x**" in readme, results
    row = next(
        r
        for r in json.loads((root / "benchmarks/results/sdft_vllm_p32_steady.json").read_text())["rows"]
        if r["side"] == "sdft_vllm_bf16_auto"
    )
    assert f"({min(row['repetition_ratios']):.2f}x to {max(row['repetition_ratios']):.2f}x)" in readme
