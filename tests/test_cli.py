"""The ``mlg`` command end to end: train -> compile, and its errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gen.config import AcceleratorConfig
from gen.golden import golden_forward, quantize_input
from gen.network import load_model_file
from gen.program import load_program
from gen.train import load_digits_split
from mlg.cli import main
from sim.board import SimulatedBoard
from sim.runner import simulator_available

ROOT = Path(__file__).resolve().parents[1]


def run_mlg(*args):
    return subprocess.run([sys.executable, "-m", "mlg", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "digits.pt"
    r = run_mlg("train", "--out", out, "--epochs", "2", "--teacher-epochs", "1", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert {"float_acc", "golden_acc", "train_seconds"} <= set(metrics)
    return out


def test_compile_writes_a_consistent_build(quick_model, tmp_path):
    r = run_mlg("compile", quick_model, "--out", tmp_path / "b", "--rows", "4", "--cols", "6",
                "--form", "generate", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["report"]["factorized"] == [] and out["report"]["form"] == "generate"
    cfg = AcceleratorConfig.load(tmp_path / "b" / "config.json")
    assert (cfg.rows, cfg.cols) == (4, 6) and out["config_hash"] == cfg.hash_hex
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    tot = report["total"]
    assert tot["mlg_bytes"] == pytest.approx(sum(r["mlg_bytes"] for r in report["layers"]))
    assert tot["fp32_bytes"] == 4 * tot["int8_bytes"] and tot["mlg_bytes"] < tot["int8_bytes"]
    assert "smaller than int8" in (tmp_path / "b" / "report.txt").read_text()

    # The program alone (what the accelerator receives) computes what the model computes.
    prog = load_program(tmp_path / "b" / "program.bin", config=cfg)
    net = load_model_file(quick_model)["network"]
    _, _, x, _ = load_digits_split()
    xi = quantize_input(net, x[:40])
    assert torch.equal(golden_forward(prog.network(), xi), golden_forward(net, xi))
    assert cfg.a_bits == net.a_bits and cfg.qb == net.qb and cfg.decode == net.decode
    assert cfg.act_buffers < len(net.layers) + 1  # buffers were reused by liveness


def test_compile_auto_form_program_matches_its_network(quick_model, tmp_path):
    """--form auto (the default) may factorize layers; the program then computes the
    compiled network, whose parts the report names."""
    r = run_mlg("compile", quick_model, "--out", tmp_path / "a", "--rows", "4", "--cols", "6", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)["report"]
    cfg = AcceleratorConfig.load(tmp_path / "a" / "config.json")
    prog = load_program(tmp_path / "a" / "program.bin", config=cfg)
    net = load_model_file(quick_model)["network"]
    names = [l.name for l in net.layers]
    assert set(report["factorized"]) <= set(names)
    assert len(prog.network().layers) == len(names) + len(report["factorized"])
    assert report["predicted_cycles"] > 0
    forms = {r["layer"]: r["form"] for r in report["layers"]}
    assert {n for n, f in forms.items() if f == "factorized"} == set(report["factorized"])
    if net.arch == "digits":
        assert 0 < report["program_golden_acc"] <= 1 and report["program_golden_images"] > 0


def test_golden_command(quick_model, capsys):
    assert main(["golden", str(quick_model), "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["golden_acc"] <= 1


@pytest.mark.parametrize("args,needle", [
    (["compile", "{tmp}/absent.pt", "--out", "{tmp}/o"], "absent.pt: no such model file"),
    (["compile", "{tmp}/junk.pt", "--out", "{tmp}/o"], "junk.pt: not a readable model file"),
    (["compile", "{tmp}/other.pt", "--out", "{tmp}/o"], "other.pt: not an mlg model file"),
    (["train", "--qb", "9", "--out", "{tmp}/x.pt"], "qb = 9"),
    (["train", "--decode", "signed", "--qv", "1", "--out", "{tmp}/x.pt"], "qv = 1"),
    (["import", "{tmp}/absent.pt", "--out", "{tmp}/x.pt", "--basis-bit", "3",
      "--coeff-in-bit", "6", "--coeff-out-bit", "3"], "absent.pt: no such checkpoint"),
])
def test_bad_input_gives_clear_error(tmp_path, capsys, args, needle):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["--seed", "1,x"], "--seed: seed list '1,x': accepted integers separated by commas"),
    (["--seed", "2,2"], "--seed: seed list '2,2': accepted distinct integers"),
    (["--seed", "1,2", "--jobs", "0"], "--jobs: '0': accepted a whole number of runs >= 1"),
    (["--pnr-timeout", "0"], "--pnr-timeout: '0': accepted a number of minutes > 0"),
    (["--pnr-timeout", "soon"], "--pnr-timeout: 'soon': accepted a number of minutes > 0"),
])
def test_synth_refuses_bad_seeds_and_jobs(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path), "--board", "ulx3s-85f", *args])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_synth_passes_the_time_limit_in_seconds_and_reports_a_flow_error(tmp_path, capsys,
                                                                        monkeypatch):
    import hw.flow.synth
    import mlg.cli
    from hw.flow.synth import SynthError

    seen = {}

    def fake_synthesize(config, board, freq, out, **kw):
        seen.update(kw, board=board, freq=freq, out=out)
        raise SynthError("nextpnr place and route stopped at its time limit of 1.5 min; see x.log")

    monkeypatch.setattr(mlg.cli, "_load_build", lambda build: (AcceleratorConfig(), None))
    monkeypatch.setattr(hw.flow.synth, "synthesize", fake_synthesize)
    code = main(["synth", str(tmp_path), "--board", "icebreaker", "--pnr-timeout", "1.5",
                 "--seed", "3,4", "--jobs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "mlg synth: error: nextpnr place and route stopped at its time limit" in err
    assert seen["pnr_timeout"] == 90.0 and seen["seed"] == [3, 4] and seen["jobs"] == 1
    assert seen["board"] == "icebreaker" and seen["freq"] == 30.0
    assert seen["out"] == tmp_path / "synth-icebreaker"


def test_compile_rejects_array_out_of_range(quick_model, tmp_path, capsys):
    assert main(["compile", str(quick_model), "--out", str(tmp_path / "o"), "--rows", "1"]) == 2
    assert "rows = 1" in capsys.readouterr().err


def test_compile_small_device_options(quick_model, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["compile", str(quick_model), "--out", str(out), "--rows", "2", "--cols", "2",
                 "--counter-bits", "24", "--no-layer-log", "--compact", "--trim"]) == 0
    cfg = AcceleratorConfig.load(out / "config.json")
    assert (cfg.counter_bits, cfg.layer_log, cfg.compact) == (24, False, True)
    # The program carries the digest of that config: a default build is another one.
    net = load_program(out / "program.bin", config=cfg).network()
    # --trim: exactly the layer features the model uses (this one has no level 2).
    assert (cfg.level2, cfg.residual, cfg.pool) == (
        any(layer.has_l2 for layer in net.layers), any(layer.res is not None for layer in net.layers),
        any(layer.op == "pool" for layer in net.layers)) == (False, True, True)
    plain = tmp_path / "p"
    assert main(["compile", str(quick_model), "--out", str(plain), "--rows", "2", "--cols", "2"]) == 0
    assert AcceleratorConfig.load(plain / "config.json").digest != cfg.digest
    capsys.readouterr()
    assert main(["compile", str(quick_model), "--out", str(tmp_path / "x"),
                 "--counter-bits", "8"]) == 2
    assert "counter_bits = 8 is out of range; accepted: 16..48" in capsys.readouterr().err


def test_sim_and_run_refuse_a_corrupt_or_missing_build(quick_model, tmp_path, capsys):
    build = tmp_path / "b"
    assert main(["compile", str(quick_model), "--out", str(build)]) == 0
    capsys.readouterr()
    assert main(["sim", str(tmp_path / "nothing")]) == 2
    assert "not a build directory" in capsys.readouterr().err
    data = bytearray((build / "program.bin").read_bytes())
    data[200] ^= 0x40
    (build / "program.bin").write_bytes(bytes(data))
    for cmd in (["sim", str(build)], ["run", str(build), "--port", "socket://127.0.0.1:1"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "program.bin" in err and "CRC" in err and "Traceback" not in err


@pytest.mark.skipif(not simulator_available("verilator"), reason="Verilator not installed")
def test_run_reaches_the_simulated_board_by_url(quick_model, tmp_path, capsys):
    """``mlg run --port socket://...`` drives the simulated board like a serial port."""
    build = tmp_path / "b"
    assert main(["compile", str(quick_model), "--out", str(build), "--rows", "4", "--cols", "4"]) == 0
    capsys.readouterr()
    config = AcceleratorConfig.load(build / "config.json")
    with SimulatedBoard(config, "verilator", fast_build=True) as board:
        assert main(["run", str(build), "--port", board.url, "--images", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 2 and report["mismatches"] == 0
    assert report["weight_bytes_per_image"] > 0 and report["cycles_per_image"] > 0


@pytest.mark.parametrize("widths", ["8", "8,0", "a,b", "8,16,32"])
def test_train_refuses_bad_widths(widths, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--widths", widths, "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--widths {widths!r}" in err and "e.g. 8,16" in err


@pytest.mark.parametrize("port,needle", [
    ("socket://127.0.0.1:notaport", "--port socket://127.0.0.1:notaport: port 'notaport' is not "
                                    "a number; accepted: socket://HOST:PORT with PORT 1..65535"),
    ("loop://", "--port loop://: loop:// echoes every request back and has no device behind it"),
])
def test_run_refuses_a_port_url_before_loading_the_build(tmp_path, capsys, port, needle):
    # No build at all: the port is checked first, so its error is the one given.
    assert main(["run", str(tmp_path / "nothing"), "--port", port]) == 2
    err = capsys.readouterr().err
    assert needle in err and "not a build directory" not in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["--bi", "0"], "--bi 0 puts level 1 (the bases B and coefficients U) on no layer of the "
                    "digits network (widths 24,48"),
    (["--bi", "9"], "--bi 9 puts level 1"),
    (["--bi", "8", "--widths", "8,16"], None),
    (["--epochs", "0"], "--epochs 0 trains no student; accepted: a whole number of epochs >= 1"),
    (["--teacher-epochs", "-1"], "--teacher-epochs -1; accepted: a whole number of epochs >= 0"),
    (["--qb", "9"], "--qb: qb = 9 is out of range; accepted: 1..8"),
    (["--qb", "0"], "--qb: qb = 0 is out of range; accepted: 1..8"),
    (["--qu", "1", "--decode", "signed"], "--qu: qu = 1 has no symmetric signed level; "
                                          "accepted: 2..8 with decode 'signed' (1..8 with 'odd')"),
    (["--m-bits", "30"], "--m-bits: m_bits = 30 is out of range; accepted: 2..24"),
])
def test_train_refuses_bad_options_before_any_work(tmp_path, capsys, monkeypatch, args, needle):
    import gen.train

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(gen.train, "load_digits_split", no_training)
    out = tmp_path / "sub" / "x.pt"
    if needle is None:       # accepted: it gets as far as loading the data set
        with pytest.raises(AssertionError, match="training started"):
            main(["train", *args, "--out", str(out)])
        return
    assert main(["train", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"mlg train: error: {needle}" in err and "Traceback" not in err
    assert not out.parent.exists()


@pytest.mark.parametrize("args,needle", [
    (["--basis-bit", "9"], "basis_bit = 9 (--basis-bit, the network's qb): qb = 9 is out of "
                           "range; accepted: 1..8"),
    (["--basis-bit", "1"], "basis_bit = 1 (--basis-bit, the network's qb): the official code "
                           "quantizes 1-bit tensors with a sign quantizer of its own"),
    (["--calib-images", "0"], "--calib-images 0: accepted a number of synthetic calibration "
                              "images >= 1"),
])
def test_import_refuses_bad_options_before_reading_the_checkpoint(tmp_path, capsys, args, needle):
    base = {"--basis-bit": "3", "--coeff-in-bit": "6", "--coeff-out-bit": "3"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    # The checkpoint does not exist: the options are refused before it is read.
    assert main(["import", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "m.pt"),
                 *flat]) == 2
    err = capsys.readouterr().err
    assert needle in err and "no such checkpoint" not in err
