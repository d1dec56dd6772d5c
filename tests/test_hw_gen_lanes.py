"""GenerationLanes: level-1 sums, level-2 lane groups and the bypass, against sums and
rounding computed here (``gen.integer``), with the latencies of the docstring.

The test plays the sequencer and the stores: it issues groups of tags (with idle
cycles between tags) and drives random store words two cycles after each tag.
"""

from __future__ import annotations

import random

import pytest
import torch
from amaranth.hdl import Const, Value

from gen.config import AcceleratorConfig, lane_plan
from gen.integer import decode_codes, int_range, round_w2
from hw.gen_lanes import GenerationLanes
from hw.gen_loader import store_depths, w1_value_bits
from hw.gen_sequencer import tag_layout
from tests.support import TINY, simulate

CONFIGS = {
    # lanes < cols (two column groups), one row per group
    "cols": AcceleratorConfig(rows=3, cols=4, max_ci=7, max_co=9, max_k=3, max_bi=2, max_bo=4,
                              gen_lanes=3, qb=3, qu=4, qv=2, qd=5, w_bits=6),
    # lanes > cols: two rows per group; signed decode
    "rows": AcceleratorConfig(rows=4, cols=2, max_bi=3, max_bo=3, gen_lanes=5, qb=4, qu=5,
                              qv=3, w_bits=5, decode="signed"),
    # two level-1 passes per W1 word
    "passes": AcceleratorConfig(rows=4, cols=4, max_bi=3, max_bo=3, gen_lanes=2, w_bits=8),
    "nol2": AcceleratorConfig(rows=3, cols=2, max_bi=3, gen_lanes=2, w_bits=4, level2=False),
    "tiny": TINY,
}
READ_LATENCY = 2
LANE_LATENCY, BYPASS_LATENCY, L1_LATENCY = 9, 6, 6


def _dec(code, bits, form):
    return int(decode_codes(torch.tensor([code]), bits, form)[0])


def _round(x, shift, w_bits):
    return int(round_w2(torch.tensor([x]), shift, w_bits)[0])


def _groups(cfg, rng):
    """Tag groups ``(kind, tags)``, each tag a (fields, store words) pair, and what each
    group must produce."""
    R, C = cfg.rows, cfg.cols
    plan = lane_plan(cfg)
    w1lo, w1hi = int_range(w1_value_bits(cfg))
    form = cfg.decode

    def words():
        return {"u": [rng.randrange(1 << cfg.qu) for _ in range(R)],
                "v": [rng.randrange(1 << cfg.qv) for _ in range(C)],
                "b": rng.randrange(1 << cfg.qb),
                "w1": [rng.randint(w1lo, w1hi) for _ in range(R)]}

    groups = []
    kinds = ["l1", "byp"] + (["l2"] if cfg.level2 else [])
    for _ in range(12):
        kind = rng.choice(kinds)
        slot, rmask, cmask = rng.randrange(2), rng.randrange(1 << R), rng.randrange(1 << C)
        base = {"slot": slot, "rmask": rmask, "cmask": cmask, "tile_done": rng.randrange(2),
                "layer_last": rng.randrange(2)}
        if kind == "l1":
            n, p = rng.randint(1, cfg.max_bi), rng.randrange(plan["P1"])
            wa = rng.randrange(store_depths(cfg)["W1"])
            tags = [({"l1": 1, "first": i == 0, "last": i == n - 1, "pc": p, "wa": wa}, words())
                    for i in range(n)]
            rows = range(p * plan["L1"], min(R, (p + 1) * plan["L1"]))
            sums = {r: sum(_dec(w["u"][r], cfg.qu, form) * _dec(w["b"], cfg.qb, form)
                           for _, w in tags) for r in rows}
            groups.append(("l1", tags, (wa, sums)))
        elif kind == "l2":
            n = rng.randint(1, cfg.max_bo)
            pr, pc = rng.randrange(plan["Pr"]), rng.randrange(plan["Pc"])
            tags = [(base | {"l2": 1, "first": i == 0, "last": i == n - 1, "pr": pr, "pc": pc},
                     words()) for i in range(n)]
            weights = []
            for lr in range(plan["Lr"]):
                for lc in range(plan["Lc"]):
                    c, r = pc * plan["Lc"] + lc, pr * plan["Lr"] + lr
                    s = sum(_dec(w["v"][c], cfg.qv, form) * w["w1"][r] for _, w in tags) \
                        if c < C and r < R else 0
                    weights.append(s)
            groups.append(("l2", tags, (base | {"pr": pr, "pc": pc}, weights)))
        else:
            pc = rng.randrange(C)
            tag = (base | {"byp": 1, "first": 1, "last": 1, "pc": pc}, words())
            groups.append(("byp", [tag], (base | {"pc": pc}, tag[1]["w1"])))
    return groups


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shift", [0, 1, 3, 9])
def test_lanes_sum_and_round(name, shift):
    cfg = CONFIGS[name]
    rng = random.Random(f"{name}-{shift}")
    groups = _groups(cfg, rng)
    layout = tag_layout(cfg)
    dut = GenerationLanes(cfg)
    # The issue schedule: one tag or an idle cycle per entry.
    schedule, ends = [None, None], []
    for kind, tags, _ in groups:
        for fields, words in tags:
            while rng.random() < 0.3:
                schedule.append(None)
            schedule.append((fields, words))
        ends.append(len(schedule) - 1)
    schedule += [None] * 12
    out = {"l1": [], "l2": [], "byp": [], "next_l2": [], "next_byp": []}

    async def tb(ctx):
        ctx.set(dut.w_shift, shift)
        for cycle, entry in enumerate(schedule):
            ctx.set(dut.i_tag.valid, entry is not None)
            if entry is not None:
                ctx.set(dut.i_tag.payload.as_value(), Const.cast(layout.const(entry[0])).value)
            read = schedule[cycle - READ_LATENCY] if cycle >= READ_LATENCY else None
            if read is not None:
                w = read[1]
                ctx.set(dut.u_data, w["u"])
                ctx.set(dut.v_data, w["v"])
                ctx.set(dut.w1_data, w["w1"])
                ctx.set(dut.b_data, w["b"])
            wr = dut.w1_wr
            if ctx.get(wr.en):
                en = ctx.get(wr.en)
                data = ctx.get(wr.data)
                out["l1"].append((cycle, ctx.get(wr.addr),
                                  {r: data[r] for r in range(cfg.rows) if en >> r & 1}))
            for key, port in (("l2", dut.o_lanes), ("byp", dut.o_bypass)):
                if ctx.get(port.valid):
                    p = ctx.get(port.payload)
                    out[key].append((cycle, p.tag, [p.w[i] for i in range(len(port.payload.w))],
                                     ctx.get(Value.cast(port.payload.tag))))
            for key, port in (("next_l2", dut.o_lanes_next), ("next_byp", dut.o_bypass_next)):
                if ctx.get(port.valid):
                    out[key].append((cycle, ctx.get(Value.cast(port.payload))))
            assert ctx.get(dut.pipe_empty) == (not any(
                e is not None for e in schedule[max(0, cycle - 9):cycle]))
            await ctx.tick()

    simulate(dut, tb)
    for key, latency in (("l1", L1_LATENCY), ("l2", LANE_LATENCY), ("byp", BYPASS_LATENCY)):
        want = [(end + latency, result) for (kind, _, result), end in zip(groups, ends)
                if kind == key]
        got = out[key]
        assert [c for c, *_ in got] == [c for c, _ in want], key
        for (_, *g), (_, result) in zip(got, want):
            if key == "l1":
                addr, sums = g
                assert (addr, sums) == result
            else:
                tag, weights, _ = g
                fields, values = result
                assert {f: getattr(tag, f) for f in fields} == fields
                assert weights == [_round(x, shift, cfg.w_bits) for x in values]
        if key != "l1":
            # Their tags one cycle ahead, the same tags.
            nxt = out[f"next_{key}"]
            assert [c + 1 for c, _ in nxt] == [c for c, *_ in got]
            assert [v for _, v in nxt] == [raw for *_, raw in got]
