"""WeightTiler: lane-group and bypass results in, tiles out as weight vectors.

The test plays the sequencer and the lanes: it starts a tile only when the tiler's
slot is free, hands over each tile's results (lane groups or columns, announced a
cycle ahead on the ``*_next`` ports) some cycles after their issue, and takes the
weight vectors with random backpressure. Each tile's vectors must be its weights
row by row, zero past the masks, with ``last`` at the end of a layer.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from amaranth.hdl import Const

from gen.config import AcceleratorConfig, lane_plan
from gen.integer import int_range
from hw.gen_sequencer import tag_layout
from hw.gen_tiling import WeightTiler
from tests.support import TINY, simulate

CONFIGS = {
    "cols": AcceleratorConfig(rows=3, cols=4, gen_lanes=3, w_bits=6),
    "rows": AcceleratorConfig(rows=4, cols=2, gen_lanes=5, w_bits=5),
    "lanes_2": AcceleratorConfig(rows=2, cols=5, gen_lanes=2, w_bits=4),
    "tiny": TINY,
}
LATENCY = {"l2": 9, "byp": 6}


def _layers(cfg, rng):
    """Layers of tiles: (kind, tiles), a tile being (weights[r][c], rmask, cmask)."""
    lo, hi = int_range(cfg.w_bits)
    layers = []
    for kind in ("l2", "byp", "l2", "l2", "byp"):
        tiles = []
        for _ in range(rng.randint(1, 5)):
            w = [[rng.randint(lo, hi) for _ in range(cfg.cols)] for _ in range(cfg.rows)]
            tiles.append((w, rng.randrange(1, 1 << cfg.rows), rng.randrange(1, 1 << cfg.cols)))
        layers.append((kind, tiles))
    return layers


def _results(cfg, kind, w):
    """A tile's results in issue order: ((pr, pc) or column, weights)."""
    plan = lane_plan(cfg)
    R, C = cfg.rows, cfg.cols
    if kind == "byp":
        return [((0, c), [w[r][c] for r in range(R)]) for c in range(C)]
    out = []
    for pr in range(plan["Pr"]):
        for pc in range(plan["Pc"]):
            lanes = []
            for lr in range(plan["Lr"]):
                for lc in range(plan["Lc"]):
                    r, c = pr * plan["Lr"] + lr, pc * plan["Lc"] + lc
                    lanes.append(w[r][c] if r < R and c < C else 0)
            out.append(((pr, pc), lanes))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("backpressure", [0.0, 0.5])
def test_tiler_emits_tiles_in_order(name, backpressure):
    cfg = CONFIGS[name]
    R, C = cfg.rows, cfg.cols
    rng = random.Random(f"{name}-{backpressure}")
    layers = _layers(cfg, rng)
    layout = tag_layout(cfg)
    dut = WeightTiler(cfg)
    want = []
    for _, tiles in layers:
        for i, (w, rmask, cmask) in enumerate(tiles):
            for r in range(R):
                vec = [w[r][c] if rmask >> r & 1 and cmask >> c & 1 else 0 for c in range(C)]
                want.append((vec, int(i == len(tiles) - 1 and r == R - 1)))
    got, out_cycles = [], []

    async def tb(ctx):
        pending = deque()     # (due cycle, kind, tag value, weights)
        cycle = 0

        def drive(kind, port, nxt):
            ctx.set(port.valid, 0)
            ctx.set(nxt.valid, 0)
            for due, k, tag, weights in pending:
                if k != kind:
                    continue
                if due == cycle + 1:
                    ctx.set(nxt.valid, 1)
                    ctx.set(nxt.payload.as_value(), tag)
                if due == cycle:
                    ctx.set(port.valid, 1)
                    ctx.set(port.payload.tag.as_value(), tag)
                    ctx.set(port.payload.w, port.payload.w.shape().const(weights))

        async def step():
            nonlocal cycle
            drive("l2", dut.i_lanes, dut.i_lanes_next)
            drive("byp", dut.i_bypass, dut.i_bypass_next)
            ready = rng.random() >= backpressure
            ctx.set(dut.o_weights.ready, ready)
            if ready and ctx.get(dut.o_weights.valid):
                p = ctx.get(dut.o_weights.payload)
                got.append(([p.w[c] for c in range(C)], p.last))
                out_cycles.append(cycle)
            await ctx.tick()
            cycle += 1
            while pending and pending[0][0] < cycle:
                pending.popleft()

        for kind, tiles in layers:
            for t, (w, rmask, cmask) in enumerate(tiles):
                while not ctx.get(dut.slot_free):
                    await step()
                slot = ctx.get(dut.slot)
                results = _results(cfg, kind, w)
                for i, ((pr, pc), weights) in enumerate(results):
                    first, final = i == 0, i == len(results) - 1
                    tag = Const.cast(layout.const({
                        "l2": kind == "l2", "byp": kind == "byp", "last": 1, "pr": pr, "pc": pc,
                        "rmask": rmask, "cmask": cmask, "slot": slot, "tile_done": final,
                        "layer_last": final and t == len(tiles) - 1})).value
                    pending.append((cycle + LATENCY[kind], kind, tag, weights))
                    ctx.set(dut.tile_start, first)
                    ctx.set(dut.tile_end, final)
                    await step()
                    ctx.set(dut.tile_start, 0)
                    ctx.set(dut.tile_end, 0)
                    while rng.random() < 0.2:
                        await step()
            # A layer's results are all in before the next layer's are issued.
            while pending:
                await step()
        while len(got) < len(want):
            await step()
            assert cycle < 5000
        for _ in range(3):
            await step()
        assert ctx.get(dut.empty)

    simulate(dut, tb)
    assert got == want
    if not backpressure:
        # A tile's vectors leave on consecutive cycles.
        for i in range(0, len(out_cycles), R):
            assert out_cycles[i:i + R] == list(range(out_cycles[i], out_cycles[i] + R))
