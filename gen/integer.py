"""The integer contract: every rounding point of the accelerator, defined once.

The golden model, the fake-quantized training layers and the hardware all
follow the functions in this module. All tensors are ``torch.int64``.

Rounding points
---------------
1. **Code decode** (:func:`decode_codes`). A ``q``-bit code ``c`` (stored as its
   raw unsigned bits) decodes to an integer value:

   * ``signed``: two's complement, ``c - 2**q`` if the top bit is set;
   * ``odd``: ``2c - (2**q - 1)``, the official dorefa_sym levels (odd integers,
     no zero).

2. **Weight generation** (:func:`generate_w2`) is exact integer arithmetic:
   ``W1[o, c, :] = sum_j U[o, c, j] * B[o, j, :]`` and
   ``W2[co, :] = sum_o V[co, o] * W1[o, :]``.

3. **W2 rounding** (:func:`round_w2`): ``W2pe = sat_w(round_shift(W2, w_shift))``
   where ``w_shift = max(0, bitlen(max|W2|) - (w_bits - 1))`` is chosen per layer
   by :func:`w2_shift`, so the layer's largest weight fits ``w_bits`` signed bits.

4. **Round-shift** (:func:`round_shift`): add ``2**(s-1)`` then shift right
   arithmetically (round half up, toward +inf); ``s = 0`` is the identity.

5. **Requant** (:func:`requant`): with the accumulator ``acc`` of one output
   channel, its multiplier ``M[co]`` (signed ``m_bits``) and bias ``bias[co]``
   (in the product domain), an optional residual operand ``res`` with its
   per-layer multiplier ``m_res``::

       y = round_shift(acc * M[co] + bias[co] + res * m_res, shift)
       y = max(y, 0)            if the layer has ReLU
       y = sat_a(y)             two's complement clamp to a_bits

   The residual is aligned to the output scale by ``m_res`` before the single
   rounding, so a residual add costs no extra rounding point.

6. **Average pooling** is a requant of the per-channel sum over the feature map
   with ``M = round(2**shift / (H*W))`` (exact when H*W is a power of two), no
   bias, no ReLU.

7. **Saturation** (:func:`saturate`) clamps to ``[-2**(b-1), 2**(b-1) - 1]``.

8. **Factorized form** (:mod:`gen.factorize`): a layer run as a conv with
   ``W1`` (rounded as in point 3 with its own shift) to ``bo`` channels,
   requantized to activations with one per-tensor multiplier (point 5, no bias,
   no ReLU), then a 1x1 conv with ``V`` that carries the layer's requant. The
   intermediate requant is the form's one extra rounding point.
"""

from __future__ import annotations

import torch

from .config import DECODE_FORMS
from .contract import int_range

__all__ = [
    "round_shift", "saturate", "int_range", "decode_codes", "encode_values",
    "value_range", "generate_w1", "generate_w2", "w2_shift", "round_w2", "requant",
    "pool_multiplier", "conv2d_int", "bitlen",
]


def bitlen(n: int) -> int:
    return int(abs(int(n))).bit_length()


def round_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Add ``2**(shift-1)``, then arithmetic shift right by ``shift``."""
    if shift < 0:
        raise ValueError(f"round_shift: shift must be >= 0, got {shift}")
    if shift == 0:
        return x
    return (x + (1 << (shift - 1))) >> shift


def saturate(x: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = int_range(bits)
    return x.clamp(lo, hi)


def value_range(bits: int, form: str) -> tuple[int, int]:
    """Smallest and largest value a ``bits``-wide code decodes to."""
    if form == "signed":
        return int_range(bits)
    if form == "odd":
        return -((1 << bits) - 1), (1 << bits) - 1
    raise ValueError(f"decode form {form!r} is not one of {', '.join(DECODE_FORMS)}")


def decode_codes(codes: torch.Tensor, bits: int, form: str) -> torch.Tensor:
    """Decode raw unsigned ``bits``-wide codes to integer values (see module doc)."""
    codes = torch.as_tensor(codes, dtype=torch.int64)
    if form == "signed":
        return torch.where(codes >= (1 << (bits - 1)), codes - (1 << bits), codes)
    if form == "odd":
        return 2 * codes - ((1 << bits) - 1)
    raise ValueError(f"decode form {form!r} is not one of {', '.join(DECODE_FORMS)}")


def encode_values(values: torch.Tensor, bits: int, form: str) -> torch.Tensor:
    """Inverse of :func:`decode_codes`; raises ValueError for values with no code."""
    values = torch.as_tensor(values, dtype=torch.int64)
    lo, hi = value_range(bits, form)
    if values.numel() and (values.min() < lo or values.max() > hi):
        raise ValueError(f"values outside {lo}..{hi} have no {bits}-bit {form} code")
    if form == "signed":
        return values & ((1 << bits) - 1)
    if bool(((values & 1) == 0).any()):
        raise ValueError(f"even values have no {form} code")
    return (values + ((1 << bits) - 1)) >> 1


def generate_w1(b: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Level 1: ``[bo, bi, kk]`` basis and ``[bo, ci, bi]`` coefficients to ``[bo, ci, kk]``.

    Without ``u`` the basis already is ``[bo, ci, kk]`` and is returned as is.
    """
    if u is None:
        return b
    return torch.einsum("ocj,ojk->ock", u, b)


def generate_w2(b: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
    """Both levels, exact: returns the unrounded ``[co, ci, kk]`` integer weights."""
    w1 = generate_w1(b, u)
    if v is None:
        return w1
    bo, ci, kk = w1.shape
    return (v @ w1.reshape(bo, ci * kk)).reshape(v.shape[0], ci, kk)


def w2_shift(w2: torch.Tensor, w_bits: int) -> int:
    """Smallest shift that brings the layer's largest |W2| into ``w_bits`` signed bits."""
    peak = int(w2.abs().max()) if w2.numel() else 0
    return max(0, peak.bit_length() - (w_bits - 1))


def round_w2(w2: torch.Tensor, shift: int, w_bits: int) -> torch.Tensor:
    return saturate(round_shift(w2, shift), w_bits)


def requant(acc: torch.Tensor, mult: torch.Tensor, bias: torch.Tensor, shift: int,
            a_bits: int, relu: bool, res: torch.Tensor | None = None,
            m_res: int = 0) -> torch.Tensor:
    """Requantize accumulators ``[N, C, H, W]`` to activations (see module doc, point 5)."""
    view = (1, -1, 1, 1) if acc.dim() == 4 else (1, -1)
    y = acc * mult.view(view) + bias.view(view)
    if res is not None:
        y = y + res * m_res
    y = round_shift(y, shift)
    if relu:
        y = y.clamp_min(0)
    return saturate(y, a_bits)


def pool_multiplier(hw: int, m_bits: int) -> tuple[int, int]:
    """``(M, shift)`` of the average-pool division by ``hw`` (point 6)."""
    shift = (m_bits - 2) + max(0, (hw - 1).bit_length())
    return round((1 << shift) / hw), shift


def conv2d_int(x: torch.Tensor, w: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    """Integer convolution ``[N, Ci, H, W]`` x ``[Co, Ci, k, k]`` -> ``[N, Co, Ho, Wo]``.

    Zero padding, int64 arithmetic throughout (im2col by strided slicing, then an
    integer matrix product), no floating point anywhere.
    """
    n, ci, h, wd = x.shape
    co, ci_w, k, _ = w.shape
    if ci != ci_w:
        raise ValueError(f"conv2d_int: input has {ci} channels, weights expect {ci_w}")
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    ho = (h + 2 * pad - k) // stride + 1
    wo = (wd + 2 * pad - k) // stride + 1
    cols = torch.stack([
        xp[:, :, ky:ky + stride * (ho - 1) + 1:stride, kx:kx + stride * (wo - 1) + 1:stride]
        for ky in range(k) for kx in range(k)
    ], dim=2)  # [N, Ci, k*k, Ho, Wo]
    cols = cols.reshape(n, ci * k * k, ho * wo)
    out = torch.matmul(w.reshape(co, ci * k * k), cols)
    return out.reshape(n, co, ho, wo)
