"""The default digits training run meets its accuracy targets."""

from gen.layers import MLGSettings
from gen.network import load_model_file
from gen.golden import golden_predict
from gen.train import TrainOptions, load_digits_split, train_digits
from mlg.cli import build_parser


def test_default_training_meets_targets(tmp_path):
    args = build_parser().parse_args(["train"])
    settings = MLGSettings(bi=args.bi, bo=args.bo, qb=args.qb, qu=args.qu, qv=args.qv, qd=args.qd,
                           decode=args.decode, w_bits=args.w_bits, a_bits=args.a_bits)
    opt = TrainOptions(epochs=args.epochs, teacher_epochs=args.teacher_epochs, seed=args.seed,
                       progress=False)
    m = train_digits(settings, opt, out_path=tmp_path / "d.pt", log=lambda *a: None)
    assert m["golden_acc"] >= 0.95
    assert m["golden_acc"] >= m["float_acc"] - 0.01
    # The saved model reproduces the reported golden accuracy.
    data = load_model_file(tmp_path / "d.pt")
    _, _, x, y = load_digits_split()
    acc = float((golden_predict(data["network"], x) == y).float().mean())
    assert acc == m["golden_acc"]
    assert data["mlg"]["bo"] == args.bo and data["arch"] == "digits"
    kinds = {(l.has_l1, l.has_l2) for l in data["network"].conv_layers()}
    assert (True, True) in kinds and (False, False) in kinds  # generated and dense layers
