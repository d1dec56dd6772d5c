"""The fake-quantized float model against the integer golden model."""

import pytest
import torch

from gen.golden import golden_forward, quantize_input
from gen.importer import calibrate
from gen.layers import MLGLinear, MLGSettings, level_sizes
from gen.lower import UnsupportedLayerError, lower_model, preflight
from gen.models import DigitsNet


def _model(settings, seed=0, steps=3, plain=False):
    torch.manual_seed(seed)
    m = DigitsNet(settings, widths=(8, 16), plain=plain)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    m.train()
    for _ in range(steps):  # non-trivial BatchNorm statistics and activation ranges
        loss = m(torch.rand(16, 1, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    calibrate(m, torch.rand(32, 1, 8, 8))
    m.eval()
    return m


@pytest.mark.parametrize("form", ["odd", "signed"])
@pytest.mark.parametrize("qb,qu,qv", [(2, 2, 2), (3, 6, 3), (4, 8, 5), (8, 3, 8)])
def test_pe_weights_are_hardware_exact(form, qb, qu, qv):
    s = MLGSettings(bi=2, bo=6, qb=qb, qu=qu, qv=qv, qd=qb, decode=form)
    m = _model(s, steps=0)
    net = lower_model(m)
    for layer, op in zip(net.layers, [op for op in m.program()]):
        if layer.op != "conv":
            continue
        w_pe, scale, shift = op.conv.generated_weight(ste=False)
        ref = layer.weights_pe(net).reshape(w_pe.shape)
        assert shift == layer.w_shift
        assert torch.equal(w_pe.to(torch.int64), ref), layer.name
        # and the float weight the model convolves with is exactly integer x scale
        eff = op.conv.effective_weight().double().reshape(w_pe.shape)
        assert torch.allclose(eff, ref.double() * float(scale), rtol=1e-6, atol=0)


def _float_op(op, x, res):
    """One op of the float model on given (already quantized) float inputs."""
    if op.op == "pool":
        return None
    if isinstance(op.conv, MLGLinear):
        y = op.conv(x.flatten(1))[:, :, None, None]
    else:
        y = op.conv(x)
    if op.bn is not None:
        y = op.bn(y)
    if res is not None:
        y = y + res
    if op.relu:
        y = torch.relu(y)
    return op.out_q(y)


@pytest.mark.parametrize("seed,plain", [(0, False), (1, False), (2, False), (3, True)])
def test_golden_times_scale_matches_fake_quant_model(seed, plain):
    s = MLGSettings(bi=2, bo=6, qd=7)
    m = _model(s, seed=seed, steps=5, plain=plain)
    net = lower_model(m)
    x = torch.rand(64, 1, 8, 8)
    bufs = golden_forward(net, quantize_input(net, x), keep=True)
    scale = {0: net.input_scale}
    for layer in net.layers:
        scale[layer.dst] = layer.out_scale
    checked = 0
    with torch.no_grad():
        for layer, op in zip(net.layers, m.program()):
            xin = bufs[layer.src].double() * scale[layer.src]
            res = bufs[layer.res].double() * scale[layer.res] if layer.res is not None else None
            f = _float_op(op, xin.float(), None if res is None else res.float())
            if f is None:
                continue
            f = f.double() / layer.out_scale
            g = bufs[layer.dst].double().reshape(f.shape)
            diff = (f - g).abs()
            # Same inputs: the integer requant differs from the float path only by the
            # rounding of M, bias and m_res to integers, i.e. at most one output step
            # and only on values that sit at a rounding boundary.
            # (the float path runs in float32: allow its rounding noise, far below a step)
            assert float(diff.max()) <= 1.0 + 1e-4, layer.name
            assert float((diff > 0.5).double().mean()) < 0.01, layer.name
            checked += 1
        logits = m(x)
    assert checked == 5
    # plain: no residual add, no pool, a 1 x 1 map out of the classifier
    assert plain == all(op.op == "conv" and op.res is None for op in m.program())
    assert net.layers[-1].ho * net.layers[-1].wo == 1
    # End to end the per-layer step differences may add up, but only to a few output steps.
    # (Argmax agreement is no measure here: the training loss pulls the logits to zero, so
    # many samples have tied logits and any one-step difference flips their argmax.)
    out = golden_forward(net, quantize_input(net, x))
    steps = (logits.double() / net.layers[-1].out_scale - out.double()).abs()
    assert float(steps.mean()) <= 0.5
    assert float(steps.max()) <= 6.0


def test_level_rules_follow_official():
    assert level_sizes(64, 64, 3, 2, 44) == (2, 44, True, True)
    assert level_sizes(3, 64, 3, 2, 44) == (2, 64, True, False)   # bo >= min(Co, Ci*k*k) = 27
    assert level_sizes(64, 128, 1, 2, 44) == (0, 44, False, True)  # 1x1: never level 1
    assert level_sizes(1, 16, 3, 2, 8) == (0, 8, False, True)
    assert level_sizes(8, 8, 3, 0, 0) == (0, 8, False, False)      # dense


def test_preflight_lists_every_unsupported_layer():
    m = DigitsNet(MLGSettings())
    m.extra1 = torch.nn.MaxPool2d(2)
    m.extra2 = torch.nn.LayerNorm(4)
    with pytest.raises(UnsupportedLayerError) as e:
        preflight(m)
    msg = str(e.value)
    assert "2 unsupported" in msg and "extra1 (MaxPool2d)" in msg and "extra2 (LayerNorm)" in msg


def test_settings_validation_names_field():
    with pytest.raises(ValueError, match="qu = 9"):
        MLGSettings(qu=9).validate()
    with pytest.raises(ValueError, match="qb = 1 has no symmetric signed"):
        MLGSettings(qb=1, decode="signed").validate()
    with pytest.raises(ValueError, match="w_bits = 1"):
        MLGSettings(w_bits=1).validate()


def test_plain_digits_network_needs_a_small_input():
    with pytest.raises(ValueError, match="at most 8 x 8 pixels.*not 16 x 16"):
        DigitsNet(MLGSettings(), widths=(8, 16), plain=True, size=16)
