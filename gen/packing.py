"""Bit packing of integer codes: the layout the hardware unpacker reads.

Codes of width ``bits`` are laid end to end in one little-endian, LSB-first bit
stream: code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)`` with its bit
``j`` at stream bit ``i*bits + j``, and stream bit ``n`` is bit ``n % 8`` of
byte ``n // 8``. Reading the bytes as little-endian words of any width gives
the same stream, so a code may straddle byte and word boundaries; only the end
of the stream is padded with zero bits to a whole byte. The code width is an
elaboration parameter of the hardware; here it may be 1..64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PackingError", "pack_codes", "unpack_codes", "packed_size"]


class PackingError(ValueError):
    """A code does not fit its width, a width is unsupported, or data is short."""


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 64:
        raise PackingError(f"code width {bits!r} unsupported; accepted 1..64 bits")
    return int(bits)


def packed_size(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * _check_bits(bits) + 7) // 8


def _as_int64(codes) -> np.ndarray:
    if hasattr(codes, "detach"):  # torch tensor
        codes = codes.detach().cpu().numpy()
    arr = np.asarray(codes)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise PackingError(f"codes must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False).reshape(-1) if arr.size else np.zeros(0, np.int64)


def pack_codes(codes, bits: int, *, signed: bool = False) -> bytes:
    """Pack integer codes into the LSB-first bit stream (see module doc).

    ``codes`` may be a list, a numpy array or a torch tensor of any shape (it is
    flattened in C order). Unsigned codes must lie in ``[0, 2**bits - 1]``;
    signed codes in ``[-2**(bits-1), 2**(bits-1) - 1]`` are stored as their low
    ``bits`` bits (two's complement). Raises :class:`PackingError` naming the
    first offending index and value.
    """
    bits = _check_bits(bits)
    if isinstance(codes, (list, tuple)):
        for i, c in enumerate(codes):
            if not -(1 << 63) <= int(c) < (1 << 63):
                raise PackingError(f"code {i} = {c} does not fit 64 bits")
    arr = _as_int64(codes)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if arr.size:
        bad = np.flatnonzero((arr < lo) | (arr > hi)) if bits < 64 or signed else np.flatnonzero(arr < 0)
        if bad.size:
            i = int(bad[0])
            kind = "signed" if signed else "unsigned"
            raise PackingError(f"code {i} = {int(arr[i])} does not fit {bits} {kind} bits; "
                               f"accepted {lo}..{hi}")
    u = arr.view(np.uint64)
    bitmat = ((u[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int, *, signed: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes as int64 (sign-extended if ``signed``).

    Extra trailing bytes are ignored; short data raises :class:`PackingError`.
    """
    bits = _check_bits(bits)
    if count < 0:
        raise PackingError(f"count {count} must be >= 0")
    need = (count * bits + 7) // 8
    if len(data) < need:
        raise PackingError(f"{count} codes of {bits} bits need {need} bytes, got {len(data)}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    raw = np.frombuffer(bytes(data[:need]), dtype=np.uint8)
    stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    u = (stream.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    out = u.view(np.int64).copy()
    if signed and bits < 64:
        top = np.int64(1) << np.int64(bits - 1)
        out = np.where(out >= top, out - (np.int64(1) << np.int64(bits)), out)
    return out
