"""The integer contract and the golden model against independent references."""

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from gen.integer import (conv2d_int, decode_codes, encode_values, generate_w2, int_range,
                         pool_multiplier, requant, round_shift, round_w2, saturate,
                         value_range, w2_shift)


@given(st.integers(-(1 << 40), 1 << 40), st.integers(0, 30))
def test_round_shift_is_round_half_up(x, s):
    got = int(round_shift(torch.tensor([x]), s)[0])
    # Exact rational reference: floor(x / 2^s + 1/2).
    num, den = 2 * x + (1 << s), 2 << s
    assert got == num // den


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("form", ["signed", "odd"])
def test_decode_encode_every_code(bits, form):
    codes = torch.arange(1 << bits)
    vals = decode_codes(codes, bits, form)
    lo, hi = value_range(bits, form)
    assert int(vals.min()) == lo and int(vals.max()) == hi
    assert len(set(vals.tolist())) == 1 << bits
    if form == "odd":
        assert all(v % 2 == 1 or v % 2 == -1 for v in vals.tolist())
    else:
        assert vals.tolist() == [c - (1 << bits) if c >= 1 << (bits - 1) else c for c in codes.tolist()]
    assert torch.equal(encode_values(vals, bits, form), codes)


def test_encode_rejects_unrepresentable():
    with pytest.raises(ValueError):
        encode_values(torch.tensor([8]), 3, "odd")
    with pytest.raises(ValueError):
        encode_values(torch.tensor([2]), 3, "odd")
    with pytest.raises(ValueError):
        encode_values(torch.tensor([4]), 3, "signed")


def test_saturate():
    x = torch.tensor([-1000, -128, -5, 0, 127, 128, 999])
    assert saturate(x, 8).tolist() == [-128, -128, -5, 0, 127, 127, 127]
    assert int_range(4) == (-8, 7)


@pytest.mark.parametrize("seed", range(12))
def test_generation_matches_explicit_sums(seed):
    rng = random.Random(seed)
    bo, ci, kk, bi, co = rng.randint(1, 6), rng.randint(1, 7), rng.choice([1, 9, 25]), rng.randint(1, 3), rng.randint(1, 8)
    b = torch.randint(-7, 8, (bo, bi, kk))
    u = torch.randint(-63, 64, (bo, ci, bi))
    v = torch.randint(-7, 8, (co, bo))
    w2 = generate_w2(b, u, v)
    for _ in range(20):
        o, c, t = rng.randrange(co), rng.randrange(ci), rng.randrange(kk)
        ref = sum(int(v[o, p]) * sum(int(u[p, c, j]) * int(b[p, j, t]) for j in range(bi)) for p in range(bo))
        assert int(w2[o, c, t]) == ref
    assert torch.equal(generate_w2(b, u, None), torch.einsum("ocj,ojk->ock", u, b))
    w1 = torch.randint(-5, 6, (bo, ci, kk))
    assert torch.equal(generate_w2(w1, None, None), w1)


@pytest.mark.parametrize("w_bits", [2, 4, 8, 12])
def test_w2_rounding_fits_and_is_minimal(w_bits):
    g = torch.Generator().manual_seed(w_bits)
    w2 = torch.randint(-50000, 50000, (64,), generator=g)
    s = w2_shift(w2, w_bits)
    lo, hi = int_range(w_bits)
    r = round_w2(w2, s, w_bits)
    assert int(r.min()) >= lo and int(r.max()) <= hi
    peak = int(w2.abs().max())
    assert (peak >> s) <= hi
    if s > 0:
        assert (peak >> (s - 1)) > hi  # one less shift would not fit
    small = torch.tensor([3, -2, 1])
    assert w2_shift(small, 8) == 0 and torch.equal(round_w2(small, 0, 8), small)


def test_requant_reference():
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-(1 << 20), 1 << 20, (2, 3, 4, 4), generator=g)
    res = torch.randint(-128, 128, (2, 3, 4, 4), generator=g)
    mult = torch.tensor([12345, -321, 7])
    bias = torch.tensor([1 << 20, -(1 << 18), 0])
    for relu in (False, True):
        y = requant(acc, mult, bias, 22, 8, relu, res=res, m_res=999)
        for idx in [(0, 0, 0, 0), (1, 1, 2, 3), (0, 2, 3, 1), (1, 0, 1, 1)]:
            n, c, i, j = idx
            t = int(acc[idx]) * int(mult[c]) + int(bias[c]) + int(res[idx]) * 999
            ref = (t + (1 << 21)) >> 22
            if relu:
                ref = max(ref, 0)
            ref = min(max(ref, -128), 127)
            assert int(y[idx]) == ref


@pytest.mark.parametrize("hw", [1, 4, 16, 49, 64, 1024])
def test_pool_multiplier(hw):
    m, s = pool_multiplier(hw, 16)
    assert 0 < m < (1 << 15)
    assert abs(m / (1 << s) - 1 / hw) <= 0.5 / (1 << s)
    if hw & (hw - 1) == 0:
        assert m * hw == 1 << s  # exact division for powers of two


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 3, 5, 7]), st.integers(1, 2), st.integers(0, 3),
       st.integers(2, 8), st.integers(2, 8))
def test_conv2d_int_equals_float64_reference(seed, k, stride, pad, a_bits, w_bits):
    g = torch.Generator().manual_seed(seed)
    n, ci, co = 2, int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    h = int(torch.randint(k, k + 7, (1,), generator=g))
    w = int(torch.randint(k, k + 7, (1,), generator=g))
    alo, ahi = int_range(a_bits)
    wlo, whi = int_range(w_bits)
    x = torch.randint(alo, ahi + 1, (n, ci, h, w), generator=g)
    wt = torch.randint(wlo, whi + 1, (co, ci, k, k), generator=g)
    got = conv2d_int(x, wt, stride, pad)
    ref = F.conv2d(x.double(), wt.double(), stride=stride, padding=pad)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref.to(torch.int64))
