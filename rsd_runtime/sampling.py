"""Sampling parameters of a request, and the sampler that turns logits into next tokens.

The filters follow vLLM's sampler (and, for the same inputs, Hugging Face's
TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper): logits are
divided by the temperature, top-k keeps every token whose logit is at least the
k-th largest, top-p keeps the smallest set of most probable tokens whose
probability sums to at least top_p (computed on the distribution left by
top-k), and a token is drawn from what remains. Where we differ:

* Only temperature == 0 is greedy. vLLM also treats temperatures below 1e-5
  as greedy; here a tiny positive temperature is honoured (the logits are
  shifted by their maximum before dividing, so nothing overflows) and gives
  argmax in practice. One below float32's smallest (about 1.4e-45), which
  would divide by zero, gives argmax: the limit of every smaller temperature.
* The draw is ``torch.multinomial`` with the sequence's own generator. vLLM
  draws by an exponential race (argmax of probs / Exp(1) noise). Both give the
  same distribution, but a seed does not reproduce vLLM's tokens.
* Ties are kept as vLLM and transformers keep them: top-k keeps every token
  tied with the k-th largest logit, so it can keep more than k tokens.
"""
from __future__ import annotations

import math

import torch

from rsd_runtime.sampling_params import MAX_LOGPROBS, SamplingParams  # noqa: F401 (part of this module's API)


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``; None for no seed (the draw then uses torch's global RNG, as vLLM does)."""
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Set filtered-out logits to -inf; vLLM's ``apply_top_k_top_p``.

    logits: (num_seqs, vocab), already divided by the temperature.
    top_k: (num_seqs,) int64 in [1, vocab] (vocab: off), or None.
    top_p: (num_seqs,) float64 in (0, 1] (1: off), or None.
    """
    vocab = logits.shape[-1]
    # Ascending, and stable so that which of several tied tokens top-p drops does not vary run to run.
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False, stable=True)
    if top_k is not None:
        kth = logits_sort.gather(1, (vocab - top_k).unsqueeze(1))  # (num_seqs, 1): the k-th largest
        logits_sort = logits_sort.masked_fill(logits_sort < kth, -math.inf)
    if top_p is not None:
        cum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        # Dropping the low tail whose mass is <= 1 - top_p leaves the smallest head with mass >= top_p.
        # 1 - top_p in double, then rounded once: the threshold transformers compares against.
        drop = cum <= (1 - top_p.double()).to(cum.dtype).unsqueeze(1)
        drop[:, -1] = False  # the most probable token always stays
        logits_sort = logits_sort.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, logits_idx, logits_sort)


class Sampler:
    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[int]:
        """One next token per row of ``logits`` (num_seqs, vocab).

        Row i is sampled with params[i] and draws only from generators[i], so a
        seeded row gives the same token whatever else is in the batch.
        """
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(generators) != len(params):
            raise ValueError(f"need logits (num_seqs, vocab) with one params and one generator per row; got "
                             f"logits {tuple(logits.shape)}, {len(params)} params, {len(generators)} generators")
        if logits.shape[0] == 0:
            return []
        logits = logits.float()
        row_max = logits.max(dim=-1, keepdim=True).values
        if torch.isnan(logits).any() or not torch.isfinite(row_max).all():
            raise ValueError("logits contain NaN or +inf, or a row is all -inf: nothing can be sampled")
        tokens = logits.argmax(dim=-1).tolist()
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return tokens

        vocab = logits.shape[-1]
        temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32).unsqueeze(1)
        if not (temps > 0).all():  # rounded to 0 in float32: argmax, as for any smaller temperature
            rows = [i for i, t in zip(rows, temps[:, 0].tolist()) if t > 0]
            if not rows:
                return tokens
            temps = temps[temps > 0].unsqueeze(1)
        x = (logits[rows] - row_max[rows]) / temps  # (num_random, vocab)
        top_k = [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows]
        top_p = [params[i].top_p for i in rows]
        x = apply_top_k_top_p(
            x,
            torch.tensor(top_k, dtype=torch.int64) if any(k < vocab for k in top_k) else None,
            torch.tensor(top_p, dtype=torch.float64) if any(p < 1.0 for p in top_p) else None,
        )
        probs = x.softmax(dim=-1)
        for j, i in enumerate(rows):
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
        return tokens


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[tuple[float, list]]:
    """For row i: (logprob of tokens[i], [(token, logprob)] of the num_top[i] most likely tokens).

    Log-probabilities of the model's own distribution (log_softmax of the raw logits, before
    temperature and filtering), as vLLM reports them by default.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (tok, k) in enumerate(zip(tokens, num_top)):
        top = []
        if k:
            vals, idx = logp[i].topk(k)
            top = list(zip(idx.tolist(), vals.tolist()))
        out.append((float(logp[i, tok]), top))
    return out
