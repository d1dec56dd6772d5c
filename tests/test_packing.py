"""pack_codes / unpack_codes: round trips for every width, and the exact bit order."""

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gen.packing import PackingError, pack_codes, packed_size, unpack_codes

NARROW = list(range(1, 9))
WIDE = [12, 16, 31, 32, 33, 48, 64]


def code_range(bits, signed):
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def reference_pack(codes, bits):
    """The hardware's view: one little-endian integer, code i at bit i*bits."""
    mask = (1 << bits) - 1
    stream = sum((c & mask) << (i * bits) for i, c in enumerate(codes))
    return stream.to_bytes(math.ceil(len(codes) * bits / 8), "little")


def codes_strategy(bits, signed, max_size=100):
    lo, hi = code_range(bits, signed)
    return st.lists(st.integers(lo, hi), max_size=max_size)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits", NARROW + WIDE)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(bits, signed, data):
    codes = data.draw(codes_strategy(bits, signed))
    packed = pack_codes(codes, bits, signed=signed)
    assert isinstance(packed, bytes)
    assert len(packed) == math.ceil(len(codes) * bits / 8)
    out = unpack_codes(packed, bits, len(codes), signed=signed)
    assert out.shape == (len(codes),)
    assert [int(v) for v in out] == codes
    assert out.dtype == (np.uint64 if bits == 64 and not signed else np.int64)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits", NARROW + WIDE)
def test_extreme_values(bits, signed):
    lo, hi = code_range(bits, signed)
    codes = [lo, hi, hi, lo, 0, hi - 1 if hi > lo + 1 else hi, lo + 1 if hi > lo else lo, hi]
    packed = pack_codes(codes, bits, signed=signed)
    assert packed == reference_pack(codes, bits)
    assert [int(v) for v in unpack_codes(packed, bits, len(codes), signed=signed)] == codes


@pytest.mark.parametrize("seed", range(40))
def test_bit_order_matches_big_integer_reference(seed):
    rng = random.Random(seed)
    bits = rng.randint(1, 64)
    signed = rng.random() < 0.5
    lo, hi = code_range(bits, signed)
    codes = [rng.randint(lo, hi) for _ in range(rng.randint(0, 60))]
    expected = reference_pack(codes, bits)
    assert pack_codes(codes, bits, signed=signed) == expected
    assert [int(v) for v in unpack_codes(expected, bits, len(codes), signed=signed)] == codes


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_bit_order_property(data):
    bits = data.draw(st.integers(1, 64))
    signed = data.draw(st.booleans())
    codes = data.draw(codes_strategy(bits, signed, max_size=40))
    assert pack_codes(codes, bits, signed=signed) == reference_pack(codes, bits)


def test_hand_computed_layouts():
    assert pack_codes([1, 2, 3], 3) == bytes([0b11010001, 0b0])
    assert pack_codes([0x1FF], 9) == bytes([0xFF, 0x01])
    assert pack_codes([1, 0, 1, 1, 0, 0, 0, 0, 1], 1) == bytes([0b00001101, 0b1])
    assert pack_codes([-1, 0], 3, signed=True) == bytes([0b00000111])
    assert pack_codes([-2], 4, signed=True) == bytes([0x0E])
    assert pack_codes([0xABC, 0x123], 12) == bytes([0xBC, 0x3A, 0x12])
    assert pack_codes([0x0102030405060708], 64) == bytes(range(8, 0, -1))


def test_codes_straddle_little_endian_words():
    codes = [5] * 11
    words = np.frombuffer(pack_codes(codes, 3) + b"\x00" * 3, dtype="<u4")
    stream = int(words[0]) | (int(words[1]) << 32)
    assert [(stream >> (3 * i)) & 7 for i in range(11)] == codes


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 24, 64])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100])
def test_size_is_exact(bits, n):
    expected = math.ceil(n * bits / 8)
    assert packed_size(n, bits) == expected
    assert len(pack_codes([0] * n, bits)) == expected
    assert len(pack_codes(np.full(n, (1 << bits) - 1, dtype=np.uint64), bits)) == expected


def test_padding_bits_are_zero():
    packed = pack_codes([7] * 3, 3)
    assert packed == bytes([0xFF, 0x01])


def test_unpack_ignores_trailing_bytes_and_accepts_buffers():
    packed = pack_codes([1, 2, 3], 3)
    assert unpack_codes(packed + b"\xff\xff", 3, 3).tolist() == [1, 2, 3]
    assert unpack_codes(bytearray(packed), 3, 3).tolist() == [1, 2, 3]
    assert unpack_codes(memoryview(packed), 3, 2).tolist() == [1, 2]
    assert unpack_codes(b"", 5, 0).tolist() == []


def test_unsigned_out_of_range():
    with pytest.raises(PackingError, match=r"code 2 = 8 does not fit 3 unsigned bits; accepted 0\.\.7"):
        pack_codes([1, 2, 8], 3)
    with pytest.raises(PackingError, match=r"code 1 = -1 does not fit 4 unsigned bits; accepted 0\.\.15"):
        pack_codes(np.array([3, -1, 99]), 4)
    with pytest.raises(PackingError, match=r"code 0 = 18446744073709551616 .*64 unsigned"):
        pack_codes([1 << 64], 64)
    with pytest.raises(PackingError, match=r"code 1 = -1 does not fit 64 unsigned"):
        pack_codes([1 << 63, -1], 64)
    with pytest.raises(PackingError, match=r"code 5 = 4 does not fit 2 unsigned"):
        pack_codes(torch.tensor([[0, 1, 2], [3, 0, 4]]), 2)
    with pytest.raises(PackingError, match=r"code 0 = 256 .*accepted 0\.\.255"):
        pack_codes(np.array([256], dtype=np.uint16), 8)


def test_signed_out_of_range():
    with pytest.raises(PackingError, match=r"code 0 = -5 does not fit 3 signed bits; accepted -4\.\.3"):
        pack_codes([-5], 3, signed=True)
    with pytest.raises(PackingError, match=r"code 3 = 4 does not fit 3 signed bits; accepted -4\.\.3"):
        pack_codes([0, 3, -4, 4], 3, signed=True)
    with pytest.raises(PackingError, match=r"code 0 = 1 does not fit 1 signed bits; accepted -1\.\.0"):
        pack_codes([1], 1, signed=True)
    with pytest.raises(PackingError, match=r"code 0 = 9223372036854775808 .*64 signed"):
        pack_codes([1 << 63], 64, signed=True)
    with pytest.raises(PackingError, match=r"code 0 = 128 .*8 signed"):
        pack_codes(np.array([128], dtype=np.uint8), 8, signed=True)


@pytest.mark.parametrize("bad", [0, 65, -1])
def test_bad_width(bad):
    for call in (lambda: pack_codes([0], bad), lambda: unpack_codes(b"\x00", bad, 1),
                 lambda: packed_size(1, bad)):
        with pytest.raises(PackingError, match=rf"code width {bad} unsupported; accepted 1\.\.64"):
            call()


def test_error_is_a_value_error():
    assert issubclass(PackingError, ValueError)
    with pytest.raises(ValueError):
        pack_codes([2], 1)


def test_truncated_data():
    with pytest.raises(PackingError, match=r"need 4 bytes, got 3"):
        unpack_codes(b"\x00\x00\x00", 5, 6)
    with pytest.raises(PackingError, match=r"need 1 bytes, got 0"):
        unpack_codes(b"", 1, 1)
    packed = pack_codes(list(range(10)), 4)
    with pytest.raises(PackingError, match=r"need 5 bytes, got 4"):
        unpack_codes(packed[:-1], 4, 10)


def test_non_integer_codes():
    with pytest.raises(PackingError, match="integer"):
        pack_codes(np.array([0.5]), 4)
    with pytest.raises(PackingError, match=r"code 1 = 2\.5 is not an integer"):
        pack_codes([1, 2.5], 4)
    with pytest.raises(PackingError, match="integer"):
        pack_codes(torch.tensor([1.0]), 4)


@pytest.mark.parametrize("shape", [(60,), (3, 4, 5), (2, 1, 3, 10), (1, 60)])
def test_accepts_tensors_and_arrays_of_any_shape(shape):
    t = torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(1))
    flat = t.flatten().tolist()
    expected = reference_pack(flat, 4)
    assert pack_codes(t, 4, signed=True) == expected
    assert pack_codes(t.numpy(), 4, signed=True) == expected
    assert pack_codes(t.to(torch.int8), 4, signed=True) == expected
    assert pack_codes(t.numpy().astype(np.int16), 4, signed=True) == expected
    assert pack_codes(t.tolist(), 4, signed=True) == expected
    assert pack_codes(t.numpy().T, 4, signed=True) == reference_pack(t.numpy().T.reshape(-1).tolist(), 4)
    assert unpack_codes(expected, 4, len(flat), signed=True).tolist() == flat


def test_accepts_every_numpy_integer_dtype():
    codes = [0, 1, 100, 127]
    expected = reference_pack(codes, 7)
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64):
        assert pack_codes(np.array(codes, dtype=dt), 7) == expected
    assert pack_codes(torch.tensor([True, False, True]), 1) == bytes([0b101])


def test_empty_inputs():
    assert pack_codes([], 5) == b""
    assert pack_codes(np.zeros((0, 3), dtype=np.int64), 5) == b""
    assert pack_codes(torch.zeros(0, dtype=torch.int64), 64, signed=True) == b""
    assert unpack_codes(b"", 7, 0).dtype == np.int64


def test_large_vectorized_round_trip():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, size=200_003)
    packed = pack_codes(codes, 3)
    assert len(packed) == math.ceil(200_003 * 3 / 8)
    assert np.array_equal(unpack_codes(packed, 3, codes.size), codes)
    signed = rng.integers(-(1 << 32), 1 << 32, size=10_001)
    assert np.array_equal(unpack_codes(pack_codes(signed, 33, signed=True), 33, signed.size,
                                       signed=True), signed)
