"""Block memories (hw.memory): the reads and writes of a plain Memory, read data registered."""

import random

import pytest
from amaranth.hdl import Module, Shape, Signal, signed
from amaranth.lib import data
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from hw.memory import BlockMemory, slice_bits


def test_slices_fit_one_block_ram_at_the_depth():
    assert slice_bits(2592) == 4 and slice_bits(4096) == 4 and slice_bits(4097) == 2
    assert slice_bits(8192) == 2 and slice_bits(16384) == 1 and slice_bits(512) == 32
    assert slice_bits(1) == 16384


@pytest.mark.parametrize("elem,count,depth,granular", [(signed(12), 3, 2592, True), (8, 1, 8192, False),
                                                    (signed(5), 2, 40, True), (signed(9), 4, 64, False)])
def test_block_memory_is_a_plain_memory_with_a_read_register(elem, count, depth, granular):
    m = Module()
    ref_shape = data.ArrayLayout(elem, count) if count > 1 else Shape.cast(elem)
    m.submodules.ref = ref = Memory(shape=ref_shape, depth=depth, init=[])
    m.submodules.dut = dut = BlockMemory(elem, count, depth, granular=granular)
    assert dut.shape == ref_shape
    rw = ref.write_port(granularity=1) if count > 1 else ref.write_port()
    rr = ref.read_port()
    sw, sr, sr2 = dut.write_port(), dut.read_port(), dut.read_port()
    flat = (lambda v: v.as_value()) if count > 1 else (lambda v: v)
    waddr, raddr, raddr2 = Signal(range(depth)), Signal(range(depth)), Signal(range(depth))
    wdata = Signal(len(flat(rw.data)))
    wen, ren, oen = Signal(count), Signal(init=1), Signal(init=1)
    # The reference: the read port, then a register loaded while out_en is high.
    want_q = Signal(len(wdata))
    with m.If(oen):
        m.d.sync += want_q.eq(flat(rr.data))
    m.d.comb += [rw.addr.eq(waddr), sw.addr.eq(waddr), rw.data.eq(wdata), sw.data.eq(wdata),
                 rw.en.eq(wen if granular else wen.any().replicate(count)),
                 sw.en.eq(wen if granular else wen.any()),
                 rr.addr.eq(raddr), sr.addr.eq(raddr), rr.en.eq(ren), sr.en.eq(ren),
                 sr.out_en.eq(oen), sr2.addr.eq(raddr2)]
    assert len(sw.en) == (count if granular else 1)
    rng = random.Random(depth)
    # A few hot addresses, so that reads see written words (and read-during-write).
    hot = [rng.randrange(depth) for _ in range(6)] + [0, depth - 1]

    async def bench(ctx):
        shadow = {}
        history = []
        for _ in range(400):
            wa, ra2 = rng.choice(hot), rng.choice(hot)
            ctx.set(waddr, wa)
            ctx.set(raddr, rng.choice(hot))
            ctx.set(raddr2, ra2)
            ctx.set(wdata, rng.getrandbits(len(wdata)))
            ctx.set(wen, rng.getrandbits(count))
            ctx.set(ren, rng.random() < 0.8)
            ctx.set(oen, rng.random() < 0.8)
            history.append(shadow.get(ra2, 0))
            await ctx.tick()
            # Second port (always enabled): the word two edges back, as stored then.
            assert ctx.get(flat(sr.data)) == ctx.get(want_q)
            shadow = {a: ctx.get(flat(ref.data[a])) for a in set(hot)}
            if len(history) >= 2:
                assert ctx.get(flat(sr2.data)) == history[-2]

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
