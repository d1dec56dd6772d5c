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

Layer descriptor
----------------
:func:`descriptor_layout` holds the run-time fields of one layer as the program
file stores them (``gen.program``); widths follow from the config maxima.

Layer record
------------
:func:`layer_record_layout` is one entry of the accelerator's program memory:
the descriptor plus where the layer's operands sit on chip, ``code_addr`` and
``code_len`` (bytes of the base store holding its B, U and V sections, each
packed on its own from a byte boundary) and ``const_addr`` (the first of its
``co`` words in the constants memory, ``ci`` for a pool). With ``streamed``
the ``code_len`` code bytes come from the host during the run instead
(``host.protocol.REGION_STREAM``) and ``code_addr`` is unused. The host driver
builds the records from a program file (``host.image``).
"""

from __future__ import annotations

from amaranth.hdl import signed, unsigned
from amaranth.lib import data, stream

from gen.config import AcceleratorConfig, clog2

__all__ = ["weight_beat_layout", "weight_stream_signature", "descriptor_layout",
           "layer_record_layout", "weight_vectors", "weight_vector_count"]


def weight_beat_layout(config: AcceleratorConfig) -> data.StructLayout:
    return data.StructLayout({
        "w": data.ArrayLayout(signed(config.w_bits), config.cols),
        "last": unsigned(1),
    })


def weight_stream_signature(config: AcceleratorConfig) -> stream.Signature:
    return stream.Signature(weight_beat_layout(config))


def descriptor_layout(config: AcceleratorConfig) -> data.StructLayout:
    dim = lambda n: unsigned(max(1, (n).bit_length()))  # noqa: E731
    return data.StructLayout({
        "op": unsigned(1),            # 0 conv, 1 pool
        "relu": unsigned(1),
        "has_l1": unsigned(1),
        "has_l2": unsigned(1),
        "has_res": unsigned(1),
        "dense_bits": unsigned(2),    # code width of a dense layer: 0 qd, 1 qb, 2 qv
        "k": dim(config.max_k),
        "stride": unsigned(2),
        "pad": dim(config.max_k // 2),
        "ci": dim(config.max_ci),
        "co": dim(config.max_co),
        "h": dim(config.max_h),
        "w": dim(config.max_w),
        "bi": dim(config.max_bi),
        "bo": dim(config.max_bo),
        "src": unsigned(max(1, clog2(config.act_buffers))),
        "dst": unsigned(max(1, clog2(config.act_buffers))),
        "res": unsigned(max(1, clog2(config.act_buffers))),
        "w_shift": dim(config.w_shift_max),
        "shift": dim(config.shift_max),
        "m_res": signed(config.m_bits),
    })


def layer_record_layout(config: AcceleratorConfig) -> data.StructLayout:
    return data.StructLayout({
        "desc": descriptor_layout(config),
        "code_addr": unsigned(max(1, (config.base_store_bytes - 1).bit_length())),
        # A streamed layer's codes may exceed the base store: up to one code byte
        # per weight of the largest layer.
        "code_len": unsigned(max(config.base_store_bytes,
                                 config.max_co * config.max_ci * config.max_k ** 2).bit_length()),
        "const_addr": unsigned(max(1, (config.const_depth - 1).bit_length())),
        "streamed": unsigned(1),
    })


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
