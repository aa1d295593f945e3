"""Drift: how far a checkpoint has moved from its base model on general prompts (the paper's
"distance from the base model"), in nats per token.

The base model answers a fixed set of general prompts once, greedily (64 tokens by default).
For every answer token we keep the base model's log-probabilities of its top-k next tokens
(k = 256 by default) and the probability mass of the rest, so later checkpoints are compared
without the base model in memory. For a checkpoint we report, averaged over answer tokens:

- `kl_nats`: KL(base || model) between the next-token distributions, computed over the base's
  top-k tokens plus one bucket for all other tokens (the model's bucket is 1 minus its mass on
  the same k tokens). Merging tokens into a bucket can only lower a KL, so this is a close lower
  bound of the full-vocabulary value; pass `base_model=` to `drift` for the exact one.
- `nll_nats`: the model's negative log-likelihood of the base's answer tokens.

Logits are computed only at answer positions, one sequence at a time, so no
[batch, tokens, vocab] tensor larger than one answer is ever alive.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from selfdistill.data.prompts import PromptBuilder
from selfdistill.eval.evaluate import answer_budgets, answer_settings, generate_within
from selfdistill.files import write_atomic
from selfdistill.precision import autocast_context
from selfdistill.sampling import Sampler, sampling_from

FORMAT = "selfdistill-drift-v1"


def drift_prompts() -> list[str]:
    path = resources.files("selfdistill") / "resources" / "probes" / "drift_prompts.json"
    return json.loads(path.read_text(encoding="utf-8"))["prompts"]


def _answer_logprobs(model, prompt_ids: list[int], answer_ids: list[int], precision: str = "fp32") -> torch.Tensor:
    """[len(answer), vocab] log-probabilities of the next token at each answer position."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    with torch.no_grad(), autocast_context(device, precision):
        # The distribution over answer token t is predicted at position len(prompt) - 1 + t.
        logits = model(input_ids=ids, logits_to_keep=len(answer_ids) + 1).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def base_answers(
    model,
    tokenizer,
    *,
    prompts: list[str] | None = None,
    max_new_tokens: int = 64,
    top_k: int = 256,
    batch_size: int = 16,
    precision: str = "fp32",
    base_name: str = "",
    engine: str = "decode",
    sampler: Sampler | None = None,
) -> dict:
    """The base model's greedy answers with the top-k log-probabilities kept for each answer token.

    The answers come from the rollout engine `engine` (a registered name; its defaults), or from a
    ready greedy `sampler` of the base model's (at least `max_new_tokens`); the log-probabilities are
    always the model's own.
    """
    builder = PromptBuilder(tokenizer)
    prompts = prompts if prompts is not None else drift_prompts()
    prompt_ids = [builder.encode_messages([{"role": "user", "content": p}]) for p in prompts]
    # Prompt and answer are scored together later, so both must fit the model's context.
    budgets = answer_budgets(model, prompt_ids, [f"drift prompt {i}" for i in range(len(prompts))], max_new_tokens)
    settings = answer_settings(
        model, tokenizer, max_new_tokens, temperature=0, batch_size=batch_size, precision=precision
    )
    longest = max(map(len, prompt_ids), default=0)
    with sampling_from(model, settings, engine=engine, max_prompt_tokens=longest, sampler=sampler) as chosen:
        done = generate_within(chosen, prompt_ids, budgets, seeds=None, desc="drift: base answers")
    items = []
    for text, ids, answer in zip(prompts, prompt_ids, done.ids):
        if not answer:
            continue
        logprobs = _answer_logprobs(model, ids, answer)
        top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        items.append(
            {
                "prompt": text,
                "prompt_ids": ids,
                "answer_ids": answer,
                "top_ids": top.indices.tolist(),
                "top_logprobs": top.values.tolist(),
            }
        )
    return {
        "format": FORMAT,
        "base": base_name,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "prompts": list(prompts),  # the answers are reused only for the same prompts (--limit)
        "items": items,
    }


def save_base_answers(answers: dict, path: str | Path) -> None:
    write_atomic(path, json.dumps(answers))  # a crash mid-write never leaves a truncated file behind


def load_base_answers(path: str | Path, base_name: str | None = None) -> dict | None:
    """Stored answers, or None when absent or made for another base model."""
    path = Path(path)
    if not path.is_file():
        return None
    answers = json.loads(path.read_text(encoding="utf-8"))
    if answers.get("format") != FORMAT or (base_name is not None and answers.get("base") != base_name):
        return None
    return answers


def _bucket_kl(base_top: torch.Tensor, top_ids: torch.Tensor, model_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(base || model) over the base's top-k tokens plus one bucket for the rest."""
    model_top = model_logprobs.gather(-1, top_ids)
    base_p = base_top.exp()
    base_rest = (1 - base_p.sum(-1)).clamp_min(0)
    model_rest = (1 - model_top.exp().sum(-1)).clamp_min(1e-30)
    kl = (base_p * (base_top - model_top)).sum(-1)
    rest = torch.where(
        base_rest > 0, base_rest * (base_rest.clamp_min(1e-30).log() - model_rest.log()), torch.zeros_like(base_rest)
    )
    return (kl + rest).clamp_min(0)


def drift(answers: dict, model, tokenizer=None, *, base_model=None, precision: str = "fp32") -> dict:
    """Mean per-token KL(base || model) and NLL of the base answers under the model, in nats.

    With `base_model`, the KL is over the full vocabulary; otherwise over the stored top-k plus
    one bucket. `tokenizer` is unused (the answers are token ids) and accepted for symmetry.
    """
    total_kl, total_nll, tokens = 0.0, 0.0, 0
    per_prompt = []  # each prompt's mean KL: the spread across prompts is the measurement's noise
    for item in answers["items"]:
        prompt_ids, answer_ids = item["prompt_ids"], item["answer_ids"]
        model_lp = _answer_logprobs(model, prompt_ids, answer_ids, precision)
        if base_model is not None:
            base_lp = _answer_logprobs(base_model, prompt_ids, answer_ids, precision)
            kl = (base_lp.exp() * (base_lp - model_lp)).sum(-1)
        else:
            kl = _bucket_kl(torch.tensor(item["top_logprobs"]), torch.tensor(item["top_ids"]), model_lp)
        nll = -model_lp.gather(-1, torch.tensor(answer_ids)[:, None])[:, 0]
        total_kl += float(kl.sum())
        per_prompt.append(round(float(kl.mean()), 6) if len(answer_ids) else 0.0)
        total_nll += float(nll.sum())
        tokens += len(answer_ids)
    return {
        "kl_nats": total_kl / max(tokens, 1),
        "nll_nats": total_nll / max(tokens, 1),
        "tokens": tokens,
        "prompts": len(answers["items"]),
        "kl_per_prompt": per_prompt,
        "kl_method": "full" if base_model is not None else f"top{answers.get('top_k')}+rest",
    }
