"""The built-in general prompts: everyday requests that none of the evaluation's probes or drift prompts repeat.

They are what a method rehearses the model's general behaviour on when the user gives no data
of their own: `sft_replay` mixes the starting model's own answers to them into training, and
`sft_reinvoke` distils the starting model back on them. Keeping them apart from the prior-capability
probes and the drift prompts keeps those two measurements free of anything trained on.
"""

from __future__ import annotations

import json
from importlib import resources


def general_prompts() -> list[str]:
    path = resources.files("selfdistill") / "resources" / "replay_prompts.json"
    return json.loads(path.read_text(encoding="utf-8"))["prompts"]
