"""What the family-fidelity and teacher-buffer checks share: tests/test_families.py and
tests/test_teacher_buffers.py run them on CPU, benchmarks/gpu/check.py on the GPU.

Families: tests/data/families/<family>/ holds one model family's small text files (its special tokens
at their real ids, its chat template, its generation config, its architecture shrunk to hidden size 16);
`family_tokenizer` builds a word-level tokenizer around them and `family_model` a random model of that
architecture (tests/data/families/README.md says what is simplified). `emit_only` forces what a model
samples, so a rollout's stop can be provoked without trained weights.

Teacher buffers: `buffer_mismatches` lists where a teacher's buffers (rotary tables and any other
non-parameter state) differ from the student's in name, dtype or value.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from selfdistill.data import Record
from selfdistill.data.prompts import CONTEXT_PREFIX, TEACHER_TEMPLATES
from selfdistill.models.tiny import words_of

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "families"
RECORD = Record(prompt="What colour is the sky ?", demonstration="zebra quartz")
FILLER = "ok"  # what a forced rollout writes before its stop token


@dataclass(frozen=True)
class Family:
    turn_end: int  # the token the template ends an assistant turn with: what demonstrations end with
    stops: list[int]  # the generation config's EOS list, the tokenizer's EOS, the end of turn (in that order)
    prompt_start: list[str]  # how every prompt begins
    user_header: list[str]  # what opens a user turn
    generation_prompt: list[str]  # how every prompt ends: the assistant's header
    # The template renders an answered conversation as the prompt, then the answer. Not so for Qwen3
    # (it renders the last answer after an empty <think></think>, which the prompt does not hold) and
    # Olmo-3 Think (its prompt opens <think>, its rendered answer does not).
    answer_follows_prompt: bool


FAMILIES = {
    "qwen2.5": Family(
        151645,
        [151645, 151643],
        ["<|im_start|>", "system"],
        ["<|im_start|>", "user"],
        ["<|im_start|>", "assistant"],
        True,
    ),
    "qwen3": Family(
        151645,
        [151645, 151643],
        ["<|im_start|>", "user"],
        ["<|im_start|>", "user"],
        ["<|im_start|>", "assistant"],
        False,
    ),
    "llama-3.1": Family(
        128009,
        [128001, 128008, 128009],
        ["<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>"],
        ["<|start_header_id|>", "user", "<|end_header_id|>"],
        ["<|start_header_id|>", "assistant", "<|end_header_id|>"],
        True,
    ),
    "gemma-3": Family(
        106,
        [1, 106],
        ["<bos>", "<start_of_turn>", "user"],
        ["<start_of_turn>", "user"],
        ["<start_of_turn>", "model"],
        True,
    ),
    # A finished conversation's last answer ends with eos_token (<|endoftext|>), earlier ones with <|im_end|>.
    "olmo-3": Family(
        100257,
        [100265, 100257],
        ["<|im_start|>", "system"],
        ["<|im_start|>", "user"],
        ["<|im_start|>", "assistant", "<", "think", ">"],
        False,
    ),
}


def _vocabulary(source: Path, added: dict[int, dict]) -> dict[str, int]:
    """The special tokens at their real ids, then every word the templates and the checks write (from id 1000,
    clear of every family's special ids)."""
    vocab = {entry["content"]: i for i, entry in added.items()}
    vocab.setdefault("<unk>", 999)  # Gemma-3 has a real one (id 3); elsewhere a stand-in for unknown words
    # The template's literal text (its escaped newlines read as spaces), the teacher templates, the checks' words.
    text = (source / "chat_template.jinja").read_text().replace("\\n", " ")
    others = [*TEACHER_TEMPLATES.values(), CONTEXT_PREFIX, "system user assistant model", FILLER, RECORD.prompt]
    for word in words_of(" ".join([text, *others, RECORD.demonstration])):
        vocab.setdefault(word, 1000 + len(vocab))
    return vocab


def family_tokenizer(name: str, directory: Path):
    """The family's tokenizer as transformers loads it from tokenizer files, written into `directory`."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    source, directory = DATA / name, Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "tokenizer_config.json").read_text())
    added = {int(i): entry for i, entry in config["added_tokens_decoder"].items()}
    backend = Tokenizer(models.WordLevel(vocab=_vocabulary(source, added), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokens = [AddedToken(e["content"], normalized=False, special=e["special"]) for _, e in sorted(added.items())]
    backend.add_special_tokens([t for t in tokens if t.special])
    backend.add_tokens([t for t in tokens if not t.special])
    backend.save(str(directory / "tokenizer.json"))
    for file in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / file, directory / file)
    # No config.json beside them: for model type qwen2 transformers would swap in Qwen2Tokenizer,
    # which rebuilds the real byte-level pipeline around this word-level vocabulary.
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:  # as models.loading.load_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def family_model(name: str, seed: int = 0):
    """A random model of the family's own architecture (config.json) with its real generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DATA / name))
    model.generation_config = GenerationConfig.from_pretrained(DATA / name)
    return model


def emit_only(model, tokens: list[int]) -> None:
    """Give the model an output head whose logits ignore the hidden state: 0 for `tokens`, -30 for every other
    token, so a sample is one of `tokens`, each as likely (any other: under 1e-7 per step at 262k tokens).
    The head is built on the device of the model's input embedding."""
    device = model.get_input_embeddings().weight.device
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True, device=device)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[torch.tensor(tokens, device=device)] = 0.0
    model.set_output_embeddings(head)


def count(tokens: list[str], part: list[str]) -> int:
    """How often `part` occurs in `tokens` as a contiguous run."""
    return sum(tokens[i : i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


# ---------------------------------------------------------------------------------------------
# Teacher buffers

PEFT_PREFIX = "base_model.model."


def method_teacher_kinds() -> list[tuple[str, str]]:
    """(method, teacher kind) for every method that distils from a teacher, every kind it can take."""
    from selfdistill.registry import METHOD_INFO

    cases = []
    for name in sorted(METHOD_INFO):
        step = METHOD_INFO[name].step
        if step is not None and step.teacher is not None:  # the methods that distil from a teacher
            kinds = [step.fixed_teacher] if step.fixed_teacher else ["ema", "frozen", "live"]
            cases += [(name, kind) for kind in kinds]
    return cases


def _buffers(module) -> dict[str, torch.Tensor]:
    return {name.removeprefix(PEFT_PREFIX): b for name, b in module.named_buffers()}


def buffer_mismatches(teacher_model, student) -> list[str]:
    """Where the teacher's buffers differ from the student's (names, dtypes, values bit for bit); empty when
    they are the same and hold the rotary table `inv_freq`."""
    ours, theirs = _buffers(teacher_model), _buffers(student)
    problems = []
    if ours.keys() != theirs.keys():
        problems.append(f"buffer names differ: {sorted(ours.keys() ^ theirs.keys())}")
    if not any("inv_freq" in name for name in ours):
        problems.append("no inv_freq buffer")
    for name in ours.keys() & theirs.keys():
        if ours[name].dtype != theirs[name].dtype:
            problems.append(f"{name}: {ours[name].dtype}, the student's {theirs[name].dtype}")
        elif ours[name].device != theirs[name].device or not torch.equal(ours[name], theirs[name]):
            problems.append(f"{name}: other values (or device) than the student's")
    return problems
