"""The pieces of `sdft serve`'s engines that run without vLLM: adapters stacked into one against the base model,
the leases a version swap waits on, a stream whose client left, the round's GPUs, the engine's name."""

import json
import threading
import time

import httpx
import pytest
import torch
from test_serve import Server

from selfdistill.errors import UserError
from selfdistill.models.lora import stack_adapters
from selfdistill.models.tiny import tiny_model, tiny_tokenizer
from selfdistill.sampling import SamplingSettings, make_sampler
from selfdistill.serve.host import _Leases, make_serving_engine, wait_for
from selfdistill.serve.rounds import RoundRunner


def _round_of_lora(model, directory, seed: int, use_rslora: bool = False):
    """As a round would: an adapter (random factors) on `model`, saved to `directory`; returns the merged model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8.0, target_modules="all-linear", use_rslora=use_rslora, task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    adapted.save_pretrained(directory)
    return adapted.merge_and_unload()


def test_stacked_adapters_on_the_base_equal_the_rounds_merged_one_after_the_other(tmp_path):
    """Version 2 = base + round 1's adapter, merged, + round 2's adapter (with rsLoRA scaling): one stacked adapter
    of rank 8 on the base model computes the same logits."""
    from peft import PeftModel

    tok = tiny_tokenizer()
    base = tiny_model(tok, hidden_size=32, layers=2, heads=2, seed=0)
    reference = tiny_model(tok, hidden_size=32, layers=2, heads=2, seed=0)
    merged = _round_of_lora(reference, tmp_path / "a1", seed=1)
    merged = _round_of_lora(merged, tmp_path / "a2", seed=2, use_rslora=True)

    out = stack_adapters([tmp_path / "a1", tmp_path / "a2"], tmp_path / "stacked", base_model="the-base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 8, False)
    assert config["base_model_name_or_path"] == "the-base"
    stacked = PeftModel.from_pretrained(base, out)
    tokens = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = merged(tokens).logits, stacked(tokens).logits
        untouched = tiny_model(tok, hidden_size=32, layers=2, heads=2, seed=0)(tokens).logits
    assert (want - untouched).abs().max() > 0.1  # the two rounds changed the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_adapter_that_is_no_plain_lora_is_refused_naming_its_file_and_field(tmp_path):
    tok = tiny_tokenizer()
    _round_of_lora(tiny_model(tok, hidden_size=32, layers=1, heads=2), tmp_path / "a1", seed=1)
    path = tmp_path / "a1" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match=r"a1/adapter_config.json: use_dora=True cannot be stacked"):
        stack_adapters([tmp_path / "a1"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_waiting_swap_holds_new_requests_back_until_the_running_ones_finish():
    leases, events = _Leases(), []
    first_in, let_first_go = threading.Event(), threading.Event()

    def request(name: str, entered: threading.Event | None = None, hold: threading.Event | None = None):
        with leases.read():
            events.append(f"{name} in")
            if entered:
                entered.set()
            if hold:
                hold.wait(10)
            events.append(f"{name} out")

    def swap():
        with leases.write():
            events.append("swap")

    running = threading.Thread(target=request, args=("first", first_in, let_first_go))
    running.start()
    first_in.wait(10)
    swapping = threading.Thread(target=swap)
    swapping.start()
    time.sleep(0.2)
    later = threading.Thread(target=request, args=("second",))
    later.start()
    time.sleep(0.2)
    assert events == ["first in"]  # the swap waits for the first; the second waits behind the swap
    let_first_go.set()
    for thread in (running, swapping, later):
        thread.join(10)
    assert events == ["first in", "first out", "swap", "second in", "second out"]


def test_a_stream_whose_consumer_left_stops_decoding():
    """Closing the token stream after two tokens ends the decode loop at its next token, not at its budget."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, hidden_size=32, layers=1, heads=2)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    settings = SamplingSettings(max_new_tokens=400, stop_token_ids=(), pad_token_id=tok.pad_token_id, temperature=0)
    stream = make_sampler(model, settings).stream([5, 6, 7], None)
    assert len([next(stream), next(stream)]) == 2
    stream.close()
    assert wait_for(lambda: not any(t.name == "selfdistill-stream" for t in threading.enumerate()), 10)
    assert len(calls) < 20  # 400 forwards if it had run on


def test_a_round_on_several_gpus_runs_under_torchrun_on_those_gpus(tmp_path, learner_dir):
    from selfdistill.learner import Learner

    learner = Learner(learner_dir, echo=lambda _: None)
    assert RoundRunner(learner).command(["train.lr=1e-4"])[1:] == [
        "-m",
        "selfdistill.cli",
        "learn",
        "round",
        str(learner.root),
        "--set",
        "train.lr=1e-4",
    ]
    several = RoundRunner(learner, devices="1, 2")
    assert several.devices == ["1", "2"]
    assert several.command()[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]


def test_an_unknown_engine_is_refused():
    with pytest.raises(UserError, match="--engine 'gpu': expected decode, vllm, or the URL"):
        make_serving_engine("gpu")
    with pytest.raises(UserError, match="no vLLM server answers there"):
        make_serving_engine("http://127.0.0.1:9")


def test_a_client_that_leaves_a_stream_gives_its_lease_back(learner_dir):
    with Server(learner_dir) as server:
        body = {"messages": [{"role": "user", "content": "k1 k2"}], "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.headers["x-selfdistill-version"] == "0"
            next(response.iter_lines())
        leases = server.app.state.host._leases
        assert wait_for(lambda: leases._readers == 0, 10)
        assert server.app.state.host.engine.name == "decode"
