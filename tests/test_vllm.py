"""rollout.engine=vllm: the in-process vLLM engine against our decode loop and the trainer, and every
caller that samples through it (SDFT, offline_distill's teacher answers, `sdft diagnose`, evaluation and
drift's base answers).

These run in the vLLM environment (`make test-vllm`, built by scripts/setup_vllm_env.sh) and are
skipped where vLLM is not installed; the last test checks the error a user gets there instead.
All comparisons are in fp32, where vLLM's numbers match the trainer's.
"""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from selfdistill.config import load_config
from selfdistill.errors import UserError
from selfdistill.models.tiny import tiny_model, tiny_tokenizer

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed (scripts/setup_vllm_env.sh builds its environment)"
)
LONG = 300  # longer than 256 tokens: a prompt that spans several prefix-cache blocks


def _model(seed=0, extra_words=()):
    """A tiny Llama whose next-token distributions are peaked, so greedy choices are not near-ties.

    Head size 64: vLLM's CPU attention supports a fixed set of head sizes (the test default, 16, is not one).
    Output head tied to the input embedding, as in SmolLM2, Qwen2.5-1.5B and Llama 3.2: the engine's
    packed copy of a tied head must be rebuilt at every sync (the untied case runs in the two-process test).
    """
    tok = tiny_tokenizer(list(extra_words))
    model = tiny_model(tok, hidden_size=128, layers=2, heads=2, seed=seed, tied=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return model, tok


def _prompts(tok, lengths=(5, 9, LONG), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, len(tok), (n,), generator=g).tolist() for n in lengths]


def _trainer_logprobs(model, prompt, completion):
    with torch.no_grad():
        logp = model(torch.tensor([prompt + completion])).logits.float().log_softmax(-1)[0]
    return torch.tensor([float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(completion)])


@pytest.fixture(scope="module")
def engine():
    from selfdistill.sampling.vllm_engine import VLLMEngine

    model, _ = _model()
    built = VLLMEngine(model, precision="fp32", max_model_len=512)
    yield built
    built.close()


@needs_vllm
def test_greedy_tokens_equal_our_decode_loop(engine):
    from selfdistill.sampling.decode import generate

    model, tok = _model()
    engine.sync(model)
    prompts = _prompts(tok)
    stop = [tok.eos_token_id]
    ours = generate(
        model, prompts, stop_token_ids=stop, pad_token_id=tok.pad_token_id, max_new_tokens=12, temperature=0
    )
    theirs = engine.generate(prompts, stop_token_ids=stop, max_new_tokens=12, temperature=0)
    assert theirs.ids == ours.ids
    assert theirs.finished == ours.finished
    assert any(len(c) > 1 for c in theirs.ids)
    for prompt, completion, logprobs in zip(prompts, theirs.ids, theirs.logprobs):
        torch.testing.assert_close(
            torch.tensor(logprobs), _trainer_logprobs(model, prompt, completion), atol=1e-4, rtol=0
        )


@needs_vllm
def test_logprobs_match_the_trainer_after_an_optimizer_step_and_a_sync(engine):
    model, tok = _model()
    engine.sync(model)
    prompts = _prompts(tok, lengths=(LONG, 7), seed=1)
    seeds = [11, 12]
    before = engine.generate(prompts, stop_token_ids=[], max_new_tokens=8, temperature=1.0, seeds=seeds)
    # One optimizer step that moves every weight noticeably.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([prompts[0][:40]])
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    seconds = engine.sync(model)
    assert seconds >= 0
    after = engine.generate(prompts, stop_token_ids=[], max_new_tokens=8, temperature=1.0, seeds=seeds)
    for prompt, completion, logprobs in zip(prompts, after.ids, after.logprobs):
        expected = _trainer_logprobs(model, prompt, completion)
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)
    # The long prompt's cached prefix from the old weights was not reused: its numbers moved.
    assert after.ids != before.ids or max(abs(a - b) for a, b in zip(after.logprobs[0], before.logprobs[0])) > 1e-2


@needs_vllm
def test_samples_do_not_depend_on_the_batch_in_fp32(engine):
    model, tok = _model()
    engine.sync(model)
    prompts = _prompts(tok, lengths=(6, 12, 20), seed=2)
    together = engine.generate(prompts, stop_token_ids=[], max_new_tokens=10, temperature=1.0, seeds=[1, 2, 3])
    alone = engine.generate(prompts[1:2], stop_token_ids=[], max_new_tokens=10, temperature=1.0, seeds=[2])
    assert alone.ids[0] == together.ids[1]
    other_seed = engine.generate(prompts[1:2], stop_token_ids=[], max_new_tokens=10, temperature=1.0, seeds=[99])
    assert other_seed.ids[0] != together.ids[1]


@needs_vllm
def test_lora_syncs_the_merged_weights(engine):
    from selfdistill.models.lora import apply_lora

    model, tok = _model()
    lora = apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    engine.sync(lora)
    prompts = _prompts(tok, lengths=(10,), seed=3)
    out = engine.generate(prompts, stop_token_ids=[], max_new_tokens=6, temperature=1.0, seeds=[5])
    torch.testing.assert_close(
        torch.tensor(out.logprobs[0]), _trainer_logprobs(lora, prompts[0], out.ids[0]), atol=1e-4, rtol=0
    )
    plain, _ = _model()
    assert (_trainer_logprobs(plain, prompts[0], out.ids[0]) - torch.tensor(out.logprobs[0])).abs().max() > 1e-2


def _toy_config(tmp_path, **train):
    return load_config(
        overrides={
            "model": {"precision": "fp32"},
            "data": {"teacher_template": "plain", "max_prompt_tokens": 256},
            "rollout": {"engine": "vllm", "max_new_tokens": 4},
            "loss": {"skip_first_tokens": 0},
            "train": {
                "output_dir": str(tmp_path / "run"),
                "batch_size": 4,
                "micro_batch_size": 2,
                "lr": 1e-3,
                "warmup_ratio": 0.25,
                "max_steps": 4,
                **train,
            },
        }
    )


@needs_vllm
def test_resume_with_vllm_rollouts_repeats_the_straight_run(tmp_path):
    from toy import KEYS, VALUES, toy_records

    from selfdistill.training.loop import train

    records = toy_records()
    model, tok = _model(extra_words=KEYS + VALUES)
    straight = train(_toy_config(tmp_path / "a"), records=records, model=model, tokenizer=tok, save_final=False)
    assert all(m["time_weight_sync"] > 0 for m in straight.metrics)
    assert all("importance_ratio_mean" in m for m in straight.metrics)
    # fp32 sampler and trainer: the ratios are 1 up to rounding, so nothing is clipped.
    for m in straight.metrics:
        assert abs(m["importance_ratio_mean"] - 1.0) < 1e-3 and m["importance_clipped_fraction"] == 0.0

    cfg = _toy_config(tmp_path / "b", save_every=2)
    model, tok = _model(extra_words=KEYS + VALUES)
    train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    checkpoints = sorted((tmp_path / "b" / "run" / "checkpoints").iterdir())
    shutil.rmtree(checkpoints[-1])  # as if the run had died after step 2
    model, tok = _model(extra_words=KEYS + VALUES)
    resumed = train(cfg, records=records, model=model, tokenizer=tok, resume=True, save_final=False)
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=1e-5)
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    resumed_losses = [json.loads(line)["loss"] for line in lines]
    assert resumed_losses == pytest.approx([m["loss"] for m in straight.metrics], rel=1e-5)


def _learning_config(out, *, lora: bool, teacher: str, steps: int, lr: float, **sections):
    """SDFT (or the method in `sections`) with vLLM rollouts on a tiny memorisation set (the prompt/context
    lengths of `_toy_config`: the same engine serves every SDFT run of the module)."""
    return load_config(
        overrides={
            **sections,
            "model": {"precision": "fp32", "lora": {"enabled": lora, "rank": 4, "alpha": 8.0}},
            "data": {"teacher_template": "plain", "max_prompt_tokens": 256},
            "rollout": {"engine": "vllm", "max_new_tokens": 4, "num_rollouts": 4},
            "loss": {"skip_first_tokens": 0},
            "teacher": {"kind": teacher},
            "train": {
                "output_dir": str(out),
                "batch_size": 2,
                "micro_batch_size": 8,
                "lr": lr,
                "warmup_ratio": 0.0,  # the first step at the full rate (a warm-up's first rate is 0)
                "weight_decay": 0.0,  # only the loss moves the weights
                "max_steps": steps,
            },
        }
    )


@needs_vllm
@pytest.mark.parametrize("teacher", ["ema", "frozen"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sdft_with_vllm_rollouts_learns(tmp_path, lora, teacher):
    """One step at a large rate moves every trainable weight (LoRA: every B factor, which starts at 0,
    and so the merged weights the engine samples from); a few steps on two records lower the loss
    (each step's loss is measured on that step's own samples, so the last steps are averaged)."""
    from toy import KEYS, VALUES, toy_records

    from selfdistill.models.sharded import merged_weights
    from selfdistill.training.loop import train

    records = toy_records()[:2]
    lr = 1e-2
    model, tok = _model(extra_words=KEYS + VALUES)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = _learning_config(tmp_path / "one", lora=lora, teacher=teacher, steps=1, lr=lr)
    one = train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    assert one.metrics[0]["finite"] and one.metrics[0]["loss"] > 0
    trained = {name: p.detach() for name, p in one.model.named_parameters() if p.requires_grad}
    assert trained
    if lora:
        # AdamW's first step moves every weight with a gradient by about lr; B's gradient is nonzero
        # from the start (A is random), A's only once B is (so after one step A has not moved).
        factors = {n: t for n, t in trained.items() if "lora_B" in n}
        assert factors and all(float(t.abs().max()) > 0.5 * lr for t in factors.values()), {
            n: float(t.abs().max()) for n, t in factors.items()
        }
        merged = dict(merged_weights(one.model))
        moved = {n: float((merged[n] - before[n]).abs().max()) for n in merged}
        assert max(moved.values()) > 1e-4, moved
    else:
        moved = {n: float((t - before[n]).abs().max()) for n, t in trained.items()}
        assert all(m > 0.5 * lr for m in moved.values()), moved

    model, tok = _model(extra_words=KEYS + VALUES)
    cfg = _learning_config(tmp_path / "few", lora=lora, teacher=teacher, steps=8, lr=lr)
    train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "few" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses), losses
    # Measured (fp32, CPU): 9.1 nats at the first step, 2.9-4.3 over the last three.
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


@pytest.fixture
def engine_calls(monkeypatch):
    """Every `VLLMSampler.generate` call: (the prompts, the completions it returned)."""
    from selfdistill.sampling.vllm_engine import VLLMSampler

    calls, real = [], VLLMSampler.generate

    def recorded(self, prompts, seeds, **kwargs):
        out = real(self, prompts, seeds, **kwargs)
        calls.append((prompts, out))
        return out

    monkeypatch.setattr(VLLMSampler, "generate", recorded)
    return calls


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_offline_distill_with_vllm_teacher_answers(tmp_path, engine_calls, lora):
    """The frozen teacher's answers come from the engine (LoRA: the adapter switched off, W0); the student
    then trains on them: its weights move and every loss is finite."""
    from toy import KEYS, VALUES, toy_records

    from selfdistill.training.loop import train

    records = toy_records()[:4]
    model, tok = _model(extra_words=KEYS + VALUES)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = _learning_config(
        tmp_path / "run",
        lora=lora,
        teacher="frozen",
        steps=3,
        lr=1e-2,
        method="offline_distill",
        offline={"loss": "divergence"},
    )
    result = train(cfg, records=records, model=model, tokenizer=tok, save_final=False)

    assert len(engine_calls) == 1  # once, before training: one answer per record
    prompts, answers = engine_calls[0]
    assert len(prompts) == len(records) and answers.logprobs is not None
    stored = [json.loads(line) for line in (tmp_path / "run" / "offline_targets.jsonl").read_text().splitlines()]
    assert [row["ids"] for row in sorted(stored, key=lambda row: row["index"])] == answers.ids
    assert all(m["finite"] and math.isfinite(m["loss"]) for m in result.metrics)
    trained = {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}
    if lora:  # the B factors start at 0
        moved = [float(p.abs().max()) for n, p in trained.items() if "lora_B" in n]
    else:
        moved = [float((p - before[n]).abs().max()) for n, p in trained.items()]
    assert moved and max(moved) > 1e-3, moved


@needs_vllm
def test_diagnose_with_vllm_rollouts_gives_the_per_token_report(tmp_path, engine_calls):
    """`sdft diagnose --set rollout.engine=vllm`: the student's samples come from the engine, scored per token."""
    from test_diagnose import tiny_records, vocabulary
    from typer.testing import CliRunner

    from selfdistill.cli import app
    from selfdistill.models.tiny import save_tiny

    records = tiny_records()
    model_dir = save_tiny(tmp_path / "model", vocabulary(records), hidden_size=128, heads=2, tied=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    out = tmp_path / "out"
    args = ["diagnose", "--model", str(model_dir), str(data), "--limit", "2", "--max-new-tokens", "4"]
    args += ["--rollouts-per-record", "2", "--precision", "fp32", "--template", "plain", "--no-ceiling"]
    result = CliRunner().invoke(app, [*args, "--set", "rollout.engine=vllm", "--out", str(out)])
    assert result.exit_code == 0, result.output

    ((prompts, sampled),) = engine_calls
    assert len(prompts) == 4  # 2 records x 2 rollouts
    report = json.loads((out / "diagnose.json").read_text())
    completions = [c for r in report["records"] for c in r["completions"]]
    assert [c["token_ids"] for c in completions] == sampled.ids
    for c, logprobs in zip(completions, sampled.logprobs):
        assert len(c["student_logp"]) == len(c["teacher_logp"]) == len(c["divergence"]) == len(c["token_ids"])
        # fp32: the trainer's log-probabilities of the engine's tokens are the engine's own
        assert c["student_logp"] == pytest.approx(logprobs, abs=1e-4)


@needs_vllm
def test_building_an_engine_leaves_the_process_settings_as_they_were(monkeypatch):
    """vLLM's CPU worker changes process-wide settings the trainer shares (torch.set_num_threads made a
    no-op, fp32 matmul precision reset to 'highest', LD_PRELOAD): they are back as they were once the
    engine is built, synced and sampling; its move of the process's memory to one NUMA node is skipped."""
    from contextlib import contextmanager

    from selfdistill.sampling import vllm_engine, vllm_process

    inside = []
    real = vllm_engine.process_settings_kept

    @contextmanager
    def observed():
        with real():
            yield
            inside.append(vllm_process.process_settings())  # the engine is built; not yet restored

    monkeypatch.setattr(vllm_engine, "process_settings_kept", observed)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # a trainer's choice the engine must not undo
    try:
        before = vllm_process.process_settings()
        model, tok = _model(seed=1)
        built = vllm_engine.VLLMEngine(model, precision="fp32", max_model_len=256)
        built.sync(model)
        built.generate(_prompts(tok, lengths=(5,)), stop_token_ids=[], max_new_tokens=3, seeds=[1])
        after = vllm_process.process_settings()
        built.close()
    finally:
        torch.set_float32_matmul_precision(precision)
    changed = {k for k in before if inside[0][k] != before[k]}
    # What vLLM changed here (this test's reason to exist).
    assert {"set_num_threads", "float32_matmul_precision", "fp32_precision"} <= changed, changed
    # The NUMA binding is not restored but never made: no page of the trainer moves to one node.
    assert "memory_policy" not in changed
    assert after == before
    torch.set_num_threads(torch.get_num_threads())  # the real function again, not vLLM's no-op


def _resident_bytes() -> int:
    """This process's resident memory (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@needs_vllm
def test_closing_an_engine_gives_its_memory_back_and_keeps_the_trainers_process_group(tmp_path):
    """Close shuts vLLM down, so the memory comes back even while something else still refers to the
    engine's LLM object (here `held`; in a run a sampler, a traceback, a user's variable). Before, close
    only dropped its own reference: vLLM's finalizer freed the memory only once nothing else referred to
    it (measured with one more reference: +2.3 GB resident, none back), and then destroyed the default
    process group, under torchrun the trainer's. Measured now: 2.3 GB up, 0.24 GB left after close (what
    the first engine of a process leaves for good: loaded kernels and libraries, allocator arenas); 75%
    must come back, so a close that kept the KV cache (2 GiB of the 2.3) fails. A process group that
    existed before the engine survives the close."""
    import gc

    import torch.distributed as dist

    from selfdistill.sampling.vllm_engine import VLLMEngine

    own_group = not dist.is_initialized()  # else an engine of an earlier test made it: it must survive too
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        model, tok = _model(seed=2)
        gc.collect()
        before = _resident_bytes()
        built = VLLMEngine(model, precision="fp32", max_model_len=256)
        built.sync(model)
        built.generate(_prompts(tok, lengths=(5,)), stop_token_ids=[], max_new_tokens=3, seeds=[1])
        grown = _resident_bytes() - before
        held = built.llm
        built.close()
        left = _resident_bytes() - before
        del held
        assert grown > 2**30, grown  # the 2 GiB KV cache (VLLM_CPU_KVCACHE_SPACE=2) is resident
        assert left < 0.25 * grown, (grown, left)
        assert built.llm is None
        built.close()  # a second close does nothing
        assert dist.is_initialized()
        total = torch.ones(1)
        dist.all_reduce(total)
        assert float(total) == 1.0
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


@needs_vllm
def test_the_first_load_goes_to_rollout_vllm_load_dir_in_the_engines_dtype(tmp_path, monkeypatch):
    """The engine's first weights are written under rollout.vllm_load_dir (created if missing), cast to
    the engine's dtype, and removed once the engine has read them."""
    from selfdistill.sampling import vllm_engine

    written = []
    real = vllm_engine.write_first_load

    def recorded(model, directory, **kwargs):
        real(model, directory, **kwargs)
        written.append((directory, kwargs["dtype"], sorted(p.name for p in Path(directory).iterdir())))

    monkeypatch.setattr(vllm_engine, "write_first_load", recorded)
    load_dir = tmp_path / "first-load"
    model, tok = _model(seed=3)
    built = vllm_engine.VLLMEngine(model, precision="fp32", max_model_len=128, load_dir=str(load_dir))
    try:
        ((directory, dtype, files),) = written
        assert Path(directory).parent == load_dir and dtype == torch.float32
        assert "config.json" in files and "model.safetensors.index.json" in files
        assert list(load_dir.iterdir()) == []  # read and removed
        out = built.generate(_prompts(tok, lengths=(5,)), stop_token_ids=[], max_new_tokens=2, temperature=0)
        assert len(out.ids[0]) == 2
    finally:
        built.close()


@needs_vllm
def test_an_engine_whose_first_load_does_not_fit_stops_before_writing(tmp_path, monkeypatch):
    from selfdistill.sampling import vllm_first_load
    from selfdistill.sampling.vllm_engine import VLLMEngine

    monkeypatch.setattr(vllm_first_load.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6, 10))
    load_dir = tmp_path / "small-disk"
    model, _ = _model()
    with pytest.raises(UserError, match="rollout.vllm_load_dir") as raised:
        VLLMEngine(model, precision="bf16", max_model_len=128, load_dir=str(load_dir))
    assert str(load_dir) in str(raised.value)
    assert list(load_dir.iterdir()) == []


def test_first_load_bytes_and_the_free_space_message(tmp_path, monkeypatch):
    """The bytes checked are the engine dtype's (an fp32 trainer, a bf16 engine: half the trainer's);
    the message names the directory, both byte counts and the setting to change."""
    from selfdistill.sampling import vllm_first_load

    model, _ = _model()
    elements = sum(p.numel() for p in model.parameters())
    margin = vllm_first_load.FIRST_LOAD_MARGIN
    assert vllm_first_load.first_load_bytes(model, torch.bfloat16) == 2 * elements + margin
    assert vllm_first_load.first_load_bytes(model, torch.float32) == 4 * elements + margin
    free = 5 * 2**30
    monkeypatch.setattr(vllm_first_load.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, 0, free))
    assert vllm_first_load.first_load_space_problem(str(tmp_path), free) is None
    message = vllm_first_load.first_load_space_problem(str(tmp_path), free + 1)
    assert str(tmp_path) in message and str(free + 1) in message and str(free) in message
    assert "rollout.vllm_load_dir" in message


def test_first_load_is_written_in_the_engines_dtype(tmp_path):
    """An fp32 model, a bf16 engine: the files hold bf16 tensors, each the model's weight rounded to bf16,
    as many bytes as `first_load_bytes` counts (less its margin), in several shards as they stream."""
    from safetensors.torch import load_file

    from selfdistill.models.sharded import merged_weights
    from selfdistill.sampling import vllm_first_load

    model, _ = _model()
    vllm_first_load.write_first_load(model, str(tmp_path), write=True, dtype=torch.bfloat16, shard_bytes=2**16)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    read = {}
    for name in sorted(set(index["weight_map"].values())):
        read.update(load_file(str(tmp_path / name)))
    expected = dict(merged_weights(model))
    assert len(set(index["weight_map"].values())) > 1
    assert read.keys() == expected.keys()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, expected[k].to(torch.bfloat16)) for k, t in read.items())
    written = sum(t.numel() * t.element_size() for t in read.values())
    assert index["metadata"]["total_size"] >= written
    assert written == vllm_first_load.first_load_bytes(model, torch.bfloat16) - vllm_first_load.FIRST_LOAD_MARGIN


def test_engine_options_cpu_is_eager_and_never_sleeps_cuda_follows_the_settings():
    from selfdistill.sampling.vllm_engine import engine_options

    for eager in (False, True):
        for sleep in (False, True):
            cpu = engine_options("cpu", processes=1, gpu_memory=0.3, eager=eager, sleep=sleep)
            assert cpu == {"enforce_eager": True}  # no sleep mode and no GPU share on CPUs
            cuda = engine_options("cuda", processes=1, gpu_memory=0.4, eager=eager, sleep=sleep)
            assert cuda == {"enforce_eager": eager, "enable_sleep_mode": sleep, "gpu_memory_utilization": 0.4}
    two = engine_options("cuda", processes=2, gpu_memory=0.3, eager=False, sleep=True)
    assert two["distributed_executor_backend"] == "external_launcher"


class _FakeLLM:
    """Stands in for vllm.LLM in sleep mode: what is asleep, and every call in order. It refuses what vLLM
    cannot do: new weights into offloaded weights, sampling while anything sleeps, sleeping twice."""

    def __init__(self):
        self.calls, self.asleep, self.synced_dtypes = [], set(), set()

    def sleep(self, level):
        assert not self.asleep and level == 1
        self.asleep = {"weights", "kv_cache"}
        self.calls.append("sleep")

    def wake_up(self, tags=None):
        assert tags and set(tags) <= self.asleep
        self.asleep -= set(tags)
        self.calls.append(f"wake_up {','.join(tags)}")

    def collective_rpc(self, method, kwargs=None):
        if method == "reload_weights":
            assert "weights" not in self.asleep
            weights = list(kwargs["weights_iterator"])
            assert kwargs["is_checkpoint_format"] and len(weights) > 0
            self.synced_dtypes |= {tensor.dtype for _, tensor in weights}
        self.calls.append(method if isinstance(method, str) else method.__name__)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def generate(self, prompts, params, use_tqdm):
        from types import SimpleNamespace

        assert not self.asleep
        self.calls.append("generate")
        step = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[4, 5], logprobs=[{4: _Logprob}, {5: _Logprob}])])
        return [step for _ in prompts]


class _Logprob:
    logprob = -0.5


def _engine_on(llm, *, sleep: bool, precision: str = "fp32"):
    """A VLLMEngine around `llm` (a fake), as `VLLMEngine.__init__` leaves one built on a GPU."""
    from selfdistill.sampling.vllm_engine import SleepCycle, VLLMEngine

    engine = object.__new__(VLLMEngine)
    engine.llm, engine.sleep_cycle, engine.precision = llm, SleepCycle(llm, sleep), precision
    engine.max_model_len, engine.tied_head, engine.syncs = 64, True, 0
    return engine


@pytest.mark.parametrize("sleep", [True, False], ids=["sleep", "no-sleep"])
def test_the_engine_sleeps_after_sampling_and_wakes_weights_then_cache_for_a_sync(monkeypatch, sleep):
    """With sleep mode (CUDA, rollout.vllm_sleep) the engine sleeps after every rollout; a sync wakes the
    weights first, writes the new ones and rebuilds the head, then wakes the KV cache and empties the
    prefix cache; sampling without a sync wakes everything. Without it no sleep or wake call is made."""
    import sys
    from types import ModuleType

    fake = ModuleType("vllm")
    fake.SamplingParams = dict
    inputs = ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    model, _ = _model()
    llm = _FakeLLM()
    engine = _engine_on(llm, sleep=sleep)

    def rollout():
        out = engine.generate([[7, 8, 9]], stop_token_ids=[], max_new_tokens=2, seeds=[1])
        assert out.ids == [[4, 5]] and out.logprobs == [[-0.5, -0.5]]

    sync = ["reload_weights", "_rebuild_output_head"]
    engine.sync(model)
    rollout()
    engine.sync(model)
    rollout()
    rollout()  # no sync before it
    if sleep:
        assert llm.calls == [
            *sync, "reset_prefix_cache", "generate", "sleep",
            "wake_up weights", *sync, "wake_up kv_cache", "reset_prefix_cache", "generate", "sleep",
            "wake_up weights,kv_cache", "generate", "sleep",
        ]  # fmt: skip
        assert llm.asleep == {"weights", "kv_cache"}
    else:
        assert llm.calls == [*sync, "reset_prefix_cache", "generate"] * 2 + ["generate"]
        assert not llm.asleep


def test_the_cuda_pins_are_the_ones_the_install_hint_and_the_docs_name():
    """scripts/vllm_cuda_requirements.txt is the one place the CUDA combination is pinned; the install hint
    and docs/vllm.md repeat it and must not drift from it."""
    from selfdistill.sampling.vllm_engine import INSTALL_HINT

    root = Path(__file__).resolve().parent.parent
    lines = (root / "scripts" / "vllm_cuda_requirements.txt").read_text().splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {pin.split("=")[0].split(">")[0] for pin in pins} == {"vllm", "torch", "transformers"}
    docs = (root / "docs" / "vllm.md").read_text()
    for pin in pins:
        assert pin in INSTALL_HINT and pin in docs, pin


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown where vLLM is missing")
def test_asking_for_vllm_without_it_says_how_to_install(tmp_path):
    from selfdistill.methods.build import build_method

    model, tok = _model()
    cfg = _toy_config(tmp_path)
    with pytest.raises(UserError, match="setup_vllm_env.sh"):
        build_method(cfg, model, tok, None, [tok.eos_token_id], tok.pad_token_id)


@needs_vllm
@pytest.mark.distributed
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_with_their_own_engines_train_as_one(tmp_path, lora):
    """Under torchrun every process gets an engine of its own (vLLM's external_launcher), its first
    weights streamed from the FSDP2 shards and synced after every step. In fp32 a completion depends
    only on prompt, seed and weights, so two processes train what one process trains."""
    from test_distributed import assert_same_run, launch, result

    settings = {"engine": "vllm", "max_steps": 2, "lora": lora}  # LoRA: merged W0 + scale·B·A from shards
    launch(tmp_path / "one", settings, 1)
    launch(tmp_path / "two", settings, 2)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    for run in ("one", "two"):
        steps = result(tmp_path / run)["importance"]
        # extremes over both processes' sequences, not one process's (or their sum)
        assert all(
            abs(m["importance_ratio_min"] - 1) < 1e-3 and abs(m["importance_ratio_max"] - 1) < 1e-3 for m in steps
        )
        assert all(abs(m["importance_ratio_mean"] - 1) < 1e-3 and m["importance_clipped_fraction"] == 0 for m in steps)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_a_sync_streams_weights_in_the_engines_dtype(precision, dtype):
    """The fp32 trainer's weights reach a bf16 engine as bf16 tensors (cast before any gather), an fp32 one's as fp32."""
    model, _ = _model()
    llm = _FakeLLM()
    _engine_on(llm, sleep=False, precision=precision).sync(model)
    assert llm.synced_dtypes == {dtype} and next(model.parameters()).dtype == torch.float32


@needs_vllm
def test_evaluation_and_drift_through_vllm_give_the_decode_loops_greedy_answers(monkeypatch):
    """`evaluate(..., engine="vllm")` and drift's base answers: the engine writes the greedy answers (the
    decode loop's own tokens in fp32, so the same scores), a budget the context cut included."""
    from selfdistill.data.prompts import PromptBuilder
    from selfdistill.data.records import Record
    from selfdistill.eval.drift import base_answers
    from selfdistill.eval.evaluate import evaluate
    from selfdistill.sampling.vllm_engine import VLLMSampler

    words = [f"w{i}" for i in range(12)]
    model, tok = _model(extra_words=words)
    model.config.max_position_embeddings = 40  # the longest prompt below leaves 3 of the 6 new tokens
    records = [Record(prompt=" ".join(words[: 2 + 3 * k]), demonstration="", answer=words[k]) for k in range(4)]
    overhead = len(PromptBuilder(tok).student_ids(Record(prompt="", demonstration="")))  # the template's tokens
    records.append(Record(prompt=" ".join(["w1"] * (37 - overhead)), demonstration="", answer="w0"))
    grader = lambda output, row: float(row["answer"] in output)  # noqa: E731
    calls, real = [], VLLMSampler.generate

    def recorded(self, prompts, seeds, **kwargs):
        calls.append(kwargs.get("max_new_tokens"))
        return real(self, prompts, seeds, **kwargs)

    monkeypatch.setattr(VLLMSampler, "generate", recorded)
    results = {}
    for engine in ("vllm", "decode"):
        examples = []
        summary = evaluate(model, tok, records, grader, max_new_tokens=6, engine=engine, examples=examples)
        results[engine] = (summary, examples)
    assert results["vllm"] == results["decode"] and results["vllm"][0]["context_cut"] == 1
    assert calls == [6, 3]  # one call per distinct budget
    answers = base_answers(model, tok, prompts=["w1 w2", "w3"], max_new_tokens=4, engine="vllm")
    assert calls[2:] == [4] and answers == base_answers(model, tok, prompts=["w1 w2", "w3"], max_new_tokens=4)
