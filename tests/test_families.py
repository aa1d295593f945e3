"""Model-family fidelity: each family's real special-token ids, chat template and generation config.

For the architectures the product ships a file for (Qwen2.5, Llama-3.1) and those users fine-tune today
(Qwen3, Gemma-3, and Olmo-3, the paper's reasoning model), tests/data/families/<family>/ holds that
family's small text files: tokenizer_config.json (its special tokens at their real ids),
chat_template.jinja, generation_config.json, and a config.json of the family's own architecture shrunk
to hidden size 16 (no weights: the model is random). The tokenizer is word-level, its vocabulary only
the words the tests use plus the special tokens at their real ids (tests/data/families/README.md says
what is simplified). On CPU the tests show that rollouts stop at the end of the turn (and on every id
the generation config lists), that demonstrations end with the token the template ends an assistant
turn with, and that student and teacher prompts render through the family's template.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from selfdistill.config import load_config
from selfdistill.data import PromptBuilder, Record
from selfdistill.data.prompts import CONTEXT_PREFIX, TEACHER_TEMPLATES, end_of_turn_token_id
from selfdistill.methods import get_method
from selfdistill.models import stop_token_ids
from selfdistill.models.tiny import tiny_tokenizer, words_of

DATA = Path(__file__).parent / "data" / "families"
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
    """The special tokens at their real ids, then every word the templates and the tests write (from id 1000,
    clear of every family's special ids)."""
    vocab = {entry["content"]: i for i, entry in added.items()}
    vocab.setdefault("<unk>", 999)  # Gemma-3 has a real one (id 3); elsewhere a stand-in for unknown words
    # The template's literal text (its escaped newlines read as spaces), the teacher templates, the tests' words.
    text = (source / "chat_template.jinja").read_text().replace("\\n", " ")
    others = [*TEACHER_TEMPLATES.values(), CONTEXT_PREFIX, "system user assistant model", FILLER, RECORD.prompt]
    for word in words_of(" ".join([text, *others, RECORD.demonstration])):
        vocab.setdefault(word, 1000 + len(vocab))
    return vocab


@pytest.fixture(scope="module")
def tokenizer_of(tmp_path_factory):
    """name -> the family's tokenizer, as transformers loads it from tokenizer files (built once per family)."""
    built = {}

    def load(name: str):
        if name not in built:
            source, directory = DATA / name, tmp_path_factory.mktemp(name)
            config = json.loads((source / "tokenizer_config.json").read_text())
            added = {int(i): entry for i, entry in config["added_tokens_decoder"].items()}
            backend = Tokenizer(models.WordLevel(vocab=_vocabulary(source, added), unk_token="<unk>"))
            backend.pre_tokenizer = pre_tokenizers.Whitespace()
            tokens = [
                AddedToken(e["content"], normalized=False, special=e["special"]) for _, e in sorted(added.items())
            ]
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
            built[name] = tokenizer
        return built[name]

    return load


def family_model(name: str, seed: int = 0):
    """A random model of the family's own architecture (config.json) with its real generation config."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DATA / name))
    model.generation_config = GenerationConfig.from_pretrained(DATA / name)
    return model


def emit_only(model, tokens: list[int]) -> None:
    """Give the model an output head whose logits ignore the hidden state: 0 for `tokens`, -30 for every other
    token, so a sample is one of `tokens`, each as likely (any other: under 1e-7 per step at 262k tokens)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[torch.tensor(tokens)] = 0.0
    model.set_output_embeddings(head)


@pytest.mark.parametrize("name", FAMILIES)
def test_special_tokens_have_their_real_ids(name, tokenizer_of):
    tok = tokenizer_of(name)
    config = json.loads((DATA / name / "tokenizer_config.json").read_text())
    for i, entry in config["added_tokens_decoder"].items():
        assert tok.convert_tokens_to_ids(entry["content"]) == int(i)
        assert tok.encode(entry["content"], add_special_tokens=False) == [int(i)]
    assert AutoConfig.from_pretrained(DATA / name).vocab_size > max(FAMILIES[name].stops)


@pytest.mark.parametrize("name", FAMILIES)
def test_stop_ids_are_every_listed_eos_the_tokenizers_and_the_end_of_turn(name, tokenizer_of):
    tok, family = tokenizer_of(name), FAMILIES[name]
    listed = GenerationConfig.from_pretrained(DATA / name).eos_token_id
    assert stop_token_ids(family_model(name), tok) == family.stops
    assert set(family.stops) == {*listed, tok.eos_token_id, family.turn_end}


def test_the_end_of_turn_stops_even_where_the_generation_config_omits_it(tokenizer_of):
    tok, model = tokenizer_of("llama-3.1"), family_model("llama-3.1")
    model.generation_config.eos_token_id = 128001  # <|end_of_text|> alone, as some fine-tunes ship it
    assert stop_token_ids(model, tok) == [128001, 128009]


@pytest.mark.parametrize(
    ("name", "stop"),
    [(name, stop) for name, family in FAMILIES.items() for stop in family.stops],
    ids=[f"{name}-{stop}" for name, family in FAMILIES.items() for stop in family.stops],
)
def test_rollouts_stop_at_the_end_of_the_turn_and_on_every_listed_id(name, stop, tokenizer_of, tmp_path):
    """SDFT's rollouts with the stop ids training gives it: a model that writes only a filler word or `stop`
    stops right after `stop`, every time, before the token budget."""
    tok = tokenizer_of(name)
    model = family_model(name)
    emit_only(model, [tok.convert_tokens_to_ids(FILLER), stop])
    cfg = load_config(
        overrides={
            "method": "sdft",
            "model": {"precision": "fp32"},
            "rollout": {"max_new_tokens": 32},
            "train": {"output_dir": str(tmp_path)},
        }
    )
    builder = PromptBuilder.from_config(tok, cfg.data)
    encoded = builder.encode(RECORD)
    method = get_method("sdft")(cfg, model, tok, builder, stop_token_ids(model, tok), tok.pad_token_id)
    items, stats = method.rollouts([encoded.student_ids] * 8, [encoded.teacher_ids] * 8, [0] * 8, list(range(8)), 0)
    for item in items:
        assert item.finished and item.completion[-1] == stop, item.completion
        assert item.completion[:-1] == [tok.convert_tokens_to_ids(FILLER)] * (len(item.completion) - 1)
    assert max(len(i.completion) for i in items) > 1 and stats["clipped"] == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_demonstrations_end_with_the_token_that_ends_an_assistant_turn(name, tokenizer_of):
    tok, family = tokenizer_of(name), FAMILIES[name]
    assert end_of_turn_token_id(tok) == family.turn_end
    builder = PromptBuilder(tok, template="plain")
    encoded = builder.encode(RECORD)
    demonstration = tok.encode(RECORD.demonstration, add_special_tokens=False)
    assert encoded.demonstration_ids == demonstration + [family.turn_end]
    # The template's own rendering of the answered conversation closes the answer with the same token.
    answered = builder.student_messages(RECORD) + [{"role": "assistant", "content": RECORD.demonstration}]
    rendered = tok.encode(tok.apply_chat_template(answered, tokenize=False), add_special_tokens=False)
    at = len(rendered) - rendered[::-1].index(demonstration[-1])  # just after the answer's last word
    assert rendered[at] == family.turn_end
    if family.answer_follows_prompt:  # what SFT trains on is the template's conversation, token for token
        target = encoded.student_ids + encoded.demonstration_ids
        assert rendered[: len(target)] == target


@pytest.mark.parametrize("name", FAMILIES)
def test_student_and_teacher_prompts_render_through_the_family_template(name, tokenizer_of):
    tok, family = tokenizer_of(name), FAMILIES[name]
    builder = PromptBuilder(tok, template="paper")
    encoded = builder.encode(RECORD)
    question, demonstration = words_of(RECORD.prompt), words_of(RECORD.demonstration)
    for ids, messages in (
        (encoded.student_ids, builder.student_messages(RECORD)),
        (encoded.teacher_ids, builder.teacher_messages(RECORD)),
    ):
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens[: len(family.prompt_start)] == family.prompt_start
        assert tokens[-len(family.generation_prompt) :] == family.generation_prompt
        assert _count(tokens, family.user_header) == 1
        assert _count(tokens, question) == 1
        # The template's text tokenized once: no second BOS, nothing added or lost.
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        if tok.bos_token and family.prompt_start[0] == tok.bos_token:
            assert tokens.count(tok.bos_token) == 1
    assert _count(tok.convert_ids_to_tokens(encoded.teacher_ids), demonstration) == 1
    assert _count(tok.convert_ids_to_tokens(encoded.student_ids), demonstration) == 0


def _count(tokens: list[str], part: list[str]) -> int:
    return sum(tokens[i : i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def test_the_end_of_turn_falls_back_to_the_tokenizers_eos():
    tok = tiny_tokenizer()
    assert end_of_turn_token_id(tok) == tok.eos_token_id  # its template ends turns with its EOS, <|end|>
    for template in (
        "{{ raise_exception('only user turns') }}",  # the template refuses the probe conversation
        "{% for m in messages %}{{ m['content'] }} question {% endfor %}",  # plain text after the answer
        "{% for m in messages %}{{ m['role'] }} {% endfor %}",  # the answer is not rendered at all
    ):
        tok.chat_template = template
        assert end_of_turn_token_id(tok) == tok.eos_token_id, template
    tok.chat_template = None
    assert end_of_turn_token_id(tok) == tok.eos_token_id
