"""The W2 rounding (hw.gen_rounding) against ``gen.integer.round_w2``."""

from __future__ import annotations

import os
import random

import pytest
import torch
from amaranth.sim import Simulator

from gen.integer import round_w2
from hw.gen_rounding import WeightRounder

SEED = int(os.environ.get("MLG_SEED", "2024"))


@pytest.mark.parametrize("held_shift", [False, True])
@pytest.mark.parametrize("in_bits,w_bits", [(6, 4), (12, 8), (22, 8), (9, 2)])
def test_rounder_matches_round_w2(in_bits, w_bits, held_shift):
    """WeightRounder equals gen.integer.round_w2 for random values and every shift (with
    ``held_shift``, from the cycle after the shift is set)."""
    shift_bits = 6
    dut = WeightRounder(in_bits, w_bits, shift_bits, held_shift=held_shift)
    rng = random.Random(SEED + in_bits)
    lo, hi = -(1 << (in_bits - 1)), (1 << (in_bits - 1)) - 1
    xs = [lo, hi, 0, -1, 1] + [rng.randint(lo, hi) for _ in range(60)]

    async def tb(ctx):
        for s in range(in_bits + 4):
            want = round_w2(torch.tensor(xs), s, w_bits).tolist()
            ctx.set(dut.shift, s)
            if held_shift:
                await ctx.tick()
            for x, y in zip(xs, want):
                ctx.set(dut.x, x)
                assert ctx.get(dut.y) == y, (x, s)

    sim = Simulator(dut)
    if held_shift:
        sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def test_generation_reexports_the_rounding():
    """``hw.generation`` keeps the names it has always exported."""
    from hw import gen_rounding, generation
    for name in ("WeightRounder", "round_half", "shift_saturate", "saturate"):
        assert getattr(generation, name) is getattr(gen_rounding, name)
