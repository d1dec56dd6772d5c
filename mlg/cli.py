"""The ``mlg`` command line: train, import, compile and evaluate MLG models."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from hw.flow.procs import Terminated, end_on_signals

__all__ = ["main"]


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _widths(text: str) -> tuple[int, int]:
    """``C1,C2``: the digits network's two stage widths, positive integers."""
    try:
        w = tuple(int(v) for v in text.split(","))
    except ValueError:
        w = ()
    if len(w) != 2 or min(w) < 1:
        raise argparse.ArgumentTypeError(f"--widths {text!r}: give two positive channel counts, e.g. 8,16")
    return w


# The option of each field of MLGSettings and TrainOptions that ``mlg train`` sets.
TRAIN_OPTIONS = {"epochs": "--epochs", "teacher_epochs": "--teacher-epochs", "bi": "--bi",
                 "bo": "--bo", "qb": "--qb", "qu": "--qu", "qv": "--qv", "qd": "--qd",
                 "decode": "--decode", "w_bits": "--w-bits", "a_bits": "--a-bits",
                 "m_bits": "--m-bits", "widths": "--widths"}


def cmd_train(args) -> int:
    from gen.layers import MLGSettings
    from gen.train import TrainOptions, check_training, train_digits

    settings = MLGSettings(bi=args.bi, bo=args.bo, qb=args.qb, qu=args.qu, qv=args.qv, qd=args.qd,
                           decode=args.decode, w_bits=args.w_bits, a_bits=args.a_bits,
                           m_bits=args.m_bits)
    opt = TrainOptions(epochs=args.epochs, teacher_epochs=args.teacher_epochs, seed=args.seed,
                       widths=args.widths, plain=args.plain,
                       distill=not args.no_distill, progress=not args.json and sys.stderr.isatty())
    check_training(settings, opt, names=TRAIN_OPTIONS)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = train_digits(settings, opt, out_path=out, log=log)
    m["model"] = str(out)
    if args.json:
        _print_json(m)
    else:
        print(f"float accuracy  {m['float_acc']:.4f}  (fake-quantized PyTorch model)")
        print(f"golden accuracy {m['golden_acc']:.4f}  (integer golden model, {m['test_images']} test images)")
        print(f"training took {m['train_seconds']:.1f} s; model written to {out}")
    return 0


def cmd_import(args) -> int:
    from gen.importer import OfficialBits, import_official

    bits = OfficialBits(args.basis_bit, args.coeff_in_bit, args.coeff_out_bit, args.weight_bit)
    bits.validate()
    if args.data is None and args.calib_images < 1:
        raise ValueError(f"--calib-images {args.calib_images}: accepted a number of synthetic "
                         "calibration images >= 1")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = import_official(args.checkpoint, bits, out_path=out, data=args.data,
                        calib_images=args.calib_images, log=log, arch=args.arch,
                        info=lambda *a: print(*a, file=sys.stderr))
    m["model"] = str(out)
    if args.json:
        _print_json(m)
    else:
        print(f"imported {args.checkpoint} ({m['arch']}) -> {out}")
        print(f"golden vs float top-1 agreement on {m['agreement_images']} images: "
              f"{m['golden_float_agreement']:.3f}")
        if "golden_acc" in m:
            print(f"float accuracy {m['float_acc']:.4f}, golden accuracy {m['golden_acc']:.4f}")
    return 0


def cmd_compile(args) -> int:
    from gen.compiler import (compile_network, describe_model, form_accuracy_warning,
                              format_report, write_build)
    from gen.network import load_model_file

    data = load_model_file(args.model)
    overrides = {"gen_lanes": args.gen_lanes} if args.gen_lanes is not None else {}
    if args.counter_bits is not None:
        overrides["counter_bits"] = args.counter_bits
    if args.no_layer_log:
        overrides["layer_log"] = False
    if args.compact:
        overrides["compact"] = True
    if args.pe_pack is not None:
        overrides["pe_pack"] = args.pe_pack
    if args.trim:
        overrides["trim"] = True
    net = data["network"]
    calib = None
    if args.form != "generate":
        calib = _calibration_inputs(net, args.calib_images)
    rows, cols = args.rows, args.cols
    if args.board is not None and (rows is None or cols is None):
        rows, cols = _size_for_board(net, args, calib, overrides)
    rows, cols = rows or 8, cols or 8
    result = compile_network(net, rows=rows, cols=cols, form=args.form, calib=calib,
                             **overrides)
    describe_model(result, args.model, data, net.arch)
    warning = form_accuracy_warning(result.report)
    if warning:
        print(f"mlg compile: warning: {warning}", file=sys.stderr)
    paths = write_build(result, args.out)
    if args.json:
        _print_json({"config": result.config.to_dict(), "config_hash": result.config.hash_hex,
                     "report": result.report, "files": {k: str(v) for k, v in paths.items()}})
    else:
        print(format_report(result.report))
        print(f"config {result.config.hash_hex[:16]} ({rows}x{cols} array) -> {args.out}")
    return 0


def _size_for_board(net, args, calib, overrides) -> tuple[int, int]:
    """The array :func:`gen.compiler.size_array` picks for ``args.board``'s multiplier
    blocks, in the forms ``args.form`` allows (said on stderr); a given ``--rows`` or
    ``--cols`` is kept."""
    from gen.compiler import size_array
    from gen.factorize import factorizable, factorize
    from hw.board import BOARDS

    board = BOARDS[args.board]
    forms = []
    if args.form in ("generate", "auto"):
        forms.append(("generate", net))
    names = [l.name for l in net.layers if factorizable(l)]
    if args.form in ("factorized", "auto") and names:
        forms.append(("factorized", factorize(net, names, calib)))
    if not forms:
        forms.append(("generate", net))
    over = dict(overrides)
    if board.family == "ice40":
        over.setdefault("compact", True)
    fixed = {k: v for k, v in (("rows", args.rows), ("cols", args.cols)) if v is not None}
    pick = size_array([n for _, n in forms], board.multipliers, fixed=fixed, **over)
    b = pick["multiplier_blocks"]
    print(f"{args.board}: {pick['rows']}x{pick['cols']} array of the {pick['candidates']} that "
          f"fit its {board.multipliers} multiplier blocks ({b['total']} used: {b['pe']} PE"
          f"{' (two products each)' if pick['pe_pack'] == 2 else ''}, {b['requant']} requant, "
          f"{b['generation']} generation), predicted {pick['predicted_cycles']:,} cycles in the "
          f"{forms[pick['form']][0]} form", file=sys.stderr)
    return pick["rows"], pick["cols"]


def _calibration_inputs(net, n: int):
    """Quantized inputs that set the factorized layers' intermediate scales: training
    images for a digits model, else N(0, 1) images (said on stderr)."""
    import torch

    from gen.golden import quantize_input

    if net.arch == "digits":
        from gen.train import load_digits_split

        x = load_digits_split()[0][:n]
    else:
        print(f"calibrating factorized layers on {n} synthetic N(0, 1) images", file=sys.stderr)
        x = torch.randn(n, *net.input_shape, generator=torch.Generator().manual_seed(0))
    return quantize_input(net, x)


def cmd_golden(args) -> int:
    from gen.golden import golden_predict
    from gen.network import load_model_file
    from gen.train import load_digits_split

    data = load_model_file(args.model)
    net = data["network"]
    if net.arch != "digits":
        raise ValueError(f"{args.model}: golden evaluation on the embedded data set needs a "
                         f"digits model, this one is {net.arch!r}")
    _, _, x, y = load_digits_split()
    acc = float((golden_predict(net, x) == y).float().mean())
    out = {"golden_acc": acc, "test_images": int(y.numel()), "model": args.model}
    if args.json:
        _print_json(out)
    else:
        print(f"golden accuracy {acc:.4f} on {y.numel()} test images")
    return 0


def _load_build(build: str):
    from gen.config import AcceleratorConfig
    from gen.program import load_program

    b = Path(build)
    if not (b / "config.json").exists() or not (b / "program.bin").exists():
        raise ValueError(f"{b}: not a build directory (needs config.json and program.bin from "
                         "'mlg compile MODEL --out DIR')")
    config = AcceleratorConfig.load(b / "config.json")
    return config, load_program(b / "program.bin", config)


def _images(program, n: int):
    from gen.train import load_digits_split

    if n < 1:
        raise ValueError(f"--images {n}: accepted a count >= 1")
    _, _, x, y = load_digits_split()
    shape = tuple(x.shape[1:])
    if tuple(program.input_shape) != shape:
        raise ValueError(f"program input {tuple(program.input_shape)} is not the embedded digits "
                         f"images {shape}: this command runs digits builds")
    if n > x.shape[0]:
        raise ValueError(f"--images {n}: the digits test split has {x.shape[0]} images")
    return x[:n], y[:n]


def _run_on(url: str, args, config, program, extra: dict) -> int:
    from host.driver import Driver
    from host.inference import format_summary, run_images
    from host.transport import SerialTransport

    x, y = _images(program, args.images)
    progress = not args.json and sys.stderr.isatty()
    with SerialTransport(url, baud=config.baud) as transport:
        driver = Driver(transport, timeout=args.timeout, progress=progress)
        report = run_images(driver, config, program, x, y, progress=progress)
    report.update(extra)
    if args.json:
        _print_json(report)
    else:
        print(format_summary(report, {k: v for k, v in extra.items() if isinstance(v, str)}))
    return 0 if report["mismatches"] == 0 else 1


def cmd_sim(args) -> int:
    import time

    from sim.board import SimulatedBoard

    config, program = _load_build(args.build)
    _images(program, args.images)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    log(f"building and starting the simulated board ({args.simulator}) ...")
    t0 = time.monotonic()
    with SimulatedBoard(config, args.simulator, waves=args.waves) as board:
        log(f"simulated board on {board.url} after {time.monotonic() - t0:.0f} s")
        extra = {"simulator": args.simulator}
        extra.update(_build_rows(args.build))
        rc = _run_on(board.url, args, config, program, extra)
    if args.waves and board.build_dir is not None:
        log(f"waveforms in {board.build_dir}")
    return rc


def cmd_soak(args) -> int:
    from sim.soak import SoakOptions, soak_session, verdict

    # Every option is checked before any work starts.
    options = SoakOptions(images=args.images, distinct=args.distinct, frames=args.frames,
                          fault_rate=args.fault_rate, timeout=args.timeout, margin=args.margin,
                          run_timeout=args.run_timeout, truncated_wait=args.truncated_wait,
                          retries=args.retries, seed=args.seed, every_kind=args.every_kind)
    if not args.start_timeout > 0:
        raise ValueError(f"--start-timeout {args.start_timeout!r}: accepted seconds > 0")
    from gen.golden import golden_forward, quantize_input

    config, program = _load_build(args.build)
    try:
        x, _ = _images(program, min(args.images, args.distinct))
    except ValueError as e:
        if args.distinct < args.images:
            raise ValueError(str(e).replace("--images", "--distinct")) from None
        raise
    net = program.network()
    x_int = quantize_input(net, x)
    golden = golden_forward(net, x_int)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    log(f"building and starting the simulated board ({args.simulator}) ...")

    def show(report):
        if args.json:
            _print_json(report)
        else:
            print(format_soak(report))

    try:
        report = soak_session(config, program, x_int, golden, options, simulator=args.simulator,
                              start_timeout=args.start_timeout, out=args.out, log=log,
                              progress=not args.json and sys.stderr.isatty())
    except BaseException as e:
        partial = getattr(e, "soak_report", None)
        if partial is not None:
            show(partial)
        if isinstance(e, KeyboardInterrupt):
            print("mlg soak: stopped by Ctrl-C (SIGINT)", file=sys.stderr)
            return 128 + signal.SIGINT
        raise
    show(report)
    return 0 if verdict(report) else 1


def cmd_bench(args) -> int:
    from gen.network import load_model_file
    from sim.perf import bench, format_report, plot_report, resnet_layer_set, save_json

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    suites = {}
    for name in args.suites.split(","):
        if name == "resnet":
            suites["resnet"] = (resnet_layer_set(seed=args.seed), None)
        elif name == "resnet18":
            suites["resnet18"] = (resnet_layer_set(depths=(2, 2, 2, 2), seed=args.seed), None)
        elif name == "digits":
            path = Path(args.digits)
            if not path.exists():
                raise ValueError(f"{path}: no digits model file; make one with "
                                 f"'mlg train --out {path}' or name another with --digits")
            net = load_model_file(path)["network"]
            suites["digits"] = (net, _calibration_inputs(net, 16))
        else:
            raise ValueError(f"--suites: unknown suite {name!r}; accepted: resnet, digits, resnet18")
    report = bench(suites, args.rows, args.cols, simulator=args.simulator, seed=args.seed,
                   form=args.form)
    if args.fmax:
        for s in report["suites"]:
            s["fmax_mhz"] = args.fmax
            s["frames_per_second"] = args.fmax * 1e6 / s["total"]["mlg_cycles"]
    if args.out:
        save_json(report, args.out)
    if args.plot:
        plot_report(report, args.plot)
        log(f"plot written to {args.plot}")
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0 if all(not any(s["mismatches"].values()) for s in report["suites"]) else 1


def cmd_sweep(args) -> int:
    from mlg.sweep import main_args

    return main_args(args)


def format_soak(r: dict) -> str:
    """The soak's report as text (whole or partial)."""
    fz = r["frame_fuzz"]
    kinds = r["by_kind"]
    rows = []
    if r["partial"]:
        rows.append(("PARTIAL REPORT", f"stopped by {r['stopped_by']} during {r['stage']}"))
    rows += [
        ("random frames", f"{fz['frames']:,}, every answer as the device model expects "
                          f"({', '.join(f'{k} {v}' for k, v in fz['by_kind'].items())})"),
        ("frame kinds left out", ", ".join(fz["kinds_left_out"]) or "none"),
        ("images", f"{r['images_done']:,} of {r['images']:,} ({r['computed_bit_exact']:,} "
                   f"computed bit-exact, {r['silently_wrong']} silently wrong, "
                   f"{r['images_lost']} lost)"),
        ("faults injected", f"{r['faults_injected']:,} ({r['faults_caught']:,} caught: "
                            + ", ".join(f"{k} {v}" for k, v in r["caught_by"].items())
                            + f"; {r['faults_got_through']} got through, "
                            f"{r['faults_not_fired']} not fired)"),
    ]
    if kinds:
        width = max(len(k) for k in kinds)
        head = "  ".join(f"{c:>8}" for c in ("injected", "crc", "check", "timeout", "through",
                                              "unfired"))
        rows.append(("by kind", f"{'':<{width}}  {head}"))
        for k, v in kinds.items():
            cells = "  ".join(f"{v[c]:>8}" for c in ("injected", "crc", "check", "timeout",
                                                     "got_through", "not_fired"))
            rows.append(("", f"{k:<{width}}  {cells}"))
    seconds = r["byte_seconds"]
    rows += [
        ("errors the driver raised", ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-"),
        ("recoveries", f"{r['recoveries']} ({r['recovery_failures']} failed and retried, "
                       f"{r['board_resets_by_soak']} board resets by the soak)"),
        ("board resets fired", f"{r['resets_fired']}"),
        ("program reloads", f"{r['program_reloads']} (read-back found the program damaged)"),
        ("failures without a fault", f"{r['failures_without_fault']}"),
        ("cycles per run", f"{r['cycles_per_run']:,}" if r["cycles_per_run"] else "-"),
        ("link", f"{seconds * 1e6:.0f} us per byte (measured)" if seconds else "-"),
        ("wall time", f"{r['wall_seconds']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_run(args) -> int:
    from host.transport import url_problem

    problem = url_problem(args.port)
    if problem:
        raise ValueError(f"--port {args.port}: {problem}")
    config, program = _load_build(args.build)
    return _run_on(args.port, args, config, program, {"port": args.port, **_build_rows(args.build)})


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed list {text!r}: accepted integers separated "
                                         f"by commas, e.g. 1,2,3") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seed list {text!r}: accepted distinct integers >= 0")
    return seeds


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted a whole number of runs >= 1")
    return n


def _minutes_arg(text: str) -> float:
    try:
        minutes = float(text)
    except ValueError:
        minutes = 0.0
    if not minutes > 0 or minutes == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: accepted a number of minutes > 0, e.g. 30")
    return minutes


def cmd_synth(args) -> int:
    from hw.flow.synth import format_synth_report, synthesize

    if args.freq is None:
        args.freq = 100.0 if args.board == "ulx3s-85f" else 30.0
    config, _ = _load_build(args.build)
    out = Path(args.out) if args.out else Path(args.build) / f"synth-{args.board}"
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    log(f"synthesizing {args.build} for {args.board} at {args.freq:g} MHz into {out} ...")
    jobs = args.jobs or max(1, min(len(args.seed), os.cpu_count() or 1))
    report = synthesize(config, args.board, args.freq, out,
                        seed=args.seed[0] if len(args.seed) == 1 else args.seed, jobs=jobs,
                        pnr_args=shlex.split(args.pnr_args), margin_pct=args.margin,
                        pnr_timeout=args.pnr_timeout * 60 if args.pnr_timeout else None,
                        progress=not args.json and sys.stderr.isatty())
    (out / "synth_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        _print_json(report)
    else:
        print(format_synth_report(report))
    return 0 if report["timing_met"] else 1


def _build_rows(build: str) -> dict:
    """Summary rows from the build's compile report: float accuracy, weight memory."""
    path = Path(build) / "report.json"
    if not path.exists():
        return {}
    rep = json.loads(path.read_text())
    rows = {}
    metrics = rep.get("model", {}).get("metrics", {})
    if "float_acc" in metrics:
        rows["accuracy float (whole test split)"] = (
            f"{metrics['float_acc']:.4f}, golden {metrics.get('golden_acc', float('nan')):.4f} "
            f"on {metrics.get('test_images', '?')} images")
    if "program_golden_acc" in rep:
        rows["accuracy golden, program as compiled"] = (
            f"{rep['program_golden_acc']:.4f} on {rep['program_golden_images']} images (forms: "
            f"{', '.join(rep.get('factorized', [])) or 'none'} factorized)")
    t = rep.get("total", {})
    if t:
        rows["weight memory MLG / int8 / fp32"] = (
            f"{t['mlg_bytes'] / 1024:.2f} / {t['int8_bytes'] / 1024:.2f} / "
            f"{t['fp32_bytes'] / 1024:.2f} KiB ({t['int8_over_mlg']:.1f}x / "
            f"{t['fp32_over_mlg']:.1f}x smaller)")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlg", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the digits MLG CNN on the embedded data set")
    t.add_argument("--out", default="build/digits.pt", help="model file to write")
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--teacher-epochs", type=int, default=15)
    t.add_argument("--no-distill", action="store_true", help="no dense teacher, no SVD init")
    t.add_argument("--bi", type=int, default=2)
    t.add_argument("--bo", type=int, default=16)
    t.add_argument("--qb", type=int, default=3)
    t.add_argument("--qu", type=int, default=6)
    t.add_argument("--qv", type=int, default=3)
    t.add_argument("--qd", type=int, default=7, help="code bits of dense layers")
    t.add_argument("--decode", choices=("odd", "signed"), default="odd")
    t.add_argument("--w-bits", type=int, default=8, help="processing-element weight width")
    t.add_argument("--a-bits", type=int, default=8, help="activation width")
    t.add_argument("--m-bits", type=int, default=16,
                   help="signed width of the per-channel requant multipliers (2..24)")
    t.add_argument("--widths", type=_widths, default=(24, 48),
                   help="channels of the two stages, e.g. 8,16 (default 24,48)")
    t.add_argument("--plain", action="store_true",
                   help="no residual add and no pooling: stride-2 convs down to a 2 x 2 map "
                        "and a 3 x 3 stride-2 conv as classifier (for the smallest builds, "
                        "with mlg compile --trim)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("import", help="import an official MLG ResNet checkpoint "
                       "(ResNet-18/34/50/101/152 for CIFAR)")
    i.add_argument("checkpoint")
    i.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
                   help="the official architecture; by default inferred from the checkpoint's "
                        "keys (and said on stderr)")
    i.add_argument("--out", required=True, help="model file to write")
    i.add_argument("--basis-bit", type=int, required=True, help="official mlg.basis_bit")
    i.add_argument("--coeff-in-bit", type=int, required=True, help="official mlg.coeff_in_bit")
    i.add_argument("--coeff-out-bit", type=int, required=True, help="official mlg.coeff_out_bit")
    i.add_argument("--weight-bit", type=int, default=8, help="official model.weight_bit")
    i.add_argument("--data", help="calibration images (.npz with x [N,3,32,32] and optional y)")
    i.add_argument("--calib-images", type=int, default=64,
                   help="synthetic calibration images when --data is not given")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_import)

    c = sub.add_parser("compile", help="derive the accelerator config and the layer program")
    c.add_argument("model")
    c.add_argument("--out", required=True, help="build directory")
    c.add_argument("--rows", type=int, default=None,
                   help="array rows (default 8, or as --board sizes it)")
    c.add_argument("--cols", type=int, default=None,
                   help="array columns (default 8, or as --board sizes it)")
    c.add_argument("--board", choices=("ulx3s-85f", "icebreaker"), default=None,
                   help="size the array for this board: of the shapes whose multiplier "
                        "blocks fit the device, the one the cost model predicts fastest for "
                        "the model (a given --rows or --cols is kept)")
    c.add_argument("--gen-lanes", type=int, default=None,
                   help="generation-unit multipliers (default: one per PE, at most 256)")
    c.add_argument("--counter-bits", type=int, default=None,
                   help="width of the run and link counters, 16..48 (default 48); narrower "
                        "counters wrap sooner and save logic on small devices")
    c.add_argument("--no-layer-log", action="store_true",
                   help="build without the per-layer counter log (saves its block RAMs)")
    c.add_argument("--compact", action="store_true",
                   help="build for a small device such as the iCEBreaker's UP5K: less logic, "
                        "a few more cycles per layer")
    c.add_argument("--pe-pack", type=int, choices=(1, 2), default=None,
                   help="PE products per multiplier block: 2 packs the weights of two "
                        "neighbouring columns into one operand (needs a_bits + 2 * w_bits + 1 "
                        "<= 18 and an even --cols); default 2 where it fits, 1 on --compact")
    c.add_argument("--trim", action="store_true",
                   help="leave out the hardware of layer features the model does not use "
                        "(level-2 generation, the residual add, pooling, and code streaming "
                        "when the base store holds every layer's codes); the build then "
                        "refuses programs that need them")
    c.add_argument("--form", choices=("auto", "generate", "factorized"), default="auto",
                   help="execution form of layers with level 2: generate W2 then convolve, the "
                        "factorized form (conv with W1, then 1x1 with V), or per layer whichever "
                        "the cost model predicts faster (default auto)")
    c.add_argument("--calib-images", type=int, default=16,
                   help="inputs that set the factorized layers' intermediate scales (default 16)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("golden", help="accuracy of the integer golden model on the digits test split")
    g.add_argument("model")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_golden)
    sy = sub.add_parser("synth", help="bitstream and timing/resource report for a board")
    sy.add_argument("build", help="build directory from 'mlg compile'")
    sy.add_argument("--board", required=True, choices=("ulx3s-85f", "icebreaker"))
    sy.add_argument("--freq", type=float, default=None,
                    help="clock in MHz (default 100 on ulx3s-85f, 30 on icebreaker)")
    sy.add_argument("--out", help="output folder (default BUILD/synth-BOARD)")
    sy.add_argument("--seed", type=_seed_list, default=[1], metavar="N[,N...]",
                    help="nextpnr placement seed (default 1); with a list, place and route "
                         "runs per seed until one meets the clock and keeps that one")
    sy.add_argument("--jobs", type=_jobs, default=None,
                    help="place and route runs at a time in a seed sweep (default: the "
                         "number of seeds, at most the number of CPUs)")
    sy.add_argument("--pnr-args", default="",
                    help="extra nextpnr options, e.g. '--placer-heap-timingweight 30' or "
                         "'--router router2 --tmg-ripup'")
    sy.add_argument("--pnr-timeout", type=_minutes_arg, default=None, metavar="MIN",
                    help="stop a place and route run after MIN minutes (a router stuck in "
                         "congestion); a seed sweep goes on with its next seed")
    sy.add_argument("--margin", type=float, default=0.0, metavar="PCT",
                    help="tighten the clock constraint given to place and route by PCT "
                         "percent (0 to 50); the clock and the verdict stay at --freq")
    sy.add_argument("--json", action="store_true")
    sy.set_defaults(func=cmd_synth)

    so = sub.add_parser("soak", help="images on the simulated board with link faults and resets injected")
    so.add_argument("build", help="build directory from 'mlg compile'")
    so.add_argument("--images", type=int, default=1000, help="images to run, >= 1 (default 1000)")
    so.add_argument("--distinct", type=int, default=100,
                    help="distinct test images, cycled through, >= 1 (default 100)")
    so.add_argument("--fault-rate", type=float, default=0.2,
                    help="share of the images that get one fault, 0 to 1 (default 0.2)")
    so.add_argument("--every-kind", action="store_true",
                    help="walk through every fault kind and phase in turn instead of at random")
    so.add_argument("--frames", type=int, default=1000,
                    help="random frames checked against the device model first, >= 0 (default 1000)")
    so.add_argument("--seed", type=int, default=0)
    so.add_argument("--timeout", type=float, default=3.0,
                    help="seconds to wait for a response on top of the time its bytes take on "
                         "the link times --margin (default 3)")
    so.add_argument("--margin", type=float, default=4.0,
                    help="factor >= 1 on the measured time of a request's bytes on the link, "
                         "and of a run (default 4)")
    so.add_argument("--run-timeout", type=float, default=120.0,
                    help="seconds to wait for the first run, which measures how long a run "
                         "takes (default 120)")
    so.add_argument("--truncated-wait", type=float, default=60.0,
                    help="more seconds to wait for the answer to a frame cut short (the "
                         "device's link_timeout cycles) (default 60)")
    so.add_argument("--retries", type=int, default=3,
                    help="attempts at an image, and at a recovery, before the image is lost "
                         "(default 3)")
    so.add_argument("--start-timeout", type=float, default=900.0,
                    help="seconds to wait for the simulated board to build and start "
                         "(default 900)")
    so.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator")
    so.add_argument("--out", help="also write the report (JSON) to this file; written "
                                  "however the soak ends, marked partial if it did not finish")
    so.add_argument("--json", action="store_true")
    so.set_defaults(func=cmd_soak)

    b = sub.add_parser("bench", help="per-layer cycles and bytes, MLG against dense int8, in RTL "
                                     "simulation, against the cost model")
    b.add_argument("--suites", default="resnet,digits",
                   help="comma-separated: resnet (the ResNet-18 layer set), digits (the digits "
                        "model), resnet18 (the whole ResNet-18); default resnet,digits")
    b.add_argument("--digits", default="build/digits.pt", help="digits model file (mlg train)")
    b.add_argument("--rows", type=int, default=8)
    b.add_argument("--cols", type=int, default=8)
    b.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--form", choices=("auto", "generate", "factorized"), default="auto",
                   help="execution form of the MLG layers (as mlg compile --form)")
    b.add_argument("--fmax", type=float, default=None,
                   help="clock in MHz (e.g. the Fmax mlg synth reported) for frames per second")
    b.add_argument("--plot", help="write the per-layer plot (PNG) to this file")
    b.add_argument("--out", help="also write the report (JSON) to this file")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    sw = sub.add_parser("sweep", help="a design-space sweep on Dask: every point of a spec's "
                                      "axes through its stages, cached; table and Pareto plot")
    sw.add_argument("spec", help="sweep spec (TOML, or YAML with suffix .yaml/.yml)")
    sw.add_argument("--out", help="results folder (default: the spec's [sweep] out, else "
                                  "build/sweeps/NAME)")
    sw.add_argument("--cache", help="stage cache folder (default OUT/cache); sweeps may share one")
    sw.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                    help="an existing Dask scheduler (default: a local cluster)")
    sw.add_argument("--workers", type=int, default=None,
                    help="worker processes of the local cluster (default: one per CPU)")
    sw.add_argument("--dry-run", action="store_true", help="list the points and stop")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func=cmd_sweep)

    for name, helptext in (("sim", "run test images end to end on the RTL in simulation"),
                           ("run", "run test images end to end on a board")):
        r = sub.add_parser(name, help=helptext)
        r.add_argument("build", help="build directory from 'mlg compile'")
        if name == "sim":
            r.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator")
            r.add_argument("--waves", action="store_true", help="write a waveform file")
        else:
            r.add_argument("--port", required=True,
                           help="pyserial URL: /dev/ttyUSB0, socket://HOST:PORT, ...")
        r.add_argument("--images", type=int, default=100, help="test images of the digits split")
        r.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a response")
        r.add_argument("--json", action="store_true")
        r.set_defaults(func=cmd_sim if name == "sim" else cmd_run)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with end_on_signals():
            return args.func(args)
    except Terminated as t:
        print(f"mlg {args.command}: stopped by {signal.Signals(t.signum).name}", file=sys.stderr)
        return 128 + t.signum
    except (ValueError, OSError, RuntimeError) as e:
        print(f"mlg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from host.driver import DriverError

        if isinstance(e, DriverError):
            print(f"mlg {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
