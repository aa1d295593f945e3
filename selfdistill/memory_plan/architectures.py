"""The architecture to plan: a model's config.json, read locally or from the shipped ones; never downloaded."""

from __future__ import annotations

import contextlib
from pathlib import Path

from selfdistill.errors import UserError

# selfdistill/resources/architectures/ (this package sits one level below selfdistill/)
ARCHITECTURES_DIR = Path(__file__).parent.parent / "resources" / "architectures"


def shipped_architectures() -> dict[str, Path]:
    """Shipped architecture configs by name (the published config.json, no weights)."""
    return {path.stem: path for path in sorted(ARCHITECTURES_DIR.glob("*.json"))}


def architecture_config(name: str, trust_remote_code: bool = False):
    """(transformers config, where it came from) for `model.name`; never downloads anything.

    A local directory with config.json (or a config .json file, or a .gguf file) is read; the
    embedded alias and hub ids whose last part names a shipped architecture (e.g.
    Qwen/Qwen2.5-7B-Instruct) use the shipped config; other hub ids are looked up in the local
    Hugging Face cache only.
    """
    from transformers import AutoConfig

    from selfdistill.models.loading import EMBEDDED_MODELS

    shipped = shipped_architectures()
    by_lower = {stem.lower(): path for stem, path in shipped.items()}
    path = Path(name).expanduser()

    def read(source, where: str, **kwargs):
        try:
            return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs), where
        except Exception as exc:  # noqa: BLE001 - a damaged config is the user's input
            raise UserError(
                f"model.name {name}: could not read the architecture config {where} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
            ) from None

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.name {name}: the directory has no config.json, so its architecture is unknown. "
                "Point model.name at a directory holding the model's config.json (the weights are not needed)."
            )
        return read(str(path), str(path / "config.json"))
    if path.is_file() and path.suffix == ".json":
        return read(str(path), str(path))
    if path.is_file() and path.suffix == ".gguf":
        return read(str(path.parent), str(path), gguf_file=path.name)
    if name in EMBEDDED_MODELS:
        stem = "SmolLM2-135M-Instruct"
        return read(str(shipped[stem]), f"the shipped {stem}.json")
    last = name.rstrip("/").split("/")[-1].lower()
    if last in by_lower:
        source = by_lower[last]
        return read(str(source), f"the shipped {source.name}")
    parts = name.split("/")
    if len(parts) == 2 and all(parts):
        with contextlib.suppress(Exception):
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=True)
            return config, "the local Hugging Face cache"
    raise UserError(
        f"model.name {name}: no architecture config to plan with. It is not a directory holding config.json, "
        f"not one of the shipped architectures ({', '.join(shipped)}, or 'smollm2-135m'), and not in the local "
        "Hugging Face cache (nothing is downloaded). Point model.name at a directory holding the model's "
        "config.json (the weights are not needed)."
    )


def type_name(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    return architectures[0] if architectures else type(config).__name__
