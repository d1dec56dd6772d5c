"""The block-RAM counter bank against a model that counts every event as it comes."""

from __future__ import annotations

import gc
import random
import warnings

import pytest
from amaranth.hdl import UnusedElaboratable
from amaranth.sim import Simulator

from hw.counters import CounterBank


@pytest.mark.parametrize("n,width", [(12, 24), (3, 6), (2, 16)])
def test_counter_bank_counts_every_event(n, width):
    """Random events (up to each counter's largest increment), random clears and reads of
    random counters: every value read equals the model's, including counters that wrap."""
    rng = random.Random(n * 100 + width)
    inc_max = [rng.choice((1, 1, 4)) for _ in range(n)]
    dut = CounterBank(inc_max, width)
    model = [0] * n
    reads = []

    async def bench(ctx):
        nonlocal model
        want = None
        for cycle in range(3000):
            events = [rng.randint(0, x) if rng.random() < 0.7 else 0 for x in inc_max]
            clear = [int(rng.random() < 0.01) for _ in range(n)]
            if cycle < 5:
                clear = [0] * n
            for i in range(n):
                ctx.set(dut.inc[i], events[i])
            ctx.set(dut.clear, sum(b << i for i, b in enumerate(clear)))
            if want is None:
                want = rng.randrange(n)
                ctx.set(dut.rd_index, want)
            if ctx.get(dut.rd_valid):
                assert ctx.get(dut.rd_data) == model[want] % (1 << width), (cycle, want)
                reads.append((want, model[want] >= 1 << width))
                want = None
            await ctx.tick()
            model = [0 if clear[i] else model[i] + events[i] for i in range(n)]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    # Every read is answered within n cycles, and reads cover every counter.
    assert len(reads) >= 3000 // (n + 1) - 1 and {i for i, _ in reads} == set(range(n))
    # The narrow bank's counters wrap and still read right.
    assert width > 6 or any(wrapped for _, wrapped in reads)


def test_counter_bank_starts_at_zero_and_refuses_bad_parameters():
    dut = CounterBank([1, 1, 1], 8)
    seen = {}

    async def bench(ctx):
        for _ in range(8):
            for i in range(3):
                ctx.set(dut.rd_index, i)
                if ctx.get(dut.rd_valid):
                    seen[i] = ctx.get(dut.rd_data)
                await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert seen and set(seen.values()) == {0}
    for args, match in ((([1], 8), "at least 2 counters"), (([1, 0], 8), "at least 1"),
                        (([1, 1], 1), "at least 2 bits")):
        # (The refused bank is not reported as an unused elaboratable.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnusedElaboratable)
            with pytest.raises(ValueError, match=match):
                CounterBank(*args)
            gc.collect()
