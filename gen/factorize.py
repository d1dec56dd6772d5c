"""The factorized execution form: a generated layer as a kxk conv with W1, then a 1x1 conv with V.

For a layer with both levels, form 1 generates ``W2 = V @ W1`` and convolves
with it. Form 2 convolves with ``W1`` to ``bo`` channels and applies ``V`` as
a 1x1 convolution: it needs ``bo * Ci * k*k`` generated weights instead of
``Co * Ci * k*k * bo`` multiply-accumulates of generation, which wins on deep
layers with small feature maps. Both parts run on the existing units:

* **part A** (``NAME.w1``): level 1 only (a dense layer of the ``qb``-bit basis
  when the layer has no level 1), ``Ci -> bo`` channels, same kernel, stride
  and padding; its weights are ``W1`` rounded to the PE width with their own
  ``w_shift``;
* **part B** (``NAME.v``): a dense 1x1 conv ``bo -> Co`` whose weights are the
  ``V`` codes as they are (``qv`` bits, ``LayerSpec.dense_bits``), with the
  layer's ReLU and residual.

Both parts keep the layer's codes at their own widths, so the form moves
exactly the bytes of form 1.

Integer contract: the bo intermediate channels are activations, so part A
requantizes them to ``a_bits`` with one per-tensor multiplier (no bias, no
ReLU); this is the form's one extra rounding point. Its scale comes from
calibration: the largest ``|Z|`` of the layer over calibration inputs (run
through the golden model) maps to the largest activation. Part B's requant
constants are the layer's, rescaled by the intermediate scale, so the two parts
approximate the layer's real-valued output; the golden model runs the two parts
as written, and the RTL equals it bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .integer import conv2d_int, decode_codes, generate_w1, int_range, round_w2, w2_shift
from .lower import requant_constants
from .network import LayerSpec, QuantizedNetwork

__all__ = ["factorizable", "factorize_layer", "factorize", "choose_factorized", "FactorizeError"]


class FactorizeError(ValueError):
    """A layer cannot take the factorized form."""


def factorizable(layer: LayerSpec) -> bool:
    """Form 2 applies to conv layers with level 2."""
    return layer.op == "conv" and layer.has_l2


def _w1(net: QuantizedNetwork, layer: LayerSpec) -> torch.Tensor:
    b = decode_codes(layer.b, net.qb, net.decode)
    u = decode_codes(layer.u, net.qu, net.decode) if layer.has_l1 else None
    return generate_w1(b, u)  # [bo, ci, kk]


def factorize_layer(net: QuantizedNetwork, layer: LayerSpec, x: torch.Tensor,
                    mid: int) -> tuple[LayerSpec, LayerSpec]:
    """Parts A and B of ``layer``; ``x`` ``[N, Ci, H, W]`` are calibration inputs of the
    layer (integers), ``mid`` the buffer for the intermediate channels."""
    if not factorizable(layer):
        raise FactorizeError(f"layer {layer.name!r}: the factorized form needs level 2 "
                             f"(op {layer.op!r}, level 2: {layer.has_l2})")
    w1 = _w1(net, layer)
    w_shift_a = w2_shift(w1, net.w_bits)
    w1_pe = round_w2(w1, w_shift_a, net.w_bits).reshape(layer.bo, layer.ci, layer.k, layer.k)
    z = conv2d_int(x, w1_pe, layer.stride, layer.pad)
    peak = int(z.abs().max()) if z.numel() else 0
    a_max = int_range(net.a_bits)[1]
    # Intermediate scale: the calibration peak of Z maps to the largest activation.
    r_a = a_max / max(1, peak)
    mult_a, _, _, shift_a = requant_constants(torch.full((layer.bo,), r_a, dtype=torch.float64),
                                              torch.zeros(layer.bo, dtype=torch.float64), 0.0,
                                              net.m_bits, f"{layer.name}.w1")
    part_a = LayerSpec(
        name=f"{layer.name}.w1", op="conv", ci=layer.ci, co=layer.bo, h=layer.h, w=layer.w,
        k=layer.k, stride=layer.stride, pad=layer.pad, bi=layer.bi if layer.has_l1 else 0,
        bo=layer.bo, src=layer.src, dst=mid, res=None, relu=False,
        # Without level 1 the basis is the weights: a dense layer of qb-bit codes.
        b=layer.b, u=layer.u, v=None, dense_bits="qd" if layer.has_l1 else "qb",
        w_shift=w_shift_a, mult=mult_a, bias=torch.zeros(layer.bo, dtype=torch.int64),
        shift=shift_a, m_res=0, in_scale=layer.in_scale,
        out_scale=layer.in_scale * layer.w_scale / r_a, w_scale=layer.w_scale)
    # Z_q ~ Z * m_a / 2^s_a and the layer's accumulator ~ V @ Z * 2^(w_shift_a - w_shift):
    # part B's real multiplier is the layer's M / 2^S times that ratio.
    g = 2.0 ** (w_shift_a - layer.w_shift) * (2.0 ** shift_a / float(mult_a[0]))
    s = 2.0 ** layer.shift
    r_b = layer.mult.double() * g / s
    mult_b, bias_b, m_res_b, shift_b = requant_constants(
        r_b, layer.bias.double() / s, layer.m_res / s, net.m_bits, f"{layer.name}.v")
    v = decode_codes(layer.v, net.qv, net.decode)          # [co, bo]
    part_b = LayerSpec(
        name=f"{layer.name}.v", op="conv", ci=layer.bo, co=layer.co, h=layer.ho, w=layer.wo,
        k=1, stride=1, pad=0, bi=0, bo=layer.co, src=mid, dst=layer.dst, res=layer.res,
        relu=layer.relu, b=layer.v.reshape(layer.co, layer.bo, 1), dense_bits="qv",
        u=None, v=None, w_shift=w2_shift(v, net.w_bits), mult=mult_b, bias=bias_b,
        shift=shift_b, m_res=m_res_b, in_scale=part_a.out_scale, out_scale=layer.out_scale,
        w_scale=1.0)
    return part_a, part_b


def factorize(net: QuantizedNetwork, names, x_int: torch.Tensor) -> QuantizedNetwork:
    """``net`` with the layers named in ``names`` in the factorized form, calibrated on
    the quantized inputs ``x_int`` ``[N, C, H, W]`` of the network."""
    from .golden import golden_layer

    names = set(names)
    unknown = names - {l.name for l in net.layers}
    if unknown:
        raise FactorizeError(f"no layer named {', '.join(sorted(unknown))}")
    bufs: dict[int, torch.Tensor] = {0: x_int.to(torch.int64)}
    nxt = 1 + max(max(l.src, l.dst, l.res or 0) for l in net.layers)
    out_layers = []
    for layer in net.layers:
        parts = [layer]
        if layer.name in names:
            parts = list(factorize_layer(net, layer, bufs[layer.src], nxt))
            nxt += 1
        for p in parts:
            res = bufs[p.res] if p.res is not None else None
            bufs[p.dst] = golden_layer(net, p, bufs[p.src], res)
            out_layers.append(p)
    out = replace(net, layers=out_layers)
    out.validate("factorized network")
    return out


def choose_factorized(net: QuantizedNetwork, x_int: torch.Tensor, cycles_of) -> list[str]:
    """Layers whose factorized form lowers the predicted cycles of the network.

    ``cycles_of(network)`` predicts a network's cycles (:mod:`gen.cost` on the
    build's config). Each layer with level 2 is tried on its own against form 1.
    """
    base = cycles_of(net)
    chosen = []
    for layer in net.layers:
        if factorizable(layer) and cycles_of(factorize(net, [layer.name], x_int)) < base:
            chosen.append(layer.name)
    return chosen
