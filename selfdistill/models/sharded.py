"""Loading and saving a model that FSDP2 shards, without any process ever holding the whole of it.

Under torchrun the student is built with its parameters on the meta device (no memory; buffers
such as rotary frequencies are computed for real, they are small), LoRA layers included, and so
is the teacher copied from it. Both are sharded with the product's plan while still empty; then
every process allocates only its own shards (`materialize`) and reads only its rows of each
weight from the safetensors files (`fill_from_files`): FSDP2 shards every parameter along its
first dimension in `world` nearly equal pieces, so a process's shard is one contiguous slice of
rows, which safetensors reads without touching the rest of the file.

`write_final` writes `final/` one parameter at a time: every process takes part in gathering it,
the main process streams it into its place in the safetensors file (whose header is written first,
from the shapes and dtypes) and frees it, so no process holds more than one whole parameter.
Tensors keep the dtype a one-process run writes (a LoRA run's merged weights: the base weights'
dtype, W0 + scale·B·A added as PEFT's merge adds it).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from selfdistill.errors import UserError
from selfdistill.models.lora import is_lora, merged_weight


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device and their buffers for real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is kept as it is: tied weights stay one object
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(module._parameters[name].to("meta"), **kwargs)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(path: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model saved at `path` (a directory), its parameters on the meta device, in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from selfdistill.models.saving import published_dtype

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.published_dtype = published_dtype(path)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def is_empty(model) -> bool:
    return any(p.is_meta for p in model.parameters())


# What a run reads of a hub model: config and generation config, tokenizer files, chat template, weights.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def weights_directory(path: str) -> Path:
    """The local directory of a model's safetensors files (a hub id: its download, once per machine)."""
    local = Path(path)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=HUB_FILES))


def materialize(model, device: torch.device) -> None:
    """Allocate this process's shards of an empty (meta) model on `device`; buffers keep their values."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    shared: dict[int, list] = {}  # tied weights: one parameter in several modules, kept one after allocation
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                shared.setdefault(id(param), []).append((module, key))
    model.to_empty(device=device)
    for places in shared.values():
        first = places[0][0]._parameters[places[0][1]]
        for module, key in places[1:]:
            module._parameters[key] = first
    with torch.no_grad():
        for name, value in buffers.items():
            target = model.get_buffer(name)
            if value.is_meta:
                raise ValueError(f"buffer {name} was built on the meta device and has no value to restore")
            target.copy_(value.to(target.device))


def checkpoint_name(parameter_name: str) -> str:
    """A (PEFT-wrapped) model's parameter name -> the name the base model's safetensors files use."""
    name = parameter_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def rows_of_this_process(param) -> tuple[int, int]:
    """The [start, end) rows of the whole parameter that this process's shard holds (FSDP2's Shard(0))."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 1
    rows = param.shape[0]
    # The mesh dimension that shards rows: the only one of a plain mesh; "shard" of a hybrid
    # (replicate, shard) mesh, whose replicas hold the same rows.
    dim = next(i for i, placement in enumerate(param.placements) if placement.is_shard(0))
    world = param.device_mesh.size(dim)
    rank = param.device_mesh.get_local_rank(dim)
    per = -(-rows // world)
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def _local(param) -> torch.Tensor:
    from selfdistill.models.distributed import local

    return local(param)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Files:
    """A model directory's safetensors files, read slice by slice with plain file reads.

    A safetensors file is an 8-byte header length, a JSON header (each tensor's dtype, shape and
    byte range) and the row-major data, so rows [start, end) of a tensor are one contiguous byte
    range. Reading it straight into a buffer of that size (not through a memory map, whose touched
    pages would count against the process) keeps the extra memory to one slice.
    """

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(f.name for f in directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"{directory}: no .safetensors weights to load")
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = directory / name
            with path.open("rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                self.entries[key] = (path, 8 + length, entry)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read_rows(self, name: str, start: int, end: int, target: torch.Tensor) -> None:
        """Copy rows [start, end) of tensor `name` into `target` (any device and dtype, same element count)."""
        path, data_start, entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise UserError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which sharded loading does not read")
        shape = entry["shape"]
        row_elements = 1
        for size in shape[1:]:
            row_elements *= size
        if not shape:
            start, end, row_elements = 0, 1, 1
        item = torch.empty((), dtype=dtype).element_size()
        direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
        buffer = target if direct else torch.empty((end - start) * row_elements, dtype=dtype)
        if buffer.numel() != (end - start) * row_elements:
            raise UserError(f"{path}: tensor {name!r} has shape {shape}, which does not fit the model's parameter")
        with path.open("rb") as f:
            f.seek(data_start + entry["data_offsets"][0] + start * row_elements * item)
            f.readinto(memoryview(buffer.view(-1).view(torch.uint8).numpy()))
        if not direct:
            target.copy_(buffer.reshape(target.shape))


def fill_from_files(model, directory: Path) -> list[str]:
    """Copy this process's rows of every weight in the files into `model`'s (local) parameters.

    Returns the names of trainable parameters the files do not hold (LoRA factors, initialised by
    `init_lora`); a base weight the files lack is an error naming it.
    """
    files = _Files(directory)
    not_in_files = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = checkpoint_name(name)
            if key not in files:
                if "lora_" in name:
                    not_in_files.append(name)
                    continue
                raise UserError(
                    f"{directory}: the weights have no tensor {key!r} for the model's parameter {name} "
                    "(the files do not match the model's config.json)."
                )
            start, end = rows_of_this_process(param)
            if end > start:
                files.read_rows(key, start, end, _local(param))
    return not_in_files


def init_lora(model, seed: int) -> None:
    """LoRA's starting point, the same in every process count: B = 0, A as PEFT draws it (Kaiming
    uniform, a = √5), from a generator seeded by the run's seed and the layer's name. Every process
    draws the whole (small) A and keeps its rows."""
    import math

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                _local(param).zero_()
            elif "lora_A" in name:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                whole = torch.empty(param.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(whole, a=math.sqrt(5), generator=generator)
                start, end = rows_of_this_process(param)
                target = _local(param)
                target.copy_(whole[start:end].to(target.dtype).reshape(target.shape))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter; under FSDP2 one all-gather of this parameter alone.

    Every process walks the parameters in the same order, so the all-gathers line up; at no
    point is more than one parameter (or one merged LoRA layer) gathered.
    """
    from torch.distributed.tensor import DTensor

    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _saved_dtype(own: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    return wanted if wanted is not None and own.is_floating_point else own


def merged_weights(
    model, factors: dict | None = None, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, whole tensor) for every weight of the plain model, one at a time, in order.

    Names are those `save_pretrained` writes for the plain model (`checkpoint_name`). A LoRA layer
    yields its merged weight W0 + scale·B·A, added into W0's dtype as PEFT's merge adds it, so at
    most one extra layer-sized tensor exists at a time; the gathered factors go into `factors`
    (under the adapter's state-dict names) when it is given. Every process must walk it.
    `dtype`: the tensors are yielded in it (None: their own); a plain weight is cast on its shard,
    before the gather, so the gather moves that dtype's bytes; a LoRA layer is merged in W0's dtype
    first (as PEFT merges), then cast.
    """
    layers = {}
    if is_lora(model):
        from peft.tuners.lora import LoraLayer

        layers = {f"{n}.base_layer.weight": m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, param in _plain_parameters(model):
        layer = layers.get(name)
        if layer is not None:
            tensor = _merged(name, layer, whole(param), factors)
        else:
            tensor = whole(param.detach().to(_saved_dtype(param.dtype, dtype)))
        yield checkpoint_name(name), tensor.to(_saved_dtype(tensor.dtype, dtype))


def _plain_parameters(model) -> list[tuple[str, torch.Tensor]]:
    """The parameters a plain model has: all but the LoRA factors (merged into their base weights)."""
    return [(name, param) for name, param in model.named_parameters() if "lora_" not in name]


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class _StreamWriter:
    """Safetensors files written tensor by tensor: every header is known up front (names, shapes and
    dtypes of all tensors, in order), so each gathered tensor goes straight to disk and is freed.
    Tensors are grouped into files of at most `part_bytes` (one file: model.safetensors)."""

    def __init__(self, directory: Path, layout: list[tuple[str, tuple, torch.dtype]], part_bytes: int):
        parts, size = [[]], 0
        for name, shape, dtype in layout:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if parts[-1] and size + nbytes > part_bytes:
                parts.append([])
                size = 0
            parts[-1].append((name, shape, dtype, nbytes))
            size += nbytes
        count = len(parts)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        )
        self.file_of, self.files, weight_map, total = {}, [], {}, 0
        for filename, part in zip(names, parts):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype, nbytes in part:
                header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                self.file_of[name] = len(self.files)
                weight_map[name] = filename
            encoded = json.dumps(header).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
            f = (directory / filename).open("wb")
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            self.files.append(f)
            total += offset
        if count > 1:
            (directory / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor, in the layout's order."""
        data = tensor.detach().to("cpu").contiguous()
        self.files[self.file_of[name]].write(memoryview(data.view(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        for f in self.files:
            f.close()


def write_final(
    model, tokenizer, directory: Path, is_main: bool, part_bytes: int = 2 * 2**30, dtype: torch.dtype | None = None
) -> None:
    """final/ of a sharded model, one gathered parameter at a time (every process must call it).

    The same files a one-process run writes with `save_model`: merged weights in `dtype` (None: the
    base weights' own dtype; each weight is cast before it is gathered, so a bf16 save also gathers
    half the bytes), and for LoRA the adapter in `adapter/`, config, generation config and tokenizer.
    """
    layout = [
        (checkpoint_name(name), tuple(param.shape), _saved_dtype(param.dtype, dtype))
        for name, param in _plain_parameters(model)
    ]
    writer = _StreamWriter(directory, layout, part_bytes) if is_main else None
    adapter_state = {}
    for name, tensor in merged_weights(model, adapter_state, dtype=dtype):
        if writer is not None:
            writer.add(name, tensor)
        del tensor
    if writer is None:
        return
    writer.close()
    lora = is_lora(model)
    config = (model.get_base_model() if lora else model).config
    config.dtype = layout[0][2]  # the weights' own dtype (a LoRA run's: the base weights')
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    if lora:
        model.save_pretrained(directory / "adapter", state_dict=adapter_state, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _merged(name: str, layer, base: torch.Tensor, factors: dict | None) -> torch.Tensor:
    """W0 + scale·B·A for one LoRA layer from gathered factors, added into W0's dtype as PEFT's merge adds it."""
    prefix = name.removesuffix("base_layer.weight")

    def gathered(layer, adapter):
        a = whole(layer.lora_A[adapter].weight)
        b = whole(layer.lora_B[adapter].weight)
        if factors is not None:
            factors[f"{prefix}lora_A.{adapter}.weight"] = a.to("cpu")
            factors[f"{prefix}lora_B.{adapter}.weight"] = b.to("cpu")
        return a, b

    return merged_weight(layer, base, base.dtype, gathered)
