"""The engine's output-channel accumulators: two halves of ``max_h * max_w`` words.

An output-channel tile accumulates into one half, one word (``cols`` sums) per
array output vector, while the post reader drains the other
(:class:`~hw.post_reader.PostReader`). A half is either accumulated into
(read-modify-write) or drained, never both at once, so one read port per half
serves both: the post reader's address while it drains the half, else the
read-modify-write's.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from gen.contract import ACC_GAP
from .memory import BlockMemory

__all__ = ["Accumulators"]


class Accumulators(wiring.Component):
    """Read-modify-write accumulation of the systolic array's column sums.

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig` (``cols``, ``acc_bits``, ``max_h``,
        ``max_w``).
    latency:
        Cycles from a vector's ``i_valid`` to its column sums on ``i_sum`` (the
        array's latency), at least 3.
    forward:
        Whether the sums still on their way into the block RAM are forwarded to the
        vectors that read them. Without forwarding, two vectors of one pixel must be
        issued at least :attr:`issue_gap` cycles apart.

    Ports
    -----
    i_valid, i_pix, i_first, i_last, i_half:
        A vector entering the array: its output pixel (word), whether it starts the
        sum (overwrite instead of accumulate), whether it is the last vector of its
        output-channel tile, and the half it accumulates into.
    i_sum:
        The array's column sums, ``latency`` cycles after the vector's ``i_valid``.
    o_full, o_full_half:
        ``o_full`` pulses as the last sum of a tile (``i_last``) is written into half
        ``o_full_half``; from the next cycle on it can be read.
    rd_en, rd_half, rd_addr, o_rd_data:
        The drain read: while ``rd_en``, half ``rd_half`` reads word ``rd_addr``.
        ``o_rd_data`` holds each half's read register (hw.memory): the word two cycles
        after its address.

    Timing
    ------
    The read for the vector at the accumulate stage (``latency`` cycles after
    ``i_valid``) leaves three cycles earlier: the block RAM, its output register, then
    the half select into a register by the adders. A sum is written a cycle after it is
    computed (from registers, to the blocks across the die). So the read misses the
    sums of the four vectors before it: with ``forward`` those are forwarded, the most
    recent first.
    """

    #: Vectors forwarded past the block RAM with ``forward``.
    FORWARD_DEPTH = 4

    def __init__(self, config: AcceleratorConfig, *, latency: int, forward: bool = True):
        if latency < 3:
            raise ValueError(f"Accumulators latency must be at least 3, got {latency!r}: the "
                             "read leaves three stages before the accumulate stage")
        self.config = config
        self.latency = latency
        self.forward = self.FORWARD_DEPTH if forward else 0
        #: Cycles from a vector's issue to the first issue of a vector of the same pixel
        #: (1: back to back).
        self.issue_gap = 1 if forward else ACC_GAP
        max_p = config.max_h * config.max_w
        words = data.ArrayLayout(signed(config.acc_bits), config.cols)
        super().__init__({
            "i_valid": In(1),
            "i_pix": In(unsigned(max(1, (max_p - 1).bit_length()))),
            "i_first": In(1),
            "i_last": In(1),
            "i_half": In(1),
            "i_sum": In(words),
            "o_full": Out(1),
            "o_full_half": Out(1),
            "rd_en": In(1),
            "rd_half": In(1),
            "rd_addr": In(range(max_p + 1)),
            "o_rd_data": Out(data.ArrayLayout(words, 2)),
        })

    def elaborate(self, platform):
        cfg = self.config
        C, L, F = cfg.cols, self.latency, self.forward
        m = Module()

        rp, wp = [], []
        for h in range(2):
            mem = BlockMemory(signed(cfg.acc_bits), C, cfg.max_h * cfg.max_w, name=f"acc_{h}")
            m.submodules[f"acc_{h}"] = mem
            wp.append(mem.write_port())
            rp.append(mem.read_port())
        m.d.comb += [self.o_rd_data[h].eq(rp[h].data) for h in range(2)]

        # The vectors in flight, from the array's input to the write stage (L + 1) and,
        # with forwarding, the sums written after it.
        meta_layout = data.StructLayout({"valid": 1, "pix": self.i_pix.shape(),
                                         "first": 1, "last": 1, "half": 1})
        line = [Signal(meta_layout, name="meta_0")]
        m.d.comb += [line[0].valid.eq(self.i_valid), line[0].pix.eq(self.i_pix),
                     line[0].first.eq(self.i_first), line[0].last.eq(self.i_last),
                     line[0].half.eq(self.i_half)]
        for i in range(1, max(L + 2, L + F)):
            nxt = Signal(meta_layout, name=f"meta_{i}")
            m.d.sync += nxt.eq(line[-1])
            line.append(nxt)
        pre, acc, wr = line[L - 3], line[L], line[L + 1]

        def same(a, b):
            return a.valid & b.valid & (a.half == b.half) & (a.pix == b.pix)

        hits = [Signal(name=f"hit{i + 1}") for i in range(F)]
        sums = [Signal(data.ArrayLayout(signed(cfg.acc_bits), C), name=f"sum{i + 1}")
                for i in range(F)]
        m.d.sync += [hit.eq(same(line[L - 1], line[L + i])) for i, hit in enumerate(hits)]
        m.d.sync += [sums[i].eq(sums[i - 1]) for i in range(1, F)]

        acc_q = Signal(data.ArrayLayout(signed(cfg.acc_bits), C), name="acc_q")
        m.d.sync += acc_q.eq(Mux(line[L - 1].half, rp[1].data, rp[0].data))
        for h in range(2):
            m.d.comb += [
                rp[h].addr.eq(Mux(self.rd_en & (self.rd_half == h), self.rd_addr, pre.pix)),
                wp[h].addr.eq(wr.pix),
                wp[h].en.eq(wr.valid & (wr.half == h)),
            ]
        for c in range(C):
            old = acc_q[c]
            for hit, s in reversed(list(zip(hits, sums))):
                old = Mux(hit, s[c], old)
            total = Signal(signed(cfg.acc_bits), name=f"acc_sum_{c}")
            m.d.comb += total.eq(Mux(acc.first, 0, old) + self.i_sum[c])
            # One register per half for the write data (each half is many blocks).
            m.d.sync += [wp[0].data[c].eq(total), wp[1].data[c].eq(total)]
            if F:
                m.d.sync += sums[0][c].eq(total)
        m.d.comb += [self.o_full.eq(wr.valid & wr.last), self.o_full_half.eq(wr.half)]
        return m
