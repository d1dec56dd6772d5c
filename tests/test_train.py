"""The default digits training run meets its accuracy targets; bad settings are refused
before any work."""

import re

import pytest

from gen import train as train_module
from gen.layers import MLGSettings
from gen.network import load_model_file
from gen.golden import golden_predict
from gen.train import TrainOptions, level_ranges, load_digits_split, train_digits
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


@pytest.mark.parametrize("settings,opt,needle", [
    (MLGSettings(bi=0), TrainOptions(), "bi 0 puts level 1 (the bases B and coefficients U) on "
                                        "no layer of the digits network (widths 24,48"),
    (MLGSettings(bi=8), TrainOptions(widths=(4, 8)), "accepted: 1..7"),
    (MLGSettings(), TrainOptions(epochs=0), "epochs 0 trains no student; accepted: a whole "
                                            "number of epochs >= 1"),
    (MLGSettings(), TrainOptions(teacher_epochs=-2), "teacher_epochs -2; accepted"),
    (MLGSettings(qv=1, decode="signed"), TrainOptions(), "qv = 1 has no symmetric signed level"),
])
def test_training_refuses_before_any_work(monkeypatch, settings, opt, needle):
    def no_data(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_module, "load_digits_split", no_data)
    with pytest.raises(ValueError, match=re.escape(needle)):
        train_digits(settings, opt, log=lambda *a: None)


def test_level_ranges_follow_the_official_rules():
    # Level 1 needs 0 < bi < min(Ci, 9): the widest 3x3 conv input decides; level 2
    # needs 0 < bo < min(Co, 9 Ci).
    assert level_ranges((24, 48)) == {"bi": (1, 8), "bo": (1, 47)}
    assert level_ranges((4, 8)) == {"bi": (1, 7), "bo": (1, 7)}
    assert level_ranges((8, 16), plain=True) == {"bi": (1, 8), "bo": (1, 15)}


def test_a_bo_that_leaves_level_2_out_is_said(tmp_path):
    logs = []
    opt = TrainOptions(epochs=1, teacher_epochs=0, widths=(8, 16), progress=False)
    train_digits(MLGSettings(bi=2, bo=16), opt, log=logs.append)
    assert "bo = 16: level 2 is on no layer (it needs bo in 1..15 for widths 8,16)" in logs
