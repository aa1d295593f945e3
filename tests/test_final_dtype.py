"""final/ in the checkpoint's own dtype (model.save_dtype): a bf16 run of a model published in bf16 saves bf16
weights with config.json saying so, the size vLLM and transformers serve; fp32 runs and `save_dtype: fp32` keep fp32."""

import json

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.api import train
from selfdistill.config import load_config
from selfdistill.models.saving import final_dtype, published_dtype
from selfdistill.models.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def published_bf16(tmp_path_factory):
    """A tiny model saved in bf16, as most hub checkpoints are."""
    directory = tmp_path_factory.mktemp("published") / "bf16"
    tok = tiny_tokenizer(["alpha", "beta"])
    tiny_model(tok, seed=0).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def _train(tmp_path, model_dir, **model_settings):
    records = [{"prompt": f"say {w}", "demonstration": w} for w in ("alpha", "beta")] * 2
    cfg = load_config(
        overrides={
            "method": "sft",
            "model": {"name": str(model_dir), **model_settings},
            "train": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "micro_batch_size": 2, "max_steps": 1},
        }
    )
    train(cfg, records=records)
    final = tmp_path / "run" / "final"
    weights = load_file(str(final / "model.safetensors"))
    return {v.dtype for v in weights.values()}, json.loads((final / "config.json").read_text())["dtype"]


def test_published_dtype_is_read_from_config_json(published_bf16, tmp_path):
    assert published_dtype(str(published_bf16)) == torch.bfloat16
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))  # the older key
    assert published_dtype(str(tmp_path)) == torch.float16
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert published_dtype(str(tmp_path)) is None


def test_a_bf16_run_saves_in_the_published_dtype(published_bf16, tmp_path):
    assert _train(tmp_path, published_bf16, precision="bf16") == ({torch.bfloat16}, "bfloat16")


def test_an_fp32_run_and_save_dtype_fp32_save_fp32(published_bf16, tmp_path):
    assert _train(tmp_path / "a", published_bf16, precision="fp32") == ({torch.float32}, "float32")
    assert _train(tmp_path / "b", published_bf16, precision="bf16", save_dtype="fp32") == (
        {torch.float32},
        "float32",
    )


def test_the_choice_and_a_model_given_in_memory():
    model = tiny_model(tiny_tokenizer([]), seed=0)  # no published dtype: its weights' own
    assert final_dtype("auto", "bf16", model) is None
    assert final_dtype("bf16", "fp32", model) == torch.bfloat16
    model.published_dtype = torch.bfloat16
    assert final_dtype("auto", "bf16", model) == torch.bfloat16 and final_dtype("auto", "fp32", model) is None
