"""Both kinds of counters (block RAM bank, registers) against a model that counts every
event as it comes; the registers' extras (per-counter enable, kept counters, values)."""

from __future__ import annotations

import gc
import random
import warnings

import pytest
from amaranth.hdl import UnusedElaboratable

from hw.counters import CounterBank, CounterRegisters, counter_signature
from tests.support import simulate


def _run_model(dut, names, inc_max, width, rng, cycles=3000):
    """Random events (up to each counter's largest increment), random clears and reads
    of random counters: every value read equals the model's. Returns the reads."""
    n = len(names)
    model = [0] * n
    reads = []

    async def bench(ctx):
        nonlocal model
        want = None
        for cycle in range(cycles):
            events = [rng.randint(0, x) if rng.random() < 0.7 else 0 for x in inc_max]
            clear = [int(rng.random() < 0.01) for _ in range(n)]
            if cycle < 5:
                clear = [0] * n
            for name, e in zip(names, events):
                ctx.set(dut.inc[name], e)
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

    simulate(dut, bench)
    return reads


@pytest.mark.parametrize("kind", [CounterBank, CounterRegisters])
@pytest.mark.parametrize("n,width", [(12, 24), (3, 6), (2, 16)])
def test_counters_count_every_event(kind, n, width):
    """Every value read equals the model's, including counters that wrap; the bank
    answers a read within n cycles, the registers at once."""
    rng = random.Random(n * 100 + width)
    inc_max = [rng.choice((1, 1, 4)) for _ in range(n)]
    names = [f"c{i}" for i in range(n)]
    dut = kind(dict(zip(names, inc_max)), width)
    reads = _run_model(dut, names, inc_max, width, rng)
    assert {i for i, _ in reads} == set(range(n))
    if kind is CounterBank:
        assert len(reads) >= 3000 // (n + 1) - 1
    else:
        assert len(reads) == 3000
    # The narrow counters wrap and still read right.
    assert width > 6 or any(wrapped for _, wrapped in reads)


def test_both_kinds_share_one_signature():
    inc_max = {"a": 1, "b": 4, "c": 1}
    shared = counter_signature(inc_max, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        for kind in (CounterBank, CounterRegisters):
            members = kind(inc_max, 16).signature.members
            for name, member in shared.items():
                assert members[name] == member, (kind, name)
        gc.collect()


def test_registers_add_only_when_enabled_and_read_kept_counters_through():
    """``add`` gates a counter's whole increment; a kept counter reads its input;
    ``values`` shows every counter at once."""
    rng = random.Random(3)
    dut = CounterRegisters({"layer": 1000, "ev": 1}, 20, kept=("link",))
    assert dut.names == ("layer", "ev", "link")

    async def bench(ctx):
        model = {"layer": 0, "ev": 0}
        for cycle in range(400):
            inc, ev, en = rng.randrange(1001), rng.randint(0, 1), int(rng.random() < 0.2)
            kept = rng.randrange(1 << 20)
            ctx.set(dut.inc["layer"], inc)
            ctx.set(dut.add["layer"], en)
            ctx.set(dut.inc["ev"], ev)
            ctx.set(dut.kept["link"], kept)
            index = rng.randrange(3)
            ctx.set(dut.rd_index, index)
            want = [model["layer"], model["ev"], kept][index]
            assert ctx.get(dut.rd_valid) and ctx.get(dut.rd_data) == want, cycle
            assert ctx.get(dut.values["link"]) == kept
            assert ctx.get(dut.values["layer"]) == model["layer"]
            await ctx.tick()
            model["layer"] = (model["layer"] + inc * en) % (1 << 20)
            model["ev"] += ev

    simulate(dut, bench)


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

    simulate(dut, bench)
    assert seen and set(seen.values()) == {0}
    for kind in (CounterBank, CounterRegisters):
        for args, match in ((([1], 8), "at least 2 counters"), (([1, 0], 8), "at least 1"),
                            (([1, 1], 1), "at least 2 bits")):
            inc_max = {f"c{i}": x for i, x in enumerate(args[0])}
            # (The refused bank is not reported as an unused elaboratable.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnusedElaboratable)
                with pytest.raises(ValueError, match=match):
                    kind(inc_max, args[1])
                gc.collect()
