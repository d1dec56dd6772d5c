"""Performance bench: MLG against a dense int8 baseline, layer by layer, in RTL simulation.

Two suites, each on one simulated board (one build) that runs both of its programs:

* ``resnet``: the ResNet-18 / CIFAR-10 layer set, one basic block per stage
  (``depths=(1, 1, 1, 1)``), which holds every distinct layer shape of
  ResNet-18: the stem, the 3x3 convolutions of every stage, the stride-2 3x3 and
  the 1x1 shortcuts, pool and classifier. Synthetic weights at MLG (bi, bo, qb,
  qu, qv) = (2, 44, 3, 6, 3), activation scales calibrated on synthetic images.
* ``digits``: the whole digits network of a model file (``mlg train``).

The **dense baseline** is the same network with every generated layer replaced
by a dense layer of int8 codes (its PE weights, on the odd levels), streamed
through the generation unit's bypass with no generation. Its codes do not fit
the base store; the host streams them during the run (``REGION_STREAM``), at
whatever rate the simulation's socket bridge reaches, so the dense run's window
cycles are not a hardware figure. What is measured is the array's side of each
dense layer, **dense preloaded**: the window less the cycles the array waited
for weights, i.e. the layer with its weights already on chip. The cost model
predicts the dense layers both preloaded and fed at one code byte per cycle.

Every run checks the network's output against the golden model, element for
element. Per layer the layer log (``REGION_LOG``) gives cycles, array cycles,
stalls for weights, generation-busy cycles and MACs; :mod:`gen.cost` predicts
the cycles, and the report gives the error.

Definitions (per layer, from the end of the previous layer to its own end):

* ``cycles``: the layer's share of the run;
* ``exposed``: cycles the array waited for weights (``stall_weights``);
* ``util``: MACs / (rows x cols x (cycles - exposed)), the compute phase;
* ``gen`` / ``hidden``: generation-unit busy cycles in the window, and how many
  of them passed while the array was not waiting (``gen - exposed``);
* ``w_bytes``: the layer's code bytes (MLG) or int8 weight bytes (dense);
  ``a_bytes``: activation bytes read and written in the on-chip buffers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from gen.compiler import allocate_buffers, choose_forms, compile_network, derive_config
from gen.config import AcceleratorConfig
from gen.cost import layer_costs
from gen.golden import golden_forward, quantize_input
from gen.integer import encode_values, value_range, w2_shift
from gen.network import QuantizedNetwork
from gen.program import read_program

__all__ = ["RESNET_BITS", "resnet_layer_set", "dense_variant", "common_config", "run_suite",
           "bench", "format_report", "plot_report", "LIMIT_FIELDS"]

RESNET_BITS = dict(bi=2, bo=44, qb=3, qu=6, qv=3)
# Config fields that size a build: a build for several networks takes the largest.
LIMIT_FIELDS = ("max_ci", "max_co", "max_k", "max_h", "max_w", "max_bi", "max_bo", "act_depth",
                "act_buffers", "base_store_bytes", "max_layers", "const_depth", "max_payload")
# Base store budget of a bench build: every MLG code stays resident (a whole
# ResNet-18 needs about 320 KiB).
BENCH_BASE_STORE = 512 << 10


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resnet_layer_set(depths=(1, 1, 1, 1), seed: int = 0, calib_images: int = 16,
                     bits: dict | None = None) -> QuantizedNetwork:
    """ResNet-18 / CIFAR-10 with ``depths`` basic blocks per stage, synthetic weights,
    calibrated on synthetic N(0, 1) images and lowered to integers."""
    from gen.importer import calibrate
    from gen.layers import MLGSettings
    from gen.lower import lower_model
    from gen.models import ResNet18

    torch.manual_seed(seed)
    settings = MLGSettings(**{**RESNET_BITS, **(bits or {})}, qd=8)
    model = ResNet18(settings, quant=True, depths=tuple(depths))
    g = torch.Generator().manual_seed(seed)
    calibrate(model, torch.randn(calib_images, 3, 32, 32, generator=g))
    return lower_model(model)


def dense_variant(net: QuantizedNetwork) -> QuantizedNetwork:
    """``net`` with every generated layer made dense: its PE weights as ``qd``-bit codes
    (the nearest odd level for the odd decode), no level 1 or 2."""
    lo, hi = value_range(net.qd, net.decode)
    layers = []
    for layer in net.layers:
        if layer.op != "conv" or layer.dense:
            layers.append(layer)
            continue
        w = layer.weights_pe(net).reshape(layer.co, layer.ci, layer.k * layer.k)
        if net.decode == "odd":
            w = 2 * torch.div(w, 2, rounding_mode="floor") + 1
        w = w.clamp(lo, hi)
        layers.append(replace(layer, b=encode_values(w, net.qd, net.decode), u=None, v=None,
                              bi=0, bo=layer.co, w_shift=w2_shift(w, net.w_bits)))
    return replace(net, layers=layers)


def common_config(nets: list[QuantizedNetwork], rows: int, cols: int,
                  **overrides) -> AcceleratorConfig:
    """One config that runs every network of ``nets``: the largest of each limit."""
    configs = [derive_config(n, rows, cols, **overrides) for n in nets]
    fields = configs[0].to_dict()
    for c in configs[1:]:
        d = c.to_dict()
        for k, v in d.items():
            if k in LIMIT_FIELDS:
                fields[k] = max(fields[k], v)
            elif k not in ("gen_lanes",) and fields[k] != v:
                raise ValueError(f"networks need different values of config field {k!r}: "
                                 f"{fields[k]!r} and {v!r}; one build cannot run both")
    return AcceleratorConfig(**fields)


def _run(driver, config, net: QuantizedNetwork, x_int: torch.Tensor, timeout: float,
         resident: bool) -> dict:
    result = compile_network(net, config.rows, config.cols, **{
        k: getattr(config, k) for k in (*LIMIT_FIELDS, "gen_lanes", "link_timeout")})
    if result.config != config:
        raise AssertionError("bench program compiled for another config")
    program = read_program(result.program, config=config, source=net.arch)
    image = driver.load_program(config, program)
    if resident and image.streamed:
        raise AssertionError(f"{net.arch}: {len(image.streamed)} layers' codes do not fit the "
                             f"base store of {config.base_store_bytes} bytes")
    t0 = time.monotonic()
    out = driver.infer(x_int, timeout=timeout)
    wall = time.monotonic() - t0
    golden = golden_forward(result.network, x_int.unsqueeze(0)).reshape(-1)
    mismatches = int((out != golden).sum())
    return {"log": driver.layer_log(), "counters": driver.counters(), "mismatches": mismatches,
            "outputs": int(golden.numel()), "wall_s": wall, "network": result.network,
            "pred": layer_costs(result.network, config)}


def _form(layer) -> str:
    if layer.op != "conv" or layer.dense:
        return "dense"
    return "L1+L2" if layer.has_l1 and layer.has_l2 else "L1" if layer.has_l1 else "L2"


def _grouped(run: dict) -> dict[str, dict]:
    """Per original layer (the two parts of a factorized layer summed): the log's
    counts, the prediction and the bytes."""
    out: dict[str, dict] = {}
    for layer, e, p in zip(run["network"].layers, run["log"], run["pred"]):
        base = layer.name
        form = _form(layer)
        if base.endswith(".w1") or base.endswith(".v"):
            base, form = base.rsplit(".", 1)[0], "W1,V"
        g = out.setdefault(base, {"form": form, "cycles": 0, "stall_weights": 0, "gen_busy": 0,
                                  "macs": 0, "predicted": 0, "preloaded_predicted": 0,
                                  "w_bytes": 0, "a_bytes": 0})
        for k in ("cycles", "stall_weights", "gen_busy", "macs"):
            g[k] += e[k]
        g["predicted"] += p.cycles
        g["preloaded_predicted"] += p.preloaded
        g["w_bytes"] += p.weight_bytes
        g["a_bytes"] += p.act_bytes
    return out


def _rows(config, net: QuantizedNetwork, mlg: dict, dense: dict) -> list[dict]:
    R, C = config.rows, config.cols
    gm, gd = _grouped(mlg), _grouped(dense)
    rows = []
    for layer in net.layers:
        m, d = gm[layer.name], gd[layer.name]
        compute = m["cycles"] - m["stall_weights"]
        d_pre = d["cycles"] - d["stall_weights"]
        rows.append({
            "layer": layer.name, "op": layer.op, "ci": layer.ci, "co": layer.co, "h": layer.h,
            "w": layer.w, "k": layer.k, "stride": layer.stride, "form": m["form"],
            "macs": m["macs"], "cycles": m["cycles"], "predicted": m["predicted"],
            "error": (m["predicted"] - m["cycles"]) / m["cycles"],
            "exposed": m["stall_weights"], "gen": m["gen_busy"],
            "hidden": max(0, m["gen_busy"] - m["stall_weights"]),
            "util": m["macs"] / (R * C * compute) if compute and layer.op == "conv" else None,
            "w_bytes": m["w_bytes"], "a_bytes": m["a_bytes"],
            "dense_macs": d["macs"], "dense_preloaded": d_pre,
            "dense_preloaded_predicted": d["preloaded_predicted"],
            "dense_error": (d["preloaded_predicted"] - d_pre) / d_pre if d_pre else 0.0,
            "dense_streamed_predicted": d["predicted"],
            "dense_util": d["macs"] / (R * C * d_pre) if d_pre and layer.op == "conv" else None,
            "dense_w_bytes": d["w_bytes"], "dense_a_bytes": d["a_bytes"],
            "preloaded_ratio": m["cycles"] / max(1, d_pre),
            "streamed_ratio": m["cycles"] / max(1, d["predicted"]),
            "w_bytes_ratio": m["w_bytes"] / d["w_bytes"] if d["w_bytes"] else None,
        })
    return rows


def run_suite(name: str, net: QuantizedNetwork, rows: int = 8, cols: int = 8, *,
              simulator: str = "verilator", seed: int = 0, timeout: float = 3600.0,
              form: str = "auto", calib: torch.Tensor | None = None, fast_build: bool = False,
              **overrides) -> dict:
    """Run ``net`` (execution forms chosen by ``form``, see
    :func:`gen.compiler.choose_forms`) and its dense variant on one simulated board;
    per-layer report. ``overrides`` replace derived config fields."""
    from host.driver import Driver
    from host.transport import SerialTransport
    from sim.board import SimulatedBoard

    g = torch.Generator().manual_seed(seed)
    c, h, w = net.input_shape
    if calib is None:
        calib = quantize_input(net, torch.randn(16, c, h, w, generator=g))
    mlg_net = choose_forms(net, rows, cols, form, calib, **overrides)
    dense = dense_variant(net)
    config = common_config([allocate_buffers(mlg_net), allocate_buffers(dense)], rows, cols,
                           base_store_budget=BENCH_BASE_STORE, **overrides)
    x_int = quantize_input(net, torch.randn(1, c, h, w, generator=g))[0]
    _log(f"[{name}] building the simulated board ({rows}x{cols}, {simulator}) ...")
    t0 = time.monotonic()
    runs = {}
    with SimulatedBoard(config, simulator, fast_build=fast_build) as board:
        with SerialTransport(board.url) as tr:
            drv = Driver(tr, timeout=60)
            for variant, n in (("mlg", mlg_net), ("dense", dense)):
                _log(f"[{name}] {variant}: load, run, check against the golden model ...")
                runs[variant] = _run(drv, config, n, x_int, timeout, variant == "mlg")
                _log(f"[{name}] {variant}: {runs[variant]['counters']['cycles']:,} cycles, "
                     f"{runs[variant]['mismatches']} of {runs[variant]['outputs']} outputs differ")
    wall = time.monotonic() - t0
    mlg, dn = runs["mlg"], runs["dense"]
    layer_rows = _rows(config, net, mlg, dn)
    return {
        "suite": name, "array": f"{rows}x{cols}", "simulator": simulator, "form": form,
        "factorized": [r["layer"] for r in layer_rows if r["form"] == "W1,V"],
        "config": config.to_dict(), "config_hash": config.hash_hex, "wall_s": wall,
        "mismatches": {"mlg": mlg["mismatches"], "dense": dn["mismatches"]},
        "outputs": mlg["outputs"],
        "total": {
            "mlg_cycles": mlg["counters"]["cycles"],
            "mlg_predicted": sum(p.cycles for p in mlg["pred"]),
            "dense_preloaded": sum(r["dense_preloaded"] for r in layer_rows),
            "dense_preloaded_predicted": sum(r["dense_preloaded_predicted"] for r in layer_rows),
            "dense_streamed_predicted": sum(p.cycles for p in dn["pred"]),
            "mlg_w_bytes": sum(r["w_bytes"] for r in layer_rows),
            "dense_w_bytes": sum(r["dense_w_bytes"] for r in layer_rows),
            "mlg_a_bytes": sum(r["a_bytes"] for r in layer_rows),
            "dense_a_bytes": sum(r["dense_a_bytes"] for r in layer_rows),
            "mlg_code_bytes_measured": mlg["counters"]["code_bytes"],
            "dense_code_bytes_measured": dn["counters"]["code_bytes"],
            "mlg_macs": mlg["counters"]["macs"], "dense_macs": dn["counters"]["macs"],
        },
        "layers": layer_rows,
        # Every program layer as the accelerator ran it (a factorized layer's two parts
        # apart): measured and predicted cycles.
        "parts": {variant: [{"layer": l.name, "cycles": e["cycles"], "predicted": p.cycles,
                             "stall_weights": e["stall_weights"], "gen_busy": e["gen_busy"],
                             "preloaded_predicted": p.preloaded, "macs": e["macs"]}
                            for l, e, p in zip(r["network"].layers, r["log"], r["pred"])]
                  for variant, r in runs.items()},
    }


def bench(suites: dict[str, tuple], rows: int = 8, cols: int = 8, **kw) -> dict:
    """Run every suite, ``name -> (network, calibration inputs or None)``."""
    return {"suites": [run_suite(name, net, rows, cols, calib=calib, **kw)
                       for name, (net, calib) in suites.items()]}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(report: dict) -> str:
    lines = []
    for s in report["suites"]:
        t = s["total"]
        lines.append(f"suite {s['suite']} on a {s['array']} array ({s['simulator']}, form {s['form']}): "
                     f"outputs differing from golden: MLG {s['mismatches']['mlg']}, dense "
                     f"{s['mismatches']['dense']} (of {s['outputs']})")
        lines.append(f"{'':<20} {'':<18} {'':<5} {'MLG':-^57} {'dense int8':-^39} {'bytes':-^27}")
        lines.append(
            f"{'layer':<20} {'shape':<18} {'form':<5} {'cycles':>9} {'pred':>9} {'err':>6} "
            f"{'util':>6} {'gen':>9} {'hidden':>9} {'preload':>9} {'pred':>9} {'err':>6} "
            f"{'MLG/pre':>8} {'MLG w':>8} {'dense w':>9} {'act':>8}")
        for r in s["layers"]:
            shape = (f"{r['ci']}>{r['co']} {r['h']}x{r['w']}"
                     + (f" k{r['k']}" if r["op"] == "conv" else " pool")
                     + (f"/{r['stride']}" if r["stride"] > 1 else ""))
            lines.append(
                f"{r['layer']:<20} {shape:<18} {r['form']:<5} {r['cycles']:>9,} {r['predicted']:>9,} "
                f"{100 * r['error']:>5.1f}% {_pct(r['util']):>6} {r['gen']:>9,} {r['hidden']:>9,} "
                f"{r['dense_preloaded']:>9,} {r['dense_preloaded_predicted']:>9,} "
                f"{100 * r['dense_error']:>5.1f}% {r['preloaded_ratio']:>8.3f} "
                f"{r['w_bytes']:>8,} {r['dense_w_bytes']:>9,} {r['a_bytes']:>8,}")
        err = (t["mlg_predicted"] - t["mlg_cycles"]) / t["mlg_cycles"]
        lines.append(
            f"{'total':<20} {'':<18} {'':<5} {t['mlg_cycles']:>9,} {t['mlg_predicted']:>9,} "
            f"{100 * err:>5.1f}% {'':>6} {'':>9} {'':>9} {t['dense_preloaded']:>9,} "
            f"{t['dense_preloaded_predicted']:>9,} {'':>6} "
            f"{t['mlg_cycles'] / t['dense_preloaded']:>8.3f} {t['mlg_w_bytes']:>8,} "
            f"{t['dense_w_bytes']:>9,} {t['mlg_a_bytes']:>8,}")
        lines.append(
            f"MLG / dense preloaded: cycles {t['mlg_cycles'] / t['dense_preloaded']:.3f}; dense fed at "
            f"one code byte per cycle (predicted): {t['dense_streamed_predicted']:,} cycles, MLG / "
            f"that {t['mlg_cycles'] / t['dense_streamed_predicted']:.3f}; weight bytes MLG / int8 "
            f"{t['mlg_w_bytes'] / t['dense_w_bytes']:.4f} (1/{t['dense_w_bytes'] / t['mlg_w_bytes']:.1f}); "
            f"factorized: {', '.join(s['factorized']) or 'none'}; wall {s['wall_s']:.0f} s")
        if "frames_per_second" in s:
            lines.append(f"at {s['fmax_mhz']:.1f} MHz: {s['frames_per_second']:,.1f} frames per second "
                         f"(MLG), {s['fmax_mhz'] * 1e6 / t['dense_preloaded']:,.1f} (dense preloaded)")
        lines.append("")
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """Per-layer cycles and weight bytes, MLG against dense, one row of panels per suite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = report["suites"]
    fig, axes = plt.subplots(len(suites), 2, figsize=(15, 4.6 * len(suites)), squeeze=False)
    for (ax_c, ax_b), s in zip(axes, suites):
        layers = [r for r in s["layers"] if r["op"] == "conv"]
        names = [r["layer"] + (" (W1,V)" if r["form"] == "W1,V" else "") for r in layers]
        x = list(range(len(layers)))
        wd = 0.27
        ax_c.bar([i - wd for i in x], [r["cycles"] for r in layers], wd, label="MLG (measured)")
        ax_c.bar(x, [r["dense_preloaded"] for r in layers], wd, label="dense int8, preloaded (measured)")
        ax_c.bar([i + wd for i in x], [r["dense_streamed_predicted"] for r in layers], wd,
                 label="dense int8, 1 B/cycle (predicted)", alpha=0.6)
        ax_c.scatter([i - wd for i in x], [r["predicted"] for r in layers], marker="_", s=200,
                     color="k", label="MLG predicted", zorder=3)
        ax_c.set_yscale("log")
        ax_c.set_ylabel("cycles")
        ax_c.set_title(f"{s['suite']}: cycles per layer ({s['array']} array)")
        ax_b.bar([i - wd / 2 for i in x], [r["w_bytes"] for r in layers], wd, label="MLG codes")
        ax_b.bar([i + wd / 2 for i in x], [r["dense_w_bytes"] for r in layers], wd, label="dense int8")
        ax_b.bar([i + 1.5 * wd for i in x], [r["a_bytes"] for r in layers], wd,
                 label="activations (both)", alpha=0.6)
        ax_b.set_yscale("log")
        ax_b.set_ylabel("bytes")
        ax_b.set_title(f"{s['suite']}: weight and activation bytes per layer")
        for ax in (ax_c, ax_b):
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_json(report: dict, path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=float) + "\n")


