"""Sliced memories (hw.memory): the same words, reads and writes as a plain Memory."""

import random

import pytest
from amaranth.hdl import Module, Shape, Signal, signed
from amaranth.lib import data
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from hw.memory import SlicedMemory, slice_bits


def test_slices_fit_one_block_ram_at_the_depth():
    assert slice_bits(2592) == 4 and slice_bits(4096) == 4 and slice_bits(4097) == 2
    assert slice_bits(8192) == 2 and slice_bits(16384) == 1 and slice_bits(512) == 32
    assert slice_bits(1) == 16384


@pytest.mark.parametrize("elem,count,depth", [(signed(12), 3, 2592), (8, 1, 8192), (signed(5), 2, 40)])
def test_sliced_memory_matches_a_plain_memory(elem, count, depth):
    m = Module()
    ref_shape = data.ArrayLayout(elem, count) if count > 1 else Shape.cast(elem)
    m.submodules.ref = ref = Memory(shape=ref_shape, depth=depth, init=[])
    sliced = SlicedMemory(m, "dut", elem, count, depth)
    assert sliced.shape == ref_shape
    rw = ref.write_port(granularity=1) if count > 1 else ref.write_port()
    rr = ref.read_port()
    sw, sr = sliced.write_port(), sliced.read_port()
    waddr, raddr = Signal(range(depth)), Signal(range(depth))
    wdata = Signal(len(rw.data.as_value()) if count > 1 else len(rw.data))
    wen, ren = Signal(count), Signal(init=1)
    m.d.comb += [rw.addr.eq(waddr), sw.addr.eq(waddr), rw.en.eq(wen), sw.en.eq(wen),
                 rw.data.eq(wdata), sw.data.eq(wdata),
                 rr.addr.eq(raddr), sr.addr.eq(raddr), rr.en.eq(ren), sr.en.eq(ren)]
    rng = random.Random(depth)
    # A few hot addresses, so that reads see written words (and read-during-write).
    hot = [rng.randrange(depth) for _ in range(6)] + [0, depth - 1]

    async def bench(ctx):
        for _ in range(400):
            ctx.set(waddr, rng.choice(hot))
            ctx.set(raddr, rng.choice(hot))
            ctx.set(wdata, rng.getrandbits(len(wdata)))
            ctx.set(wen, rng.getrandbits(count))
            ctx.set(ren, rng.random() < 0.8)
            await ctx.tick()
            want = ctx.get(rr.data.as_value() if count > 1 else rr.data)
            got = ctx.get(sr.data.as_value() if count > 1 else sr.data)
            assert got == want

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
