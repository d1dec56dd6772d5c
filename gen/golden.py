"""Integer golden model: the specification the RTL must match bit for bit.

Every operation is int64 arithmetic following :mod:`gen.integer`; there is no
floating point between the quantized input and the integer logits.
"""

from __future__ import annotations

import torch

from .integer import conv2d_int, int_range, requant
from .network import LayerSpec, QuantizedNetwork

__all__ = ["quantize_input", "golden_layer", "golden_forward", "golden_predict"]


def quantize_input(net: QuantizedNetwork, x: torch.Tensor) -> torch.Tensor:
    """Float images ``[N, C, H, W]`` to activations: ``sat(floor(x / s + 1/2))``.

    This is the host's job: the accelerator receives integers.
    """
    lo, hi = int_range(net.a_bits)
    q = torch.floor(x.double() / net.input_scale + 0.5)
    return q.clamp(lo, hi).to(torch.int64)


def golden_layer(net: QuantizedNetwork, layer: LayerSpec, x: torch.Tensor,
                 res: torch.Tensor | None = None) -> torch.Tensor:
    """Run one layer on int64 activations ``[N, C, H, W]``."""
    if layer.op == "pool":
        acc = x.sum(dim=(2, 3), keepdim=True)
    else:
        acc = conv2d_int(x, layer.weights_pe(net), layer.stride, layer.pad)
    return requant(acc, layer.mult, layer.bias, layer.shift, net.a_bits, layer.relu,
                   res=res, m_res=layer.m_res)


def golden_forward(net: QuantizedNetwork, x_int: torch.Tensor,
                   keep: bool = False) -> torch.Tensor | dict[int, torch.Tensor]:
    """Run the whole network on quantized inputs.

    Returns the output buffer ``[N, classes]`` (int64), or all buffers if ``keep``.
    """
    bufs: dict[int, torch.Tensor] = {0: x_int.to(torch.int64)}
    for layer in net.layers:
        res = bufs[layer.res] if layer.res is not None else None
        bufs[layer.dst] = golden_layer(net, layer, bufs[layer.src], res)
    if keep:
        return bufs
    return bufs[net.output_buffer].reshape(x_int.shape[0], -1)


@torch.no_grad()
def golden_predict(net: QuantizedNetwork, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Class predictions for float images (argmax of the integer logits, first on ties)."""
    preds = []
    for i in range(0, x.shape[0], batch):
        logits = golden_forward(net, quantize_input(net, x[i:i + batch]))
        preds.append(logits.argmax(dim=1))
    return torch.cat(preds)
