"""Sharded loading and final/ writing, on one plain process (the torchrun cases are in test_distributed)."""

import pytest
import torch
from safetensors.torch import load_file
from toy import KEYS, VALUES

from selfdistill.models import apply_lora, save_model
from selfdistill.models.sharded import empty_model, fill_from_files, init_lora, materialize, write_final
from selfdistill.models.tiny import tiny_model, tiny_tokenizer


def _saved(tmp_path, tied=False):
    tok = tiny_tokenizer(KEYS + VALUES)
    model = tiny_model(tok, seed=0, tied=tied)
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    tok.save_pretrained(tmp_path / "saved")
    return model, tok


def _weights(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_an_empty_model_filled_from_its_files_is_the_saved_model(tmp_path, tied):
    model, _ = _saved(tmp_path, tied)
    empty = empty_model(str(tmp_path / "saved"), torch.float32)
    assert all(p.is_meta for p in empty.parameters()) and not any(b.is_meta for b in empty.buffers())
    materialize(empty, torch.device("cpu"))
    assert fill_from_files(empty, tmp_path / "saved") == []
    for (name, a), b in zip(model.state_dict().items(), empty.state_dict().values()):
        assert torch.equal(a, b), name
    if tied:
        assert empty.lm_head.weight is empty.model.embed_tokens.weight


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("part_bytes", [2**30, 40_000], ids=["one-file", "parts"])
def test_final_written_parameter_by_parameter_is_what_save_model_writes(tmp_path, lora, part_bytes):
    model, tok = _saved(tmp_path)
    if lora:
        model = apply_lora(model, 4, 8.0, target_modules=["q_proj", "v_proj"])
        init_lora(model, seed=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()  # a trained adapter: the merge must matter
    save_model(model, tok, tmp_path / "reference")
    (tmp_path / "streamed").mkdir()
    write_final(model, tok, tmp_path / "streamed", is_main=True, part_bytes=part_bytes)
    if part_bytes < 2**30:
        assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) > 1
    reference, streamed = _weights(tmp_path / "reference"), _weights(tmp_path / "streamed")
    assert reference.keys() == streamed.keys()
    for name in reference:
        assert reference[name].dtype == streamed[name].dtype and torch.equal(reference[name], streamed[name]), name
    if lora:
        a = load_file(str(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "streamed" / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_starts_the_same_for_a_seed_and_differently_for_another():
    def start(seed):
        model = apply_lora(tiny_model(tiny_tokenizer(), seed=0), 4, 8.0, target_modules=["q_proj"])
        init_lora(model, seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    one, again, other = start(1), start(1), start(2)
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert all(float(v.abs().max()) == 0 for k, v in one.items() if "lora_B" in k)
    assert any(not torch.equal(one[k], other[k]) for k in one if "lora_A" in k)
