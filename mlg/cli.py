"""The ``mlg`` command line: train, import, compile and evaluate MLG models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_train(args) -> int:
    from gen.layers import MLGSettings
    from gen.train import TrainOptions, train_digits

    settings = MLGSettings(bi=args.bi, bo=args.bo, qb=args.qb, qu=args.qu, qv=args.qv, qd=args.qd,
                           decode=args.decode, w_bits=args.w_bits, a_bits=args.a_bits)
    opt = TrainOptions(epochs=args.epochs, teacher_epochs=args.teacher_epochs, seed=args.seed,
                       distill=not args.no_distill, progress=not args.json and sys.stderr.isatty())
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
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = import_official(args.checkpoint, bits, out_path=out, data=args.data,
                        calib_images=args.calib_images, log=log)
    m["model"] = str(out)
    if args.json:
        _print_json(m)
    else:
        print(f"imported {args.checkpoint} -> {out}")
        print(f"golden vs float top-1 agreement on {m['agreement_images']} images: "
              f"{m['golden_float_agreement']:.3f}")
        if "golden_acc" in m:
            print(f"float accuracy {m['float_acc']:.4f}, golden accuracy {m['golden_acc']:.4f}")
    return 0


def cmd_compile(args) -> int:
    from gen.compiler import compile_network, format_report, write_build
    from gen.network import load_model_file

    data = load_model_file(args.model)
    result = compile_network(data["network"], rows=args.rows, cols=args.cols)
    paths = write_build(result, args.out)
    if args.json:
        _print_json({"config": result.config.to_dict(), "config_hash": result.config.hash_hex,
                     "report": result.report, "files": {k: str(v) for k, v in paths.items()}})
    else:
        print(format_report(result.report))
        print(f"config {result.config.hash_hex[:16]} ({args.rows}x{args.cols} array) -> {args.out}")
    return 0


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
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("import", help="import an official MLG ResNet-18 checkpoint")
    i.add_argument("checkpoint")
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
    c.add_argument("--rows", type=int, default=8)
    c.add_argument("--cols", type=int, default=8)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("golden", help="accuracy of the integer golden model on the digits test split")
    g.add_argument("model")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_golden)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"mlg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
