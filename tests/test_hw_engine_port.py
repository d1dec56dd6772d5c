"""The engine's host port (:class:`hw.engine_port.EngineHostPort`) on real activation banks.

The port is wired to ``act_buffers x rows`` block memories as the engine wires it.
Tensors loaded through ``i_load`` (with idle cycles) read back through ``o_read``
(under back-pressure); a read-back with another shape than the load checks the
bank layout itself: channel ``c``, pixel ``p`` of a ``[C, P]`` tensor lives in bank
``c mod rows`` at ``(c // rows) * P + p``. Commands that name nothing are ignored.
"""

from __future__ import annotations

import dataclasses
import random

from amaranth.hdl import Elaboratable, Module, signed

from hw.engine import bank_depth
from hw.engine_port import EngineHostPort, host_command_layout
from hw.memory import BlockMemory
from tests.support import TINY, put_stream, simulate, take_stream

CFG = dataclasses.replace(TINY, max_ci=5, max_co=5, act_depth=45, act_buffers=3)


class _PortOnBanks(Elaboratable):
    def __init__(self, config):
        self.config = config
        self.port = EngineHostPort(config)

    def elaborate(self, platform):
        cfg, port = self.config, self.port
        m = Module()
        m.submodules.port = port
        for b in range(cfg.act_buffers):
            for r in range(cfg.rows):
                mem = BlockMemory(signed(cfg.a_bits), 1, bank_depth(cfg),
                                  name=f"act_{b}_{r}")
                m.submodules[f"act_{b}_{r}"] = mem
                rp, wp = mem.read_port(), mem.write_port()
                i = b * cfg.rows + r
                m.d.comb += [rp.addr.eq(port.rd_addr), port.i_rd_data[b][r].eq(rp.data),
                             wp.en.eq(port.wr_en[i]), wp.addr.eq(port.wr_addr),
                             wp.data.eq(port.wr_data)]
        return m


def _command(write, buf, channels, pixels):
    """A host command as the bits of its layout."""
    return host_command_layout(CFG).const(
        {"write": write, "buf": buf, "channels": channels, "pixels": pixels}).as_bits()


def _signed(v, bits):
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def test_host_port_loads_and_reads_back_in_the_bank_layout():
    dut = _PortOnBanks(CFG)
    port, R, A = dut.port, CFG.rows, CFG.a_bits
    rng = random.Random(21)
    lo, hi = -(1 << (A - 1)), (1 << (A - 1)) - 1
    # (buffer, channels, pixels) loads, then reads with their own or another shape
    loads = [(0, 5, 9), (2, 3, 4), (1, 1, 1)]
    tensors = {b: [[rng.randint(lo, hi) for _ in range(p)] for _ in range(c)] for b, c, p in loads}
    shapes = {b: (c, p) for b, c, p in loads}

    def expected(buf, channels, pixels):
        """The values at channel c, pixel p of a [channels, pixels] read, from the layout
        of the load's shape."""
        lc, lp = shapes[buf]
        bank_words = {}
        for c in range(lc):
            for p in range(lp):
                bank_words[(c % R, (c // R) * lp + p)] = tensors[buf][c][p]
        return [bank_words[(c % R, (c // R) * pixels + p)]
                for c in range(channels) for p in range(pixels)]

    reads = [(0, 5, 9), (2, 3, 4), (1, 1, 1), (0, 4, 5), (0, 2, 13), (2, 1, 8)]
    ignored = [(0, 0, 4), (1, 3, 0), (3, 2, 2)]     # no channels, no pixels, no buffer 3

    async def driver(ctx):
        # The engine offers the command slot while the port is idle.
        while True:
            ctx.set(port.accept, not ctx.get(port.busy))
            await ctx.tick()

    async def tb(ctx):
        for buf, c, p in loads:
            await put_stream(ctx, port.i_host, [_command(1, buf, c, p)])
            flat = [v & ((1 << A) - 1) for row in tensors[buf] for v in row]
            await put_stream(ctx, port.i_load, flat, rng, idle=0.3, max_gap=2)
            while ctx.get(port.busy):
                await ctx.tick()
        for cmd in ignored:
            await put_stream(ctx, port.i_host, [_command(0, *cmd)])
            for _ in range(3):
                assert not ctx.get(port.busy) and not ctx.get(port.o_read.valid)
                await ctx.tick()
        for buf, c, p in reads:
            await put_stream(ctx, port.i_host, [_command(0, buf, c, p)])
            got = await take_stream(ctx, port.o_read, c * p, rng, backpressure=0.4)
            assert [_signed(v, A) for v in got] == expected(buf, c, p), (buf, c, p)
            for _ in range(8):
                if not ctx.get(port.busy):
                    break
                await ctx.tick()
            assert not ctx.get(port.busy) and not ctx.get(port.o_read.valid)

    simulate(dut, tb, background=[driver])


def test_host_port_takes_a_load_element_every_cycle():
    """A load is ready throughout: an element a cycle, then idle right after the last."""
    dut = _PortOnBanks(CFG)
    port = dut.port
    n = 3 * 7

    async def driver(ctx):
        while True:
            ctx.set(port.accept, not ctx.get(port.busy))
            await ctx.tick()

    async def tb(ctx):
        await put_stream(ctx, port.i_host, [_command(1, 2, 3, 7)])
        assert ctx.get(port.busy)
        ctx.set(port.i_load.valid, 1)
        for i in range(n):
            ctx.set(port.i_load.payload, i % 8)
            assert ctx.get(port.i_load.ready) and ctx.get(port.busy), i
            await ctx.tick()
        ctx.set(port.i_load.valid, 0)
        assert not ctx.get(port.busy) and not ctx.get(port.i_load.ready)
        await put_stream(ctx, port.i_host, [_command(0, 2, 3, 7)])
        got = await take_stream(ctx, port.o_read, n)
        assert got == [i % 8 for i in range(n)]

    simulate(dut, tb, background=[driver])
