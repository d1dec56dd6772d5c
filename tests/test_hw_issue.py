"""The engine's issue stage (:class:`hw.issue.IssueStage`) with a real window feeder.

The post reader and the activation banks are played by the testbench: banks that
answer every address two cycles later with a value made of (buffer, bank,
address), and accumulator halves that a claim makes busy until some cycles after
their tile's last vector. Checked: the vectors entering the array are the layer's
(:func:`hw.feeder.feed_reference`) with the source buffer's activations in their
active rows; each weight vector reaches the staging tile in order and every tile's
transfer comes before its vectors; no tile starts on a busy half; the counters; and
the descriptor and weight-stream checks (:data:`hw.engine.ERR_DESCRIPTOR`,
:data:`hw.engine.ERR_WEIGHTS`).
"""

from __future__ import annotations

import dataclasses
import random

from amaranth.hdl import Elaboratable, Module

from hw.engine import ERR_DESCRIPTOR, ERR_WEIGHTS
from hw.feeder import WindowFeeder, feed_reference
from hw.issue import IssueStage
from tests.support import TINY, TINY_COMPACT, put_stream, simulate

CFG = dataclasses.replace(TINY, max_ci=5, max_co=3, act_depth=45, act_buffers=3)


class _IssueWithFeeder(Elaboratable):
    def __init__(self, config, issue_gap=1):
        self.issue = IssueStage(config, issue_gap=issue_gap)
        self.feeder = WindowFeeder(config)

    def elaborate(self, platform):
        m = Module()
        m.submodules.issue = issue = self.issue
        m.submodules.feeder = feeder = self.feeder
        m.d.comb += [feeder.start.eq(issue.o_feed_start), feeder.desc.eq(issue.desc),
                     issue.i_pixels.eq(feeder.p), issue.i_vec.payload.eq(feeder.o_vec.payload),
                     issue.i_vec.valid.eq(feeder.o_vec.valid),
                     feeder.o_vec.ready.eq(issue.i_vec.ready)]
        return m


def _bank_value(b, r, addr):
    return (b * 7 + r * 3 + addr) % 16 - 8


def _run(config, layer, *, bad_last=False, issue_gap=1, seed=1):
    """Run one layer; returns what the testbench saw."""
    R, C = config.rows, config.cols
    dut = _IssueWithFeeder(config, issue_gap)
    issue = dut.issue
    rng = random.Random(seed)
    ci, co, k = layer["ci"], layer.get("co", 1), layer.get("k", 1)
    pool = layer.get("op", 0) == 1
    n_w = 0 if pool or layer.get("invalid") else -(-co // C) * -(-ci // R) * k * k * R
    weights = [{"w": [rng.randint(-8, 7) for _ in range(C)], "last": i == n_w - 1} for i in range(n_w)]
    if bad_last and n_w:
        weights[n_w // 2]["last"] = 1
    seen = {"vecs": [], "acts": [], "staged": [], "xfers": [], "claims": [], "cycle": 0,
            "done": None, "busy_starts": [], "counts": None, "error": None}

    async def banks(ctx):
        # Every bank answers two cycles after the address; the post reader's halves.
        hist = [0, 0]
        busy_until = [None, None]
        half_busy = 0
        cycle = 0
        vectors_left = None
        while True:
            hist.append(ctx.get(issue.rd_addr))
            for b in range(config.act_buffers):
                for r in range(R):
                    ctx.set(issue.i_rd_data[b][r], _bank_value(b, r, hist[-3]))
            ctx.set(issue.half_busy, half_busy)
            ctx.set(issue.pool_free, 1)
            ctx.set(issue.layer_end, vectors_left == 0)
            if ctx.get(issue.start):
                vectors_left = len(expected)
            if ctx.get(issue.claim):
                h = ctx.get(issue.claim_half)
                assert not (half_busy >> h) & 1, "a tile started on a busy half"
                half_busy |= 1 << h
                seen["claims"].append(h)
            if ctx.get(issue.o_array_valid) or ctx.get(issue.o_pool_valid):
                vec = {f: ctx.get(getattr(issue.o_vec, f)) for f in
                       ("addr", "mask", "pix", "sel", "first", "tile_last", "cotile_last", "half",
                        "pool_first", "pool_last")}
                seen["vecs"].append((cycle, vec))
                seen["acts"].append([ctx.get(issue.o_act[r]) for r in range(R)])
                vectors_left -= 1
                if vec["cotile_last"]:
                    busy_until[vec["half"]] = cycle + 6
            for h in range(2):
                if busy_until[h] == cycle:
                    half_busy &= ~(1 << h)
                    busy_until[h] = None
            if ctx.get(issue.stage_en):
                seen["staged"].append((ctx.get(issue.stage_row),
                                       [ctx.get(issue.stage_w[c]) for c in range(C)]))
            if ctx.get(issue.xfer):
                seen["xfers"].append((cycle, ctx.get(issue.xfer_bank)))
            await ctx.tick()
            cycle += 1
            seen["cycle"] = cycle

    desc = {"op": int(pool), "k": k, "stride": layer.get("stride", 1), "pad": layer.get("pad", 0),
            "ci": ci, "co": co, "h": layer["h"], "w": layer["w"], "src": layer.get("src", 0),
            "dst": layer.get("dst", 1)}
    expected = [] if layer.get("invalid") else feed_reference(
        config, pool=pool, ci=ci, co=co, h=layer["h"], w=layer["w"], k=k,
        stride=desc["stride"], pad=desc["pad"])

    async def tb(ctx):
        ctx.set(issue.accept, 1)
        await put_stream(ctx, issue.i_desc, [desc])
        ctx.set(issue.accept, 0)
        assert ctx.get(issue.busy) and ctx.get(issue.start)
        await put_stream(ctx, issue.i_weights, weights, rng, idle=0.2)
        for _ in range(400):
            if ctx.get(issue.done):
                break
            await ctx.tick()
        assert ctx.get(issue.done)
        seen["done"] = seen["cycle"]
        seen["error"] = ctx.get(issue.error)
        seen["counts"] = {n: ctx.get(getattr(issue, n)) for n in ("mac_cycles", "macs")}
        await ctx.tick()
        assert not ctx.get(issue.busy)

    simulate(dut, tb, background=[banks])
    return seen, expected, weights


def _check_vectors(config, seen, expected, src):
    got = [v for _, v in seen["vecs"]]
    assert len(got) == len(expected)
    for g, want, acts in zip(got, expected, seen["acts"]):
        for f, value in want.items():
            if f != "addr" or want["mask"]:
                assert g[f] == value, (f, g, want)
        assert acts == [_bank_value(src, r, g["addr"]) if (want["mask"] >> r) & 1 else 0
                        for r in range(config.rows)]


def test_issue_stage_runs_a_conv_layer():
    layer = dict(ci=5, co=3, h=3, w=3, k=3, stride=1, pad=1, src=2, dst=0)
    seen, expected, weights = _run(CFG, layer)
    _check_vectors(CFG, seen, expected, src=2)
    # the weight vectors, in order, each into the staging row of its place in the tile
    assert seen["staged"] == [(i % CFG.rows, w["w"]) for i, w in enumerate(weights)]
    # one transfer per tile, alternating banks, each before its tile's first vector
    tiles = [(c, v) for c, v in seen["vecs"] if v["tile_last"]]
    assert [b for _, b in seen["xfers"]] == [i % 2 for i in range(len(tiles))]
    starts = [seen["vecs"][0][0]] + [seen["vecs"][i + 1][0] for i, (_, v) in
                                     enumerate(seen["vecs"][:-1]) if v["tile_last"]]
    assert all(x < s for (x, _), s in zip(seen["xfers"], starts))
    # one claim per output-channel tile, alternating halves
    assert seen["claims"] == [0, 1]
    assert seen["error"] == 0
    assert seen["counts"] == {"mac_cycles": len(expected), "macs": 5 * 3 * 9 * 9}


def test_issue_stage_runs_a_pool_layer_without_weights():
    layer = dict(op=1, ci=3, h=2, w=3, src=1, dst=2)
    seen, expected, _ = _run(CFG, layer)
    _check_vectors(CFG, seen, expected, src=1)
    assert seen["staged"] == [] and seen["claims"] == [] and seen["error"] == 0
    assert seen["counts"] == {"mac_cycles": 0, "macs": 3 * 6}


def test_issue_stage_spaces_the_vectors_of_a_pixel_by_the_issue_gap():
    # a 1 x 2 output map: without the gap, a pixel's vectors would come 2 cycles apart
    layer = dict(ci=2, co=2, h=1, w=2, k=3, pad=1)
    seen, expected, _ = _run(TINY_COMPACT, layer, issue_gap=5)
    _check_vectors(TINY_COMPACT, seen, expected, src=0)
    last = {}
    for cycle, v in seen["vecs"]:
        if v["pix"] in last:
            assert cycle - last[v["pix"]] >= 5
        last[v["pix"]] = cycle


def test_issue_stage_flags_a_misplaced_last_weight():
    seen, _, _ = _run(CFG, dict(ci=2, co=2, h=2, w=2, k=3, pad=1), bad_last=True)
    assert seen["error"] == ERR_WEIGHTS


def test_issue_stage_refuses_a_bad_descriptor():
    for bad in (dict(k=2), dict(ci=0), dict(dst=0), dict(ci=6), dict(src=3)):
        layer = {**dict(ci=2, co=2, h=2, w=2, k=1, src=0, dst=1), **bad, "invalid": True}
        seen, _, _ = _run(CFG, layer)
        assert seen["error"] == ERR_DESCRIPTOR, bad
        assert seen["vecs"] == [] and seen["staged"] == []
