"""Serving with vLLM (`sdft serve --engine vllm` or `--engine URL`); see `selfdistill.serve.engines`.

`InProcessVLLM` runs vLLM's asynchronous engine (AsyncLLM, checked against vLLM 0.32.0) on an event loop of
its own, in a thread of the server, so requests from the server's worker threads are batched together. A
version's weights are loaded in place from its directory (the workers' `reload_weights` with
`weights_path`), and the prefix cache is emptied: blocks computed with the old weights must not be reused.

`RemoteVLLM` talks to a vLLM OpenAI server. Each version is registered there as a LoRA adapter
(`POST /v1/load_lora_adapter`) against the base model the server was started with. A learner's round trains
an adapter on the version before it, so version N is its lineage's adapters applied one after the other;
`stack_adapters` writes that as one adapter whose rank is the sum of theirs (exact, no approximation), once
per version, in `versions/vN/adapter-from-base/`. The server must read that directory, so it runs on the
same machine or a shared filesystem, with `--max-lora-rank` at least the stacked rank.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from selfdistill.errors import UserError
from selfdistill.serve.engines import GenerationRequest, ServingEngine

log = logging.getLogger(__name__)


class InProcessVLLM(ServingEngine):
    name = "vllm"
    one_version_at_a_time = True  # one copy of the weights, reloaded in place

    def __init__(self, precision: str = "auto", gpu_memory: float = 0.85, max_model_len: int | None = None):
        from selfdistill.precision import resolve_precision
        from selfdistill.sampling.vllm_engine import import_vllm

        import_vllm()  # a UserError saying how to install vLLM where it is missing
        # AsyncLLM runs its engine core in a child process and sends it calls over a local socket, encoded with
        # msgpack, which refuses a function. Rebuilding a tied head's packed copy after a reload is one
        # (`_rebuild_output_head`): allow pickle for the calls between this process and the child it starts.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.gpu_memory = gpu_memory
        self.max_model_len = max_model_len
        self.engine = None
        self.loaded: str | None = None
        self.tied_head = False
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="selfdistill-vllm-loop").start()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def prepare(self, learner, version: int, path: str) -> str:
        return path  # the weights are read by `activate`, into the engine's own memory

    def activate(self, path: str) -> None:
        from selfdistill.sampling.vllm_engine import _rebuild_output_head

        if self.engine is None:
            self._run(self._build(path))
        elif path != self.loaded:
            kwargs = {"weights_path": path, "is_checkpoint_format": True}
            self._run(self.engine.collective_rpc("reload_weights", kwargs=kwargs))
            if self.tied_head:  # the CPU backend's packed copy of a tied head (see `_rebuild_output_head`)
                self._run(self.engine.collective_rpc(_rebuild_output_head))
            self._run(self.engine.reset_prefix_cache())
        self.loaded = path

    async def _build(self, path: str) -> None:
        from transformers import AutoConfig
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from selfdistill.sampling.vllm_engine import engine_dtype, engine_options

        self.tied_head = bool(getattr(AutoConfig.from_pretrained(path), "tie_word_embeddings", False))
        options = engine_options(self.device, processes=1, gpu_memory=self.gpu_memory, eager=False, sleep=False)
        args = AsyncEngineArgs(
            model=path,
            dtype=engine_dtype(self.precision),
            max_model_len=self.max_model_len,
            enable_prefix_caching=True,
            generation_config="vllm",
            disable_log_stats=True,
            **options,
        )
        self.engine = AsyncLLM.from_engine_args(args)

    def stream(self, handle: str, prompt_ids, request: GenerationRequest, stop_ids) -> Iterator[int]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            seed=request.sampling_seed,
            detokenize=False,
            ignore_eos=True,  # our stop tokens end a completion, every end-of-turn id (as in rollouts)
            stop_token_ids=list(stop_ids),
            output_kind=RequestOutputKind.DELTA,
        )
        tokens: queue.Queue = queue.Queue()

        async def produce() -> None:
            try:
                prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
                async for output in self.engine.generate(prompt, params, uuid.uuid4().hex):
                    for token in output.outputs[0].token_ids:
                        tokens.put(token)
            except Exception as exc:  # noqa: BLE001 - raised in the consumer's thread
                tokens.put(exc)
            finally:
                tokens.put(None)

        running = asyncio.run_coroutine_threadsafe(produce(), self.loop)
        try:
            while (token := tokens.get()) is not None:
                if isinstance(token, Exception):
                    raise token
                yield token
        finally:
            running.cancel()  # a consumer that left early: cancelling the generation aborts the request in vLLM

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self.loop.call_soon_threadsafe(self.loop.stop)


class RemoteVLLM(ServingEngine):
    name = "vllm-server"

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self.base = self._base_model()
        self._in_use: dict[str, int] = {}
        self._released: set[str] = set()
        self._lock = threading.Lock()

    def _base_model(self) -> str:
        import httpx

        try:
            response = self.client.get("/v1/models")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise UserError(f"--engine {self.url}: no vLLM server answers there ({exc})") from None
        models = response.json().get("data", [])
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise UserError(f"--engine {self.url}: the server lists no base model ({models})")
        return bases[0]

    def prepare(self, learner, version: int, path: str) -> str:
        if version == 0:
            return self.base
        adapter = adapter_from_base(learner, version)
        name = f"{learner.root.name}-v{version}"
        response = self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter)})
        if response.status_code == 404:
            raise UserError(
                f"--engine {self.url}: the server cannot load adapters at run time; start it with --enable-lora "
                "and the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
            )
        if response.status_code != 200 and "already" not in response.text:
            raise UserError(
                f"--engine {self.url}: the server refused the adapter of version {version}: {response.text}"
            )
        return name

    @contextmanager
    def _using(self, name: str) -> Iterator[None]:
        with self._lock:
            self._in_use[name] = self._in_use.get(name, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[name] -= 1
                unload = name in self._released and self._in_use[name] == 0
            if unload:
                self._unload(name)

    def stream(self, handle: str, prompt_ids, request: GenerationRequest, stop_ids) -> Iterator[int]:
        body = {
            "model": handle,
            "prompt": list(prompt_ids),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.sampling_seed,
            "stream": True,
            "return_token_ids": True,
            "ignore_eos": True,
            "stop_token_ids": list(stop_ids),
            "skip_special_tokens": False,
        }
        with self._using(handle), self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"the vLLM server answered {response.status_code}: {response.read().decode()}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
                yield from choices[0].get("token_ids") or []

    def release(self, handle: str) -> None:
        """Unload the version's adapter once no request uses it (the base model stays)."""
        if handle == self.base:
            return
        with self._lock:
            self._released.add(handle)
            unload = self._in_use.get(handle, 0) == 0
        if unload:
            self._unload(handle)

    def _unload(self, name: str) -> None:
        with self._lock:
            if name not in self._released:
                return
            self._released.discard(name)
        response = self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code != 200:
            log.warning("the vLLM server did not unload adapter %s: %s", name, response.text)

    def close(self) -> None:
        self.client.close()


def adapter_from_base(learner, version: int) -> Path:
    """Version `version` as one LoRA adapter against the base model (see the module's docstring), written
    once into the version's directory and reused."""
    target = learner.root / "versions" / f"v{version}" / "adapter-from-base"
    if (target / "adapter_config.json").is_file():
        return target
    lineage = learner.lineage(version)  # v1 ... vN, each trained on the one before
    full = [v["number"] for v in lineage if v["kind"] != "lora"]
    if full:
        raise UserError(
            f"version {full[0]} was trained with full weights: an external vLLM server serves versions as LoRA "
            "adapters of its base model. Serve this learner with --engine vllm (in-process) or --engine decode."
        )
    from selfdistill.models.lora import stack_adapters

    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=target.parent) as scratch:
        adapters = [Path(v["path"]) / "adapter" for v in lineage]
        written = stack_adapters(adapters, Path(scratch) / "adapter", base_model=learner.model_path(0))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(written, target)
    return target
