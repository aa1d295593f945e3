"""Progress: live bars on a terminal, whole labelled lines elsewhere and in workers, no third-party bars."""

import pytest

from selfdistill import progress
from selfdistill.progress import LineProgress, progress_bar, progress_mode, quiet_third_party_bars


@pytest.mark.parametrize(
    "value, tty, mode",
    [
        ("0", True, "off"),
        ("lines", True, "lines"),
        ("bar", False, "bar"),
        ("1", False, "bar"),
        ("", True, "bar"),
        ("", False, "lines"),
    ],
)
def test_mode_follows_the_variable_then_the_terminal(monkeypatch, value, tty, mode):
    monkeypatch.setenv(progress.ENV, value)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: tty)
    assert progress_mode() == mode


def test_lines_mode_prints_whole_labelled_lines_at_each_quarter(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "lines")
    monkeypatch.setenv(progress.LABEL_ENV, "[sdft seed 0]")
    bar = progress_bar(total=8, desc="generate")
    assert isinstance(bar, LineProgress)
    for _ in range(8):
        bar.update(1)
    bar.close()
    assert capsys.readouterr().out.splitlines() == [
        "[sdft seed 0] generate: 2/8",
        "[sdft seed 0] generate: 4/8",
        "[sdft seed 0] generate: 6/8",
        "[sdft seed 0] generate: 8/8",
    ]
    bar = progress_bar(total=4, desc="sdft training")  # the loss set after each step shows on that step's line
    for step in range(1, 5):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / step:.2f}")
    bar.close()
    assert capsys.readouterr().out.splitlines() == [
        "[sdft seed 0] sdft training: 1/4",
        "[sdft seed 0] sdft training: 2/4 loss=0.50",
        "[sdft seed 0] sdft training: 3/4 loss=0.33",
        "[sdft seed 0] sdft training: 4/4 loss=0.25",
    ]


def test_generation_reports_progress_in_a_worker(monkeypatch, capsys, tmp_path):
    from selfdistill.models import load_model
    from selfdistill.models.tiny import save_tiny
    from selfdistill.sampling.decode import generate

    monkeypatch.setenv(progress.ENV, "lines")
    monkeypatch.setenv(progress.LABEL_ENV, "[sft seed 1]")
    model, tokenizer = load_model(str(save_tiny(tmp_path / "tiny", extra_words=["a", "b"])))
    prompts = [tokenizer.encode("a b", add_special_tokens=False)] * 4
    generate(
        model,
        prompts,
        stop_token_ids=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=2,
        temperature=0,
        batch_size=2,
        precision="fp32",
        desc="eval alpha",
    )
    assert "[sft seed 1] eval alpha: 4/4" in capsys.readouterr().out.splitlines()


def test_third_party_bars_are_silenced(monkeypatch):
    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    transformers_logging.enable_progress_bar()
    try:
        quiet_third_party_bars()
        assert not transformers_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
        assert not datasets.is_progress_bar_enabled()
        assert progress.os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        transformers_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()
        datasets.enable_progress_bars()
