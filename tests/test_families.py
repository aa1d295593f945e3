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
The families and their helpers live in benchmarks/gpu/fidelity.py, which the GPU check
(benchmarks/gpu/check.py) runs the same cases with on the GPU.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, GenerationConfig

from benchmarks.gpu.fidelity import DATA, FAMILIES, FILLER, RECORD, count, emit_only, family_model, family_tokenizer
from selfdistill.config import load_config
from selfdistill.data import PromptBuilder
from selfdistill.data.prompts import end_of_turn_token_id
from selfdistill.methods.build import build_method
from selfdistill.models import stop_token_ids
from selfdistill.models.tiny import tiny_tokenizer, words_of


@pytest.fixture(scope="module")
def tokenizer_of(tmp_path_factory):
    """name -> the family's tokenizer, as transformers loads it from tokenizer files (built once per family)."""
    built = {}

    def load(name: str):
        if name not in built:
            built[name] = family_tokenizer(name, tmp_path_factory.mktemp(name))
        return built[name]

    return load


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
    method = build_method(cfg, model, tok, builder, stop_token_ids(model, tok), tok.pad_token_id)
    prompts = ([encoded.student_ids] * 8, [encoded.teacher_ids] * 8)
    items, stats = method.rollouts.sample(model, *prompts, [0] * 8, list(range(8)), 0)
    for item in items:
        assert item.finished and item.completion[-1] == stop, item.completion
        assert item.completion[:-1] == [tok.convert_tokens_to_ids(FILLER)] * (len(item.completion) - 1)
    assert max(len(i.completion) for i in items) > 1 and stats["clipped_ratio_sum"] == 0


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
        assert count(tokens, family.user_header) == 1
        assert count(tokens, question) == 1
        # The template's text tokenized once: no second BOS, nothing added or lost.
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        if tok.bos_token and family.prompt_start[0] == tok.bos_token:
            assert tokens.count(tok.bos_token) == 1
    assert count(tok.convert_ids_to_tokens(encoded.teacher_ids), demonstration) == 1
    assert count(tok.convert_ids_to_tokens(encoded.student_ids), demonstration) == 0


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
