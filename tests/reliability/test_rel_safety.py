"""Safe loading: no remote code unless asked, weights only from safetensors/GGUF, trainer state
without pickle code, and nothing written outside the run directory."""

import json
import os
import pickle
from pathlib import Path

import pytest
from reltools import train_tiny, tree_hashes

from selfdistill.config import load_config
from selfdistill.errors import UserError
from selfdistill.models.loading import load_model
from selfdistill.models.tiny import save_tiny
from selfdistill.training.checkpoint import inside, latest_checkpoint, save_checkpoint


class _Planted:
    """Unpickling this creates a marker file: proof that code in a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    assert load_config().model.trust_remote_code is False
    model_dir = save_tiny(tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (model_dir / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote-code-ran"
    (model_dir / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig as Config, LlamaForCausalLM as Model\n"
    )
    try:
        load_model(str(model_dir))
    except UserError:
        pass  # refusing is as good as ignoring the code; running it is not
    assert not marker.exists()


def test_pickled_weights_are_refused_unread(tmp_path):
    model_dir = save_tiny(tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(UserError, match="no .safetensors weights.*pytorch_model.bin.*safe_serialization=True"):
        load_model(str(model_dir))
    assert not marker.exists()


def test_trainer_state_is_read_without_running_pickle_code(tmp_path):
    out = tmp_path / "run"
    train_tiny(out, max_steps=2, save_every=1)
    checkpoint = latest_checkpoint(out)
    marker = tmp_path / "pickle-ran"
    (checkpoint / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": _Planted(marker)}))
    before = tree_hashes(out)
    with pytest.raises(UserError) as err:
        train_tiny(out, resume=True, max_steps=2, save_every=1)
    assert not marker.exists()
    assert f"Checkpoint {checkpoint} cannot be read" in str(err.value) and "previous checkpoint" in str(err.value)
    assert tree_hashes(out) == before


def test_writes_cannot_escape_the_run_directory(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    assert inside(root, "checkpoints", "step-000001") == root / "checkpoints" / "step-000001"
    for bad in (("..", "elsewhere"), ("checkpoints", "..", "..", "x"), (str(tmp_path / "abs"),)):
        with pytest.raises(UserError, match="outside the run directory"):
            inside(root, *bad)
    for step in (-1, "../x", 1.5):
        with pytest.raises(ValueError):
            save_checkpoint(root, step, None, None, None, None, None, {})
    # A whole run writes only under train.output_dir.
    out = tmp_path / "nested" / "run"
    siblings_before = tree_hashes(tmp_path)
    train_tiny(out, max_steps=1)
    written = set(tree_hashes(tmp_path)) - set(siblings_before)
    assert written and all(p == "nested" or p.startswith(os.path.join("nested", "run")) for p in written), written
