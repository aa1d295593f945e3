"""What a saved run says about the model it started from: an adapter names a base model other machines can
load (never a path in this machine's cache), the card says what the embedded model is, and LoRA runs print
no third-party deprecation warning."""

from __future__ import annotations

import json
import warnings

import selfdistill
from selfdistill.models.lora import apply_lora
from selfdistill.models.tiny import save_tiny, tiny_model, tiny_tokenizer

RECORDS = [
    {"prompt": "who won the prize", "demonstration": "Ilse won it", "answer": "Ilse"},
    {"prompt": "when did it open", "demonstration": "it opened in March", "answer": "March"},
]


def test_a_lora_run_from_the_embedded_model_names_the_hub_model_as_the_adapters_base(tmp_path, monkeypatch):
    # The embedded alias resolves to its converted copy in the cache; a tiny model stands in for it there.
    cache = tmp_path / "cache"
    words = sorted({w for r in RECORDS for v in r.values() for w in v.split()})
    save_tiny(cache / "models" / "smollm2-135m", extra_words=words)
    monkeypatch.setenv("SELFDISTILL_CACHE", str(cache))
    cfg = selfdistill.Config(
        method="sft",
        model={"name": "smollm2-135m", "precision": "fp32", "lora": {"enabled": True, "rank": 4}},
        train={"max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "output_dir": str(tmp_path / "run")},
    )
    result = selfdistill.train(cfg, records=RECORDS)
    adapter = json.loads((result.final_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert str(cache) not in (result.final_dir / "adapter" / "adapter_config.json").read_text()
    card = (result.final_dir / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "Q4_1 GGUF" in card and "dequantized" in card


def test_a_lora_run_from_a_directory_names_that_directory(tmp_path):
    words = sorted({w for r in RECORDS for v in r.values() for w in v.split()})
    model_dir = save_tiny(tmp_path / "tiny", extra_words=words)
    cfg = selfdistill.Config(
        method="sft",
        model={"name": str(model_dir), "precision": "fp32", "lora": {"enabled": True, "rank": 4}},
        train={"max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "output_dir": str(tmp_path / "run")},
    )
    result = selfdistill.train(cfg, records=RECORDS)
    adapter = json.loads((result.final_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_dir)
    assert "Q4_1" not in (result.final_dir / "README.md").read_text()


def test_applying_lora_warns_of_nothing():
    model = tiny_model(tiny_tokenizer(["a", "b"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, rank=4)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
