import json

import pytest
import torch

from selfdistill.data import PromptBuilder, Record, load_records
from selfdistill.data.prompts import TEACHER_TEMPLATES
from selfdistill.errors import UserError
from selfdistill.methods.base import TrainItem, completion_hidden
from selfdistill.models.tiny import tiny_model, tiny_tokenizer

WORDS = "Who won the prize ? Ada Lovelace did alpha beta gamma delta".split()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_jsonl_with_column_mapping_and_meta(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q1", "golden_response": "A1", "id": 7}])
    (record,) = load_records(path, columns={"prompt": "instruction", "demonstration": "golden_response"})
    assert record.prompt == "Q1" and record.demonstration == "A1" and record.meta == {"id": 7}
    assert "line 1" in record.source


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"prompt": "q", "demonstration": ', "line 2, column"),
        ('{"demonstration": "a"}', "field 'prompt': missing"),
        ('{"prompt": "q", "demonstration": 3}', "field 'demonstration': expected a string"),
        ('{"prompt": "q", "demonstration": "  "}', "demonstration is empty"),
        (
            '{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "demonstration": "a"}',
            "ends with a 'assistant' turn",
        ),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "demonstration": "fine"}, line])
    with pytest.raises(UserError) as err:
        load_records(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and needle in str(err.value)


def test_non_utf8_and_empty_files(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "demonstration": "x"}\n')
    with pytest.raises(UserError, match="line 1: not valid UTF-8"):
        load_records(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        load_records(empty)


def test_builtin_demo_file_loads():
    records = load_records("builtin:demo")
    assert len(records) == 24 and all(r.answer in r.demonstration for r in records)


def test_hf_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"q": "Q", "a": "A"}]).save_to_disk(str(tmp_path / "ds"))
    (record,) = load_records(tmp_path / "ds", columns={"prompt": "q", "demonstration": "a"})
    assert (record.prompt, record.demonstration) == ("Q", "A")


def test_teacher_prompt_holds_question_and_demonstration_student_prompt_does_not():
    tok = tiny_tokenizer(WORDS)
    builder = PromptBuilder(tok, template="paper")
    record = Record(
        prompt=[{"role": "system", "content": "alpha"}, {"role": "user", "content": "Who won the prize ?"}],
        demonstration="Ada Lovelace did",
    )
    student = builder.student_messages(record)
    teacher = builder.teacher_messages(record)
    assert student[-1]["content"] == "Who won the prize ?" and "Ada" not in str(student)
    assert teacher[0] == student[0]  # earlier turns kept
    expected = TEACHER_TEMPLATES["paper"].format(question="Who won the prize ?", demonstration="Ada Lovelace did")
    assert teacher[-1]["content"] == expected  # the paper's wording, verbatim
    enc = builder.encode(record)
    text = tok.decode(enc.teacher_ids)
    assert "Who won the prize ?" in text and "Ada Lovelace did" in text
    assert "Ada" not in tok.decode(enc.student_ids)


def test_context_goes_to_the_teacher_only():
    tok = tiny_tokenizer(WORDS)
    builder = PromptBuilder(tok, template="plain")
    record = Record(prompt="Who won ?", demonstration="Ada", context="gamma delta")
    assert "gamma delta" in builder.teacher_messages(record)[-1]["content"]
    assert "gamma" not in str(builder.student_messages(record))


def test_overlong_prompt_is_an_error_or_a_counted_skip():
    tok = tiny_tokenizer(WORDS)
    long_record = Record(prompt=" ".join(["alpha"] * 50), demonstration="beta", source="f.jsonl line 3")
    short = Record(prompt="alpha", demonstration="beta")
    with pytest.raises(UserError, match="f.jsonl line 3: the student prompt has .* over the limit 20"):
        PromptBuilder(tok, max_prompt_tokens=20).encode_all([short, long_record])
    builder = PromptBuilder(tok, max_prompt_tokens=20, overlong="skip")
    kept = builder.encode_all([short, long_record])
    assert [e.index for e in kept] == [0] and len(builder.skipped) == 1
    # the teacher has its own limit: the demonstration never truncates the question silently
    with pytest.raises(UserError, match="teacher prompt"):
        PromptBuilder(tok, max_teacher_prompt_tokens=10).encode(short)


def test_custom_template_must_have_placeholders_and_chat_template_is_required():
    tok = tiny_tokenizer(WORDS)
    with pytest.raises(UserError, match="{question} and {demonstration}"):
        PromptBuilder(tok, template="no placeholders")
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        PromptBuilder(tok)


def test_student_and_teacher_completion_positions_align_token_for_token():
    tok = tiny_tokenizer(WORDS)
    model = tiny_model(tok)
    builder = PromptBuilder(tok)
    records = [
        Record(prompt="Who won ?", demonstration="Ada"),
        Record(prompt="Who won the prize ?", demonstration="Lovelace did"),
    ]
    encoded = builder.encode_all(records)
    completions = [
        tok.convert_tokens_to_ids(["alpha", "beta", "gamma"]),
        tok.convert_tokens_to_ids(["delta", "<|end|>"]),
    ]
    items = [TrainItem(e.index, e.student_ids, c, 1, e.teacher_ids) for e, c in zip(encoded, completions)]
    s_hidden, s_tokens = completion_hidden(model, items, False, tok.pad_token_id, "fp32")
    t_hidden, t_tokens = completion_hidden(model, items, True, tok.pad_token_id, "fp32")
    assert s_tokens.tolist() == t_tokens.tolist() == completions[0][1:] + completions[1][1:]
    # Each gathered hidden state is the one a full forward uses to predict that very token.
    logits = model.get_output_embeddings()(s_hidden)
    full = model(input_ids=torch.tensor([encoded[0].student_ids + completions[0]])).logits[0]
    p = len(encoded[0].student_ids)
    torch.testing.assert_close(logits[:2], full[p : p + 2], atol=1e-5, rtol=1e-5)
