"""TileSequencer: the reads it issues, in order, against the loops written out here.

The test plays the sequencer's neighbours: it holds the layer fields, pulses
``start``, keeps a tile slot like ``hw.gen_tiling.WeightTiler`` (sometimes not free,
to check that a tile waits for it), and models the lanes' pipeline as nine stages
for ``pipe_empty``. The tags and read addresses of every issued read are compared
with the level-1 and weight-tile loops, and the store layouts of ``hw.gen_loader``.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from amaranth.hdl import Const

from gen.config import AcceleratorConfig, lane_plan
from hw.gen_loader import layer_layout
from hw.gen_sequencer import TileSequencer
from tests.support import TINY, simulate

PIPE = 9    # stage registers of hw.gen_lanes behind the issue stage

CONFIGS = {
    "small": AcceleratorConfig(rows=3, cols=4, max_ci=7, max_co=9, max_k=3, max_bi=2, max_bo=4,
                               gen_lanes=3, qb=3, qu=4, qv=2, qd=5, w_bits=6),
    "wide": AcceleratorConfig(rows=4, cols=4, max_ci=9, max_co=9, max_k=3, max_bi=3, max_bo=3,
                              gen_lanes=8),
    "tiny": TINY,
}


def _cdiv(a, b):
    return -(-a // b)


def _expected(cfg, ci, co, kk, bi, bo, has_l1, has_l2):
    """(mode, fields) of every read, in issue order."""
    R, C = cfg.rows, cfg.cols
    plan = lane_plan(cfg)
    cit, cot, stride = _cdiv(ci, R), _cdiv(co, C), _cdiv(ci, R) * kk
    rmask = lambda ct: sum(1 << r for r in range(R) if ct * R + r < ci)  # noqa: E731
    cmask = lambda q: sum(1 << c for c in range(C) if q * C + c < co)  # noqa: E731
    out = []
    if has_l1:
        for o in range(bo):
            for ct in range(cit):
                for t in range(kk):
                    for p in range(plan["P1"]):
                        for j in range(bi):
                            out.append(("l1", {"first": j == 0, "last": j == bi - 1, "pc": p,
                                               "wa": (o * cit + ct) * kk + t,
                                               "u_addr": (o * cit + ct) * bi + j,
                                               "b_addr": (o * bi + j) * kk + t}))
    tiles = [(q, ct, t) for q in range(cot) for ct in range(cit) for t in range(kk)]
    for q, ct, t in tiles:
        tile = []
        if has_l2:
            for pr in range(plan["Pr"]):
                for pc in range(plan["Pc"]):
                    for n in range(bo):
                        tile.append(("l2", {"first": n == 0, "last": n == bo - 1, "pr": pr,
                                            "pc": pc, "v_addr": q * bo + n,
                                            "w1_addr": n * stride + ct * kk + t}))
        else:
            for pc in range(C):
                tile.append(("byp", {"first": 1, "last": 1, "pc": pc,
                                     "w1_addr": (q * C + pc) * stride + ct * kk + t}))
        for i, (mode, f) in enumerate(tile):
            f |= {"rmask": rmask(ct), "cmask": cmask(q), "tile_done": i == len(tile) - 1,
                  "layer_last": (q, ct, t) == tiles[-1] and i == len(tile) - 1}
        out += tile
    return out


def _run(cfg, layer, block, seed):
    dut = TileSequencer(cfg)
    rng = random.Random(seed)
    got, tiles = [], []

    async def tb(ctx):
        ctx.set(dut.layer.as_value(), Const.cast(layer_layout(cfg).const(layer)).value)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        history = deque([0] * PIPE, maxlen=PIPE)
        slot, busy, cycle = 0, [0, 0], 0
        while True:
            # A slot becomes free again some cycles after its tile ends.
            for s in range(2):
                if busy[s] > 0 and rng.random() > block:
                    busy[s] -= 1
            ctx.set(dut.slot, slot)
            ctx.set(dut.slot_free, busy[slot] == 0)
            ctx.set(dut.pipe_empty, not any(history))
            tag, valid = ctx.get(dut.o_tag.payload), ctx.get(dut.o_tag.valid)
            if valid:
                mode = "l1" if tag.l1 else "l2" if tag.l2 else "byp" if tag.byp else "?"
                got.append((mode, tag, {n: ctx.get(getattr(dut, n)) for n in
                                        ("u_addr", "b_addr", "v_addr", "w1_addr")}))
            if ctx.get(dut.tile_start):
                assert busy[slot] == 0 and valid and tag.slot == slot
                tiles.append(slot)
                busy[slot] = -1          # busy until the tile ends
            if ctx.get(dut.tile_end):
                busy[slot] = rng.randint(0, 6)
                slot ^= 1
            done = ctx.get(dut.done)
            await ctx.tick()
            history.append(valid)
            cycle += 1
            if done:
                break
            assert cycle < 20000
        # The sequencer is idle after done.
        for _ in range(PIPE + 2):
            assert not ctx.get(dut.o_tag.valid)
            await ctx.tick()

    simulate(dut, tb)
    return got, tiles


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["both", "l1", "l2", "dense"])
def test_sequencer_issues_the_loops(name, mode):
    cfg = CONFIGS[name]
    rng = random.Random(f"{name}-{mode}")
    has_l1, has_l2 = mode in ("both", "l1"), mode in ("both", "l2")
    R, C = cfg.rows, cfg.cols
    for trial in range(3):
        ci, co, k = rng.randint(1, cfg.max_ci), rng.randint(1, cfg.max_co), rng.choice([1, 3])
        kk = k * k
        bi = rng.randint(1, cfg.max_bi) if has_l1 else 0
        bo = rng.randint(1, cfg.max_bo) if has_l2 else co
        cit, cot = _cdiv(ci, R), _cdiv(co, C)
        layer = {"ci": ci, "co": co, "bi": bi, "bo": bo, "kk": kk, "has_l1": has_l1,
                 "has_l2": has_l2, "w_shift": 0, "stride": cit * kk, "bikk": bi * kk,
                 "bi_m1": max(bi - 1, 0), "bo_m1": bo - 1, "kk_m1": kk - 1,
                 "ci_last": (cit - 1) * R, "co_last": (cot - 1) * C}
        got, tiles = _run(cfg, layer, block=(0.0, 0.5, 0.9)[trial], seed=trial)
        want = _expected(cfg, ci, co, kk, bi, bo, has_l1, has_l2)
        assert len(got) == len(want)
        for i, ((mode_g, tag, addrs), (mode_w, f)) in enumerate(zip(got, want)):
            have = {n: int(getattr(tag, n)) for n in f if hasattr(tag, n)} | addrs
            assert mode_g == mode_w, i
            assert {n: have[n] for n in f} == {n: int(v) for n, v in f.items()}, i
        n_tiles = cot * cit * kk
        assert tiles == [i % 2 for i in range(n_tiles)]
