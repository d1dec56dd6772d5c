"""Endpoint slack of a routed design, from the SDF that nextpnr writes.

nextpnr reports one critical path per clock. To see *how much* of a design
misses a clock, and where, this module reads the design's SDF
(``nextpnr --sdf``: cell delays, setup checks and the delay of every routed
arc, in picoseconds) and runs a single-clock static timing analysis:

* launch points are the outputs of clocked paths (``IOPATH CLK Q`` of a
  flip-flop, ``CLKA DOA*`` of a block RAM, the registered product of a DSP);
* delays add along routed arcs and combinational cell paths; the arrival at a
  pin is the latest over its fan-in;
* every input with a setup check against a clock is an endpoint: slack is
  ``period - setup - arrival``.

Delays are the maximum of each SDF triple, clock skew is not modelled (one
global clock), and paths from or to device pins are left out. The worst slack
matches the critical path nextpnr reports for the same design.

Endpoints are grouped by the signal they belong to: nextpnr names cells after
the nets they drive (``core.engine.drain_1_TRELLIS_FF_Q_2`` is a bit of
``core.engine.drain_1``), so the report says which registers, memories and
multipliers miss the clock and by how much, with each group's worst path.

``python -m hw.flow.sta DESIGN.sdf --freq MHZ [--top N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Timing", "StaError", "parse_sdf", "analyse", "signal_of", "format_sta", "main"]


class StaError(ValueError):
    """An SDF file that cannot be analysed; the message names the file and line."""


_TRIPLE = r"\((-?[\d.]*):(-?[\d.]*):(-?[\d.]*)\)"
_CELLTYPE = re.compile(r'^\s*\(CELLTYPE\s+"([^"]*)"\)')
_INSTANCE = re.compile(r"^\s*\(INSTANCE\s*(\S*?)\)\s*$")
_IOPATH = re.compile(r"^\s*\(IOPATH\s+(?:\((?:posedge|negedge)\s+)?(\S+?)\)?\s+(\S+)\s+" + _TRIPLE)
_INTERCONNECT = re.compile(r"^\s*\(INTERCONNECT\s+(\S+)\s+(\S+)\s+" + _TRIPLE)
_SETUPHOLD = re.compile(r"^\s*\(SETUPHOLD\s+\((?:posedge|negedge)\s+(\S+)\)\s+"
                        r"\((?:posedge|negedge)\s+(\S+)\)\s+" + _TRIPLE)
_CLOCK_PORT = re.compile(r"CLK|CLOCK|WCK")


def _ps(groups) -> float:
    """The maximum of an SDF (min:typ:max) triple; empty fields count as zero."""
    return max(float(g) if g not in ("", "-") else 0.0 for g in groups)


@dataclass
class Timing:
    """The timing graph of one design: pins, arcs, launch points and endpoints (ps)."""
    names: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    fanout: list[list[tuple[int, float]]] = field(default_factory=list)
    launch: dict[int, float] = field(default_factory=dict)      # pin -> clock-to-output
    setup: dict[int, float] = field(default_factory=dict)       # pin -> setup time
    cells: dict[str, str] = field(default_factory=dict)         # instance -> cell type

    def pin(self, name: str) -> int:
        i = self.index.get(name)
        if i is None:
            i = self.index[name] = len(self.names)
            self.names.append(name)
            self.fanout.append([])
        return i


def parse_sdf(text: str, source: str = "<sdf>") -> Timing:
    """The timing graph of an SDF written by nextpnr (one ``(CELL ...)`` per instance)."""
    t = Timing()
    celltype = instance = None
    comb: list[tuple[str, str, float]] = []
    clocked: list[tuple[str, str, float]] = []
    checks_seen = False
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _INTERCONNECT.match(line)
        if m:
            t.fanout[t.pin(m.group(1))].append((t.pin(m.group(2)), _ps(m.groups()[2:5])))
            continue
        m = _IOPATH.match(line)
        if m:
            if instance is None:
                raise StaError(f"{source}:{lineno}: IOPATH outside a cell instance")
            src, dst, d = m.group(1), m.group(2), _ps(m.groups()[2:5])
            (clocked if _CLOCK_PORT.search(src) else comb).append((f"{instance}/{src}",
                                                                  f"{instance}/{dst}", d))
            continue
        m = _SETUPHOLD.match(line)
        if m:
            if instance is None:
                raise StaError(f"{source}:{lineno}: SETUPHOLD outside a cell instance")
            p = t.pin(f"{instance}/{m.group(1)}")
            t.setup[p] = max(t.setup.get(p, 0.0), _ps(m.groups()[2:5]))
            checks_seen = True
            continue
        m = _CELLTYPE.match(line)
        if m:
            celltype, instance = m.group(1), None
            continue
        m = _INSTANCE.match(line)
        if m:
            instance = m.group(1)
            if celltype is not None and instance:
                t.cells[instance] = celltype
    if not t.cells:
        raise StaError(f"{source}: no cell instances found; is this an SDF written by nextpnr --sdf?")
    if not checks_seen:
        raise StaError(f"{source}: no setup checks found, so there are no timing endpoints")
    for a, b, d in comb:
        t.fanout[t.pin(a)].append((t.pin(b), d))
    for _, b, d in clocked:
        p = t.pin(b)
        t.launch[p] = max(t.launch.get(p, 0.0), d)
    return t


@dataclass
class Endpoint:
    pin: str
    slack_ps: float
    arrival_ps: float
    path: list[tuple[str, float]]        # (pin, arrival) from the launch point


def analyse(t: Timing, period_ps: float) -> list[Endpoint]:
    """Every endpoint reached from a launch point, worst slack first."""
    n = len(t.names)
    indeg = [0] * n
    for outs in t.fanout:
        for j, _ in outs:
            indeg[j] += 1
    arrival = [float("-inf")] * n
    pred = [-1] * n
    for p, d in t.launch.items():
        arrival[p] = d
    queue = deque(i for i in range(n) if indeg[i] == 0)
    done = 0
    while queue:
        i = queue.popleft()
        done += 1
        a = arrival[i]
        for j, d in t.fanout[i]:
            if a + d > arrival[j] and j not in t.launch:
                arrival[j], pred[j] = a + d, i
            indeg[j] -= 1
            if indeg[j] == 0:
                queue.append(j)
    if done != n:
        loop = [t.names[i] for i in range(n) if indeg[i] > 0][:5]
        raise StaError(f"combinational loop through {len(loop)}+ pins, e.g. {', '.join(loop)}")
    result = []
    for p, s in t.setup.items():
        if arrival[p] == float("-inf"):
            continue
        path, i = [], p
        while i != -1:
            path.append((t.names[i], arrival[i]))
            i = pred[i]
        result.append(Endpoint(t.names[p], period_ps - s - arrival[p], arrival[p], path[::-1]))
    result.sort(key=lambda e: e.slack_ps)
    return result


_CELL_SUFFIX = re.compile(r"(_TRELLIS_FF_Q|_TRELLIS_COMB|_LUT4_|_CCU2C_|_PFUMX_|_L6MUX21_|_DPR16X4|"
                          r"_MULT18X18D|_SB_DFF|_SB_LUT4|_SB_CARRY|\$).*$")


def signal_of(pin: str) -> str:
    """The signal an endpoint pin belongs to: the cell name without nextpnr's suffixes."""
    inst = pin.rsplit("/", 1)[0].replace("\\", "")
    return _CELL_SUFFIX.sub("", inst) or inst


def summarise(endpoints: list[Endpoint], period_ps: float, top: int = 25) -> dict:
    """Worst slack, failing endpoint counts, and the worst groups by signal."""
    failing = [e for e in endpoints if e.slack_ps < 0]
    groups: dict[str, list[Endpoint]] = defaultdict(list)
    for e in failing:
        groups[signal_of(e.pin)].append(e)
    rows = []
    for name, es in sorted(groups.items(), key=lambda kv: kv[1][0].slack_ps)[:top]:
        w = es[0]
        rows.append({"signal": name, "endpoints": len(es), "worst_slack_ns": round(w.slack_ps / 1000, 3),
                     "from": signal_of(w.path[0][0]) if w.path else "",
                     "path": [[pin, round(a / 1000, 3)] for pin, a in w.path]})
    worst = endpoints[0].slack_ps if endpoints else 0.0
    bins = [0.5, 1.0, 2.0, 3.0]
    return {
        "period_ns": period_ps / 1000,
        "endpoints": len(endpoints),
        "failing": len(failing),
        "failing_by_ns": {f"<= -{b:g}": sum(e.slack_ps <= -b * 1000 for e in failing) for b in bins},
        "worst_slack_ns": round(worst / 1000, 3),
        "fmax_mhz": round(1e6 / (period_ps - worst), 2) if period_ps - worst > 0 else None,
        "groups": rows,
        "failing_signals": len(groups),
    }


def format_sta(s: dict, paths: int = 3) -> str:
    lines = [f"period {s['period_ns']:g} ns: {s['endpoints']} endpoints, {s['failing']} failing "
             f"in {s['failing_signals']} signals; worst slack {s['worst_slack_ns']:+.3f} ns "
             f"(Fmax {s['fmax_mhz']} MHz)",
             "failing by margin: " + ", ".join(f"{k} ns: {v}" for k, v in s["failing_by_ns"].items()),
             "", f"{'worst ns':>9} {'bits':>5}  signal  <- worst path starts at"]
    for r in s["groups"]:
        lines.append(f"{r['worst_slack_ns']:>+9.3f} {r['endpoints']:>5}  {r['signal']}  <- {r['from']}")
    for r in s["groups"][:paths]:
        lines += ["", f"worst path into {r['signal']} ({r['worst_slack_ns']:+.3f} ns):"]
        prev = None
        for pin, a in r["path"]:
            if prev is not None and a == prev:
                continue  # carry-chain and wiring hops with no delay
            step = a - (prev or 0.0)
            lines.append(f"  {a:7.3f} (+{step:.3f})  {signal_of(pin)} [{pin.rsplit('/', 1)[-1]}]")
            prev = a
    return "\n".join(lines)


def report(sdf: Path, freq_mhz: float, top: int = 25) -> dict:
    """Parse ``sdf`` and summarise its endpoint slack at ``freq_mhz``."""
    try:
        text = Path(sdf).read_text()
    except OSError as e:
        raise StaError(f"{sdf}: cannot read ({e.strerror})") from None
    if freq_mhz <= 0:
        raise StaError(f"--freq {freq_mhz:g}: give the clock in MHz, a positive number")
    period = 1e6 / freq_mhz
    return summarise(analyse(parse_sdf(text, str(sdf)), period), period, top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hw.flow.sta", description=__doc__.split("\n\n")[0])
    ap.add_argument("sdf", help="SDF written by nextpnr --sdf")
    ap.add_argument("--freq", type=float, required=True, help="clock, MHz")
    ap.add_argument("--top", type=int, default=25, help="failing signals listed (default 25)")
    ap.add_argument("--paths", type=int, default=3, help="worst paths printed in full (default 3)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        s = report(Path(args.sdf), args.freq, args.top)
    except StaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2) if args.json else format_sta(s, args.paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
