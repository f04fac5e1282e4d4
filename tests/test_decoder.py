"""Decoder: batched sampling over persistent per-slot state, checked against plain per-request formulas."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from kiln.engine import rng
from kiln.engine.decoder import Decoder
from kiln.executor.messages import ScheduledBatch, SlotInit
from kiln.sampling_params import SamplingParams

V = 40


def make_init(
    slot: int, params: SamplingParams | None = None, prompt=(), output=(), seed=0, seq_index=0, stop=()
):
    return SlotInit(
        slot=slot,
        params=params or SamplingParams(),
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        seed=seed,
        seq_index=seq_index,
        stop_ids=tuple(stop),
    )


def make_batch(slots, positions, num_output=None, inits=(), seq_ids=None, step_id=0) -> ScheduledBatch:
    r = len(slots)
    empty = np.zeros(0, np.int32)
    return ScheduledBatch(
        step_id=step_id,
        seq_ids=empty,
        slots=empty,
        num_computed=empty,
        num_new_tokens=empty,
        num_decode=0,
        input_ids=empty,
        block_updates=np.zeros((0, 3), np.int32),
        copy_blocks=np.zeros((0, 2), np.int32),
        sample_rows=np.arange(r, dtype=np.int32),
        sample_slots=np.asarray(slots, np.int32),
        sample_seq_ids=np.asarray(seq_ids if seq_ids is not None else range(r), np.int32),
        sample_positions=np.asarray(positions, np.int32),
        sample_num_output=np.asarray(num_output if num_output is not None else [0] * r, np.int32),
        slot_inits=list(inits),
    )


def rand_logits(r: int, v: int = V, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, v, generator=g) * scale


# ---------------------------------------------------------------- plain per-request references
def ref_processed(row: list[float], p: SamplingParams, prompt, output, num_output: int, stop) -> list[float]:
    """logit_bias, min_tokens, HF repetition penalty, OpenAI presence/frequency, one request at a time."""
    x = list(row)
    for tok, b in (p.logit_bias or {}).items():
        x[tok] += b
    if num_output < p.min_tokens:
        for t in stop:
            x[t] = -math.inf
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def ref_probs(row: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Exact distribution after temperature, top_k, top_p (on the renormalised top-k set), min_p."""
    z = row.astype(np.float64) / p.temperature
    prob = np.exp(z - z.max())
    prob /= prob.sum()
    order = list(np.argsort(-z))
    allowed = order[: p.top_k] if p.top_k > 0 else order
    mass = sum(prob[t] for t in allowed)
    kept, cum = [], 0.0
    for t in allowed:
        if cum < p.top_p:
            kept.append(t)
        cum += prob[t] / mass
    kept = [t for t in kept if prob[t] >= p.min_p * prob[order[0]]]
    out = np.zeros_like(prob)
    out[kept] = prob[kept]
    return out / out.sum()


# ---------------------------------------------------------------- rng
def test_fmix32_matches_unsigned_32_bit_arithmetic():
    def fmix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    vals = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + random.Random(0).sample(range(2**32), 200)
    got = rng.fmix32(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert got == [fmix(v) for v in vals]


def test_uniform_is_in_open_interval_and_flat():
    k1, k2 = rng.row_keys(*(torch.arange(64, dtype=torch.int64) for _ in range(4)))
    u = rng.uniform(k1, k2, rng.vocab_term(4096, "cpu"))  # [64, 4096]
    assert 0 < u.min() and u.max() < 1
    hist = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    assert ((hist - expected).abs() / expected).max() < 0.03


# ---------------------------------------------------------------- greedy and distributions
def test_greedy_is_argmax_and_logprobs_are_raw():
    logits = rand_logits(6)
    dec = Decoder(8, V)
    inits = [make_init(s, SamplingParams(temperature=0)) for s in range(6)]
    out = dec.sample(logits, make_batch(range(6), [5] * 6, inits=inits, seq_ids=[10, 11, 12, 13, 14, 15]))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.seq_ids.tolist() == [10, 11, 12, 13, 14, 15]
    ref_lp = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    np.testing.assert_allclose(out.logprobs, ref_lp.numpy(), rtol=1e-5, atol=1e-6)
    assert out.top_ids is None and out.top_logprobs is None


def test_a_greedy_sample_computed_on_the_device_is_used_only_for_plain_greedy_steps():
    # a small decode graph hands over its greedy_sample output: a plain greedy step takes it as is (no
    # launch of its own); a step that processes or draws ignores it; a wrong shape is refused
    from kiln.engine.sampling_math import greedy_sample_reference

    logits = rand_logits(3)
    tokens, packed = greedy_sample_reference(logits)
    marked = (tokens.flip(0), packed.clone())  # not the argmax: shows which sample was used
    marked[1][:3] = marked[0].to(torch.int32)
    dec = Decoder(8, V)
    greedy = [make_init(s, SamplingParams(temperature=0)) for s in range(3)]
    out = dec.sample_async(logits, make_batch(range(3), [5] * 3, inits=greedy), marked).result()
    assert out.token_ids.tolist() == tokens.flip(0).tolist()
    assert dec.last_sampled is marked[0]
    drawing = [make_init(s, SamplingParams(temperature=0, logprobs=2)) for s in range(3)]
    out = dec.sample_async(logits, make_batch(range(3), [6] * 3, inits=drawing), marked).result()
    assert out.token_ids.tolist() == tokens.tolist()  # top logprobs asked for: sampled here
    with pytest.raises(ValueError, match=r"precomputed greedy sample needs tokens \[3\] and packed \[6\]"):
        dec.sample_async(logits, make_batch(range(3), [7] * 3, inits=greedy), (tokens[:2], packed))


def test_the_plain_greedy_plan_is_the_general_plan():
    # the one-look plan of a step whose slots are all plain greedy equals the full look at the mirrors,
    # and any slot that is not (logprobs, penalties, bias, min_tokens with stop ids, a draw) takes the
    # full look
    import dataclasses

    kinds = {
        "plain": SamplingParams(temperature=0),
        "min_tokens_no_stops": SamplingParams(temperature=0, min_tokens=3),
        "logprobs": SamplingParams(temperature=0, logprobs=1),
        "penalty": SamplingParams(temperature=0, repetition_penalty=1.2),
        "bias": SamplingParams(temperature=0, logit_bias={3: 1.0}),
        "min_tokens": SamplingParams(temperature=0, min_tokens=3),
        "random": SamplingParams(temperature=0.7, top_k=5),
    }
    plain = {"plain", "min_tokens_no_stops"}
    for a in kinds:
        for b in kinds:
            dec = Decoder(4, V)
            inits = [make_init(s, kinds[k], stop=(1,) if k in ("min_tokens", "random") else ())
                     for s, k in enumerate((a, b))]  # fmt: skip
            batch = make_batch([0, 1], [5, 5], num_output=[0, 0], inits=inits)
            dec.state.apply(inits)
            fast = dec._plan(batch)
            dec.state.plain_greedy[:] = False
            general = dec._plan(batch)
            assert dataclasses.asdict(fast).keys() == dataclasses.asdict(general).keys()
            for field in dataclasses.fields(general):
                x, y = getattr(fast, field.name), getattr(general, field.name)
                assert np.array_equal(x, y), (a, b, field.name, x, y)
            assert fast.plain_greedy == ({a, b} <= plain)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.7),
        SamplingParams(temperature=1.0, min_p=0.15),
        SamplingParams(temperature=1.5, top_k=6, top_p=0.8, min_p=0.05),
    ],
    ids=["t1", "t0.6", "topk", "topp", "minp", "all"],
)
def test_sampled_frequencies_match_filtered_softmax(params):
    v, n = 12, 20000
    row = rand_logits(1, v, seed=3, scale=1.2)
    dec = Decoder(1, v)
    # one slot, many positions: each row is an independent draw keyed by its position
    batch = make_batch([0] * n, range(n), inits=[make_init(0, params, seed=1234)])
    out = dec.sample(row.expand(n, v).contiguous(), batch)
    obs = np.bincount(out.token_ids, minlength=v)
    expect = ref_probs(row[0].numpy(), params) * n
    assert obs[expect == 0].sum() == 0, "sampled a token the filters remove"
    support = expect > 0
    chi2 = (((obs - expect) ** 2)[support] / expect[support]).sum()
    df = max(int(support.sum()) - 1, 1)
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = rand_logits(16, seed=7)
    dec = Decoder(16, V)
    inits = [
        make_init(
            s, SamplingParams(temperature=0.9, top_k=1) if s % 2 else SamplingParams(top_p=1e-6), seed=s
        )
        for s in range(16)
    ]
    out = dec.sample(logits, make_batch(range(16), range(16), inits=inits))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_extreme_valid_values_sample_the_top_token_without_nan():
    # Valid float64 values that float32 rounds to 0 or inf: a temperature or top_p of 1e-300, a
    # repetition penalty of 1e-300 (logits / 0 = inf) or 1e300. Each row keeps its top token(s) and
    # the sampler never gathers from an empty top-p prefix (index -1) or draws from NaN.
    logits = rand_logits(8, seed=3)
    dec = Decoder(8, V)
    extreme = [
        SamplingParams(temperature=1e-38, top_p=0.95),
        SamplingParams(top_p=1e-300),
        SamplingParams(temperature=1e-300, top_p=0.5),
        SamplingParams(temperature=1e-45, top_k=5, top_p=0.3, min_p=0.5),
        SamplingParams(temperature=1e300, min_p=1.0),
        SamplingParams(temperature=1e-30, top_p=0.9, repetition_penalty=1e-300),
        SamplingParams(temperature=0.5, top_p=0.9, repetition_penalty=1e300),
        SamplingParams(temperature=1e-30, repetition_penalty=1e-30),
    ]
    inits = [make_init(s, sp, seed=s, prompt=[int(logits[s].argmax())]) for s, sp in enumerate(extreme)]
    out = dec.sample(logits, make_batch(range(8), range(8), inits=inits))
    argmax = logits.argmax(-1).tolist()
    for s in (0, 1, 2, 3, 4):  # no penalty: the top token (min_p = 1 keeps only it)
        assert out.token_ids[s] == argmax[s], s
    for s in (5, 7):  # a vanishing penalty pushes the (seen) top token up to float32's max: still it
        assert out.token_ids[s] == argmax[s], s
    assert 0 <= out.token_ids[6] < V  # a huge penalty: some other token, drawn from finite scores


# ---------------------------------------------------------------- seeds
def test_seeded_draws_do_not_depend_on_batch_composition_or_order():
    logits = rand_logits(6, seed=11, scale=0.5)  # flat-ish: draws are far from deterministic
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=20)]
    reqs = [(seed, seq, params[seed % 2]) for seed, seq in [(1, 0), (1, 1), (2, 0), (3, 0), (4, 2), (5, 0)]]

    dec_a = Decoder(8, V)
    inits = [make_init(i, p, seed=s, seq_index=q) for i, (s, q, p) in enumerate(reqs)]
    a = dec_a.sample(logits, make_batch(range(6), [9] * 6, inits=inits)).token_ids

    # reversed, in other slots, interleaved with greedy and other random rows
    dec_b = Decoder(32, V)
    inits, slots, rows = [], [], []
    for j, i in enumerate(reversed(range(6))):
        s, q, p = reqs[i]
        inits += [
            make_init(20 + j, p, seed=s, seq_index=q),
            make_init(j, SamplingParams(temperature=0.7), seed=99 + j),
        ]
        slots += [20 + j, j]
        rows += [logits[i], rand_logits(1, seed=50 + j)[0]]
    b = dec_b.sample(torch.stack(rows), make_batch(slots, [9] * 12, inits=inits)).token_ids
    assert b[0::2][::-1].tolist() == a.tolist()


def test_different_keys_draw_differently():
    v, n = 1000, 200
    logits = torch.zeros(n, v)  # uniform: two independent draws agree with probability 1/1000

    def draws(seed: int, seq_index: int, start: int) -> np.ndarray:
        dec = Decoder(1, v)
        init = make_init(0, SamplingParams(temperature=1.0), seed=seed, seq_index=seq_index)
        return dec.sample(logits, make_batch([0] * n, range(start, start + n), inits=[init])).token_ids

    base = draws(7, 0, 0)
    assert np.array_equal(base, draws(7, 0, 0))
    for other in (draws(7, 1, 0), draws(8, 0, 0), draws(2**40 + 7, 0, 0), draws(7, 0, 1)):
        assert (other == base).mean() < 0.02
    assert len(set(base.tolist())) > 150  # positions give fresh draws


# ---------------------------------------------------------------- penalties, bias, min_tokens
PENALTY_PARAMS = [
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0, presence_penalty=0.8, frequency_penalty=0.5),
    SamplingParams(temperature=0.9, repetition_penalty=0.7, frequency_penalty=-0.4, seed=1),
    SamplingParams(temperature=0, logit_bias={3: 2.5, 17: -100.0}, presence_penalty=-1.0),
    SamplingParams(temperature=0),  # no penalties: unaffected by the others' state
]


def test_penalties_and_bias_match_per_request_formulas_over_steps():
    r = len(PENALTY_PARAMS)
    prompts = [[1, 2, 3, 3, 9], [4, 5], [1, 30, 31], [6, 6, 6, 7], [8]]
    outputs = [[2, 2], [], [5, 30, 30, 11], [], []]  # resumed sequences carry earlier output tokens
    dec = Decoder(8, V)
    slots = [3, 0, 5, 7, 1]
    inits = [
        make_init(s, p, prompt=pr, output=o, seed=i)
        for i, (s, p, pr, o) in enumerate(zip(slots, PENALTY_PARAMS, prompts, outputs, strict=True))
    ]
    for step in range(6):
        # logits with planted repeats so penalties change argmax
        logits = rand_logits(r, seed=100 + step, scale=1.0)
        logits[:, [2, 5, 30, 6]] += 3.0
        num_out = [len(o) for o in outputs]
        positions = [len(pr) + n for pr, n in zip(prompts, num_out, strict=True)]
        batch = make_batch(slots, positions, num_out, inits=inits if step == 0 else ())
        got = dec.processed_logits(logits, batch)
        for i, p in enumerate(PENALTY_PARAMS):
            ref = ref_processed(logits[i].tolist(), p, prompts[i], outputs[i], num_out[i], ())
            torch.testing.assert_close(got[i], torch.tensor(ref), rtol=1e-5, atol=1e-5)
        out = dec.sample(logits, batch)
        for i, p in enumerate(PENALTY_PARAMS):
            if p.greedy:
                assert out.token_ids[i] == int(got[i].argmax())
            outputs[i].append(int(out.token_ids[i]))
    assert dec.state.counts is not None and dec.state.bias is not None


def test_large_state_is_allocated_only_when_used_and_cleared_on_reuse():
    dec = Decoder(4, V)
    logits = rand_logits(2, seed=5)
    dec.sample(
        logits, make_batch([0, 1], [3, 3], inits=[make_init(0), make_init(1, SamplingParams(temperature=0))])
    )
    assert dec.state.counts is None and dec.state.bias is None and dec.state.stop_ids is None
    biased = SamplingParams(temperature=0, logit_bias={int(logits[0].argmin()): 100.0})
    out = dec.sample(logits, make_batch([0, 1], [4, 4], inits=[make_init(0, biased)]))
    assert out.token_ids[0] == int(logits[0].argmin())
    # the slot is reused by a request without a bias: its row must not keep the old one
    out = dec.sample(logits[:1], make_batch([0], [0], inits=[make_init(0, SamplingParams(temperature=0))]))
    assert out.token_ids[0] == int(logits[0].argmax())
    torch.testing.assert_close(dec.processed_logits(logits[:1], make_batch([0], [1])), logits[:1])


def test_min_tokens_masks_stop_ids_only_until_reached():
    dec = Decoder(4, V)
    logits = rand_logits(3, seed=9)
    logits[:, 7] = 50.0  # a stop id that would always win
    logits[:, 12] = 40.0  # a stop id only for slot 1, added later (widens the stop table)
    first = [
        make_init(0, SamplingParams(temperature=0, min_tokens=3), stop=[7]),
        make_init(2, SamplingParams(temperature=0), stop=[7]),
    ]  # min_tokens 0: never masked
    tokens = []
    for n in range(5):
        inits = first if n == 0 else []
        if n == 1:
            inits = [make_init(1, SamplingParams(temperature=0.5, min_tokens=2), stop=[12, 7, 3], seed=4)]
        out = dec.sample(logits, make_batch([0, 1, 2], [10 + n] * 3, [n, n - 1, n], inits=inits))
        tokens.append(out.token_ids.tolist())
        proc = dec.processed_logits(logits, make_batch([0, 1, 2], [10 + n] * 3, [n, n - 1, n]))
        masked = (proc == -math.inf).nonzero().tolist()
        expect = [[0, 7]] * (n < 3) + [[1, 3], [1, 7], [1, 12]] * (1 <= n and n - 1 < 2)
        assert sorted(masked) == sorted(expect)
    assert [t[0] for t in tokens] == [12] * 3 + [7, 7]  # 12 is not a stop id of slot 0
    assert [t[2] for t in tokens] == [7] * 5
    assert tokens[1][1] not in (3, 7, 12) and tokens[2][1] not in (3, 7, 12) and tokens[3][1] == 7


# ---------------------------------------------------------------- logprobs
def test_top_logprobs_equal_log_softmax_topk_of_raw_logits():
    dec = Decoder(4, V)
    logits = rand_logits(3, seed=21)
    inits = [
        make_init(
            0, SamplingParams(temperature=0.8, logprobs=5, repetition_penalty=1.5), prompt=[1, 2], seed=3
        ),
        make_init(1, SamplingParams(temperature=0, logprobs=2, logit_bias={0: 9.0})),
        make_init(2, SamplingParams(temperature=1.0)),
    ]
    out = dec.sample(logits, make_batch([0, 1, 2], [2, 2, 2], inits=inits))
    ref = torch.log_softmax(logits, -1)
    vals, ids = ref.topk(5, -1)
    assert out.top_ids.shape == (3, 5) and out.top_ids.dtype == np.int32
    assert out.top_ids.tolist() == ids.tolist()
    np.testing.assert_allclose(out.top_logprobs, vals.numpy(), rtol=1e-5, atol=1e-6)
    sampled = ref.gather(1, torch.from_numpy(out.token_ids.astype(np.int64))[:, None]).squeeze(1)
    np.testing.assert_allclose(out.logprobs, sampled.numpy(), rtol=1e-5, atol=1e-6)
    assert out.token_ids[1] == 0  # the bias moved the token, not the reported logprobs


# ---------------------------------------------------------------- preemption and mixing
def run_steps(dec: Decoder, slot: int, init: SlotInit | None, prompt_len: int, done: list[int], steps: int):
    tokens, procs = [], []
    for k in range(steps):
        n = len(done) + len(tokens)
        batch = make_batch([slot], [prompt_len + n], [n], inits=[init] if (init and k == 0) else ())
        logits = rand_logits(1, seed=1000 + n, scale=1.0)
        logits[0, [4, 9, 13]] += 2.5
        procs.append(dec.processed_logits(logits, batch))
        tokens.append(int(dec.sample(logits, batch).token_ids[0]))
    return tokens, procs


def test_resume_after_preemption_restores_penalties_and_draws():
    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.4, frequency_penalty=0.6, seed=5)
    prompt = [4, 9, 1]
    dec = Decoder(8, V)
    full, full_procs = run_steps(dec, 2, make_init(2, params, prompt=prompt, seed=5, seq_index=1), 3, [], 8)
    # resume in another slot of a decoder whose state saw other requests, after 3 tokens
    dec2 = Decoder(8, V)
    other = SamplingParams(temperature=0, presence_penalty=1.0, logit_bias={9: 3.0})
    run_steps(dec2, 6, make_init(6, other, prompt=[13, 13]), 2, [], 3)
    resumed = make_init(6, params, prompt=prompt, output=full[:3], seed=5, seq_index=1)
    rest, rest_procs = run_steps(dec2, 6, resumed, 3, full[:3], 5)
    assert rest == full[3:]
    for a, b in zip(rest_procs, full_procs[3:], strict=True):
        torch.testing.assert_close(a, b)


MIXED = [
    (SamplingParams(temperature=0, logit_bias={5: 1.5}), [1, 2], [], [3]),
    (SamplingParams(temperature=0.9, top_k=4, logprobs=3), [7], [8, 8], []),
    (SamplingParams(temperature=1.2, top_p=0.6, min_p=0.1), [2, 3, 4], [], [0, 1]),
    (
        SamplingParams(temperature=0.8, repetition_penalty=1.2, presence_penalty=0.5, min_tokens=4),
        [9],
        [1, 9],
        [2],
    ),
    (SamplingParams(temperature=0, frequency_penalty=0.7, logprobs=1), [5, 5], [5], []),
    (SamplingParams(temperature=1.0, top_k=10, top_p=0.9, logit_bias={6: -5.0}, logprobs=6), [], [3], [6]),
]


def test_mixed_batch_equals_each_row_alone():
    logits = rand_logits(len(MIXED), seed=31, scale=1.0)
    logits[:, [1, 2, 3, 5, 8, 9]] += 2.0
    slots = [6, 0, 3, 9, 1, 4]
    inits = [
        make_init(s, p, prompt=pr, output=o, seed=40 + i, seq_index=i % 2, stop=st)
        for i, (s, (p, pr, o, st)) in enumerate(zip(slots, MIXED, strict=True))
    ]
    num_out = [len(m[2]) for m in MIXED]
    positions = [len(m[1]) + n for m, n in zip(MIXED, num_out, strict=True)]
    both = Decoder(10, V).sample(logits, make_batch(slots, positions, num_out, inits=inits))
    assert both.top_ids.shape == (len(MIXED), 6)
    for i, init in enumerate(inits):
        init.slot = 0
        alone = Decoder(1, V).sample(
            logits[i : i + 1], make_batch([0], positions[i : i + 1], num_out[i : i + 1], [init])
        )
        assert alone.token_ids[0] == both.token_ids[i], i
        np.testing.assert_allclose(alone.logprobs[0], both.logprobs[i], rtol=1e-6)
        k = MIXED[i][0].logprobs or 0
        if k:
            assert alone.top_ids[0].tolist() == both.top_ids[i, :k].tolist()


# ---------------------------------------------------------------- boundary errors
def test_bad_inputs_are_rejected_with_clear_errors():
    dec = Decoder(2, V)
    with pytest.raises(ValueError, match="logits must be"):
        dec.sample(torch.zeros(2, V + 1), make_batch([0, 1], [0, 0]))
    with pytest.raises(ValueError, match="slot must be in"):
        dec.sample(torch.zeros(1, V), make_batch([0], [0], inits=[make_init(2)]))
    with pytest.raises(ValueError, match="token ids in"):
        dec.sample(torch.zeros(1, V), make_batch([0], [0], inits=[make_init(0, prompt=[V])]))
    with pytest.raises(ValueError, match="more than once"):
        dec.sample(torch.zeros(1, V), make_batch([0], [0], inits=[make_init(0), make_init(0)]))
    out = dec.sample(torch.zeros(0, V), make_batch([], []))
    assert out.token_ids.shape == (0,)


def test_warm_up_allocates_every_table_and_leaves_slots_reusable():
    dec = Decoder(6, V)
    dec.warm_up()
    s = dec.state
    assert (
        s.counts is not None and s.prompt_mask is not None and s.bias is not None and s.stop_ids is not None
    )
    logits = rand_logits(2, seed=8)
    inits = [make_init(4, SamplingParams(temperature=0)), make_init(5, SamplingParams(temperature=0))]
    out = dec.sample(logits, make_batch([4, 5], [1, 1], inits=inits))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match="num_rows"):
        dec.warm_up(7)


# ---------------------------------------------------------------- GPU: the compiled path matches the CPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_equal_cpu_draws():
    logits = rand_logits(len(MIXED), seed=31, scale=1.0)
    slots = [6, 0, 3, 9, 1, 4]
    outs = []
    for device in ("cpu", "cuda"):
        dec = Decoder(10, V, device)
        inits = [
            make_init(s, p, prompt=pr, output=o, seed=40 + i, seq_index=i % 2, stop=st)
            for i, (s, (p, pr, o, st)) in enumerate(zip(slots, MIXED, strict=True))
        ]
        steps = []
        for step in range(4):
            num_out = [len(m[2]) + step for m in MIXED]
            positions = [len(m[1]) + n for m, n in zip(MIXED, num_out, strict=True)]
            batch = make_batch(slots, positions, num_out, inits=inits if step == 0 else ())
            steps.append(dec.sample(logits.to(device), batch))
        outs.append(steps)
    for a, b in zip(*outs, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        assert a.top_ids.tolist() == b.top_ids.tolist()
