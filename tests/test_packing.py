"""pack_codes / unpack_codes: round trips for every width, and the exact bit order."""

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gen.packing import PackingError, pack_codes, packed_size, unpack_codes

WIDTHS = list(range(1, 9)) + [12, 16, 31, 32, 33, 48, 63]


def _codes(bits, signed):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return st.lists(st.integers(lo, hi), max_size=200)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", WIDTHS)
def test_round_trip_every_width(bits, signed):
    @settings(max_examples=40, deadline=None)
    @given(_codes(bits, signed))
    def check(codes):
        data = pack_codes(codes, bits, signed=signed)
        assert len(data) == math.ceil(len(codes) * bits / 8) == packed_size(len(codes), bits)
        assert unpack_codes(data, bits, len(codes), signed=signed).tolist() == codes
    check()


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 13, 64])
def test_extremes(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = [lo, hi, 0, -1, lo, hi]
    assert unpack_codes(pack_codes(codes, bits, signed=True), bits, 6, signed=True).tolist() == codes
    if bits < 64:
        u = [0, (1 << bits) - 1, 1, (1 << bits) - 1]
        assert unpack_codes(pack_codes(u, bits), bits, 4).tolist() == u


@pytest.mark.parametrize("seed", range(20))
def test_bit_order_matches_big_integer_reference(seed):
    rng = random.Random(seed)
    bits = rng.randint(1, 8)
    codes = [rng.randrange(1 << bits) for _ in range(rng.randint(0, 50))]
    stream = sum(c << (i * bits) for i, c in enumerate(codes))
    expected = stream.to_bytes(math.ceil(len(codes) * bits / 8), "little")
    assert pack_codes(codes, bits) == expected


def test_straddling_example():
    # 3-bit codes 1, 2, 3: 0b011_010_001 -> bytes 0xd1, 0x00
    assert pack_codes([1, 2, 3], 3) == bytes([0xD1, 0x00])
    assert pack_codes([0x1FF], 9) == bytes([0xFF, 0x01])


def test_accepts_tensors_and_arrays_of_any_shape():
    t = torch.randint(0, 16, (3, 4, 5))
    assert pack_codes(t, 4) == pack_codes(t.flatten().tolist(), 4)
    a = t.numpy()
    assert pack_codes(a, 4) == pack_codes(t, 4)
    assert unpack_codes(pack_codes(a, 4), 4, a.size).tolist() == a.reshape(-1).tolist()


def test_errors():
    with pytest.raises(PackingError, match=r"code 2 = 8 does not fit 3 unsigned bits; accepted 0\.\.7"):
        pack_codes([1, 2, 8], 3)
    with pytest.raises(PackingError, match=r"code 0 = -5 does not fit 3 signed bits; accepted -4\.\.3"):
        pack_codes([-5], 3, signed=True)
    with pytest.raises(PackingError, match=r"code 1 = -1 does not fit 4 unsigned"):
        pack_codes(np.array([3, -1]), 4)
    for bad in (0, 65):
        with pytest.raises(PackingError, match=f"code width {bad} unsupported"):
            pack_codes([0], bad)
    with pytest.raises(PackingError, match="need 4 bytes, got 3"):
        unpack_codes(b"\x00\x00\x00", 5, 6)
    with pytest.raises(PackingError, match="integers"):
        pack_codes(np.array([0.5]), 4)
