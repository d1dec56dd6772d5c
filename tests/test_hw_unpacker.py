"""CodeUnpacker and the code decode: packed streams of every code width, against
streams packed here and ``gen.integer.decode_codes``."""

from __future__ import annotations

import os
import random

import pytest
import torch
from amaranth.hdl import Module, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import Out
from amaranth.sim import Simulator

from gen.config import code_value_bits
from gen.integer import decode_codes
from hw.unpacker import CodeDecoder, CodeUnpacker, decode_code
from tests.support import put_stream, raises_while_building

SEED = int(os.environ.get("MLG_SEED", "2024"))




@pytest.mark.parametrize("word_bits,byte_window", [(8, False), (16, False), (8, True)])
def test_unpacker_every_width_straddling(word_bits, byte_window):
    """Sections of every width 1..8 back to back (not byte aligned), some followed by
    an align; random idle input and random backpressure."""
    rng = random.Random(SEED + word_bits)
    dut = CodeUnpacker(word_bits, byte_window=byte_window)
    sections = []
    for _ in range(2):
        for q in rng.sample(range(1, 9), 8):
            sections.append((q, [rng.randrange(1 << q) for _ in range(rng.randint(1, 23))],
                             rng.random() < 0.5))
    bits, n = 0, 0
    for q, codes, align in sections:
        for c in codes:
            bits |= c << n
            n += q
        if align:
            n = -(-n // 8) * 8
    n = -(-n // word_bits) * word_bits
    words = [(bits >> i) & ((1 << word_bits) - 1) for i in range(0, n, word_bits)]
    got = []

    async def consumer(ctx):
        for q, codes, align in sections:
            ctx.set(dut.width, q)
            for _ in codes:
                while rng.random() < 0.3:
                    await ctx.tick()
                ctx.set(dut.o_stream.ready, 1)
                code, = await ctx.tick().sample(dut.o_stream.payload).until(dut.o_stream.valid)
                ctx.set(dut.o_stream.ready, 0)
                got.append(code)
            if align:
                ctx.set(dut.align, 1)
                await ctx.tick()
                ctx.set(dut.align, 0)

    async def producer(ctx):
        await put_stream(ctx, dut.i_stream, words, random.Random(SEED), idle=0.3)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer, background=True)
    sim.add_testbench(consumer)
    sim.run()
    assert got == [c for _, codes, _ in sections for c in codes]


@pytest.mark.parametrize("byte_window", [False, True])
def test_unpacker_full_rate(byte_window):
    """One code per cycle at every width with a steady input."""
    for q in range(1, 9):
        dut = CodeUnpacker(8, byte_window=byte_window)
        count = 64
        words = list(range(256)) * ((count * q) // 2048 + 1)
        cycles = []

        async def tb(ctx, q=q):
            ctx.set(dut.width, q)
            ctx.set(dut.o_stream.ready, 1)
            got = 0
            for cycle in range(count + 8):
                if ctx.get(dut.o_stream.valid):
                    got += 1
                    if got == count:
                        cycles.append(cycle)
                        return
                await ctx.tick()

        async def producer(ctx):
            await put_stream(ctx, dut.i_stream, words)

        sim = Simulator(dut)
        sim.add_clock(1e-6)
        sim.add_testbench(producer, background=True)
        sim.add_testbench(tb)
        sim.run()
        assert cycles and cycles[0] <= count + 3, f"width {q}: {cycles}"


@pytest.mark.parametrize("form", ["signed", "odd"])
def test_decode_every_width(form):
    """decode_code (static width) and CodeDecoder (run-time width) equal gen.integer."""
    class Static(wiring.Component):
        def __init__(self):
            super().__init__({f"v{q}": Out(signed(code_value_bits(q, form))) for q in range(1, 9)}
                             | {"code": wiring.In(8)})

        def elaborate(self, platform):
            m = Module()
            for q in range(1, 9):
                m.d.comb += getattr(self, f"v{q}").eq(decode_code(self.code, q, form))
            return m

    static, dynamic = Static(), CodeDecoder(form)
    m = Module()
    m.submodules.static, m.submodules.dynamic = static, dynamic

    async def tb(ctx):
        for q in range(1, 9):
            want = decode_codes(torch.arange(1 << q), q, form).tolist()
            ctx.set(dynamic.width, q)
            for c in range(1 << q):
                junk = random.Random(c).randrange(256) & ~((1 << q) - 1)
                ctx.set(static.code, c | junk)
                ctx.set(dynamic.code, c | junk)
                assert ctx.get(getattr(static, f"v{q}")) == want[c], (q, c)
                assert ctx.get(dynamic.value) == want[c], (q, c)

    sim = Simulator(m)
    sim.add_testbench(tb)
    sim.run()


def test_decode_rejects_bad_form():
    raises_while_building(ValueError, "'twos'", lambda: CodeDecoder("twos"))
    raises_while_building(ValueError, "word_bits 12", lambda: CodeUnpacker(12))
