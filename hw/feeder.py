"""Window feeder: the activation-vector sequence of a layer, as bank addresses and masks.

Activations live in ``rows`` banks, channel ``c`` of a ``[C, H, W]`` tensor in
bank ``c mod rows`` at address ``(c // rows) * H * W + y * W + x``. For one
input-channel tile (``ci0 = t * rows``) every bank is read at the same address,
so a whole vector costs one read per bank and never conflicts.

For a convolution the feeder walks, in the weight-stream order of
:mod:`hw.interfaces`::

    for co_tile: for ci_tile: for tap (ky, kx): for oy: for ox:
        (iy, ix) = (oy * stride + ky - pad, ox * stride + kx - pad)

and emits one vector per output pixel and tap: the address of ``(iy, ix)`` in
tile ``ci_tile`` and a row mask that is zero outside the map (zero padding)
and for rows past ``ci`` (channel counts that are not multiples of ``rows``).
Each vector also carries what the accumulator and weight banks need (see
:func:`feed_layout`). For a global average pool it walks ``ci_tile`` and every
input pixel. All address arithmetic is incremental: no multiplier sits in the
per-vector path; the few products of the layer geometry are computed by
shift-and-add during a setup phase of ``bit_length(max(max_h, max_w)) + 3``
cycles.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from .interfaces import descriptor_layout

__all__ = ["WindowFeeder", "feed_layout", "bank_depth", "feed_reference"]


def bank_depth(config: AcceleratorConfig) -> int:
    """Entries per activation bank for one buffer.

    The largest ``ceil(C / rows) * H * W`` over every tensor with
    ``C * H * W <= act_depth`` and ``H * W <= max_h * max_w``: a tensor with a
    channel count that is not a multiple of ``rows`` fills its banks unevenly.
    """
    hw_max = config.max_h * config.max_w
    best = 1
    for ch in range(1, max(config.max_ci, config.max_co) + 1):
        hw = min(hw_max, config.act_depth // ch)
        if hw == 0:
            break
        best = max(best, -(-ch // config.rows) * hw)
    return best


def feed_layout(config: AcceleratorConfig) -> data.StructLayout:
    """Payload of one activation vector.

    ``addr``/``mask``: bank address and active rows; ``sel``: PE weight bank
    (tile parity); ``tile_last``: last vector of a weight tile; ``first``:
    overwrite instead of accumulate; ``cotile_first``/``cotile_last``: first and
    last vector of an output-channel tile; ``half``: accumulator half (co-tile
    parity); ``pix``: output pixel; ``pool_first``/``pool_last``: first and last
    pixel of a pooled channel tile; ``layer_last``: last vector of the layer;
    ``rows_v``/``cols_v``: real input/output channels of the tile.
    """
    R, C = config.rows, config.cols
    return data.StructLayout({
        "addr": unsigned(max(1, (bank_depth(config) - 1).bit_length())),
        "mask": unsigned(R),
        "sel": unsigned(1),
        "tile_last": unsigned(1),
        "first": unsigned(1),
        "cotile_first": unsigned(1),
        "cotile_last": unsigned(1),
        "half": unsigned(1),
        "pix": unsigned(max(1, (config.max_h * config.max_w - 1).bit_length())),
        "pool": unsigned(1),
        "pool_first": unsigned(1),
        "pool_last": unsigned(1),
        "layer_last": unsigned(1),
        "rows_v": unsigned(R.bit_length()),
        "cols_v": unsigned(C.bit_length()),
    })


def feed_reference(config: AcceleratorConfig, *, pool: bool, ci: int, co: int, h: int, w: int,
                   k: int = 1, stride: int = 1, pad: int = 0) -> list[dict]:
    """The vectors :class:`WindowFeeder` emits for one layer (``addr``, ``mask``, ``pix``,
    ``sel``, ``first``, ``tile_last``, ``cotile_last``), masked addresses as 0."""
    R, C = config.rows, config.cols
    out = []
    if pool:
        for ci0 in range(0, ci, R):
            mask = sum(1 << r for r in range(R) if ci0 + r < ci)
            for q in range(h * w):
                out.append({"addr": (ci0 // R) * h * w + q, "mask": mask, "pix": q,
                            "pool_first": int(q == 0), "pool_last": int(q == h * w - 1)})
        return out
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    tile = 0
    for co0 in range(0, co, C):
        for ci0 in range(0, ci, R):
            rows = sum(1 << r for r in range(R) if ci0 + r < ci)
            for ky in range(k):
                for kx in range(k):
                    for oy in range(ho):
                        for ox in range(wo):
                            iy, ix = oy * stride + ky - pad, ox * stride + kx - pad
                            inside = 0 <= iy < h and 0 <= ix < w
                            out.append({
                                "addr": (ci0 // R) * h * w + iy * w + ix if inside else 0,
                                "mask": rows if inside else 0,
                                "pix": oy * wo + ox, "sel": tile % 2,
                                "first": int(ci0 == 0 and ky == 0 and kx == 0),
                                "tile_last": int(oy == ho - 1 and ox == wo - 1),
                                "cotile_last": int(ci0 + R >= ci and ky == k - 1 and kx == k - 1
                                                   and oy == ho - 1 and ox == wo - 1),
                            })
                    tile += 1
    return out


class WindowFeeder(wiring.Component):
    """Generates the activation vectors of one layer (see the module doc).

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig`.

    Ports
    -----
    start, desc:
        A one-cycle ``start`` latches the layer fields of ``desc``
        (:func:`hw.interfaces.descriptor_layout`: ``op``, ``k``, ``stride``,
        ``pad``, ``ci``, ``co``, ``h``, ``w``). The descriptor must be valid
        (the engine checks it); ``start`` is ignored while :attr:`busy`.
    o_vec:
        Stream of :func:`feed_layout` vectors.
    busy:
        High from ``start`` until the last vector is accepted.
    ho, wo, hw, p:
        Output map, input pixel count and output pixel count of the layer,
        valid from the first vector on (1 x 1 output for a pool).
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        self.bank_depth = bank_depth(config)
        dims = max(config.max_h, config.max_w)
        super().__init__({
            "start": In(1),
            "desc": In(descriptor_layout(config)),
            "o_vec": Out(stream.Signature(feed_layout(config))),
            "busy": Out(1),
            "ho": Out(range(dims + 1)),
            "wo": Out(range(dims + 1)),
            "hw": Out(range(config.max_h * config.max_w + 1)),
            "p": Out(range(config.max_h * config.max_w + 1)),
        })

    def elaborate(self, platform):
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        m = Module()

        dim_bits = max(cfg.max_h, cfg.max_w).bit_length()
        hw_max = cfg.max_h * cfg.max_w
        span = self.bank_depth + 4 * max(cfg.max_w, cfg.max_h) + 8
        addr_shape = signed(span.bit_length() + 1)
        coord_shape = signed(dim_bits + 3)
        chan_shape = unsigned(max(cfg.max_ci, cfg.max_co).bit_length())

        # Latched layer fields.
        pool = Signal()
        k = Signal.like(self.desc.k)
        s2 = Signal()
        pad = Signal.like(self.desc.pad)
        ci = Signal(chan_shape)
        co = Signal(chan_shape)
        h = Signal(range(cfg.max_h + 1))
        w = Signal(range(cfg.max_w + 1))

        # Geometry computed in setup.
        ho = Signal(range(max(cfg.max_h, cfg.max_w) + 1))
        wo = Signal.like(ho)
        hw = Signal(range(hw_max + 1))
        p = Signal(range(hw_max + 1))
        padw = Signal(range(3 * cfg.max_w + 4))
        m.d.comb += [self.ho.eq(ho), self.wo.eq(wo), self.hw.eq(hw), self.p.eq(p)]

        # Shift-and-add multipliers of the setup phase.
        mul_x1, mul_x2 = (Signal(range(2 * hw_max + 2), name=f"mul_x{i}") for i in (1, 2))
        mul_x3 = Signal(range(8 * cfg.max_w + 8))
        mul_y1, mul_y2 = Signal(range(2 * cfg.max_w + 2)), Signal(range(2 * cfg.max_w + 2))
        mul_n = Signal(range(dim_bits + 2))

        # Loop state.
        cols_left = Signal(chan_shape)
        rows_left = Signal(chan_shape)
        hw_base = Signal(addr_shape)
        tap_start = Signal(addr_shape)
        row_start = Signal(addr_shape)
        addr = Signal(addr_shape)
        ky = Signal(range(cfg.max_k))
        kx = Signal(range(cfg.max_k))
        oy = Signal(range(max(cfg.max_h, cfg.max_w) + 1))
        ox = Signal.like(oy)
        iy = Signal(coord_shape)
        ix = Signal(coord_shape)
        pix = Signal(range(hw_max + 1))
        sel = Signal()
        half = Signal()
        first = Signal()

        stride_w = Mux(s2, w << 1, w)
        stride = Mux(s2, 2, 1)

        inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        rows_mask = Signal(R)
        m.d.comb += [rows_mask[r].eq(rows_left > r) for r in range(R)]
        # Loop bounds minus one, registered once per layer, keep subtractors out of the
        # per-vector compare.
        wo_m1, ho_m1 = Signal.like(wo), Signal.like(ho)
        k_m1 = Signal.like(k)
        hw_m1 = Signal.like(hw)
        last_ox = ox == wo_m1
        last_oy = oy == ho_m1
        last_kx = kx == k_m1
        last_ky = ky == k_m1
        last_ci = rows_left <= R
        last_co = cols_left <= C
        last_q = pix == hw_m1

        vec = self.o_vec.payload
        on = Mux(pool, 1, inside)
        m.d.comb += [
            vec.addr.eq(Mux(on, addr, 0)),
            vec.mask.eq(Mux(on, rows_mask, 0)),
            vec.sel.eq(sel),
            vec.half.eq(half),
            vec.pix.eq(pix),
            vec.pool.eq(pool),
            vec.first.eq(first),
            vec.tile_last.eq(~pool & last_ox & last_oy),
            vec.cotile_first.eq(~pool & first & (pix == 0)),
            vec.cotile_last.eq(~pool & last_ox & last_oy & last_kx & last_ky & last_ci),
            vec.pool_first.eq(pool & (pix == 0)),
            vec.pool_last.eq(pool & last_q),
            vec.layer_last.eq(Mux(pool, last_q & last_ci,
                                  last_ox & last_oy & last_kx & last_ky & last_ci & last_co)),
            vec.rows_v.eq(Mux(last_ci, rows_left, R)),
            vec.cols_v.eq(Mux(pool, 1, Mux(last_co, cols_left, C))),
        ]

        fire = self.o_vec.valid & self.o_vec.ready

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    d = self.desc
                    m.d.sync += [pool.eq(d.op), k.eq(Mux(d.op, 1, d.k)), s2.eq(d.stride == 2),
                                 pad.eq(Mux(d.op, 0, d.pad)), ci.eq(d.ci), co.eq(d.co),
                                 h.eq(d.h), w.eq(d.w)]
                    m.next = "GEOMETRY"
                m.d.comb += self.busy.eq(self.start)
            with m.State("GEOMETRY"):
                m.d.comb += self.busy.eq(1)
                ho_c = ((h + (pad << 1) - k) >> s2) + 1
                wo_c = ((w + (pad << 1) - k) >> s2) + 1
                m.d.sync += [
                    ho.eq(Mux(pool, 1, ho_c)), wo.eq(Mux(pool, 1, wo_c)),
                    mul_x1.eq(h), mul_x2.eq(Mux(pool, 1, ho_c)), mul_x3.eq(pad),
                    mul_y1.eq(w), mul_y2.eq(Mux(pool, 1, wo_c)),
                    hw.eq(0), p.eq(0), padw.eq(pad), mul_n.eq(0),
                ]
                m.next = "MULTIPLY"
            with m.State("MULTIPLY"):
                m.d.comb += self.busy.eq(1)
                # hw = h * w, p = ho * wo, padw = pad * w + pad, one bit of w and wo per cycle.
                m.d.sync += [
                    hw.eq(hw + Mux(mul_y1[0], mul_x1, 0)),
                    padw.eq(padw + Mux(mul_y1[0], mul_x3, 0)),
                    p.eq(p + Mux(mul_y2[0], mul_x2, 0)),
                    mul_x1.eq(mul_x1 << 1), mul_x2.eq(mul_x2 << 1), mul_x3.eq(mul_x3 << 1),
                    mul_y1.eq(mul_y1 >> 1), mul_y2.eq(mul_y2 >> 1),
                    mul_n.eq(mul_n + 1),
                ]
                with m.If(mul_n == dim_bits):
                    m.next = "START"
            with m.State("START"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [
                    wo_m1.eq(wo - 1), ho_m1.eq(ho - 1), k_m1.eq(k - 1), hw_m1.eq(hw - 1),
                    cols_left.eq(Mux(pool, ci, co)), rows_left.eq(ci),
                    hw_base.eq(0), tap_start.eq(-padw), row_start.eq(-padw),
                    addr.eq(Mux(pool, 0, -padw)),
                    ky.eq(0), kx.eq(0), oy.eq(0), ox.eq(0), iy.eq(-pad), ix.eq(-pad),
                    pix.eq(0), sel.eq(0), half.eq(0), first.eq(1),
                ]
                m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += [self.busy.eq(1), self.o_vec.valid.eq(1)]
                with m.If(fire & pool):
                    with m.If(~last_q):
                        m.d.sync += [pix.eq(pix + 1), addr.eq(addr + 1)]
                    with m.Else():
                        m.d.sync += [pix.eq(0), hw_base.eq(hw_base + hw), addr.eq(hw_base + hw),
                                     rows_left.eq(rows_left - R)]
                        with m.If(last_ci):
                            m.next = "IDLE"
                with m.If(fire & ~pool):
                    with m.If(~last_ox):
                        m.d.sync += [ox.eq(ox + 1), ix.eq(ix + stride), addr.eq(addr + stride),
                                     pix.eq(pix + 1)]
                    with m.Elif(~last_oy):
                        m.d.sync += [ox.eq(0), oy.eq(oy + 1), ix.eq(kx - pad), iy.eq(iy + stride),
                                     row_start.eq(row_start + stride_w),
                                     addr.eq(row_start + stride_w), pix.eq(pix + 1)]
                    with m.Else():
                        # End of a weight tile: the next vector uses the other PE bank.
                        m.d.sync += [ox.eq(0), oy.eq(0), pix.eq(0), sel.eq(~sel), first.eq(0)]
                        with m.If(~last_kx):
                            nxt = tap_start + 1
                            m.d.sync += [kx.eq(kx + 1), ix.eq(kx + 1 - pad), iy.eq(ky - pad),
                                         tap_start.eq(nxt), row_start.eq(nxt), addr.eq(nxt)]
                        with m.Elif(~last_ky):
                            nxt = tap_start + w - k + 1
                            m.d.sync += [kx.eq(0), ky.eq(ky + 1), ix.eq(-pad), iy.eq(ky + 1 - pad),
                                         tap_start.eq(nxt), row_start.eq(nxt), addr.eq(nxt)]
                        with m.Else():
                            m.d.sync += [kx.eq(0), ky.eq(0), ix.eq(-pad), iy.eq(-pad)]
                            with m.If(~last_ci):
                                nxt = hw_base + hw - padw
                                m.d.sync += [rows_left.eq(rows_left - R), hw_base.eq(hw_base + hw),
                                             tap_start.eq(nxt), row_start.eq(nxt), addr.eq(nxt)]
                            with m.Else():
                                m.d.sync += [rows_left.eq(ci), hw_base.eq(0), tap_start.eq(-padw),
                                             row_start.eq(-padw), addr.eq(-padw), first.eq(1),
                                             half.eq(~half), cols_left.eq(cols_left - C)]
                                with m.If(last_co):
                                    m.next = "IDLE"
        return m
