"""Interfaces shared by the hardware blocks, all derived from the AcceleratorConfig.

Weight stream (generation unit -> systolic engine)
--------------------------------------------------
The systolic engine is weight-stationary: processing element ``PE[r][c]`` holds
the weight of input channel ``ci0 + r`` and output channel ``co0 + c`` for one
kernel tap while every output pixel of the layer streams past it. The weights
of a layer therefore travel as *weight vectors*, one per array row, each
carrying ``cols`` signed ``w_bits`` weights (:func:`weight_beat_layout`). For a
conv layer with ``Co`` outputs, ``Ci`` inputs and a ``k x k`` kernel the order is::

    for co_tile in range(ceil(Co / cols)):          # co0 = co_tile * cols
        for ci_tile in range(ceil(Ci / rows)):      # ci0 = ci_tile * rows
            for tap in range(k * k):                # tap = ky * k + kx
                for r in range(rows):
                    w[c] = W2pe[co0 + c, ci0 + r, ky, kx]   (0 past Co or Ci)

``rows`` vectors form one weight tile (``rows x cols``); ``last`` is set on the
final vector of the layer. :func:`weight_vectors` is the reference of this
order, computed from the golden model's PE weights; benches compare against it.

Layer descriptor and layer record
---------------------------------
:func:`descriptor_layout` (the run-time fields of one layer) and
:func:`layer_record_layout` (one entry of the accelerator's program memory: the
descriptor plus where the layer's codes and constants sit on chip) are part of the
contract between compiler, host and RTL and are defined in :mod:`gen.contract`;
they are re-exported here for the blocks that take a descriptor. The host driver
builds the records from a program file (``host.image``).
"""

from __future__ import annotations

from amaranth.hdl import signed, unsigned
from amaranth.lib import data, stream

from gen.config import AcceleratorConfig
from gen.contract import descriptor_layout, layer_record_layout

__all__ = ["weight_beat_layout", "weight_stream_signature", "descriptor_layout",
           "layer_record_layout", "weight_vectors", "weight_vector_count"]


def weight_beat_layout(config: AcceleratorConfig) -> data.StructLayout:
    return data.StructLayout({
        "w": data.ArrayLayout(signed(config.w_bits), config.cols),
        "last": unsigned(1),
    })


def weight_stream_signature(config: AcceleratorConfig) -> stream.Signature:
    return stream.Signature(weight_beat_layout(config))


def weight_vector_count(config: AcceleratorConfig, ci: int, co: int, k: int) -> int:
    tiles = -(-co // config.cols) * -(-ci // config.rows)
    return tiles * k * k * config.rows


def weight_vectors(config: AcceleratorConfig, w_pe) -> list[list[int]]:
    """Reference weight-vector order for PE weights ``w_pe`` ``[Co, Ci, k, k]``."""
    co, ci, k, _ = w_pe.shape
    R, C = config.rows, config.cols
    out = []
    for co0 in range(0, co, C):
        for ci0 in range(0, ci, R):
            for tap in range(k * k):
                ky, kx = divmod(tap, k)
                for r in range(R):
                    vec = []
                    for c in range(C):
                        o, i = co0 + c, ci0 + r
                        vec.append(int(w_pe[o, i, ky, kx]) if o < co and i < ci else 0)
                    out.append(vec)
    return out
