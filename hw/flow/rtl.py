"""Write the Verilog of the accelerator's blocks for the config of a compiled build.

Usage: ``python -m hw.flow.rtl BUILD_DIR [--out DIR]`` reads ``BUILD_DIR/config.json``
(written by ``mlg compile``) and writes one Verilog file per block into
``BUILD_DIR/rtl`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from gen.config import AcceleratorConfig, ConfigError

__all__ = ["BLOCKS", "elaborate", "write_rtl", "main"]

# (verilog module name, python module, component class or factory)
BLOCKS = [
    ("mlg_generation_unit", "hw.serialgen", "generation_unit"),   # the one the config builds
    ("mlg_conv_engine", "hw.engine", "ConvEngine"),
    ("mlg_accelerator", "hw.accelerator", "Accelerator"),
]


def elaborate(config: AcceleratorConfig, name: str):
    """Instantiate the component registered as ``name`` for ``config``."""
    for vname, module, cls in BLOCKS:
        if vname == name:
            return getattr(importlib.import_module(module), cls)(config)
    raise ValueError(f"unknown block {name!r}; accepted: {', '.join(b[0] for b in BLOCKS)}")


def write_rtl(config: AcceleratorConfig, out_dir) -> dict[str, Path]:
    from amaranth.back import verilog

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for vname, _, _ in BLOCKS:
        comp = elaborate(config, vname)
        path = out / f"{vname}.v"
        path.write_text(verilog.convert(comp, name=vname, emit_src=False))
        written[vname] = path
    (out / "config.json").write_text(config.to_json(indent=2) + "\n")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hw.flow.rtl", description=__doc__.splitlines()[0])
    p.add_argument("build", help="build directory holding config.json")
    p.add_argument("--out", help="output directory (default BUILD/rtl)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        config = AcceleratorConfig.load(Path(args.build) / "config.json")
        written = write_rtl(config, args.out or Path(args.build) / "rtl")
    except (ConfigError, ValueError, OSError) as e:
        print(f"hw.flow.rtl: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    else:
        for k, v in written.items():
            print(f"{k}: {v} ({v.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
