"""``mlg sweep``: points as Dask tasks on a local cluster of two worker processes, a
worker killed mid-sweep, the content cache, failures, and spec validation."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mlg.cli import main

distributed = pytest.importorskip("dask.distributed")

from gen.config import AcceleratorConfig  # noqa: E402
from gen.cost import network_cost  # noqa: E402
from gen.program import load_program  # noqa: E402
from mlg.sweep import SweepSpecError, load_spec, pareto_front, run_sweep  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small digits model (8 and 16 channels, level 2 on its 3x3 layers), two epochs."""
    from gen.layers import MLGSettings
    from gen.train import TrainOptions, train_digits

    out = tmp_path_factory.mktemp("model") / "tiny.pt"
    train_digits(MLGSettings(bo=8), TrainOptions(epochs=2, teacher_epochs=0, widths=(8, 16),
                                                 progress=False), out_path=out, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Dask cluster of two worker processes, one thread each."""
    c = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                 dashboard_address=None)
    yield c
    c.close()


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


POINTS = [("4x4", "auto"), ("4x4", 2), ("8x8", "auto"), ("8x8", 2)]


def one_by_one(model, rows, cols, lanes, out, capsys):
    """A point run by hand: ``mlg compile --json``, then the cost model of the program
    file as the accelerator receives it."""
    args = ["compile", str(model), "--out", str(out), "--rows", str(rows), "--cols", str(cols),
            "--json"] + ([] if lanes == "auto" else ["--gen-lanes", str(lanes)])
    capsys.readouterr()
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    cfg = AcceleratorConfig.load(out / "config.json")
    prog = load_program(out / "program.bin", config=cfg)
    return {"config_hash": rep["config_hash"][:16], "gen_lanes": cfg.gen_lanes,
            "compile_predicted_cycles": rep["report"]["predicted_cycles"],
            "cost_cycles": network_cost(prog.network(), cfg)["cycles"],
            "accuracy": rep["report"]["program_golden_acc"],
            "mlg_kib": rep["report"]["total"]["mlg_bytes"] / 1024}


def test_sweep_on_two_workers_survives_a_killed_worker_and_resumes_from_cache(
        tiny_model, cluster, tmp_path, capsys):
    spec = load_spec(write_spec(tmp_path / "s.toml", f"""
[sweep]
name = "tiny"
stages = ["compile", "cost"]
[model]
file = "{tiny_model}"
[axes]
array = ["4x4", "8x8"]
gen_lanes = ["auto", 2]
"""))
    client = distributed.Client(cluster)
    try:
        pids = client.run(os.getpid)
        assert len(pids) == 2
        box = {}

        def sweep():
            try:
                box["r"] = run_sweep(spec, tmp_path / "out", scheduler=cluster.scheduler_address,
                                     progress=False, log=lambda m: None)
            except BaseException as e:  # reported below
                box["e"] = e

        t = threading.Thread(target=sweep)
        t.start()
        # Kill the worker process that holds a compile task, while it holds it.
        killed = None
        deadline = time.monotonic() + 300
        while killed is None and t.is_alive() and time.monotonic() < deadline:
            for addr, keys in client.processing().items():
                if any(str(k).startswith("compile-") for k in keys) and addr in pids:
                    os.kill(pids[addr], signal.SIGKILL)
                    killed = (addr, [str(k) for k in keys])
                    break
            time.sleep(0.02)
        t.join(timeout=900)
        assert not t.is_alive()
        assert "e" not in box, box.get("e")
        assert killed is not None, "no compile task was seen on a worker"
        r = box["r"]
        # The sweep completed every point, the killed worker's task on another worker.
        assert r["failed"] == 0 and len(r["rows"]) == 4
        assert all(row["status"] == "ok" for row in r["rows"])
        client.wait_for_workers(2, timeout=120)
        assert set(client.run(os.getpid).values()) != set(pids.values())
        # Every stage ran once (the four configs differ: 4x4 has 4 lanes, not 2).
        assert r["stages_run"] == 8 and r["stages_cached"] == 0
    finally:
        client.close()

    # The table against the same points run one by one.
    by_point = {(row["array"], row["gen_lanes_axis"]): row for row in r["rows"]}
    assert set(by_point) == set(POINTS)
    for (array, lanes), row in by_point.items():
        rows, cols = map(int, array.split("x"))
        ref = one_by_one(tiny_model, rows, cols, lanes, tmp_path / f"ref-{array}-{lanes}", capsys)
        got = {k: row[k] for k in ref}
        assert got == pytest.approx(ref), (array, lanes)
        assert row["cycles"] == ref["cost_cycles"] and row["cycles_source"] == "cost"
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 10_000
    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("point,status")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [p["cost_cycles"] for p in saved["points"]] == [row["cost_cycles"] for row in r["rows"]]

    # A second run computes nothing: every stage's result comes from the cache, whose
    # files stay as they were.
    results = sorted((tmp_path / "out" / "cache").glob("*/result.json"))
    assert len(results) == 8
    stamps = {p: p.stat().st_mtime_ns for p in results}
    r2 = run_sweep(spec, tmp_path / "out2", cache=tmp_path / "out" / "cache",
                   scheduler=cluster.scheduler_address, progress=False, log=lambda m: None)
    assert r2["stages_run"] == 0 and r2["stages_cached"] == 8 and r2["failed"] == 0
    assert all(row["stages_run"] == 0 and row["stages_cached"] == 2 for row in r2["rows"])
    assert {p: p.stat().st_mtime_ns for p in results} == stamps
    skip = {"stages_run", "stages_cached"}
    assert [{k: v for k, v in row.items() if k not in skip} for row in r2["rows"]] == \
        [{k: v for k, v in row.items() if k not in skip} for row in r["rows"]]


def test_failed_point_reported_with_stage_and_sweep_goes_on(tiny_model, cluster, tmp_path,
                                                            capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a model")
    spec = write_spec(tmp_path / "f.toml", f"""
[sweep]
stages = ["compile", "cost"]
[axes]
model = ["{tiny_model}", "{bad}"]
array = ["4x4"]
""")
    capsys.readouterr()
    rc = main(["sweep", str(spec), "--out", str(tmp_path / "o"),
               "--scheduler", cluster.scheduler_address])
    out = capsys.readouterr().out
    assert rc == 1
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["points"]
    good, broken = rows
    assert good["status"] == "ok" and good["cost_cycles"] > 0
    assert broken["status"] == "failed" and broken["failed_stage"] == "compile"
    assert "broken.pt" in broken["error"] and "not a readable model file" in broken["error"]
    assert broken["cost_cycles"] is None
    assert "stage compile" in out and "1 failed" in out


@pytest.mark.parametrize("text, words", [
    ("[sweep]\nstages = ['compile']\nstagez = 1\n", ["[sweep]", "stagez", "accepted", "stages"]),
    ("[sweep]\nstages = ['compile', 'benchmark']\n",
     ["stages", "'benchmark'", "accepted", "compile, cost, bench"]),
    ("[sweep]\nstages = ['cost']\n", ["stage 'cost' needs stage 'compile'"]),
    ("[sweep]\nstages = ['compile']\n[axes]\narray = ['8x1']\n",
     ["[axes] array", "'8x1'", "accepted 'RxC'", "2..64"]),
    ("[sweep]\nstages = ['compile']\n[axes]\ngen_lanes = [0]\n",
     ["[axes] gen_lanes", "0", "'auto'", "1..256"]),
    ("[sweep]\nstages = ['compile']\n[axes]\nform = ['fast']\n",
     ["[axes] form", "'fast'", "generate, auto, factorized"]),
    ("[sweep]\nstages = ['compile']\n[axes]\nboard = ['arty']\n",
     ["[axes] board", "'arty'", "ulx3s-85f, icebreaker"]),
    ("[sweep]\nstages = ['compile']\n[axes]\nseed = [1, 2]\n", ["[axes] seed", "synth"]),
    ("[sweep]\nstages = ['compile']\n[axes]\nw_bits = [6, 8]\n", ["[axes] w_bits", "train"]),
    ("[sweep]\nstages = ['compile']\n[axes]\nlanes = [8]\n", ["[axes]", "lanes", "gen_lanes"]),
    ("[sweep]\nstages = ['compile']\n[axis]\n", ["unknown table", "axis", "axes"]),
    ("[sweep]\nstages = ['train', 'compile']\n[axes]\nbi = [40]\n", ["bi", "40", "accepted"]),
    ("[sweep]\nstages = ['compile']\n[synth]\nmargin = 80\n", ["[synth] margin", "0 to 50"]),
])
def test_spec_errors_name_file_key_and_accepted(tiny_model, tmp_path, capsys, text, words):
    if "[model]" not in text and "train" not in text:
        text += f"[model]\nfile = '{tiny_model}'\n"
    spec = write_spec(tmp_path / "bad.toml", text)
    with pytest.raises(SweepSpecError) as e:
        load_spec(spec)
    msg = str(e.value)
    assert msg.startswith(str(spec))
    for w in words:
        assert w in msg, (w, msg)
    # Before any work: the command refuses with status 2 and writes nothing.
    capsys.readouterr()
    assert main(["sweep", str(spec), "--out", str(tmp_path / "never")]) == 2
    assert str(spec) in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_spec_missing_model_and_yaml(tmp_path, tiny_model):
    spec = write_spec(tmp_path / "m.toml", "[sweep]\nstages = ['compile']\n[model]\n"
                                           "file = 'nowhere/model.pt'\n")
    with pytest.raises(SweepSpecError, match=r"model file 'nowhere/model.pt' not found"):
        load_spec(spec)
    y = write_spec(tmp_path / "s.yaml", f"sweep:\n  stages: [compile, cost]\nmodel:\n"
                                        f"  file: {tiny_model}\naxes:\n  array: [2x4, 4x4]\n")
    s = load_spec(y)
    assert s["axes"]["array"] == ["2x4", "4x4"] and s["sweep"]["stages"] == ["compile", "cost"]


def test_pareto_front():
    rows = [{"cycles": 10, "luts": 5}, {"cycles": 8, "luts": 9}, {"cycles": 12, "luts": 6},
            {"cycles": 8, "luts": 9}, {"cycles": 20, "luts": None}]
    # (12, 6) is dominated by (10, 5); the two equal points are both on the front.
    assert pareto_front(rows, ("cycles", "luts")) == [0, 1, 3]
