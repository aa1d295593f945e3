"""`sdft plan` / `selfdistill.plan`: memory per process from fake tensors, against what real runs allocate.

The tiny Llama config below is planned with fake tensors and a fake process group; the same pieces
(model, LoRA, method with its teacher, FSDP2 plan, one step) then run for real in a one-process gloo
group, and this process's real shards must have the sizes the plan reports.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfdistill
from selfdistill import registry
from selfdistill.config import load_config, merge
from selfdistill.memory_plan import GIB, architecture_config, plan
from selfdistill.memory_plan.planner import _planning_config, _shapes, _trace
from selfdistill.methods.sft_kl import SFTKL, SFTKLConfig

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}
# (LoRA, teacher kind, precision): full and LoRA with each teacher kind, fp32 and bf16
SETTINGS = [
    (False, "ema", "fp32"),
    (False, "ema", "bf16"),
    (False, "frozen", "bf16"),
    (False, "live", "fp32"),
    (True, "ema", "bf16"),
    (True, "frozen", "bf16"),
    (True, "ema", "fp32"),
]


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY))
    return directory


def tiny_config(directory: Path, lora: bool = False, teacher: str = "ema", precision: str = "fp32", **train):
    return load_config(
        overrides={
            "model": {"name": str(directory), "precision": precision, "lora": {"enabled": lora, "rank": 4}},
            "teacher": {"kind": teacher},
            "data": {"max_prompt_tokens": 16, "max_teacher_prompt_tokens": 24},
            "rollout": {"max_new_tokens": 8, "batch_size": 2},
            "train": {"batch_size": 8, "micro_batch_size": 2, "activation_checkpointing": True, **train},
        }
    )


def _bytes(tensors) -> int:
    from selfdistill.models.distributed import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def real_run(cfg, directory: Path, store: Path) -> dict:
    """The trainer's pieces for real in a one-process gloo group: one step; this process's shard sizes."""
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from selfdistill.memory_plan.planner import _items
    from selfdistill.methods.build import build_method
    from selfdistill.models import apply_lora
    from selfdistill.models.distributed import Processes, shard_model
    from selfdistill.models.loading import weights_dtype

    dist.init_process_group("gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        dtype = weights_dtype(cfg.model.load_dtype, cfg.model.precision, cfg.model.lora.enabled)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora.rank, cfg.model.lora.alpha)
        model.train()
        procs = Processes(0, 1, torch.device("cpu"), sharded=True)
        shard = functools.partial(shard_model, procs=procs)
        method = build_method(cfg, model, None, None, [], 0, [], procs=procs, shard=shard)
        model = method.model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        loss, _ = method.loss(_items(cfg, _shapes(cfg, 1)))
        loss.backward()
        gradients = _bytes(p.grad for p in params)
        optimizer.step()
        method.after_step()
        teacher = method.teacher.module
        return {
            "weights": _bytes(model.parameters()) + _bytes(model.buffers()),
            "gradients": gradients,
            "optimizer": sum(
                _bytes(v for v in s.values() if isinstance(v, torch.Tensor)) for s in optimizer.state.values()
            ),
            "teacher_weights": 0 if teacher is None else _bytes(teacher.parameters()) + _bytes(teacher.buffers()),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lora, teacher, precision", SETTINGS)
def test_planned_shards_are_what_a_real_run_allocates(tiny_dir, tmp_path, lora, teacher, precision):
    cfg = tiny_config(tiny_dir, lora, teacher, precision)
    real = real_run(cfg, tiny_dir, tmp_path / "store")
    planned = plan(cfg, processes=1)
    for name, size in real.items():
        assert getattr(planned, name) == size, name
    assert planned.peak >= planned.step_peak > planned.weights + planned.gradients + planned.optimizer


def test_two_processes_halve_the_sharded_parts(tiny_dir):
    cfg = tiny_config(tiny_dir)
    one, two = plan(cfg, processes=1), plan(cfg, processes=2)
    # FSDP2 pads each parameter's first dimension to a multiple of the processes: at most one row each
    config = architecture_config(str(tiny_dir))[0]
    rows = 4 * (2 * config.hidden_size + config.num_hidden_layers * 7 * config.intermediate_size)
    for name in ("weights", "gradients", "optimizer", "teacher_weights"):
        whole, half = getattr(one, name), getattr(two, name)
        assert whole / 2 <= half <= whole / 2 + 2 * rows, name
    assert two.largest_unit == one.largest_unit  # a unit is gathered whole
    assert two.rollout_gather == one.rollout_gather == 4 * one.parameters  # the whole fp32 model
    assert two.step_peak < one.step_peak


def test_fake_tensors_trace_what_real_tensors_allocate(tiny_dir):
    cfg = _planning_config(tiny_config(tiny_dir, precision="bf16"), "bf16")
    config = architecture_config(str(tiny_dir))[0]
    shapes = _shapes(cfg, 2)
    fake = _trace(cfg, config, 2, shapes, "decode", fake=True)
    real = _trace(cfg, config, 2, shapes, "decode", fake=False)
    for name in ("weights", "teacher", "optimizer", "gradients", "rollout_gather", "update_peak", "largest_unit"):
        assert fake[name] == real[name], name
    # Fake tensors have no values, so transformers cannot tell that the padding mask is all ones and
    # builds the attention mask a real all-ones batch skips: a few bytes more, never less.
    for checkpointing in (True, False):
        assert (
            0
            <= fake["steps"][checkpointing]["peak"] - real["steps"][checkpointing]["peak"]
            < 0.01 * real["steps"][checkpointing]["peak"]
        )
    assert 0 <= fake["rollout_peak"] - real["rollout_peak"] < 0.01 * real["rollout_peak"]


def test_lora_and_teacher_kinds(tiny_dir):
    full = plan(tiny_config(tiny_dir, precision="bf16"), processes=2)
    lora = plan(tiny_config(tiny_dir, lora=True, precision="bf16"), processes=2)
    assert lora.trainable_parameters < full.trainable_parameters / 10
    assert lora.gradients == 4 * lora.trainable_parameters / 2  # the adapter's fp32 shards
    assert lora.weights < full.weights  # a bf16 base (model.load_dtype auto) and an fp32 adapter
    assert lora.teacher_weights == full.teacher_weights  # EMA: an fp32 copy of W0 + EMA(BA), the model's shape
    frozen = plan(tiny_config(tiny_dir, teacher="frozen", precision="bf16"), processes=2)
    from transformers import AutoConfig, AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir))
    buffers = sum(b.numel() * b.element_size() for b in student.buffers())  # the rotary tables, kept in fp32
    assert 2 * frozen.teacher_weights == full.teacher_weights + buffers  # bf16 parameters, the student's fp32 buffers
    assert plan(tiny_config(tiny_dir, lora=True, teacher="frozen", precision="bf16"), processes=2).teacher_weights == 0
    assert plan(tiny_config(tiny_dir, teacher="live"), processes=2).teacher_weights == 0


def test_bf16_layers_gather_in_bf16_and_autocast_copies_only_fp32_gathers(tiny_dir):
    """distributed.gather auto (a bf16 run's default): decoder layers are gathered in bf16, so autocast
    has no fp32 layer weight to copy. distributed.gather fp32: the layers arrive in fp32 and autocast casts
    them; training forwards autocast without its cast cache, so with activation checkpointing no layer's
    bf16 copy outlives the layer (with the cache every layer's was kept until the forward ended: 7B,
    12 GiB), and without checkpointing autograd keeps the copies its backward needs."""
    fp32 = plan(tiny_config(tiny_dir, precision="fp32"), processes=2)
    bf16 = plan(tiny_config(tiny_dir, precision="bf16"), processes=2)
    assert fp32.weights == bf16.weights  # fp32 master weights either way
    assert bf16.gather_dtypes == {"layers": ["bf16"], "norms": ["fp32"], "root": ["fp32"]}
    assert fp32.gather_dtypes == {"layers": ["fp32"], "root": ["fp32"]}
    gather_fp32 = {"distributed": {"gather": "fp32"}}
    checkpointed = plan(_with(tiny_config(tiny_dir, precision="bf16"), **gather_fp32), processes=2)
    saved = plan(
        _with(tiny_config(tiny_dir, precision="bf16", activation_checkpointing=False), **gather_fp32), processes=2
    )
    assert checkpointed.gather_dtypes == {"layers": ["fp32"], "root": ["fp32"]}
    assert fp32.weight_copies == 0 and bf16.weight_copies == 0 and checkpointed.weight_copies == 0
    assert saved.weight_copies > 0
    auto = plan(tiny_config(tiny_dir, precision="bf16", activation_checkpointing=False), processes=2)
    assert auto.weight_copies == 0  # no fp32 layer weight to cast


def test_bf16_layer_gathers_move_half_the_bytes(tiny_dir):
    """The rollout's gather and every micro-batch's layer gathers: bf16 layer matrices with gather auto,
    fp32 with gather fp32; the root and the layers' norms in fp32 either way; gradients reduced in fp32."""
    cfg = tiny_config(tiny_dir, precision="bf16")
    auto = plan(cfg, processes=2)
    fp32 = plan(_with(cfg, distributed={"gather": "fp32"}), processes=2)
    config = architecture_config(str(tiny_dir))[0]
    hidden, layers = config.hidden_size, config.num_hidden_layers
    root = 2 * config.vocab_size * hidden + hidden  # embeddings, head, final norm
    norms = layers * 2 * hidden
    matrices = auto.parameters - root - norms
    assert fp32.rollout_gather == 4 * auto.parameters
    assert auto.rollout_gather == 4 * root + 4 * norms + 2 * matrices
    rows = {name: {row["what"]: row for row in p.communication} for name, p in (("auto", auto), ("fp32", fp32))}
    backward = "student backward: each layer gathered again"
    assert rows["fp32"][backward]["bytes"] == 4 * (matrices + norms)
    assert rows["auto"][backward]["dtypes"] == {"bf16": 2 * matrices, "fp32": 4 * norms}
    rollout = "rollout: the whole model gathered once (decode)"
    assert rows["auto"][rollout]["bytes"] == auto.rollout_gather and rows["auto"][rollout]["per"] == "step"
    scatter = "gradients: reduce-scatter within the shard group"
    assert rows["auto"][scatter]["bytes"] == rows["fp32"][scatter]["bytes"] == 4 * auto.parameters
    assert rows["auto"][scatter]["dtypes"] == {"fp32": 4 * auto.parameters}


def test_communication_per_step_flat_and_hybrid(tiny_dir):
    """Each micro-batch gathers and reduces again; the ring's (n-1)/n and 2(n-1)/n; hybrid sharding
    (2 nodes of 2) shards within a node, so only the gradients' all-reduce crosses nodes."""
    from selfdistill.memory_plan.settings import Hardware

    cfg = _with(tiny_config(tiny_dir, precision="bf16"), train={"batch_size": 16})  # 4 prompts each: 2 micro-batches
    hardware = Hardware(gpus_per_node=2, intra_node_bandwidth=100.0, inter_node_bandwidth=10.0)
    flat = plan(_with(cfg, distributed={"shard_size": 4}), processes=4, hardware=hardware)
    hybrid = plan(cfg, processes=4, hardware=hardware)
    two = plan(cfg, processes=2, hardware=hardware)
    assert (flat.nodes, flat.shard_size, flat.replicas) == (2, 4, 1)
    assert (hybrid.nodes, hybrid.shard_size, hybrid.replicas) == (2, 2, 2)
    assert hybrid.weights == two.weights < 2 * flat.weights  # sharded over one node's 2 processes
    by = {name: {row["what"]: row for row in p.communication} for name, p in (("flat", flat), ("hybrid", hybrid))}
    forward = by["flat"]["student forward: every unit gathered"]
    assert forward["times"] == flat.micro_batches == 2 and forward["link"] == "inter-node"
    assert forward["traffic"] == int(2 * 3 / 4 * forward["bytes"])
    assert forward["seconds"] == forward["traffic"] / 10e9
    assert by["hybrid"]["student forward: every unit gathered"]["link"] == "intra-node"
    reduce = by["hybrid"]["gradients: all-reduce of the shards across replicas"]
    assert reduce["link"] == "inter-node" and reduce["group"] == 2
    assert reduce["bytes"] == 4 * hybrid.parameters / 2  # each process's fp32 gradient shard
    assert reduce["traffic"] == int(2 * 2 * 1 / 2 * reduce["bytes"])
    assert "gradients: all-reduce of the shards across replicas" not in by["flat"]
    assert [row for row in by["hybrid"].values() if row["link"] == "inter-node"] == [
        reduce,
        by["hybrid"]["clipping: the gradients' norm"],
    ]
    assert hybrid.compute_flops == flat.compute_flops > 0
    assert plan(cfg, processes=1).communication == []
    with pytest.raises(selfdistill.UserError, match="shard_size 3"):
        plan(_with(cfg, distributed={"shard_size": 3}), processes=4)


def test_api_and_json(tiny_dir):
    result = selfdistill.plan(None, processes=2, hardware={"gpu_tflops": 100.0, "mfu": 0.5}, **_sections(tiny_dir))
    data = result.to_dict()
    assert data["peak"] == result.peak and data["processes"] == 2
    assert data["compute_seconds"] == data["compute_flops"] / 50e12 and data["communication_bytes"] > 0
    assert {row["how"] for row in data["rows"]} >= {"traced", "computed", "shard plan"}
    assert "peak per process" in result.table()


def _sections(directory: Path) -> dict:
    return {
        "model": {"name": str(directory)},
        "data": {"max_prompt_tokens": 16, "max_teacher_prompt_tokens": 24},
        "rollout": {"max_new_tokens": 8},
        "train": {"batch_size": 4, "micro_batch_size": 2},
    }


def _sdft(args, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_cli_plans_the_shipped_qwen_7b_offline(tmp_path):
    (tmp_path / "qwen7b.yaml").write_text(
        "model: {name: Qwen/Qwen2.5-7B-Instruct, precision: bf16}\n"
        "data: {max_prompt_tokens: 256}\n"
        "rollout: {max_new_tokens: 256, batch_size: 4}\n"
        "train: {batch_size: 32, micro_batch_size: 2, activation_checkpointing: true}\n"
    )
    proc = _sdft(["plan", "qwen7b.yaml", "--processes", "8", "--json", "plan.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Qwen2ForCausalLM, 7.62 B parameters" in proc.stdout
    assert "peak per process" in proc.stdout
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["processes"] == 8 and data["parameters"] == 7_615_616_512
    assert 3.5 < data["weights"] / GIB < 3.6  # 7.6 B fp32 parameters over 8 processes
    assert data["peak"] > data["weights"] + data["gradients"] + data["optimizer"] + data["teacher_weights"]


def test_an_unknown_model_is_bad_input(tmp_path):
    proc = _sdft(["plan", "--processes", "2", "--model", "nobody/no-such-model-xyz"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: model.name nobody/no-such-model-xyz: no architecture config")
    assert "config.json" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "weights-only").mkdir()
    for name, words in [
        (str(tmp_path / "weights-only"), "has no config.json"),
        ("./no/such/dir", "no architecture config"),
        ("no-such-alias", "no architecture config"),
    ]:
        with pytest.raises(selfdistill.UserError, match=words):
            selfdistill.plan(None, processes=2, model={"name": name})
    with pytest.raises(selfdistill.UserError, match="train.batch_size 4 is smaller"):
        selfdistill.plan(None, processes=8, model={"name": "smollm2-135m"}, train={"batch_size": 4})


def test_shipped_architectures_are_the_published_ones():
    expected = {
        "Qwen2.5-7B-Instruct": (3584, 18944, 28, 28, 4, 152064, False),
        "Qwen2.5-14B-Instruct": (5120, 13824, 48, 40, 8, 152064, False),
        "Llama-3.1-8B-Instruct": (4096, 14336, 32, 32, 8, 128256, False),
        "SmolLM2-135M-Instruct": (576, 1536, 30, 9, 3, 49152, True),
    }
    for name, shape in expected.items():
        config, where = architecture_config(name)
        assert "shipped" in where
        assert (
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.vocab_size,
            config.tie_word_embeddings,
        ) == shape
    assert architecture_config("meta-llama/Llama-3.1-8B-Instruct")[0].vocab_size == 128256
    assert architecture_config("smollm2-135m")[0].hidden_size == 576


def test_planning_works_on_this_torch_or_says_which_it_needs(tiny_dir):
    """Fake kernels for the collectives came after the trainer's floor (torch 2.8 lacks them): there the
    plan stops with a message saying which torch to plan with (make test-floor runs this)."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version >= (2, 13):
        assert plan(tiny_config(tiny_dir), processes=2).peak > 0
    else:
        with pytest.raises(selfdistill.UserError, match="use torch 2.13 or later"):
            plan(tiny_config(tiny_dir), processes=2)


def _with(cfg, **changes):
    data = cfg.to_dict()
    if "method" in changes:  # teacher.kind holds the kind cfg's method runs: the new method picks its own
        data["teacher"]["kind"] = None
    return load_config(overrides=merge(data, changes))


def test_the_keeping_methods_are_planned(tiny_dir, tmp_path):
    base = tiny_config(tiny_dir, precision="bf16")
    sft = plan(_with(base, method="sft"), processes=2)
    replay = plan(_with(base, method="sft_replay"), processes=2)
    for name in ("weights", "gradients", "optimizer", "teacher_weights", "step_peak"):
        assert getattr(replay, name) == getattr(sft, name), name  # it trains exactly as SFT does
    kl = plan(_with(base, method="sft_kl"), processes=2)
    frozen = plan(_with(base, teacher={"kind": "frozen"}), processes=2)
    assert kl.teacher == "frozen" and kl.teacher_weights == frozen.teacher_weights > 0  # the starting model
    assert kl.step_peak > sft.step_peak and kl.teacher_prompt_tokens == base.data.max_prompt_tokens
    assert plan(_with(base, method="sft_kl", model={"lora": {"enabled": True}}), processes=2).teacher_weights == 0
    sdft = plan(base, processes=2)
    hybrid = plan(_with(base, loss={"sft_weight": 1.0}), processes=2)
    assert hybrid.step_peak > sdft.step_peak  # the demonstrations' forward is held until the backward
    # What the plan says sft_kl holds is what a real run allocates.
    cfg = _with(tiny_config(tiny_dir, precision="bf16"), method="sft_kl")
    real = real_run(cfg, tiny_dir, tmp_path / "store")
    planned = plan(cfg, processes=1)
    for name, size in real.items():
        assert getattr(planned, name) == size, name


def test_a_verdict_with_gpu_memory(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, precision="bf16")
    full = plan(cfg, processes=1)
    lora = plan(_with(cfg, model={"lora": {"enabled": True}}), processes=1)
    assert full.needed == full.peak + full.reserve and full.reserve_parts["NCCL buffers"] == 0  # one process
    assert lora.needed < full.needed
    gpu = (lora.needed + full.needed) / 2 / GIB  # room for the LoRA run, not for full fine-tuning
    verdict = plan(cfg, processes=1, gpu_memory=gpu)
    line = verdict.table().splitlines()[-1]
    assert verdict.fits is False and line.startswith(f"does not fit: {full.needed / GIB:.1f} GiB per process needed")
    # Every suggestion is a plan of its own with the change: LoRA's figure is the LoRA plan's, exactly.
    by_change = {s["change"]: s for s in verdict.suggestions}
    assert by_change["model.lora.enabled=true"] == {
        "change": "model.lora.enabled=true",
        "needed": lora.needed,
        "fits": True,
    }
    assert "Would fit: model.lora.enabled=true" in line
    assert set(by_change) == {"model.lora.enabled=true", "--processes 2", "train.micro_batch_size=1"}
    fitting = plan(_with(cfg, model={"lora": {"enabled": True}}), processes=1, gpu_memory=gpu)
    assert fitting.fits is True and fitting.table().splitlines()[-1].startswith(f"fits: {lora.needed / GIB:.1f} of")
    # Without --gpu-memory: no verdict, and the line says how to get one; the JSON has the verdict's fields.
    proc = _sdft(["plan", "--processes", "2", "--model", str(tiny_dir)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("no verdict:") and "--gpu-memory" in proc.stdout
    proc = _sdft(
        ["plan", "--processes", "2", "--model", str(tiny_dir), "--gpu-memory", "2", "--json", "p.json"], tmp_path
    )
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["fits"] is True and data["gpu_memory"] == 2 * GIB and data["engine_share"] == 0
    assert (
        data["reserve"]
        == GIB + GIB // 2 + data["reserve_parts"][next(k for k in data["reserve_parts"] if "fragm" in k)]
    )
    assert data["verdict"].startswith("fits:") and data["needed"] == data["peak"] + data["reserve"]


def test_the_vllm_engine_share_holds_its_weights_or_is_refused(tiny_dir):
    cfg = _with(tiny_config(tiny_dir), rollout={"engine": "vllm", "vllm_gpu_memory": 0.3, "vllm_sleep": False})
    result = plan(cfg, processes=2, gpu_memory=1.0)
    assert result.engine_dtype == "fp32" and result.engine_weights == result.parameters * 4  # the whole model
    assert result.engine_share == int(0.3 * GIB)
    assert result.needed == result.peak + result.engine_share + result.reserve  # held through the step
    assert "engine's share (rollout.vllm_gpu_memory, held throughout)" in result.table()
    # Asleep through the training step (the default): the share adds to the rollout's side only.
    asleep = plan(_with(cfg, rollout={"vllm_sleep": True}), processes=2, gpu_memory=1.0)
    assert asleep.engine_sleeps and asleep.peak == result.peak
    assert asleep.needed == max(asleep.step_peak, asleep.rollout_peak + asleep.engine_share) + asleep.reserve
    assert asleep.needed < result.needed and "it sleeps through the step" in asleep.table()
    # The weight sync gathers each weight whole in the engine's dtype (fp32 here), once per step.
    sync = next(row for row in asleep.communication if row["what"].startswith("rollout: vLLM weight sync"))
    assert sync["bytes"] == 4 * asleep.parameters and sync["per"] == "step" and sync["traffic"] == 2 * asleep.parameters
    # 0.3 x 0.0005 GiB = 161 kB is less than the engine's 0.28 MB of fp32 weights
    with pytest.raises(selfdistill.UserError, match=r"^rollout.vllm_gpu_memory 0.3 gives the vLLM engine .* at least"):
        plan(cfg, processes=2, gpu_memory=0.0005)


@pytest.mark.parametrize("method", sorted(selfdistill.METHODS))
def test_every_registered_method_is_planned_as_its_registry_entry_declares(tiny_dir, method):
    cfg = _with(tiny_config(tiny_dir, precision="bf16"), method=method)
    step = registry.METHOD_INFO[method].step
    planned = plan(cfg, processes=2)
    assert planned.method == method and planned.step_peak > 0
    assert (planned.teacher is not None) == (step.teacher is not None) == (planned.teacher_weights > 0)
    assert (planned.rollout_engine is not None) == (step.trains_on == "rollouts") == (planned.rollout_peak > 0)
    shown = {"demonstration": cfg.data.max_teacher_prompt_tokens, "prompt": cfg.data.max_prompt_tokens}
    runs = step.teacher_runs(cfg)
    assert planned.teacher_prompt_tokens == (shown[step.teacher_sees] if runs else None)
    assert ("teacher forward" in planned.compute_parts) == runs


class Anchored(SFTKL):
    """A method only this test module defines: sft_kl's anchored loss, its teacher declared in its entry."""


def test_a_method_registered_elsewhere_is_planned_from_its_declaration(tiny_dir, monkeypatch):
    declared = registry.Step(teacher="frozen", teacher_sees="prompt")
    entry = registry.MethodInfo(
        "anchored", "A test method.", Anchored, "Trained by a test.", config=SFTKLConfig, step=declared
    )
    monkeypatch.setitem(registry.METHOD_INFO, "anchored", entry)
    base = tiny_config(tiny_dir, precision="bf16")
    planned = selfdistill.plan(_with(base, method="anchored"), processes=2)
    kl = selfdistill.plan(_with(base, method="sft_kl"), processes=2)
    assert planned.teacher == "frozen" and planned.teacher_prompt_tokens == base.data.max_prompt_tokens
    for name in ("weights", "teacher_weights", "step_peak", "compute_flops"):
        assert getattr(planned, name) == getattr(kl, name), name
    assert planned.rollout_engine is None and planned.rollout_peak == 0
    # A method whose entry declares no step cannot be traced: the error names what is missing.
    monkeypatch.setitem(registry.METHOD_INFO, "anchored", dataclasses.replace(entry, step=None))
    with pytest.raises(selfdistill.UserError, match=r"method anchored: .*declares nothing.*`step=Step\(...\)`"):
        selfdistill.plan(_with(base, method="anchored"), processes=2)
