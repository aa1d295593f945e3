"""The bad-input corpus: each user mistake, given to `sdft train`, ends with exit 2 and one paragraph
naming the file, line and field (or the option) and what to do, no traceback, and the disk as it was.

The command runs in this process through `selfdistill.cli.main` (the `sdft` entry point itself:
argv in, exit status and stderr out), which keeps 50 cases to seconds; anything escaping it other
than SystemExit would be a traceback and fails the test. One case also runs as a real subprocess.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reltools import tree_hashes
from toy import KEYS, VALUES

from selfdistill.models.tiny import save_tiny

GOOD = [{"prompt": k, "demonstration": v} for k, v in zip(KEYS, VALUES)]
COMMON = [
    "--max-steps",
    "1",
    "--batch-size",
    "2",
    "-s",
    "rollout.max_new_tokens=2",
    "-s",
    "model.precision=fp32",
    "-s",
    "data.teacher_template=plain",
    "-s",
    "loss.skip_first_tokens=0",
]


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def run_sdft(args, capsys, monkeypatch):
    """(exit status, stderr) of `sdft ARGS`, run in this process."""
    from selfdistill.cli import main

    monkeypatch.setattr(sys, "argv", ["sdft", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()  # any other exception escaping here is a traceback the user would have seen
    return exited.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A workspace: a tiny model, a good data file and a finished run `prev/` (made by `sdft train`)."""
    root = tmp_path_factory.mktemp("workspace")
    save_tiny(root / "model", KEYS + VALUES)
    (root / "good.jsonl").write_bytes(jsonl(*GOOD))
    from selfdistill.cli import main

    argv, cwd = sys.argv, os.getcwd()
    # Relative paths, as a user in the workspace would type them; each test runs in a copy of it.
    sys.argv = [
        "sdft",
        "train",
        "--model",
        "model",
        "--data",
        "good.jsonl",
        "-o",
        "prev",
        *COMMON,
        "-s",
        "train.save_every=1",
    ]
    try:
        os.chdir(root)
        with pytest.raises(SystemExit) as exited:
            main()
    finally:
        sys.argv = argv
        os.chdir(cwd)
    assert exited.value.code in (0, None)
    assert (root / "prev" / "checkpoints" / "step-000001" / "state.json").is_file()
    return root


def _no_chat_template(model: Path):
    config = model / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    for extra in model.glob("chat_template.*"):
        extra.unlink()


def _corrupt(path: Path, data: bytes = b"\x00not a safetensors file" * 4):
    path.write_bytes(data)


def _context(limit: int):
    """Set the model's own context limit (max_position_embeddings) in its config.json."""

    def edit(path: Path):
        config = json.loads(path.read_text())
        config["max_position_embeddings"] = limit
        path.write_text(json.dumps(config))

    return edit


# id -> (files to write (name -> bytes, or a function of the workspace), args, needles in the message).
# Placeholders: {ws} workspace, {data} data.jsonl, {model} model dir. Default data/model/output: data.jsonl, model, run.
CASES = {
    # --- data files ------------------------------------------------------------------------------------
    "malformed-json": (
        {"data.jsonl": jsonl(GOOD[0], '{"prompt": "k1", "demonstration": ')},
        [],
        ["{data} line 2, column", "malformed JSON", "Fix that line"],
    ),
    "row-not-an-object": (
        {"data.jsonl": jsonl(GOOD[0], "[1, 2]")},
        [],
        ["{data} line 2", "expected a JSON object, got list", "Write each record as one object"],
    ),
    "missing-prompt": (
        {"data.jsonl": jsonl(GOOD[0], {"demonstration": "v1"})},
        [],
        ["{data} line 2, field 'prompt': missing", "data.columns"],
    ),
    "missing-demonstration": (
        {"data.jsonl": jsonl({"prompt": "k1"})},
        [],
        ["{data} line 1, field 'demonstration': missing", "Add it to every record"],
    ),
    "demonstration-wrong-type": (
        {"data.jsonl": jsonl(GOOD[0], GOOD[1], {"prompt": "k2", "demonstration": 3})},
        [],
        ["{data} line 3, field 'demonstration': expected a string, got int", "JSON string"],
    ),
    "prompt-wrong-type": (
        {"data.jsonl": jsonl({"prompt": 7, "demonstration": "v1"})},
        [],
        ["{data} line 1, field 'prompt': expected a string or a list of chat messages, got int", "Write the prompt as"],
    ),
    "context-wrong-type": (
        {"data.jsonl": jsonl({"prompt": "k1", "demonstration": "v1", "context": ["x"]})},
        [],
        ["{data} line 1, field 'context': expected a string, got list", "leave it out"],
    ),
    "empty-demonstration": (
        {"data.jsonl": jsonl(GOOD[0], {"prompt": "k1", "demonstration": "  "})},
        [],
        ["{data} line 2, field 'demonstration': the demonstration is empty", "expert answer"],
    ),
    "empty-prompt": (
        {"data.jsonl": jsonl({"prompt": " ", "demonstration": "v1"})},
        [],
        ["{data} line 1, field 'prompt': the prompt is empty", "Write the question"],
    ),
    "chat-ends-with-assistant": (
        {
            "data.jsonl": jsonl(
                {
                    "prompt": [{"role": "user", "content": "k1"}, {"role": "assistant", "content": "v1"}],
                    "demonstration": "v1",
                }
            )
        },
        [],
        ["{data} line 1, field 'prompt'", "ends with a 'assistant' turn", "put the expert answer in 'demonstration'"],
    ),
    "chat-message-without-content": (
        {"data.jsonl": jsonl({"prompt": [{"role": "user"}], "demonstration": "v1"})},
        [],
        ["{data} line 1, field 'prompt': message 0", "string 'role' and 'content'"],
    ),
    "chat-empty-list": (
        {"data.jsonl": jsonl({"prompt": [], "demonstration": "v1"})},
        [],
        ["{data} line 1, field 'prompt': the message list is empty", "user turn"],
    ),
    "non-utf8": (
        {"data.jsonl": jsonl(GOOD[0]) + b'{"prompt": "caf\xe9", "demonstration": "v1"}\n'},
        [],
        ["{data} line 2: not valid UTF-8", "re-save the file as UTF-8"],
    ),
    "empty-file": ({"data.jsonl": b""}, [], ["{data}: no records (the file is empty)", "one JSON object per line"]),
    "only-blank-lines": ({"data.jsonl": b"\n  \n\n"}, [], ["{data}: no records", "one JSON object per line"]),
    "data-file-missing": ({}, ["--data", "{ws}/nope.jsonl"], ["{ws}/nope.jsonl: file not found", "data.train"]),
    "data-dir-not-a-dataset": (
        {"notds/readme.txt": b"hi"},
        ["--data", "{ws}/notds"],
        ["{ws}/notds: not a saved Hugging Face dataset", "Point data.train"],
    ),
    "unknown-builtin-dataset": ({}, ["--data", "builtin:nope"], ["Unknown built-in dataset 'nope'", "available: demo"]),
    "unknown-column-field": (
        {},
        ["-s", "data.columns={question: prompt}"],
        ["data.columns: unknown field 'question'", "map one of prompt"],
    ),
    "student-prompt-over-limit": (
        {},
        ["-s", "data.max_prompt_tokens=3"],
        ["{data} line ", "student prompt has", "over the limit 3 (data.max_prompt_tokens)", "data.overlong=skip"],
    ),
    "teacher-prompt-over-limit": (
        {},
        ["-s", "data.max_teacher_prompt_tokens=8"],
        [
            "{data} line ",
            "teacher prompt (question + demonstration) has",
            "(data.max_teacher_prompt_tokens)",
            "Raise the limit",
        ],
    ),
    "all-records-skipped": (
        {},
        ["-s", "data.max_prompt_tokens=3", "-s", "data.overlong=skip"],
        ["All 8 records are over the prompt limits"],
    ),
    # --- options and config files ------------------------------------------------------------------------
    "unknown-method": ({}, ["--method", "ppo"], ["Config value method: unknown method 'ppo'", "choose one of sdft"]),
    "unknown-teacher-kind": (
        {},
        ["-s", "teacher.kind=ghost"],
        ["teacher.kind", "unknown teacher kind 'ghost'", "choose one of ema, frozen, live"],
    ),
    "unknown-loss-kind": (
        {},
        ["-s", "loss.kind=l2"],
        ["loss.kind", "unknown loss kind 'l2'", "choose one of forward_kl"],
    ),
    "bad-teacher-template": (
        {},
        ["-s", "data.teacher_template=answer like this"],
        ["data.teacher_template", "{question} and {demonstration}"],
    ),
    "bad-overlong-choice": (
        {},
        ["-s", "data.overlong=maybe"],
        ["data.overlong: unknown data overlong 'maybe'; choose one of error, skip"],
    ),
    "invalid-yaml": (
        {"c.yaml": b"train:\n  lr: [1,\n"},
        ["{ws}/c.yaml"],
        ["Config file {ws}/c.yaml line ", "invalid YAML", "Fix the syntax"],
    ),
    "yaml-not-a-mapping": (
        {"c.yaml": b"- train\n- lr\n"},
        ["{ws}/c.yaml"],
        ["Config file {ws}/c.yaml: the top level must be a mapping"],
    ),
    "yaml-unknown-key": (
        {"c.yaml": b"train:\n  lerning_rate: 0.1\n"},
        ["{ws}/c.yaml"],
        ["Config file {ws}/c.yaml", "Unknown config key 'train.lerning_rate'"],
    ),
    "yaml-misspelt-key": (
        {"c.yaml": b"teacher:\n  ema_rat: 0.1\n"},
        ["{ws}/c.yaml"],
        ["Unknown config key 'teacher.ema_rat'", "Did you mean 'teacher.ema_rate'?"],
    ),
    "config-file-missing": ({}, ["{ws}/none.yaml"], ["Config file {ws}/none.yaml does not exist"]),
    "override-unknown-key": ({}, ["-s", "train.lrr=1"], ["Unknown config key 'train.lrr'", "Did you mean 'train.lr'?"]),
    "override-unknown-section": ({}, ["-s", "trian.lr=1"], ["Unknown config key 'trian'", "Did you mean 'train'?"]),
    "override-without-value": ({}, ["-s", "train.lr"], ["Override 'train.lr'", "section.key=value"]),
    "negative-lr": ({}, ["--lr=-0.001"], ["Config value train.lr: must be a finite number > 0"]),
    "ema-rate-above-1": ({}, ["-s", "teacher.ema_rate=1.5"], ["Config value teacher.ema_rate: must lie in [0, 1]"]),
    "ema-rate-negative": ({}, ["-s", "teacher.ema_rate=-0.1"], ["Config value teacher.ema_rate: must lie in [0, 1]"]),
    "top-k-zero": ({}, ["-s", "loss.top_k=0"], ["Config value loss.top_k: must be a positive integer or null"]),
    "top-p-zero": ({}, ["-s", "rollout.top_p=0"], ["Config value rollout.top_p: must lie in (0, 1]"]),
    "wrong-type-value": (
        {},
        ["-s", "train.micro_batch_size=lots"],
        ["Config value train.micro_batch_size: expected int, got 'lots'"],
    ),
    "keep-last-zero": ({}, ["-s", "train.keep_last=0"], ["Config value train.keep_last: must be >= 1"]),
    "negative-nonfinite-limit": (
        {},
        ["-s", "train.max_nonfinite_steps=-1"],
        ["train.max_nonfinite_steps: must be >= 0"],
    ),
    # --- the output directory ----------------------------------------------------------------------------
    "output-dir-holds-another-run": (
        {},
        ["-o", "{ws}/prev", "--lr", "0.5"],
        ["{ws}/prev already holds a different run", "pass --overwrite"],
    ),
    "output-dir-holds-this-run": (
        {},
        ["-o", "prev", "--data", "good.jsonl", "--model", "model"],
        ["prev already holds checkpoints of this run", "--resume", "--overwrite"],
    ),
    "overwrite-with-broken-data-keeps-old-run": (
        {"data.jsonl": jsonl("{oops")},
        ["-o", "{ws}/prev", "--overwrite"],
        ["{data} line 1", "malformed JSON"],
    ),
    "output-dir-is-a-file": ({"afile": b"x"}, ["-o", "{ws}/afile"], ["train.output_dir {ws}/afile is a file"]),
    "output-dir-run-json-damaged": (
        {"prev/run.json": b"{not json"},
        ["-o", "{ws}/prev", "--resume"],
        ["{ws}/prev/run.json is damaged", "--overwrite"],
    ),
    "resume-from-damaged-checkpoint": (
        {"prev/checkpoints/step-000001/trainer_state.pt": b"garbage"},
        ["-o", "prev", "--resume", "--data", "good.jsonl", "--model", "model"],
        ["Checkpoint prev/checkpoints/step-000001 cannot be read", "Move it out of"],
    ),
    # --- the model -------------------------------------------------------------------------------------
    "missing-model-path": (
        {},
        ["--model", "{ws}/no-such-model/"],
        ["model.name {ws}/no-such-model/: no such file or directory"],
    ),
    "model-dir-without-config": (
        {"emptymodel/x.txt": b""},
        ["--model", "{ws}/emptymodel"],
        ["model.name {ws}/emptymodel: the directory has no config.json", "save_pretrained"],
    ),
    "missing-gguf": ({}, ["--model", "{ws}/none.gguf"], ["model.name {ws}/none.gguf: no such file"]),
    "corrupt-gguf": (
        {"bad.gguf": b"GGUF" + b"\x00" * 60},
        ["--model", "{ws}/bad.gguf"],
        ["{ws}/bad.gguf: could not read the GGUF model", "download it again"],
    ),
    "corrupt-safetensors": (
        {"model/model.safetensors": _corrupt},
        [],
        ["model.name {model}: could not load the model from {model}/model.safetensors", "damaged or incomplete"],
    ),
    "pickle-only-weights": (
        {"model/model.safetensors": lambda p: p.unlink(), "model/pytorch_model.bin": b"\x80\x04K\x01."},
        [],
        ["model.name {model}: no .safetensors weights", "pytorch_model.bin", "safe_serialization=True"],
    ),
    "corrupt-tokenizer": (
        {"model/tokenizer.json": b"{broken"},
        [],
        ["model.name {model}: the tokenizer files are damaged", "Save the tokenizer again"],
    ),
    "tokenizer-without-chat-template": (
        {"model/tokenizer_config.json": lambda p: _no_chat_template(p.parent)},
        [],
        ["model.name {model}: the tokenizer has no chat template", "chat_template"],
    ),
    # A student prompt ("<|user|> k0 <|end|> <|assistant|>", 4 tokens) + rollout.max_new_tokens=2 does not
    # fit the vLLM engine's context, capped at the model's limit of 5: refused in set-up on every process
    # (not mid-run on the one that drew it). Pure length arithmetic: vLLM need not be installed.
    "student-prompt-over-vllm-context": (
        {"model/config.json": _context(5)},
        ["-s", "rollout.engine=vllm"],
        [
            "{data} line 1, field 'prompt': the student prompt has 4 tokens",
            "rollout.max_new_tokens=2",
            "the vLLM engine's context of 5 tokens",
            "max_position_embeddings=5",
            "7 more records are too long as well",
            "Lower data.max_prompt_tokens to 3",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_message_and_changes_nothing(case, template, tmp_path, capsys, monkeypatch):
    files, args, needles = CASES[case]
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    shutil.copy(ws / "good.jsonl", ws / "data.jsonl")
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "cache"))  # outside the snapshot: a cache may fill
    for name, content in files.items():
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        content(path) if callable(content) else path.write_bytes(content)
    fill = lambda s: (
        s.replace("{ws}", str(ws)).replace("{data}", str(ws / "data.jsonl")).replace("{model}", str(ws / "model"))
    )  # noqa: E731
    args = [fill(a) for a in args]
    head = ["train"] + [a for a in args if a.endswith(".yaml")]
    rest = [a for a in args if not a.endswith(".yaml")]
    defaults = []
    if "--model" not in rest:
        defaults += ["--model", str(ws / "model")]
    if "--data" not in rest:
        defaults += ["--data", str(ws / "data.jsonl")]
    if "-o" not in rest:
        defaults += ["-o", str(ws / "run")]
    before = tree_hashes(ws)
    monkeypatch.chdir(ws)

    code, err = run_sdft(head + defaults + COMMON + rest, capsys, monkeypatch)

    assert code == 2, err
    assert "Traceback" not in err
    message = err[err.index("error: ") :].strip()
    assert "\n" not in message, message  # one paragraph
    for needle in needles:
        assert fill(needle) in message, (needle, message)
    assert tree_hashes(ws) == before  # nothing already on disk changed, and no run directory appeared


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25


def test_overwrite_replaces_another_run_once_the_input_is_good(template, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    args = [
        "train",
        "--model",
        str(ws / "model"),
        "--data",
        str(ws / "good.jsonl"),
        "-o",
        str(ws / "prev"),
        *COMMON,
        "--lr",
        "0.5",
    ]
    code, err = run_sdft(args, capsys, monkeypatch)
    assert code == 2 and "different run" in err
    code, err = run_sdft(args + ["--overwrite"], capsys, monkeypatch)
    assert code in (0, None), err
    assert json.loads((ws / "prev" / "run.json").read_text())["config"]["train"]["lr"] == 0.5


def test_a_real_sdft_process_prints_no_traceback(template, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(jsonl(GOOD[0], '{"prompt": "k1", "demonstration": '))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFDISTILL_PROGRESS": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfdistill.cli",
            "train",
            "--data",
            str(data),
            "--model",
            str(template / "model"),
            "-o",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"error: {data} line 2, column ")
    assert proc.stderr.strip().endswith(
        "malformed JSON (Expecting value). Fix that line: each line must be one complete JSON object."
    )
    assert not (tmp_path / "run").exists()


OTHER_COMMANDS = {
    "unknown-task-data-show": (
        ["data", "show", "nosuchtask"],
        ["Unknown task 'nosuchtask'", "built-in tasks: tooluse"],
    ),
    "unknown-task-data-make": (["data", "make", "nosuchtask", "--out", "{ws}/made"], ["Unknown task 'nosuchtask'"]),
    "unknown-task-eval": (
        ["eval", "--model", "{ws}/model", "--task", "nosuchtask", "--out", "{ws}/prev"],
        ["Unknown task 'nosuchtask'", "built-in tasks:"],
    ),
    "unknown-grader-eval": (
        [
            "eval",
            "--model",
            "{ws}/model",
            "--task",
            "{ws}/good.jsonl",
            "--grader",
            "nosuchgrader",
            "--out",
            "{ws}/prev",
        ],
        ["Unknown grader 'nosuchgrader'", "choose one of"],
    ),
}


@pytest.mark.parametrize("case", list(OTHER_COMMANDS))
def test_unknown_task_and_grader_in_the_other_commands(case, template, tmp_path, capsys, monkeypatch):
    from selfdistill.cli import app

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    args, needles = OTHER_COMMANDS[case]
    assert args[0] in names, f"`sdft {args[0]}` is not a command"
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    fill = lambda s: s.replace("{ws}", str(ws))  # noqa: E731
    before = tree_hashes(ws)
    code, err = run_sdft([fill(a) for a in args], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    message = err[err.index("error: ") :].strip()
    assert "\n" not in message and all(fill(n) in message for n in needles), message
    after = tree_hashes(ws)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already on disk changed
    assert all(v == "dir" for k, v in after.items() if k not in before)  # (eval makes its --out directory first)
