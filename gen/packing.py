"""Bit packing of integer codes: the layout the hardware unpacker reads.

Think of the packed bytes as one long little-endian number. Codes of width
``bits`` are laid end to end from its least significant bit upwards: code ``i``
occupies stream bits ``[i*bits, (i+1)*bits)`` with its bit ``j`` at stream bit
``i*bits + j``, and stream bit ``n`` is bit ``n % 8`` of byte ``n // 8``. So
the first code sits in the low bits of byte 0, and the bytes equal
``sum(code_i << (i*bits))`` written little-endian.

Nothing is aligned: a code may straddle a byte boundary, and because the
order is little-endian throughout, reading the same bytes as little-endian
16-, 32- or 64-bit words gives the same stream, so codes straddle word
boundaries in the same way. Only the end of the stream is padded, with zero
bits, to a whole byte; ``n`` codes take exactly ``ceil(n*bits/8)`` bytes.

In hardware the code width is an elaboration parameter of the unpacker; here
it may be 1..64. Signed codes are stored as the low ``bits`` bits of their
two's complement and sign-extended when read back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .integer import int_range

__all__ = ["PackingError", "pack_codes", "unpack_codes", "packed_size"]

MAX_BITS = 64


class PackingError(ValueError):
    """A code does not fit its width, a width is unsupported, or data is short."""


def _check_bits(bits: Any) -> int:
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)) \
            or not 1 <= bits <= MAX_BITS:
        raise PackingError(f"code width {bits!r} unsupported; accepted 1..{MAX_BITS} bits")
    return int(bits)


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return int_range(bits)
    return 0, (1 << bits) - 1


def _small_uint(bits: int) -> np.dtype:
    """The narrowest unsigned dtype holding ``bits`` bits."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if bits <= np.dtype(dt).itemsize * 8:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def packed_size(count: int, bits: int) -> int:
    """Number of bytes holding ``count`` codes of ``bits`` bits: ``ceil(count*bits/8)``.

    Raises :class:`PackingError` for a width outside 1..64 or a negative count.
    """
    bits = _check_bits(bits)
    if count < 0:
        raise PackingError(f"count {count} must be >= 0")
    return (int(count) * bits + 7) // 8


def _flatten(codes: Any) -> np.ndarray:
    """Codes as a flat numpy array of integer (or, for huge Python ints, object) dtype."""
    if hasattr(codes, "detach") and hasattr(codes, "numpy"):
        codes = codes.detach().cpu().numpy()
    from_sequence = not isinstance(codes, np.ndarray)
    arr = np.asarray(codes).reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if from_sequence and arr.dtype.kind == "f":
        arr = np.array(codes, dtype=object).reshape(-1)
    if arr.dtype == object:
        for i, c in enumerate(arr):
            if isinstance(c, (float, np.floating)) or not isinstance(c, (int, np.integer)):
                raise PackingError(f"code {i} = {c!r} is not an integer")
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise PackingError(f"codes must be integers, got dtype {arr.dtype}")
    return arr


def _to_uint64(arr: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Range-check ``arr`` and return the low ``bits`` bits of each code as uint64."""
    lo, hi = _code_range(bits, signed)
    kind = "signed" if signed else "unsigned"

    def fail(i: int, value: int) -> None:
        raise PackingError(f"code {i} = {value} does not fit {bits} {kind} bits; "
                           f"accepted {lo}..{hi}")

    if arr.dtype == object:
        mask = (1 << bits) - 1
        for i, c in enumerate(arr):
            if not lo <= int(c) <= hi:
                fail(i, int(c))
        return np.fromiter((int(c) & mask for c in arr), dtype=np.uint64, count=arr.size)

    info = np.iinfo(arr.dtype)
    bad = np.zeros(arr.shape, dtype=bool)
    if lo > info.min:
        bad |= arr < arr.dtype.type(lo)
    if hi < info.max:
        bad |= arr > arr.dtype.type(hi)
    idx = np.flatnonzero(bad)
    if idx.size:
        fail(int(idx[0]), int(arr[idx[0]]))
    if info.min < 0:
        return arr.astype(np.int64, copy=False).view(np.uint64)
    return arr.astype(np.uint64, copy=False)


def pack_codes(codes: Any, bits: int, *, signed: bool = False) -> bytes:
    """Pack integer codes into the LSB-first bit stream described in the module doc.

    ``codes`` may be a Python sequence, a numpy array or a torch tensor of any
    shape; it is flattened in C order. With ``signed=False`` every code must lie
    in ``[0, 2**bits - 1]``; with ``signed=True`` in
    ``[-2**(bits-1), 2**(bits-1) - 1]``, stored as its low ``bits`` bits of
    two's complement. The result is exactly ``ceil(n*bits/8)`` bytes, the last
    one zero-padded.

    Raises :class:`PackingError` for a width outside 1..64, non-integer codes,
    or a code out of range (the message names the first offending index, its
    value and the accepted range).
    """
    bits = _check_bits(bits)
    u = _to_uint64(_flatten(codes), bits, signed)
    n = u.size
    if n == 0:
        return b""
    if bits % 8 == 0:
        width = bits // 8
        if bits in (8, 16, 32, 64):
            return u.astype(np.dtype(f"<u{width}")).tobytes()
        return u.astype("<u8").view(np.uint8).reshape(n, 8)[:, :width].tobytes()
    small = u.astype(_small_uint(bits))
    bitmat = np.empty((n, bits), dtype=np.uint8)
    one = small.dtype.type(1)
    for j in range(bits):
        np.bitwise_and(small >> small.dtype.type(j), one, out=bitmat[:, j], casting="unsafe")
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int, *, signed: bool = False) -> np.ndarray:
    """Read ``count`` codes of ``bits`` bits back from a stream made by :func:`pack_codes`.

    ``data`` may be any bytes-like object at least ``ceil(count*bits/8)`` bytes
    long; extra trailing bytes are ignored. Returns an int64 array, sign-extended
    if ``signed``. The one exception is unsigned 64-bit codes, which int64
    cannot hold: they come back as uint64.

    Raises :class:`PackingError` for a width outside 1..64, a negative count, or
    data shorter than needed (the message gives both byte counts).
    """
    bits = _check_bits(bits)
    if count < 0:
        raise PackingError(f"count {count} must be >= 0")
    count = int(count)
    need = (count * bits + 7) // 8
    raw = np.frombuffer(data, dtype=np.uint8) if len(data) else np.zeros(0, np.uint8)
    if raw.size < need:
        raise PackingError(f"{count} codes of {bits} bits need {need} bytes, "
                           f"got {raw.size}")
    wide_unsigned = bits == 64 and not signed
    if count == 0:
        return np.zeros(0, dtype=np.uint64 if wide_unsigned else np.int64)
    raw = raw[:need]
    if bits % 8 == 0:
        width = bits // 8
        if bits in (8, 16, 32, 64):
            u = raw.view(np.dtype(f"<u{width}")).astype(np.uint64)
        else:
            wide = np.zeros((count, 8), dtype=np.uint8)
            wide[:, :width] = raw.reshape(count, width)
            u = wide.view("<u8").reshape(-1).astype(np.uint64)
    else:
        stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
        dt = _small_uint(bits)
        u = np.zeros(count, dtype=dt)
        for j in range(bits):
            u |= stream[:, j].astype(dt) << dt.type(j)
        u = u.astype(np.uint64)
    if wide_unsigned:
        return u
    if signed and bits < 64:
        sign = np.uint64(1 << (bits - 1))
        return (u ^ sign).view(np.int64) - np.int64(1 << (bits - 1))
    return u.view(np.int64)
