"""The sampler: greedy, temperature, top-k, top-p and seeds, checked against argmax, transformers and counts."""
from __future__ import annotations

import math

import pytest
import torch

from rsd_runtime.sampling import Sampler, SamplingParams, apply_top_k_top_p, make_generator

VOCAB = 64


@pytest.fixture
def sampler() -> Sampler:
    return Sampler()


def random_logits(num_seqs: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_seqs, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draw(sampler, logits_row: torch.Tensor, params: SamplingParams, num: int, seed: int = 0) -> torch.Tensor:
    """num draws from one row, all from one seeded generator; (num,) token ids."""
    g = make_generator(seed)
    tokens = sampler.sample(logits_row.expand(num, -1).contiguous(), [params] * num, [g] * num)
    return torch.tensor(tokens)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# Chi-square critical values at p = 0.001; the draws use fixed seeds, so these tests do not flake.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 7: 24.32}


def test_greedy_is_argmax(sampler):
    logits = random_logits(8)
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5)] * 8  # filters do not apply to greedy
    assert sampler.sample(logits, params, [None] * 8) == logits.argmax(dim=-1).tolist()


def test_greedy_takes_lowest_index_on_ties(sampler):
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0]])
    assert sampler.sample(logits, [SamplingParams(temperature=0)], [None]) == [1]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.5, top_k=1),
                                    SamplingParams(temperature=1.5, top_p=1e-6),
                                    SamplingParams(temperature=1e-30),
                                    SamplingParams(temperature=1e-46)],  # 0 in float32: no division by it
                         ids=["top_k=1", "tiny top_p", "tiny temperature", "temperature under float32's least"])
def test_degenerate_filters_are_greedy(sampler, params):
    logits = random_logits(16, seed=1)
    gens = [make_generator(i) for i in range(16)]
    assert sampler.sample(logits, [params] * 16, gens) == logits.argmax(dim=-1).tolist()


def test_a_temperature_under_float32s_least_is_argmax_beside_other_rows(sampler):
    logits = random_logits(4, seed=3)
    params = [SamplingParams(temperature=1e-46), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=5e-46), SamplingParams(temperature=0.7, seed=2)]
    gens = [make_generator(p.seed) for p in params]
    alone = [sampler.sample(logits[i:i + 1], [p], [make_generator(p.seed)])[0] for i, p in enumerate(params)]
    got = sampler.sample(logits, params, gens)
    assert got == alone and got[0] == logits[0].argmax() and got[2] == logits[2].argmax()


def test_seeded_rows_do_not_depend_on_the_batch(sampler):
    row = random_logits(1, seed=2)[0] / 3  # flat enough that the draws vary

    def run(companions: list[SamplingParams], position: int, seed: int = 1234, steps: int = 20) -> list[int]:
        params = list(companions)
        params.insert(position, SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=seed))
        gens = [make_generator(p.seed) for p in params]
        out = []
        for step in range(steps):
            logits = random_logits(len(params), seed=100 + step)
            logits[position] = row + step * 0.01
            out.append(sampler.sample(logits, params, gens)[position])
        return out

    alone = run([], 0)
    assert len(set(alone)) > 3, "the draws must vary for this test to mean anything"
    assert run([], 0, seed=4321) != alone
    others = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=7),
              SamplingParams(temperature=2.0, top_k=5), SamplingParams(temperature=1.0, top_p=0.3, seed=9)]
    assert run(others, 0) == alone
    assert run(others, 2) == alone
    assert run(others[:1], 1) == alone


def test_unseeded_rows_follow_the_global_rng(sampler):
    logits = random_logits(1, seed=3)
    params = SamplingParams(temperature=1.0)
    torch.manual_seed(5)
    first = [sampler.sample(logits, [params], [None])[0] for _ in range(30)]
    torch.manual_seed(5)
    assert [sampler.sample(logits, [params], [None])[0] for _ in range(30)] == first


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_gives_softmax_of_scaled_logits(sampler, temperature):
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.5])
    tokens = draw(sampler, logits, SamplingParams(temperature=temperature), 6_000, seed=11)
    expected = torch.softmax(logits / temperature, dim=-1)
    assert chi_square(tokens, expected) < CHI2_999[4]
    # The same counts do not fit another temperature: the check has teeth.
    assert chi_square(tokens, torch.softmax(logits / (temperature * 1.5), dim=-1)) > CHI2_999[4]


def test_top_k_stays_within_the_k_best(sampler):
    logits = random_logits(1, seed=4)[0]
    tokens = draw(sampler, logits, SamplingParams(temperature=3.0, top_k=8), 5_000, seed=12)
    best = logits.topk(8).indices
    assert set(tokens.tolist()) == set(best.tolist())
    expected = torch.zeros(VOCAB)
    expected[best] = torch.softmax(logits[best] / 3.0, dim=-1)
    assert chi_square(tokens, expected) < CHI2_999[7]


def test_top_p_keeps_the_smallest_head_reaching_p(sampler):
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    # 0.5 < 0.7 <= 0.5 + 0.3: tokens 1 and 3, renormalised.
    tokens = draw(sampler, logits, SamplingParams(temperature=1.0, top_p=0.7), 5_000, seed=13)
    assert chi_square(tokens, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8])) < CHI2_999[1]
    tokens = draw(sampler, logits, SamplingParams(temperature=1.0, top_p=0.85), 5_000, seed=14)
    assert chi_square(tokens, torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95) < CHI2_999[2]


def test_top_p_applies_after_top_k(sampler):
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top-k=2 leaves (4/7, 3/7); top-p=0.5 then keeps only token 0. Without top-k first it would keep two.
    tokens = draw(sampler, probs.log(), SamplingParams(top_k=2, top_p=0.5), 2_000, seed=15)
    assert set(tokens.tolist()) == {0}
    tokens = draw(sampler, probs.log(), SamplingParams(top_p=0.5), 2_000, seed=15)
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (1, 1.0), (VOCAB, 1.0), (0, 0.9), (0, 0.3), (10, 0.6)])
def test_filters_match_transformers(top_k, top_p):
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    logits = random_logits(32, seed=6)
    expected = logits
    if top_k > 0:
        expected = logits_process.TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = logits_process.TopPLogitsWarper(top_p)(None, expected)
    got = apply_top_k_top_p(logits,
                            torch.full((32,), top_k if top_k > 0 else VOCAB, dtype=torch.int64),
                            torch.full((32,), top_p, dtype=torch.float64))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    got = apply_top_k_top_p(logits, torch.tensor([2]), None)
    assert torch.isinf(got).tolist() == [[False, True, False, False, True]]


def test_mixed_batch_uses_each_rows_params(sampler):
    logits = random_logits(3, seed=7)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0.8, top_k=2)]
    tokens = sampler.sample(logits, params, [None, make_generator(1), make_generator(2)])
    assert tokens[:2] == logits[:2].argmax(dim=-1).tolist()
    assert tokens[2] in logits[2].topk(2).indices.tolist()


def test_bad_logits_are_refused(sampler):
    p = [SamplingParams()]
    with pytest.raises(ValueError, match="one params and one generator per row"):
        sampler.sample(torch.zeros(2, 4), p, [None])
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(torch.tensor([[0.0, math.nan]]), p, [None])
    with pytest.raises(ValueError, match="all -inf"):
        sampler.sample(torch.full((1, 4), -math.inf), p, [None])
    assert sampler.sample(torch.empty(0, 4), [], []) == []


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(3), make_generator(3)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.parametrize("kwargs,message", [
    ({"max_tokens": 0}, "max_tokens must be an int >= 1"),
    ({"max_tokens": 2.0}, "max_tokens must be an int >= 1"),
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
    ({"top_k": -2}, "top_k must be an int >= 1, or -1 or 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
    ({"seed": 1 << 64}, "seed must be None or an int"),
    ({"seed": "7"}, "seed must be None or an int"),
    ({"stop": ["ok", ""]}, "stop must be a list of non-empty strings"),
    ({"stop_token_ids": [3, -1]}, "stop_token_ids must be a list of ints >= 0"),
    ({"ignore_eos": 1}, "ignore_eos must be a bool"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop="\n\n", temperature=1, seed=-5)
    assert p.stop == ["\n\n"] and isinstance(p.temperature, float) and not p.greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams().max_tokens == 16
