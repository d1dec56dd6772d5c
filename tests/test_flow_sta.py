"""Endpoint slack from an SDF: arrival times, setup, grouping by signal, refusals."""

import pytest

from hw.flow.sta import StaError, analyse, parse_sdf, report, signal_of, summarise

# Two flip-flops feed a LUT that feeds a third; the second one's Q also feeds
# the third's enable directly. Delays in ps.
SDF = r"""(DELAYFILE
  (SDFVERSION "3.0")
  (TIMESCALE 1ps)
  (CELL
    (CELLTYPE "top")
    (INSTANCE )
    (DELAY
      (ABSOLUTE
        (INTERCONNECT a_TRELLIS_FF_Q/Q f_LUT4_Z/A (100:200:300) (100:200:300))
        (INTERCONNECT b_TRELLIS_FF_Q_1/Q f_LUT4_Z/B (1000:1500:2000) (1000:1500:2000))
        (INTERCONNECT f_LUT4_Z/F c_TRELLIS_FF_Q_3/DI (400:400:400) (400:400:400))
        (INTERCONNECT b_TRELLIS_FF_Q_1/Q c_TRELLIS_FF_Q_3/CE (50:50:50) (50:50:50))
      )
    )
  )
  (CELL
    (CELLTYPE "TRELLIS_COMB")
    (INSTANCE f_LUT4_Z)
    (DELAY
      (ABSOLUTE
        (IOPATH A F (200:220:240) (200:220:240))
        (IOPATH B F (200:220:250) (200:220:250))
      )
    )
  )
""" + "".join(f"""  (CELL
    (CELLTYPE "TRELLIS_FF")
    (INSTANCE {name})
    (DELAY
      (ABSOLUTE
        (IOPATH CLK Q (400:450:500) (400:450:500))
      )
    )
    (TIMINGCHECK
      (SETUPHOLD (posedge DI) (posedge CLK) (100:100:100) (0:0:0))
      (SETUPHOLD (posedge CE) (posedge CLK) (150:150:150) (0:0:0))
    )
  )
""" for name in ("a_TRELLIS_FF_Q", "b_TRELLIS_FF_Q_1", "c_TRELLIS_FF_Q_3")) + ")\n"


def test_arrival_is_the_latest_fan_in_and_slack_subtracts_setup():
    t = parse_sdf(SDF)
    eps = {e.pin: e for e in analyse(t, 5000)}
    # Only c has inputs driven from a launch point: DI through the LUT, CE directly.
    assert set(eps) == {"c_TRELLIS_FF_Q_3/DI", "c_TRELLIS_FF_Q_3/CE"}
    di = eps["c_TRELLIS_FF_Q_3/DI"]
    # b's path (500 + 2000 + 250 + 400) beats a's (500 + 300 + 240 + 400).
    assert di.arrival_ps == 3150
    assert di.slack_ps == 5000 - 100 - 3150
    assert [p for p, _ in di.path] == ["b_TRELLIS_FF_Q_1/Q", "f_LUT4_Z/B", "f_LUT4_Z/F",
                                       "c_TRELLIS_FF_Q_3/DI"]
    assert eps["c_TRELLIS_FF_Q_3/CE"].slack_ps == 5000 - 150 - 550


def test_summary_groups_failing_bits_by_signal():
    t = parse_sdf(SDF)
    s = summarise(analyse(t, 3000), 3000)
    assert s["failing"] == 1 and s["worst_slack_ns"] == pytest.approx(-0.25)
    assert s["fmax_mhz"] == pytest.approx(1e6 / 3250, abs=0.01)
    assert [g["signal"] for g in s["groups"]] == ["c"] and s["groups"][0]["from"] == "b"
    assert summarise(analyse(t, 4000), 4000)["failing"] == 0


def test_signal_names_drop_nextpnr_suffixes():
    assert signal_of("core.engine.drain_1_TRELLIS_FF_Q_2/DI") == "core.engine.drain_1"
    assert signal_of(r"core.gen.acc_3_TRELLIS_FF_Q/DI") == "core.gen.acc_3"
    assert signal_of("buf.0.0/WEA") == "buf.0.0"


def test_refusals_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(StaError, match="no cell instances"):
        parse_sdf("(DELAYFILE)\n", "x.sdf")
    no_checks = SDF.replace("(SETUPHOLD", "(HOLD")
    with pytest.raises(StaError, match="x.sdf: no setup checks"):
        parse_sdf(no_checks, "x.sdf")
    loop = SDF.replace("(INTERCONNECT f_LUT4_Z/F c_TRELLIS_FF_Q_3/DI",
                       "(INTERCONNECT f_LUT4_Z/F f_LUT4_Z/A (1:1:1) (1:1:1))\n"
                       "        (INTERCONNECT f_LUT4_Z/F c_TRELLIS_FF_Q_3/DI")
    with pytest.raises(StaError, match="combinational loop"):
        analyse(parse_sdf(loop), 1000)
    with pytest.raises(StaError, match="missing.sdf: cannot read"):
        report(tmp_path / "missing.sdf", 100)
    (tmp_path / "d.sdf").write_text(SDF)
    with pytest.raises(StaError, match="--freq 0"):
        report(tmp_path / "d.sdf", 0)
