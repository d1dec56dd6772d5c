"""Lowering a trained float model to the integer network the accelerator runs.

This is where BatchNorm is folded and every float scale becomes an integer
multiplier and shift (the requant constants of :mod:`gen.integer`):

* a conv layer's real output is ``a_c * (s_w * s_in * acc) + b_c`` where
  ``a_c, b_c`` come from its BatchNorm (or 1 and the bias), ``s_w`` is the
  scale of its PE weights and ``s_in`` that of its input;
* in units of the output scale ``s_out`` that is ``r_c * acc + b_c / s_out`` with
  ``r_c = a_c s_w s_in / s_out``; with one shift ``S`` per layer,
  ``M_c = round(r_c 2^S)``, ``bias_c = round(b_c / s_out 2^S)`` and the residual
  multiplier ``m_res = round(s_res / s_out 2^S)``;
* ``S`` is the largest shift (at most :data:`MAX_SHIFT`) that keeps every
  ``|M_c|`` and ``|m_res|`` within ``m_bits`` signed bits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .contract import widths_of
from .integer import int_range, pool_multiplier
from .layers import ActQuant, MLGConv2d, MLGLinear
from .network import LayerSpec, QuantizedNetwork

__all__ = ["lower_model", "preflight", "UnsupportedLayerError", "MAX_SHIFT", "requant_constants"]

MAX_SHIFT = 40
SUPPORTED = (MLGConv2d, MLGLinear, nn.BatchNorm2d, ActQuant, nn.Sequential, nn.ReLU, nn.Identity)


class UnsupportedLayerError(ValueError):
    """The model holds layer types the accelerator cannot run (all are listed)."""


def preflight(model: nn.Module) -> None:
    """List every unsupported module of ``model`` at once, before any work."""
    from .models import BLOCKS, _MLGModel

    bad = [f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules()
           if not isinstance(m, SUPPORTED + tuple(BLOCKS.values()) + (_MLGModel,))]
    if bad:
        raise UnsupportedLayerError(
            f"{len(bad)} unsupported layer(s): {', '.join(bad)}; the accelerator runs "
            "MLGConv2d, MLGLinear, BatchNorm2d, ReLU, residual adds and global average pooling")


def _fold_bn(bn: nn.BatchNorm2d | None, bias: torch.Tensor | None, co: int):
    if bn is None:
        a = torch.ones(co, dtype=torch.float64)
        b = bias.detach().double() if bias is not None else torch.zeros(co, dtype=torch.float64)
        return a, b
    inv = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    a = bn.weight.detach().double() * inv
    b = bn.bias.detach().double() - bn.running_mean.double() * a
    return a, b


def requant_constants(r: torch.Tensor, bias_f: torch.Tensor, r_res: float, m_bits: int,
                      name: str = "layer"):
    """Integer ``(M, bias, m_res, S)`` for real multipliers ``r`` (see module doc)."""
    limit = int_range(m_bits)[1]
    peak = max(float(r.abs().max()) if r.numel() else 0.0, abs(r_res))
    if not math.isfinite(peak):
        raise ValueError(f"{name}: requant multiplier is not finite ({peak})")
    if peak == 0:
        shift = 0
    else:
        shift = int(math.floor(math.log2(limit / peak)))
        while shift >= 0 and round(peak * 2 ** shift) > limit:
            shift -= 1
        shift = min(shift, MAX_SHIFT)
    if shift < 0:
        raise ValueError(f"{name}: requant multiplier {peak:.4g} does not fit {m_bits} bits "
                         "at shift 0; the output scale is too small for this layer")
    mult = torch.round(r * 2 ** shift).to(torch.int64)
    bias = torch.round(bias_f * 2 ** shift).to(torch.int64)
    return mult, bias, int(round(r_res * 2 ** shift)), shift


@torch.no_grad()
def lower_model(model: nn.Module) -> QuantizedNetwork:
    """Fold BatchNorm, fix every scale and return the integer network of ``model``."""
    preflight(model)
    s = model.settings
    net = QuantizedNetwork(
        arch=model.arch, input_shape=(model.in_channels, model.size, model.size),
        input_scale=model.aq_in.scale, num_classes=model.num_classes, **widths_of(s))
    for op in model.program():
        s_in, s_out = op.in_q.scale, op.out_q.scale
        if op.op == "pool":
            m, sh = pool_multiplier(op.h * op.w, s.m_bits)
            net.layers.append(LayerSpec(
                name=op.name, op="pool", ci=net.layers[-1].co, co=net.layers[-1].co, h=op.h,
                w=op.w, src=op.src, dst=op.dst, mult=torch.full((net.layers[-1].co,), m),
                bias=torch.zeros(net.layers[-1].co, dtype=torch.int64), shift=sh,
                in_scale=s_in, out_scale=s_in))
            continue
        conv = op.conv
        if not conv.quant:
            raise ValueError(f"layer {op.name!r}: float (unquantized) layer cannot be lowered")
        parts = conv.quantized_parts(ste=False)
        _, w_scale, w_shift = conv.generated_weight(ste=False)
        a, b = _fold_bn(op.bn, conv.bias, conv.out_channels)
        r = a * float(w_scale) * s_in / s_out
        r_res = op.res_q.scale / s_out if op.res is not None else 0.0
        mult, bias, m_res, shift = requant_constants(r, b / s_out, r_res, s.m_bits, op.name)
        net.layers.append(LayerSpec(
            name=op.name, op="conv", ci=conv.in_channels, co=conv.out_channels, h=op.h, w=op.w,
            k=conv.kernel_size, stride=conv.stride, pad=conv.padding, bi=conv.base_in,
            bo=conv.base_out, src=op.src, dst=op.dst, res=op.res, relu=op.relu,
            b=parts["B"][1], u=parts["U"][1] if parts["U"] is not None else None,
            v=parts["V"][1] if parts["V"] is not None else None, w_shift=w_shift,
            mult=mult, bias=bias, shift=shift, m_res=m_res, in_scale=s_in, out_scale=s_out,
            w_scale=float(w_scale)))
    net.validate(f"{model.arch} model")
    return net
