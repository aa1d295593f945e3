"""`sdft diagnose` on a tiny random model: per-token numbers, summary, outputs, CLI."""

import json
import re
import sys

import pytest
import torch
from typer.testing import CliRunner

from selfdistill.config import load_config
from selfdistill.data.prompts import PromptBuilder
from selfdistill.data.records import Record
from selfdistill.diagnosis import core, summarize
from selfdistill.diagnosis.core import CompletionTrace, RecordTrace, is_format_token
from selfdistill.distillation.losses import divergence
from selfdistill.models.tiny import save_tiny, tiny_model, tiny_tokenizer, words_of
from selfdistill.sampling import generate, rollout_seed

COLOURS = ["red", "blue", "green"]


def tiny_records():
    return [Record(prompt=f"what is {w} ?", demonstration=f"it is {w} .", answer=w) for w in COLOURS]


def vocabulary(records):
    return sorted(set(words_of(" ".join(r.prompt + " " + r.demonstration for r in records))))


@pytest.fixture(scope="module")
def tiny():
    records = tiny_records()
    tok = tiny_tokenizer(vocabulary(records))
    return tiny_model(tok, seed=3), tok, records


def settings(**loss):
    return load_config(
        overrides={
            "data": {"teacher_template": "plain"},
            "model": {"precision": "fp32"},
            "train": {"seed": 7},
            "rollout": {"max_new_tokens": 6, "num_rollouts": 2},
            "loss": loss,
        }
    )


@pytest.mark.parametrize("loss", [{}, {"kind": "jsd", "beta": 0.3, "top_k": 5}])
def test_per_token_numbers_equal_two_direct_forward_passes(tiny, loss):
    model, tok, records = tiny
    cfg = settings(**loss)
    stop = [tok.eos_token_id]
    traces = core.trace(model, tok, records, cfg, stop)
    builder = PromptBuilder(tok, template="plain")
    assert [len(r.completions) for r in traces] == [2, 2, 2]
    for r in traces:
        record = records[r.index]
        student = builder.encode_messages(builder.student_messages(record))
        teacher = builder.encode_messages(builder.teacher_messages(record))
        for c in r.completions:
            # The completion is the student's own sample, drawn as training draws it (per-row seed).
            seed = rollout_seed(7, r.index, c.rollout)
            assert c.seed == seed
            again = generate(
                model,
                [student],
                stop_token_ids=stop,
                pad_token_id=tok.pad_token_id,
                max_new_tokens=6,
                temperature=1.0,
                seeds=[seed],
            )
            assert c.token_ids == again.ids[0]
            n = len(c.token_ids)
            with torch.no_grad():
                s_logits = model(input_ids=torch.tensor([student + c.token_ids])).logits[
                    0, len(student) - 1 : len(student) - 1 + n
                ]
                t_logits = model(input_ids=torch.tensor([teacher + c.token_ids])).logits[
                    0, len(teacher) - 1 : len(teacher) - 1 + n
                ]
            picked = torch.tensor(c.token_ids)[:, None]
            s_logp, t_logp = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
            torch.testing.assert_close(
                torch.tensor(c.student_logp), s_logp.gather(-1, picked)[:, 0], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                torch.tensor(c.teacher_logp), t_logp.gather(-1, picked)[:, 0], atol=1e-5, rtol=1e-5
            )
            expected = divergence(s_logits, t_logits, cfg.loss.kind, beta=cfg.loss.beta, top_k=cfg.loss.top_k)
            torch.testing.assert_close(torch.tensor(c.divergence), expected, atol=1e-5, rtol=1e-4)
            top_p, top_i = t_logp.exp().topk(core.TOP_N, dim=-1)
            assert [[t[0] for t in row] for row in c.teacher_top] == top_i.tolist()
            torch.testing.assert_close(
                torch.tensor([[t[2] for t in row] for row in c.teacher_top]), top_p, atol=1e-5, rtol=1e-4
            )
            assert [row[0][0] for row in c.student_top] == s_logp.argmax(-1).tolist()
            assert c.in_loss == [j >= 3 for j in range(n)]
        # The demonstration's first token, right after each prompt.
        first = builder.encode(record).demonstration_ids[0]
        with torch.no_grad():
            p_s = model(input_ids=torch.tensor([student])).logits[0, -1].softmax(-1)[first].item()
            p_t = model(input_ids=torch.tensor([teacher])).logits[0, -1].softmax(-1)[first].item()
        assert r.demo_first_student_p == pytest.approx(p_s, abs=1e-6)
        assert r.demo_first_teacher_p == pytest.approx(p_t, abs=1e-6)


def test_format_tokens_have_no_letter_or_digit():
    assert all(is_format_token(t) for t in ["{", '":', "\n", " ", "</", "...", ""])
    assert not any(is_format_token(t) for t in ["Action", " the", "42", '{"city']) and is_format_token(
        "<|end|>", special=True
    )


def synthetic(divergences, formats, skip=1):
    n = len(divergences)
    c = CompletionTrace(
        record=0,
        rollout=0,
        seed=0,
        finished=True,
        token_ids=list(range(n)),
        token_texts=["x"] * n,
        student_logp=[-1.0] * n,
        teacher_logp=[-0.5] * n,
        divergence=divergences,
        is_format=formats,
        in_loss=[j >= skip for j in range(n)],
        teacher_top=[[(j, "x", 0.9)] for j in range(n)],
        student_top=[[(99, "y", 0.5)]] * n,
    )
    return RecordTrace(
        index=0,
        student_prompt="",
        teacher_prompt="",
        demonstration="",
        demo_first_token="x",
        demo_first_student_p=0.1,
        demo_first_teacher_p=0.4,
        completions=[c],
    )


def test_summary_shares_by_hand():
    s = summarize(
        [synthetic([4.0, 1.0, 1.0, 1.0, 1.0, 2.0], [True, False, False, True, False, False])], skip_first_tokens=1
    )
    assert s["divergence_total"] == 10.0 and s["tokens"] == 6
    assert s["first_k_share"] == {"1": 0.4, "4": 0.7, "16": 1.0}
    assert s["in_loss_share"] == pytest.approx(0.6)
    assert s["format_share"] == pytest.approx(0.5) and s["answer_share"] == pytest.approx(0.5)
    assert s["format_token_fraction"] == pytest.approx(2 / 6)
    assert s["logp_gap_mean"] == pytest.approx(0.5)
    assert s["teacher_top_differs"] == 0.0 and s["student_top_differs"] == 1.0
    assert s["demo_first_token_teacher_p"] == 0.4 and s["demo_first_token_student_p"] == 0.1


def test_summary_shares_add_up_on_a_real_trace(tiny):
    model, tok, records = tiny
    s = summarize(core.trace(model, tok, records, settings(), [tok.eos_token_id]), skip_first_tokens=3)
    shares = [s["first_k_share"][k] for k in ("1", "4", "16")]
    assert all(0.0 <= x <= 1.0 for x in shares) and shares == sorted(shares)
    assert s["format_share"] + s["answer_share"] == pytest.approx(1.0)
    assert 0.0 <= s["in_loss_share"] <= 1.0 and s["divergence_total"] > 0


def write_task(tmp_path):
    records = tiny_records()
    model_dir = save_tiny(tmp_path / "model", vocabulary(records))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return model_dir, data


def test_cli_end_to_end_writes_json_and_html(tmp_path):
    from selfdistill.cli import app

    model_dir, data = write_task(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "diagnose",
            "--model",
            str(model_dir),
            str(data),
            "--grader",
            "contains",
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--rollouts-per-record",
            "2",
            "--precision",
            "fp32",
            "--template",
            "plain",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"HTML: {out / 'diagnose.html'}" in result.output and "share in first 1 / 4 / 16 tokens" in result.output
    report = json.loads((out / "diagnose.json").read_text())
    assert set(report) == {"fields", "settings", "summary", "ceiling", "advice", "records"}
    assert report["settings"]["template"] == "plain" and report["settings"]["num_rollouts"] == 2
    assert [row["prompt"] for row in report["ceiling"]] == ["student", "teacher:plain"]
    assert set(report["ceiling"][1]) >= {"scores", "demo_loglik", "demo_loglik_gain", "demo_first_token_gain"}
    for key in (
        "divergence_total",
        "first_k_share",
        "format_share",
        "answer_share",
        "logp_gap_mean",
        "teacher_top_differs",
        "demo_first_token_teacher_p",
        "demo_first_token_student_p",
        "in_loss_share",
    ):
        assert key in report["summary"]
    completions = [c for r in report["records"] for c in r["completions"]]
    assert len(report["records"]) == 2 and len(completions) == 4
    arrays = (
        "token_ids",
        "token_texts",
        "student_p",
        "teacher_p",
        "student_logp",
        "teacher_logp",
        "logp_gap",
        "divergence",
        "is_format",
        "in_loss",
        "teacher_top",
        "student_top",
    )
    for c in completions:
        assert len({len(c[a]) for a in arrays}) == 1 and len(c["teacher_top"][0]) == core.TOP_N
    html = (out / "diagnose.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert html.count('class="tok') == sum(len(c["token_ids"]) for c in completions)
    assert "How to read this" in html and "Teacher ceiling" in html


def test_cli_takes_settings_from_a_training_config(tmp_path):
    from selfdistill.cli import app

    model_dir, data = write_task(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model: {{name: {model_dir}, precision: fp32}}\ndata: {{train: {data}, teacher_template: plain}}\n"
        "rollout: {temperature: 0.7, max_new_tokens: 3}\nloss: {kind: reverse_kl, skip_first_tokens: 0}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["diagnose", "--config", str(config), "--limit", "1", "--no-ceiling", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "diagnose.json").read_text())
    s = report["settings"]
    assert (s["temperature"], s["max_new_tokens"], s["loss_kind"], s["template"], s["task"]) == (
        0.7,
        3,
        "reverse_kl",
        "plain",
        str(data),
    )
    assert report["ceiling"] is None and report["summary"]["in_loss_share"] == pytest.approx(1.0)


def test_bad_options_exit_with_code_2(tmp_path, monkeypatch, capsys):
    from selfdistill import cli

    _, data = write_task(tmp_path)
    for args, message in (
        (["--precision", "fp16"], "model.precision"),  # a training setting: the config's check names its key
        (["--divergence", "kl"], "loss.kind"),
        (["--limit", "0"], "--limit"),
        (["--template", "task"], "built-in tasks"),
    ):
        monkeypatch.setattr(sys, "argv", ["sdft", "diagnose", str(data), "--out", str(tmp_path / "out"), *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # rejected before anything was written
