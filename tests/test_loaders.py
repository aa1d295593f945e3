"""Loaders for the paper's tool-use and science data, HuatuoGPT-o1, chat messages and mapped columns."""

import json
from pathlib import Path

import pytest

from selfdistill.errors import UserError
from selfdistill.tasks.loaders import detect_format, load_dataset_records

PAPER_EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paper-eval"

TOOL_PROMPT = (
    "Your task is to answer the user's question using available tools.\nYou have access to the following tools:\n"
    "Name: Axolotl\nDescription: Axolotl facts\nDocumentation:\ngetAxolotlFacts: Facts.\n"
    'Parameters: {"limit": "integer. How many."}\n\nBegin!\nQuestion: Give me 3 axolotl facts.'
)
TOOL_ROWS = [
    {
        "prompt": TOOL_PROMPT,
        "name": "Axolotl",
        "instruction": "Give me 3 axolotl facts.",
        "golden_answer": [{"Action": "getAxolotlFacts", "Action_Input": '{"limit": 3}'}],
        "golden_response": 'Thought: I need facts.\nAction: getAxolotlFacts\nAction Input: {"limit": 3}',
    },
    {
        "prompt": TOOL_PROMPT,
        "name": "Axolotl",
        "instruction": "two calls",
        "golden_answer": [{"Action": "getA", "Action_Input": '{"x": 1}'}, {"Action": "getB", "Action_Input": "{}"}],
    },
]
SYSTEM = "Given a question and four options, please select the right answer. Respond in the following format: ..."
SCIENCE_ROWS = [
    {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q1?\n\nA: 1\nB: 2\nC: 3\nD: 4"}],
        "answer": "C",
    },
    {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Q2?"},
            {"role": "assistant", "content": "<reasoning>\nbecause\n</reasoning>\n<answer>\nB\n</answer>"},
        ],
        "answer": "B",
    },
    {
        "prompt": [{"role": "user", "content": "Q3?"}],
        "output_text": "<reasoning>\nr\n</reasoning>\n<answer>\nA\n</answer>",
        "answer": "A",
    },
]
HUATUO_ROWS = [
    {
        "Question": "A 40-year-old has chest pain. Next step?",
        "Complex_CoT": "Think about ECG first.",
        "Response": "Get an ECG.",
    }
]
MESSAGES_ROWS = [
    {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], "id": 7}
]


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paper_tooluse_rows(tmp_path):
    records = load_dataset_records(write(tmp_path, "tool.jsonl", TOOL_ROWS))
    assert records[0].demonstration == TOOL_ROWS[0]["golden_response"]
    assert records[0].prompt == TOOL_PROMPT
    assert records[0].meta["golden_answer"] == TOOL_ROWS[0]["golden_answer"]
    assert records[0].meta["instruction"] == "Give me 3 axolotl facts."
    # no golden_response: written from golden_answer, one call after the other
    assert records[1].demonstration == 'Action: getA\nAction Input: {"x": 1}\nAction: getB\nAction Input: {}'
    assert records[1].source.endswith("tool.jsonl line 2")


def test_paper_science_rows(tmp_path):
    records = load_dataset_records(write(tmp_path, "sci.jsonl", SCIENCE_ROWS), format="paper-science")
    assert [r.answer for r in records] == ["C", "B", "A"]
    assert records[0].prompt[-1]["content"].startswith("Q1?") and len(records[0].prompt) == 2
    assert records[0].demonstration.endswith("<answer>\nC\n</answer>")
    # a chat ending with the assistant turn: that turn is the demonstration, the prompt ends with the user
    assert records[1].prompt[-1] == {"role": "user", "content": "Q2?"}
    assert records[1].demonstration == SCIENCE_ROWS[1]["messages"][-1]["content"]
    assert records[2].demonstration == SCIENCE_ROWS[2]["output_text"]


def test_huatuo_and_messages_rows(tmp_path):
    [h] = load_dataset_records(write(tmp_path, "h.jsonl", HUATUO_ROWS))
    assert h.prompt == HUATUO_ROWS[0]["Question"]
    assert h.demonstration == "## Thinking\n\nThink about ECG first.\n\n## Final Response\n\nGet an ECG."
    assert h.meta["Response"] == "Get an ECG."
    [m] = load_dataset_records(write(tmp_path, "m.jsonl", MESSAGES_ROWS))
    assert m.prompt == [{"role": "user", "content": "Hi?"}] and m.demonstration == "Hello." and m.meta == {"id": 7}


def test_detect_format():
    assert detect_format(TOOL_ROWS[0]) == "paper-tooluse"
    assert detect_format(SCIENCE_ROWS[0]) == "paper-science"
    assert detect_format(HUATUO_ROWS[0]) == "huatuo"
    assert detect_format(MESSAGES_ROWS[0]) == "messages"
    assert detect_format({"prompt": "x", "demonstration": "y"}) == "records"


def test_hf_saved_dataset_and_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(HUATUO_ROWS * 3).save_to_disk(str(tmp_path / "huatuo"))
    records = load_dataset_records(tmp_path / "huatuo")
    assert len(records) == 3 and records[2].source.endswith("row 3")
    assert records[0].demonstration.startswith("## Thinking")
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"q": "2+2?", "a": "4"}])}).save_to_disk(
        str(tmp_path / "qa")
    )
    [r] = load_dataset_records(tmp_path / "qa", columns={"prompt": "q", "demonstration": "a"}, split="test")
    assert (r.prompt, r.demonstration) == ("2+2?", "4")
    with pytest.raises(UserError, match="no split 'train'"):
        load_dataset_records(tmp_path / "qa")


def test_builtin_task_source():
    records = load_dataset_records("task:science", split="eval", limit=3)
    assert len(records) == 3 and records[0].meta["split"] == "eval"
    with pytest.raises(UserError, match="no split 'dev'"):
        load_dataset_records("task:science", split="dev")


def test_errors_name_file_line_and_field(tmp_path):
    bad = write(tmp_path, "bad.jsonl", [TOOL_ROWS[0], {"prompt": "x", "golden_answer": "not a list"}])
    with pytest.raises(UserError, match=r"bad\.jsonl line 2, field 'golden_answer': expected list"):
        load_dataset_records(bad)
    bad = write(tmp_path, "bad2.jsonl", [{"Question": "q", "Complex_CoT": "c"}])
    with pytest.raises(UserError, match=r"bad2\.jsonl line 1, field 'Response': missing"):
        load_dataset_records(bad)
    bad = write(tmp_path, "bad3.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match="last message must be the assistant"):
        load_dataset_records(bad, format="messages")
    with pytest.raises(UserError, match="Unknown data format"):
        load_dataset_records(bad, format="csv")
    with pytest.raises(UserError, match="file not found"):
        load_dataset_records(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not PAPER_EVAL.is_dir(), reason="the paper's evaluation files (../shared) are absent")
def test_real_paper_files():
    tools = load_dataset_records(PAPER_EVAL / "tooluse_eval.jsonl")
    assert len(tools) == 97
    assert all(r.meta["golden_answer"] and r.demonstration.startswith("Action: ") for r in tools)
    assert tools[0].demonstration == "Action: getRandomAxolotlImage\nAction Input: {}"
    science = load_dataset_records(PAPER_EVAL / "science_eval.jsonl")
    assert len(science) == 507
    assert {r.answer for r in science} == set("ABCD")
    assert all(r.prompt[0]["role"] == "system" and r.prompt[-1]["role"] == "user" for r in science)
    assert all(r.demonstration.endswith(f"<answer>\n{r.answer}\n</answer>") for r in science)
