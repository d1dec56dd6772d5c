"""The engine's accumulators (:class:`hw.accumulator.Accumulators`).

Output-channel tiles are accumulated pass by pass over their pixels, the column
sums arriving ``latency`` cycles after each vector as from the array, and then
drained through the read port; every word must be the sum of its vectors. With
forwarding, vectors of one pixel come back to back (maps of one and two pixels);
without it they are spaced by :attr:`~hw.accumulator.Accumulators.issue_gap`.
"""

from __future__ import annotations

import random

import pytest

from hw.accumulator import Accumulators
from gen.contract import ACC_GAP
from tests.support import TINY, simulate

LATENCY = 6


def _schedule(rng, forward, tiles):
    """Per cycle, the vector entering the array (or None): tiles of (half, pixels,
    passes), each pass over the pixels in order, as the issue stage orders them."""
    gap = 1 if forward else ACC_GAP
    lo, hi = -(1 << (TINY.acc_bits - 3)), (1 << (TINY.acc_bits - 3)) - 1
    out = []
    for half, pixels, passes in tiles:
        for k in range(passes):
            for p in range(pixels):
                out.append({"half": half, "pix": p, "first": k == 0,
                            "last": k == passes - 1 and p == pixels - 1,
                            "sum": [rng.randint(lo, hi) for _ in range(TINY.cols)]})
                if rng.random() < 0.2:
                    out.append(None)
            # a pixel comes back no sooner than `gap` cycles later
            out.extend([None] * max(0, gap - pixels))
    return out


@pytest.mark.parametrize("forward", [True, False])
def test_accumulators_sum_every_pixel_of_a_tile(forward):
    rng = random.Random(5 if forward else 6)
    dut = Accumulators(TINY, latency=LATENCY, forward=forward)
    assert dut.issue_gap == (1 if forward else ACC_GAP)
    tiles = [(0, 1, 4), (1, 2, 3), (0, 9, 2), (1, 3, 5)] if forward else \
        [(0, 1, 3), (1, 5, 3), (0, 9, 2)]
    schedule = _schedule(rng, forward, tiles)
    C = TINY.cols

    async def tb(ctx):
        want, full = {}, []
        total = len(schedule) + LATENCY + 3
        for t in range(total):
            v = schedule[t] if t < len(schedule) else None
            ctx.set(dut.i_valid, v is not None)
            if v:
                for name in ("half", "pix", "first", "last"):
                    ctx.set(getattr(dut, f"i_{name}"), v[name])
                key = (v["half"], v["pix"])
                base = [0] * C if v["first"] else want[key]
                want[key] = [a + b for a, b in zip(base, v["sum"])]
            back = schedule[t - LATENCY] if 0 <= t - LATENCY < len(schedule) else None
            for c in range(C):
                ctx.set(dut.i_sum[c], back["sum"][c] if back else 0)
            if ctx.get(dut.o_full):
                full.append((t, ctx.get(dut.o_full_half)))
            await ctx.tick()
        # o_full as each tile's last sum is written: a cycle after its accumulate stage
        lasts = [(t + LATENCY + 1, v["half"]) for t, v in enumerate(schedule) if v and v["last"]]
        assert full == lasts
        # Drain: the read register holds the word two cycles after its address.
        ctx.set(dut.rd_en, 1)
        for (half, pix), sums in sorted(want.items()):
            ctx.set(dut.rd_half, half)
            ctx.set(dut.rd_addr, pix)
            await ctx.tick().repeat(2)
            assert [ctx.get(dut.o_rd_data[half][c]) for c in range(C)] == sums, (half, pix)

    simulate(dut, tb)


def test_accumulators_refuse_a_latency_shorter_than_the_read():
    import gc
    import warnings

    from amaranth.hdl import UnusedElaboratable
    with warnings.catch_warnings():
        # (the refused block is never elaborated; its warning comes when it is collected)
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match="latency must be at least 3"):
            Accumulators(TINY, latency=2)
        gc.collect()
