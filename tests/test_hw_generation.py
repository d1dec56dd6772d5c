"""Generation unit: Amaranth-simulator unit tests and cocotb benches on both simulators.

(Its parts have tests of their own: ``test_hw_gen_loader``, ``test_hw_gen_sequencer``,
``test_hw_gen_lanes``, ``test_hw_gen_tiling``, ``test_hw_gen_rounding`` and
``test_hw_unpacker``.)

The cocotb part elaborates a few tops, each holding several generation units
with different elaboration configs (code widths, decode form, array shape,
lanes), so that one build per simulator covers every code width 1..8 of qb,
qu, qv and qd and both decode forms. Each unit runs many random layers in one
simulation, with idle cycles on its inputs and backpressure on its output.

``MLG_LONG=1`` adds a longer randomized regression; ``MLG_SEED`` changes the seed.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from amaranth.hdl import Const, Module, UnusedElaboratable
from amaranth.lib import wiring
from amaranth.lib.wiring import Out
from amaranth.sim import Simulator

from gen.config import AcceleratorConfig
from gen.integer import decode_codes, round_w2
from hw.generation import GenerationUnit, lane_plan
from hw.interfaces import descriptor_layout, weight_vectors
from hw.serialgen import SerialGenerationUnit, generation_unit
from sim.runner import SIMULATORS, run_bench, simulator_available
from tests.support import put_stream, raises_while_building

BENCHES = Path(__file__).resolve().parents[1] / "sim" / "benches"
sys.path.insert(0, str(BENCHES))
import bench_generation as bench  # noqa: E402

SEED = int(os.environ.get("MLG_SEED", "2024"))
LONG = os.environ.get("MLG_LONG", "") not in ("", "0")


# Amaranth-simulator unit tests -------------------------------------------------------



def test_lane_plan():
    cfg = AcceleratorConfig()
    assert lane_plan(cfg) == {"Lc": 8, "Lr": 1, "Pc": 1, "Pr": 8, "lanes": 8, "L1": 8, "P1": 1}
    p = lane_plan(AcceleratorConfig(rows=8, cols=8, gen_lanes=16))
    assert (p["Lc"], p["Lr"], p["Pr"], p["lanes"]) == (8, 2, 4, 16)
    p = lane_plan(AcceleratorConfig(rows=8, cols=8, gen_lanes=3))
    assert (p["Lc"], p["Pc"], p["L1"], p["P1"]) == (3, 3, 3, 3)


def test_generation_unit_pysim():
    """A few layers of every mode through the Amaranth simulator, with stalls."""
    cfg = AcceleratorConfig(rows=3, cols=4, max_ci=7, max_co=9, max_k=3, max_bi=2, max_bo=4,
                            gen_lanes=3, qb=3, qu=4, qv=2, qd=5, w_bits=6)
    rng = random.Random(SEED)
    layers = [bench.random_layer(cfg, rng, mode) for mode in bench.MODES]
    entries = [bench.job_layer(cfg, layer) for layer in layers]
    expected = [(vec, int(i == len(e["expected"]) - 1))
                for e in entries for i, vec in enumerate(e["expected"])]
    assert _run_pysim(GenerationUnit(cfg), entries, 1) == expected


def test_generation_unit_rejects_non_config():
    raises_while_building(TypeError, "dict", lambda: GenerationUnit({"rows": 8}))


def _run_pysim(dut, entries, seed, idle=0.3, backpressure=0.3):
    """Drive ``entries`` (descriptor, code bytes) through ``dut``; the vectors it emits."""
    stream = b"".join(bytes.fromhex(e["bytes"]) for e in entries)
    n = sum(len(e["expected"]) for e in entries)
    got = []

    async def descs(ctx):
        for e in entries:
            ctx.set(dut.i_desc.payload.as_value(), e["desc"])
            ctx.set(dut.i_desc.valid, 1)
            await ctx.tick().until(dut.i_desc.ready)
            ctx.set(dut.i_desc.valid, 0)

    async def codes(ctx):
        await put_stream(ctx, dut.i_codes, stream, random.Random(seed), idle=idle)

    async def weights(ctx):
        r = random.Random(seed + 1)
        for _ in range(n):
            while r.random() < backpressure:
                await ctx.tick()
            ctx.set(dut.o_weights.ready, 1)
            w, last = await ctx.tick().sample(dut.o_weights.payload.w,
                                              dut.o_weights.payload.last).until(dut.o_weights.valid)
            ctx.set(dut.o_weights.ready, 0)
            got.append(([int(x) for x in w], int(last)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(descs, background=True)
    sim.add_testbench(codes, background=True)
    sim.add_testbench(weights)
    sim.run()
    return got


def _dense_bits_layer(cfg, rng, dense_bits):
    """A dense layer whose codes have the width ``dense_bits`` selects (1: qb, 2: qv), as
    the program file marks a dense layer stored at a basis or coefficient width."""
    bits = {1: cfg.qb, 2: cfg.qv}[dense_bits]
    ci, co, k = rng.randint(1, cfg.max_ci), rng.randint(1, cfg.max_co), 3
    codes = torch.tensor([rng.randrange(1 << bits) for _ in range(co * ci * k * k)])
    w = decode_codes(codes, bits, cfg.decode).reshape(co, ci, k * k)
    shift = rng.randint(0, 3)
    pe = round_w2(w, shift, cfg.w_bits).reshape(co, ci, k, k)
    fields = {"ci": ci, "co": co, "k": k, "bi": 0, "bo": co, "w_shift": shift,
              "has_l1": 0, "has_l2": 0, "dense_bits": dense_bits}
    return {"desc": Const.cast(descriptor_layout(cfg).const(fields)).value,
            "bytes": bench.pack_codes(codes.tolist(), bits).hex(),
            "expected": weight_vectors(cfg, pe)}


SERIAL_CONFIGS = [
    AcceleratorConfig(rows=3, cols=4, max_ci=7, max_co=9, max_k=3, max_bi=2, max_bo=4, gen_lanes=1,
                      qb=3, qu=4, qv=2, qd=5, w_bits=6, compact=True, level2=False),
    AcceleratorConfig(rows=2, cols=2, max_ci=5, max_co=6, max_k=3, max_bi=3, max_bo=1, gen_lanes=1,
                      qb=2, qu=6, qv=3, qd=8, w_bits=8, decode="signed", compact=True,
                      level2=False),
    AcceleratorConfig(rows=2, cols=3, max_ci=5, max_co=6, max_k=5, max_bi=2, max_bo=1, gen_lanes=1,
                      qb=1, qu=7, qv=4, qd=3, w_bits=4, compact=True, level2=False),
]


@pytest.mark.parametrize("index", range(len(SERIAL_CONFIGS)))
@pytest.mark.parametrize("align", [True, False])
def test_serial_generation_unit_pysim(index, align):
    """The serial unit (compact, no level 2) against the golden weight vectors: level-1
    and dense layers of random shapes and shifts, dense layers stored at every code
    width, with idle input and backpressure."""
    cfg = SERIAL_CONFIGS[index]
    rng = random.Random(SEED + index)
    layers = [bench.random_layer(cfg, rng, mode) for mode in ("l1", "dense", "l1", "dense")]
    layers += [bench.random_layer(cfg, rng, rng.choice(bench.modes_of(cfg))) for _ in range(4)]
    entries = [bench.job_layer(cfg, layer, section_align=align) for layer in layers]
    entries[2:2] = [_dense_bits_layer(cfg, rng, 1), _dense_bits_layer(cfg, rng, 2)]
    expected = [(vec, int(i == len(e["expected"]) - 1))
                for e in entries for i, vec in enumerate(e["expected"])]
    dut = generation_unit(cfg, section_align=align)
    assert isinstance(dut, SerialGenerationUnit)
    assert _run_pysim(dut, entries, SEED + index) == expected
    # Full rate in and out: the vectors come out the same.
    dut = generation_unit(cfg, section_align=align)
    assert _run_pysim(dut, entries, SEED, idle=0.0, backpressure=0.0) == expected


def test_generation_unit_choice():
    """Compact builds without level 2 get the serial unit; the others the lane unit, and
    the serial unit refuses a config with level 2."""
    base = SERIAL_CONFIGS[0]
    # (The units are only looked at: not reported as unused elaboratables.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        assert isinstance(generation_unit(base), SerialGenerationUnit)
        for change in ({"compact": False}, {"level2": True}):
            assert type(generation_unit(dataclasses.replace(base, **change))) is GenerationUnit
        gc.collect()
    raises_while_building(ValueError, "level2 must be false",
            lambda: SerialGenerationUnit(dataclasses.replace(base, level2=True)))
    raises_while_building(TypeError, "dict", lambda: SerialGenerationUnit({"rows": 8}))


# cocotb benches ----------------------------------------------------------------------

class GenerationBank(wiring.Component):
    """Several generation units side by side in one top (ports ``u{i}__...``), so one
    simulator build serves several elaboration configs."""

    def __init__(self, units):
        self.units = [generation_unit(cfg, section_align=align) for cfg, align in units]
        super().__init__({f"u{i}": Out(u.signature) for i, u in enumerate(self.units)})

    def elaborate(self, platform):
        m = Module()
        for i, unit in enumerate(self.units):
            m.submodules[f"u{i}"] = unit
            wiring.connect(m, wiring.flipped(getattr(self, f"u{i}")), unit)
        return m


def _width_configs() -> list[tuple[AcceleratorConfig, bool]]:
    """Eight small units: qb, qu, qv and qd each take every width 1..8 once, the
    decode forms alternate, and shapes and lane counts vary (fewer lanes than
    columns, partial lane passes, several rows per lane group, more lanes than a tile)."""
    shapes = [  # rows, cols, lanes, max_k, w_bits, max_bi, max_bo, section_align
        (2, 3, 1, 3, 4, 2, 3, True),
        (3, 2, 2, 3, 8, 3, 4, True),
        (2, 4, 3, 3, 6, 1, 5, True),
        (4, 2, 5, 3, 3, 2, 3, True),
        (3, 3, 9, 5, 10, 3, 2, True),
        (2, 2, 16, 3, 5, 2, 6, True),
        (4, 4, 4, 5, 7, 2, 4, False),
        (2, 5, 6, 7, 2, 3, 3, False),
    ]
    out = []
    for i, (rows, cols, lanes, max_k, w_bits, max_bi, max_bo, align) in enumerate(shapes):
        out.append((AcceleratorConfig(
            rows=rows, cols=cols, gen_lanes=lanes, max_k=max_k, w_bits=w_bits,
            max_bi=max_bi, max_bo=max_bo, max_ci=9 - i % 3, max_co=7 + i % 3,
            qb=i + 1, qu=(i + 2) % 8 + 1, qv=(i + 5) % 8 + 1, qd=(i + 7) % 8 + 1,
            decode=("signed", "odd")[i % 2]), align))
    return out


def _default_configs() -> list[tuple[AcceleratorConfig, bool]]:
    """The paper's widths on an 8x8 array (odd decode), and a signed 4x8 one with
    more lanes than columns."""
    return [
        (AcceleratorConfig(rows=8, cols=8, gen_lanes=8, qb=3, qu=6, qv=3, qd=8, decode="odd",
                           max_ci=20, max_co=20, max_k=3, max_bi=2, max_bo=12), True),
        (AcceleratorConfig(rows=4, cols=8, gen_lanes=16, qb=4, qu=5, qv=2, qd=6, decode="signed",
                           w_bits=6, max_ci=12, max_co=18, max_k=3, max_bi=3, max_bo=7), True),
    ]


def _coverage_check(configs):
    for field in ("qb", "qu", "qv", "qd"):
        assert sorted(getattr(c, field) for c, _ in configs) == list(range(1, 9)), field
    assert {c.decode for c, _ in configs} == {"signed", "odd"}


def _job(configs, layers_per_unit: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    units = []
    for i, (cfg, align) in enumerate(configs):
        # Every mode the unit has first, then random ones.
        have = bench.modes_of(cfg)
        modes = list(have) + [rng.choice(have) for _ in range(layers_per_unit - len(have))]
        layers = [bench.random_layer(cfg, rng, mode) for mode in modes]
        units.append({
            "config": cfg, "prefix": f"u{i}__",
            "layers": [bench.job_layer(cfg, layer, section_align=align) for layer in layers],
            "idle": bench.PATTERNS[(i + seed) % len(bench.PATTERNS)],
            "backpressure": bench.PATTERNS[(i + seed + 2) % len(bench.PATTERNS)],
        })
    return units


def _serial_configs() -> list[tuple[AcceleratorConfig, bool]]:
    """Serial units (compact, no level 2): the pysim configs and the iCEBreaker's widths."""
    return [(cfg, i != 1) for i, cfg in enumerate(SERIAL_CONFIGS)] + [
        (AcceleratorConfig(rows=2, cols=2, gen_lanes=1, qb=3, qu=6, qv=3, qd=7, max_ci=16,
                           max_co=16, max_k=3, max_bi=2, max_bo=1, compact=True, level2=False),
         True)]


BENCH_SETS = {
    "widths": (_width_configs, 10),
    "default": (_default_configs, 8),
    "serial": (_serial_configs, 8),
}


@pytest.mark.parametrize("sim", SIMULATORS)
@pytest.mark.parametrize("bench_set", sorted(BENCH_SETS))
def test_generation_cocotb(sim, bench_set, tmp_path, monkeypatch):
    # sim.runner passes a relative results_xml, which cocotb's runner refuses
    # while PYTEST_CURRENT_TEST is set.
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setenv("MAKEFLAGS", bench.VERILATOR_MAKEFLAGS_FAST_BUILD)
    if not simulator_available(sim):
        pytest.skip(f"{sim} not installed")
    make, layers = BENCH_SETS[bench_set]
    configs = make()
    if bench_set == "widths":
        _coverage_check(configs)
    seeds = [SEED]
    if LONG:
        layers *= 4
        seeds += [SEED + 1000 * i for i in range(1, 4)]
    for seed in seeds:
        job = tmp_path / f"job-{seed}.json"
        bench.write_job(job, _job(configs, layers, seed))
        run_bench(GenerationBank(configs), f"gen_{bench_set}", "bench_generation", sim,
                  test_dir=BENCHES, testcase="generation_check",
                  extra_env={"MLG_GEN_JOB": job, "MLG_SEED": seed})


def test_pattern_names_cover_backpressure():
    assert set(bench.PATTERNS) >= {"full", "random"}
    assert list(itertools.islice(bench.pattern("half", 0), 4)) == [1, 0, 1, 0]
