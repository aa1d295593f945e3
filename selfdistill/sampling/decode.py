"""Our decode loop: the student's own completions, batched, with a KV cache (`rollout.engine: decode`).

`generate` runs its own decode loop (`_decode`) for decoder-only transformers models: the same
tokens as `model.generate` (tests/test_rollout.py compares them), without its per-step
machinery, and with "no stop tokens" meaning exactly that (`model.generate` falls back to the
model's own eos token and pads the row after it).

Sampling is seeded per completion, not per batch: each row draws its randomness from its own
generator (the Gumbel-max trick over the processed logits), so a completion depends only on
its prompt, its seed and the weights — not on which other prompts shared its batch, on batch
size, on how records are split across processes, or on a resume. That is what makes two
processes reproduce one, and a resumed run reproduce an uninterrupted one.

`DecodeSampler` is this loop as a `Sampler`, the way every caller generates (`rollout.engine:
decode`, and evaluation's default); `generate` itself is for benchmarks and tests of the loop.
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from selfdistill.models.batching import pad_batch
from selfdistill.models.distributed import backbone, full_weights
from selfdistill.precision import autocast_context
from selfdistill.progress import progress_bar
from selfdistill.sampling.base import Completions, Sampler, SamplingSettings

# Up to this many rows, the CPU decode step applies the output head as `W @ h.T` (see _logits_fn).
SMALL_DECODE_ROWS = 16


class SeededSampling(LogitsProcessor):
    """Temperature, top-p, then per-row Gumbel noise: the argmax is a sample from the row's generator."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cumulative - sorted_scores.softmax(-1) >= self.top_p  # keep the token that crosses top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return scores + gumbel


def _logits_fn(model):
    """hidden [rows, d] -> next-token logits [rows, V], as the model's own head computes them.

    On a CPU, a plain bias-free head with a few rows is applied as `W @ h.T`: the GEMM runs that
    orientation faster than `F.linear` for the 49k-row output matrix, the decode step's largest
    product (8 rows: 3% and 12% off the whole decode step in two runs; at 32 rows `F.linear` is
    as fast or faster — `python -m benchmarks.run rollout`).
    """
    from selfdistill.distillation.losses import output_head

    project = output_head(model)
    if not project.plain_linear:
        return project
    weight = project.module.weight

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.device.type == "cpu" and hidden.shape[0] <= SMALL_DECODE_ROWS:
            return torch.mm(weight, hidden.T).T
        return project(hidden)

    return logits


def _decode(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_token_ids: list[int],
    pad_token_id: int,
    pick,
    on_token=None,
) -> list[list[int]]:
    """Prefill once, then one token per step with a KV cache, until every row stopped or the budget ends.

    The same computation as `model.generate` for a decoder-only model (positions from the
    attention mask, so left padding is invisible; a stopped row keeps decoding pad tokens),
    without its per-step machinery: only the last position's hidden state goes through the
    output head, and the loop ends as soon as all rows have stopped.
    """
    from transformers import DynamicCache

    decoder = backbone(model)
    logits_of = _logits_fn(model)
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(stop_token_ids, dtype=torch.long, device=ids.device)
    stopped = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    # transformers 5.20 renamed `past_key_values` to `cache`; an unknown keyword is swallowed
    # silently, which would decode every step without its context.
    # (Asked of the decoder module: under FSDP2 `decoder` is the root's registered forward method.)
    cache_kwarg = "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"
    tokens = []
    inputs = ids
    for _ in range(max_new_tokens):
        hidden = decoder(
            input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kwarg: cache}
        ).last_hidden_state[:, -1]
        logits = logits_of(hidden).float()
        token = pick(logits).masked_fill(stopped, pad_token_id)
        tokens.append(token)
        if on_token is not None:  # streaming: each step's tokens as soon as they exist
            on_token(token.tolist())
        stopped |= torch.isin(token, stops)
        if bool(stopped.all()):
            break
        inputs = token[:, None]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = positions[:, -1:] + 1
    return torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(ids.shape[0])]


def _uses_own_loop(model) -> bool:
    """Decoder-only models from transformers' own code; anything else goes through `model.generate`."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_decoder"):
        return False
    remote = getattr(model, "is_remote_code", None)
    return not (callable(remote) and remote())


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    stop_token_ids: int | list[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seeds: list[int] | None = None,
    batch_size: int = 16,
    precision: str = "fp32",
    desc: str | None = None,
    use_hf_generate: bool = False,
    on_token=None,
) -> Completions:
    """Complete every prompt (token ids). temperature 0 is greedy; otherwise `seeds` gives one seed per prompt.
    No stop tokens (an empty list) means every completion runs to `max_new_tokens`.
    `use_hf_generate` runs transformers' `model.generate` instead of our decode loop (same tokens;
    kept as the reference the tests compare against, and used for models the loop does not cover).
    `on_token(tokens)`: each step's tokens of a batch's rows, as decoded (for streaming; `model.generate`: after).
    """
    if isinstance(stop_token_ids, int):
        stop_token_ids = [stop_token_ids]
    if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    own_loop = not use_hf_generate and _uses_own_loop(model)
    # Longest prompts first, so each batch holds prompts of similar length (less padding).
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out_ids: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    bar = progress_bar(total=len(prompts), desc=desc) if desc else None
    with full_weights(model):  # under FSDP2: gathered once here, no collectives while decoding
        for start in range(0, len(order), batch_size):
            _generate_batch(
                model,
                order[start : start + batch_size],
                prompts,
                out_ids,
                finished,
                device=device,
                own_loop=own_loop,
                seeds=seeds,
                temperature=temperature,
                top_p=top_p,
                precision=precision,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stop_token_ids,
                pad_token_id=pad_token_id,
                on_token=on_token,
            )
            if bar:
                bar.update(min(batch_size, len(order) - start))
    if bar:
        bar.close()
    model.train(was_training)
    return Completions(ids=out_ids, finished=finished)


def _generate_batch(
    model,
    batch,
    prompts,
    out_ids,
    finished,
    *,
    device,
    own_loop,
    seeds,
    temperature,
    top_p,
    precision,
    max_new_tokens,
    stop_token_ids,
    pad_token_id,
    on_token=None,
) -> None:
    """Complete the prompts at indices `batch`, writing into `out_ids` / `finished`."""
    ids, mask = pad_batch([prompts[i] for i in batch], pad_token_id, side="left")
    ids, mask = ids.to(device), mask.to(device)
    sampler = SeededSampling([seeds[i] for i in batch], temperature, top_p) if temperature > 0 else None
    with autocast_context(device, precision):
        if own_loop:
            pick = (lambda logits: sampler(None, logits).argmax(-1)) if sampler else (lambda logits: logits.argmax(-1))
            new = _decode(
                model,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stop_token_ids,
                pad_token_id=pad_token_id,
                pick=pick,
                on_token=on_token,
            )
        else:
            config = GenerationConfig(
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_token_ids or None,
                pad_token_id=pad_token_id,
                use_cache=True,
            )
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler] if sampler else []),
            )
            new = generated[:, ids.shape[1] :].tolist()
            for step in zip(*new) if on_token is not None else ():
                on_token(list(step))
    for row, i in zip(new, batch):
        cut = next((j for j, tok in enumerate(row) if tok in stop_token_ids), None)
        out_ids[i] = row if cut is None else row[: cut + 1]
        finished[i] = cut is not None


class _Abandoned(Exception):
    """Raised inside a streaming decode loop whose consumer went away, to end it."""


class DecodeSampler(Sampler):
    """Our decode loop as a `Sampler`: it samples from the model itself, so `sync` has nothing to copy."""

    def __init__(self, model, settings: SamplingSettings):
        self.model = model
        self.settings = settings

    @classmethod
    def build(cls, model, settings: SamplingSettings, *, cfg=None, max_prompt_tokens=None) -> DecodeSampler:
        """The loop has no settings of its own and no fixed context: `cfg` and `max_prompt_tokens` are unused."""
        return cls(model, settings)

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int] | None,
        *,
        desc: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Completions:
        s = self.settings
        return generate(
            self.model,
            prompts,
            seeds=seeds,
            desc=desc,
            max_new_tokens=s.budget(max_new_tokens),
            stop_token_ids=list(s.stop_token_ids),
            pad_token_id=s.pad_token_id,
            temperature=s.temperature,
            top_p=s.top_p,
            batch_size=s.batch_size,
            precision=s.precision,
        )

    def stream(self, prompt: list[int], seed: int | None, *, max_new_tokens: int | None = None) -> Iterator[int]:
        """One prompt's tokens as the loop decodes them (up to and including a stop token). The loop runs in a
        thread of its own, so the caller may consume the tokens from any thread; closing the iterator early (a
        client that went away) stops the loop at its next token."""
        tokens: queue.Queue = queue.Queue()
        abandoned = threading.Event()
        s = self.settings

        def on_token(step) -> None:
            if abandoned.is_set():
                raise _Abandoned
            tokens.put(step[0])

        def decode() -> None:
            try:
                generate(
                    self.model,
                    [prompt],
                    seeds=None if seed is None else [seed],
                    max_new_tokens=s.budget(max_new_tokens),
                    stop_token_ids=list(s.stop_token_ids),
                    pad_token_id=s.pad_token_id,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    batch_size=1,
                    precision=s.precision,
                    on_token=on_token,
                )
            except _Abandoned:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                tokens.put(exc)
            finally:
                tokens.put(None)

        threading.Thread(target=decode, daemon=True, name="selfdistill-stream").start()
        try:
            while (token := tokens.get()) is not None:
                if isinstance(token, BaseException):
                    raise token
                yield token
                if token in s.stop_token_ids:
                    return
        finally:
            abandoned.set()

    def sync(self, model) -> float:
        """Nothing to copy: the loop runs the live model. Only which model that is is noted (no time spent)."""
        self.model = model
        return 0.0
