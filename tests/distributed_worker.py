"""Trains the tiny toy setup; run by tests/test_distributed.py once plainly and once under torchrun."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from selfdistill.config import load_config  # noqa: E402
from selfdistill.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from selfdistill.train import train  # noqa: E402
from toy import KEYS, VALUES, toy_records  # noqa: E402

out = Path(sys.argv[1])
tok = tiny_tokenizer(KEYS + VALUES)
model = tiny_model(tok, seed=0)
cfg = load_config(overrides={
    "model": {"precision": "fp32"},
    "rollout": {"max_new_tokens": 4},
    "loss": {"skip_first_tokens": 1, "chunk_size": 3},
    "train": {"output_dir": str(out), "batch_size": 8, "micro_batch_size": 3, "max_steps": 3, "lr": 1e-3},
})
result = train(cfg, records=toy_records(), model=model, tokenizer=tok)
import torch.distributed as dist  # noqa: E402

world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
if not dist.is_initialized() or dist.get_rank() == 0:
    (out / "world.json").write_text(json.dumps({"world_size": world, "losses": [m["loss"] for m in result.metrics]}))
