"""The compiler: integer network -> AcceleratorConfig + layer program + memory report.

``compile_network`` derives the one :class:`AcceleratorConfig` of a build from the
model's bit-widths and layer shapes (array shape from the caller), maps the
logical activation buffers of the network onto as few physical buffers as
liveness allows, and emits the packed binary program.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from .config import AcceleratorConfig, ConfigError, pe_pack_fits
from .contract import act_bytes, widths_of
from .network import QuantizedNetwork
from .program import write_program

__all__ = ["CompileError", "CompileResult", "derive_config", "allocate_buffers",
           "compile_network", "memory_report", "format_report", "place_codes",
           "BASE_STORE_BUDGET"]

# Default on-chip base store limit: 256 KiB of block RAM (an ECP5-85F has 468 KiB).
# A network whose codes need more keeps the first layers resident and streams the rest.
BASE_STORE_BUDGET = 256 * 1024


class CompileError(ValueError):
    """The network cannot be compiled for the requested accelerator."""


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def allocate_buffers(net: QuantizedNetwork) -> QuantizedNetwork:
    """Rename logical buffers to physical ones by liveness (greedy, lowest free id).

    A buffer is free after the last layer that reads it. A layer never writes a
    buffer it reads (as source or residual) in the same step.
    """
    last_use: dict[int, int] = {}
    for i, l in enumerate(net.layers):
        last_use[l.src] = i
        if l.res is not None:
            last_use[l.res] = i
    last_use[net.output_buffer] = len(net.layers)
    phys = {0: 0}
    busy = {0}
    layers = []
    for i, l in enumerate(net.layers):
        dst = next(p for p in range(len(net.layers) + 2) if p not in busy)
        phys[l.dst] = dst
        busy.add(dst)
        layers.append(replace(l, src=phys[l.src], dst=dst,
                              res=phys[l.res] if l.res is not None else None))
        for b in {l.src, l.res} - {None}:
            if last_use[b] == i:
                busy.discard(phys[b])
    return replace(net, layers=layers)


def place_codes(net: QuantizedNetwork, base_store_bytes: int) -> list[bool]:
    """Which layers' codes stay resident in a base store of ``base_store_bytes``.

    Layers are placed in program order while they fit; a layer that does not fit,
    and every conv layer after it, is streamed from the host during the run (so
    the stream is consumed in the order it is sent). Pools have no codes and
    count as resident.
    """
    used, streaming, out = 0, False, []
    for l in net.layers:
        n = l.aligned_code_bytes(net)
        if n and (streaming or used + n > base_store_bytes):
            streaming = True
            out.append(False)
        else:
            used += n
            out.append(True)
    return out


def derive_config(net: QuantizedNetwork, rows: int = 8, cols: int = 8, *,
                  base_store_budget: int = BASE_STORE_BUDGET, trim: bool = False,
                  **overrides) -> AcceleratorConfig:
    """The smallest config that runs ``net`` on an ``rows x cols`` array.

    The base store holds every layer's codes if they fit ``base_store_budget``
    bytes, else the budget (see :func:`place_codes`). With ``trim``, the config
    leaves out the layer features (level 2, the residual add, pooling) that no
    layer of ``net`` uses, and code streaming if the base store holds every
    layer's codes. Two PEs share a multiplier block (``pe_pack = 2``) where the
    widths allow it (:func:`gen.config.pe_pack_problem`), except on ``compact``
    builds; ``pe_pack=1`` in ``overrides`` keeps one block per PE.
    """
    conv = net.conv_layers()
    acts = [net.input_shape[0] * net.input_shape[1] * net.input_shape[2]]
    acts += [l.co * l.ho * l.wo for l in net.layers]
    code_bytes = sum(l.aligned_code_bytes(net) for l in conv)
    in_bytes = net.input_shape[0] * net.input_shape[1] * net.input_shape[2] * act_bytes(net)
    bufs = 1 + max(max(l.src, l.dst, l.res or 0) for l in net.layers)
    fields = dict(
        rows=rows, cols=cols, **widths_of(net),
        max_ci=max(l.ci for l in net.layers), max_co=max(l.co for l in net.layers),
        max_k=max(l.k for l in conv), max_h=max(l.h for l in net.layers),
        max_w=max(l.w for l in net.layers),
        max_bi=max([l.bi for l in conv if l.has_l1] or [1]),
        max_bo=max([l.bo for l in conv if l.has_l2] or [1]),
        act_depth=_pow2(max(acts)), act_buffers=max(2, bufs),
        # Every layer's codes stay resident in the base store.
        base_store_bytes=min(_pow2(max(1, code_bytes)), _pow2(base_store_budget)),
        max_layers=_pow2(max(8, len(net.layers))),
        # With level 2 generated on chip, one generation multiplier per PE: a level-2
        # tile of rows x cols weights then takes bo cycles, hidden behind compute on
        # any map of at least bo pixels (8 lanes made the digits model's 4x4 layers 8x
        # generation-bound). Without it (dense and factorized layers only), level 1
        # uses at most `rows` lanes (config.lane_plan) and more would sit idle.
        gen_lanes=min(256, rows * cols) if any(l.has_l2 for l in conv) else rows,
        const_depth=_pow2(sum(l.out_channels for l in net.layers)),
        # The frame buffer holds a whole input image and its LOAD_ACT header.
        max_payload=min(65535, _pow2(max(256, in_bytes + 7))),
    )
    # Two PE products per multiplier block wherever the weights are narrow enough; not on
    # compact builds (the iCE40's 16 x 16 blocks are narrower than the packed operand).
    compact = overrides.get("compact", False)
    fields["pe_pack"] = 2 if not compact and pe_pack_fits(fields["a_bits"], fields["w_bits"],
                                                          cols) else 1
    if trim:
        fields.update(level2=any(l.has_l2 for l in conv),
                      residual=any(l.res is not None for l in net.layers),
                      pool=any(l.op == "pool" for l in net.layers),
                      # (code streaming, when the base store holds every layer's codes)
                      stream=not all(place_codes(net, fields["base_store_bytes"])))
    fields.update(overrides)
    try:
        return AcceleratorConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise CompileError(f"cannot derive an accelerator config: {e}") from None


def memory_report(net: QuantizedNetwork) -> dict:
    """Per-layer and total weight memory: MLG packed vs int8 vs fp32 (bytes)."""
    rows = []
    for l in net.conv_layers():
        bits = sum(t.numel() * b for _, t, b in l.code_tensors(net))
        dense = l.co * l.ci * l.k * l.k
        rows.append({
            "layer": l.name, "ci": l.ci, "co": l.co, "k": l.k, "stride": l.stride,
            "h": l.h, "w": l.w, "bi": l.bi, "bo": l.bo, "level1": l.has_l1, "level2": l.has_l2,
            "mlg_bytes": bits / 8, "int8_bytes": dense, "fp32_bytes": 4 * dense,
            "macs": l.macs,
        })
    tot = {k: sum(r[k] for r in rows) for k in ("mlg_bytes", "int8_bytes", "fp32_bytes", "macs")}
    tot["int8_over_mlg"] = tot["int8_bytes"] / tot["mlg_bytes"] if tot["mlg_bytes"] else 0.0
    tot["fp32_over_mlg"] = tot["fp32_bytes"] / tot["mlg_bytes"] if tot["mlg_bytes"] else 0.0
    return {"layers": rows, "total": tot}


@dataclass
class CompileResult:
    config: AcceleratorConfig
    program: bytes
    network: QuantizedNetwork
    report: dict


FORMS = ("generate", "auto", "factorized")


def predicted_cycles(net: QuantizedNetwork, rows: int, cols: int, **overrides) -> int:
    """Cycles :mod:`gen.cost` predicts for ``net`` on the config it would compile to."""
    from .cost import layer_costs

    net = allocate_buffers(net)
    return sum(c.cycles for c in layer_costs(net, derive_config(net, rows, cols, **overrides)))


# The arrays :func:`size_array` considers: 2..MAX_SIZED rows and columns.
MAX_SIZED = 32


def size_array(nets, multipliers: int, *, fixed: dict | None = None, **overrides) -> dict:
    """The array shape for a network on a device with ``multipliers`` multiplier blocks.

    ``nets`` are the network in the execution forms the compile may use (e.g. the
    generate form and the fully factorized one, :func:`choose_forms`). Of the
    ``rows x cols`` arrays (2..:data:`MAX_SIZED` each) on which some form's build fits
    the blocks (:attr:`gen.config.AcceleratorConfig.multiplier_blocks`, with two PE
    products per block where ``pe_pack`` allows), the one :mod:`gen.cost` predicts
    fastest in its fastest fitting form (fewer PEs, then the squarer shape, on a tie).

    Returns ``{"rows", "cols", "predicted_cycles", "multiplier_blocks", "pe_pack",
    "form", "candidates"}``: ``form`` is the index in ``nets`` of the form the
    prediction is for, ``candidates`` how many shapes fit. Raises
    :class:`CompileError` if not even a 2 x 2 array fits. ``fixed`` may hold ``rows``
    or ``cols``: only shapes with that many are considered.
    """
    from .cost import layer_costs

    fixed = fixed or {}
    nets = [allocate_buffers(n) for n in (nets if isinstance(nets, (list, tuple)) else [nets])]
    best, fits = None, 0
    for rows in ([fixed["rows"]] if "rows" in fixed else range(2, MAX_SIZED + 1)):
        for cols in ([fixed["cols"]] if "cols" in fixed else range(2, MAX_SIZED + 1)):
            options = []
            for i, net in enumerate(nets):
                try:
                    config = derive_config(net, rows, cols, **overrides)
                except CompileError:
                    continue
                if config.multiplier_blocks["total"] <= multipliers:
                    cycles = sum(c.cycles for c in layer_costs(net, config))
                    options.append((cycles, i, config))
            if not options:
                continue
            fits += 1
            cycles, i, config = min(options, key=lambda o: o[:2])
            key = (cycles, rows * cols, abs(rows - cols))
            if best is None or key < best[0]:
                best = (key, rows, cols, i, config)
    if best is None:
        shape = " and ".join(f"{k} = {v}" for k, v in fixed.items()) or \
            f"2..{MAX_SIZED} rows and columns"
        raise CompileError(f"no array of {shape} fits {multipliers} multiplier blocks")
    (cycles, _, _), rows, cols, i, config = best
    return {"rows": rows, "cols": cols, "predicted_cycles": cycles,
            "multiplier_blocks": config.multiplier_blocks, "pe_pack": config.pe_pack,
            "form": i, "candidates": fits}


def choose_forms(net: QuantizedNetwork, rows: int, cols: int, form: str,
                 calib, **overrides) -> QuantizedNetwork:
    """``net`` with its execution forms chosen: ``generate`` keeps form 1 everywhere,
    ``factorized`` takes form 2 wherever it applies, ``auto`` wherever the cost model
    predicts fewer cycles. ``calib`` (quantized inputs) sets the intermediate scales."""
    from .factorize import choose_factorized, factorizable, factorize

    if form not in FORMS:
        raise CompileError(f"execution form {form!r} unknown; accepted: {', '.join(FORMS)}")
    if form == "generate" or not any(factorizable(l) for l in net.layers):
        return net
    if calib is None:
        raise CompileError(f"form {form!r} needs calibration inputs for the factorized layers' "
                           "intermediate scale")
    if form == "auto":
        names = choose_factorized(net, calib,
                                  lambda n: predicted_cycles(n, rows, cols, **overrides))
    else:
        names = [l.name for l in net.layers if factorizable(l)]
    return factorize(net, names, calib) if names else net


def compile_network(net: QuantizedNetwork, rows: int = 8, cols: int = 8, *,
                    form: str = "generate", calib=None, **overrides) -> CompileResult:
    """Compile ``net`` for an ``rows x cols`` array; ``overrides`` replace derived
    config fields (e.g. ``gen_lanes``, ``link_timeout``). ``form`` chooses the
    execution form of the generated layers (:func:`choose_forms`)."""
    from .cost import layer_costs

    original = net
    net = choose_forms(net, rows, cols, form, calib, **overrides)
    net = allocate_buffers(net)
    config = derive_config(net, rows, cols, **overrides)
    for l in net.layers:
        if l.bias is not None and l.bias.numel():
            lim = 1 << (config.bias_bits - 1)
            if int(l.bias.abs().max()) >= lim:
                raise CompileError(f"layer {l.name!r}: bias needs more than "
                                   f"{config.bias_bits} bits (field bias)")
    program = write_program(net, config)
    # Memory per layer of the model: a factorized layer keeps its codes, and its int8
    # baseline is the layer's own dense weights.
    report = memory_report(original)
    resident = dict(zip((l.name for l in net.layers), place_codes(net, config.base_store_bytes)))
    for row in report["layers"]:
        name = row["layer"]
        parts = [n for n in (name, f"{name}.w1", f"{name}.v") if n in resident]
        row["resident"] = all(resident[n] for n in parts)
        row["form"] = ("factorized" if f"{name}.w1" in resident else
                       "generate" if row["level1"] or row["level2"] else "dense")
    report["base_store_bytes"] = config.base_store_bytes
    report["streamed_code_bytes"] = sum(l.aligned_code_bytes(net)
                                        for l, r in zip(net.layers, resident) if not r)
    report["program_bytes"] = len(program)
    report["config_hash"] = config.hash_hex
    report["array"] = f"{rows}x{cols}"
    report["form"] = form
    report["factorized"] = [r["layer"] for r in report["layers"] if r["form"] == "factorized"]
    report["predicted_cycles"] = sum(c.cycles for c in layer_costs(net, config))
    return CompileResult(config, program, net, report)


def write_build(result: CompileResult, out_dir) -> dict[str, Path]:
    """Write ``program.bin``, ``config.json``, ``report.json`` and ``report.txt``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"program": out / "program.bin", "config": out / "config.json",
             "report": out / "report.json", "report_txt": out / "report.txt"}
    paths["program"].write_bytes(result.program)
    result.config.save(paths["config"])
    paths["report"].write_text(json.dumps(result.report, indent=2) + "\n")
    paths["report_txt"].write_text(format_report(result.report) + "\n")
    return paths


def _kib(b: float) -> str:
    return f"{b / 1024:10.2f}"


def format_report(report: dict) -> str:
    lines = [f"{'layer':<20} {'Ci':>4} {'Co':>4} {'k':>2} {'bi':>3} {'bo':>4} {'L1':>2} {'L2':>2} "
             f"{'MLG KiB':>10} {'int8 KiB':>10} {'fp32 KiB':>10}"]
    for r in report["layers"]:
        lines.append(f"{r['layer']:<20} {r['ci']:>4} {r['co']:>4} {r['k']:>2} {r['bi']:>3} "
                     f"{r['bo']:>4} {'y' if r['level1'] else '-':>2} {'y' if r['level2'] else '-':>2} "
                     f"{_kib(r['mlg_bytes'])} {_kib(r['int8_bytes'])} {_kib(r['fp32_bytes'])}")
    t = report["total"]
    lines.append(f"{'total':<20} {'':>4} {'':>4} {'':>2} {'':>3} {'':>4} {'':>2} {'':>2} "
                 f"{_kib(t['mlg_bytes'])} {_kib(t['int8_bytes'])} {_kib(t['fp32_bytes'])}")
    lines.append(f"weights: MLG {t['mlg_bytes'] / 1024:.2f} KiB, {t['int8_over_mlg']:.1f}x smaller "
                 f"than int8, {t['fp32_over_mlg']:.1f}x smaller than fp32; program "
                 f"{report.get('program_bytes', 0)} bytes")
    return "\n".join(lines)


def describe_model(result: CompileResult, path, data: dict, arch: str) -> None:
    """Add the model file and, for a digits network, the golden accuracy of the program
    as compiled (its forms, its rounding points) to ``result.report``; with factorized
    layers also that of the model in the generate form (``generate_golden_acc``)."""
    result.report["model"] = {"file": str(path), "arch": data.get("arch"),
                              "metrics": data.get("metrics", {})}
    if arch == "digits":
        from .golden import golden_predict
        from .train import load_digits_split

        _, _, x, y = load_digits_split()
        result.report["program_golden_acc"] = float(
            (golden_predict(result.network, x) == y).float().mean())
        result.report["program_golden_images"] = int(x.shape[0])
        if result.report.get("factorized"):
            result.report["generate_golden_acc"] = float(
                (golden_predict(data["network"], x) == y).float().mean())


def form_accuracy_warning(report: dict, points: float = 1.0) -> str | None:
    """A warning when the factorized layers of a compiled digits program cost more than
    ``points`` percentage points of golden accuracy against the generate form (with
    narrow PE weights the factorized form rounds ``W1`` itself to ``w_bits``)."""
    prog, gen = report.get("program_golden_acc"), report.get("generate_golden_acc")
    if prog is None or gen is None or (gen - prog) * 100 <= points:
        return None
    return (f"the factorized form of {', '.join(report['factorized'])} costs "
            f"{(gen - prog) * 100:.1f} points of golden accuracy ({prog:.4f} against "
            f"{gen:.4f} in the generate form); --form generate keeps the accuracy")
