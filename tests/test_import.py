"""``mlg import`` on checkpoints laid out as the official MLG code saves them."""

import pytest
import torch

from gen.importer import (ImportError_, OfficialBits, build_from_official, import_official,
                          infer_arch, read_official_checkpoint)
from gen.layers import MLGConv2d, MLGLinear
from gen.network import load_model_file
from tests.official import official_resnet18_state, official_resnet_state


def _official_dorefa_sym(x, k):
    """The official quantizer, written from its published definition (float64)."""
    w = torch.tanh(x.double())
    r = w.abs().max()
    n = 2 ** k - 1
    return torch.round((w / (2 * r) + 0.5) * n) / n * (2 * r) - r


def _official_build_weight(sd, name, bits: OfficialBits, co, ci, k):
    """What the official build_weight() returns for this state (float64)."""
    w = sd[f"{name}.weight"].double()
    cin, cout = sd.get(f"{name}.coeff_in"), sd.get(f"{name}.coeff_out")
    if cin is None and cout is None:
        return _official_dorefa_sym(w, bits.weight_bit).reshape(co, ci, k, k)
    bo = cout.shape[1] if cout is not None else co
    if cin is not None:
        basis = _official_dorefa_sym(w[:bo, : cin.shape[2]], bits.basis_bit)
        w1 = torch.matmul(_official_dorefa_sym(cin, bits.coeff_in_bit), basis.reshape(bo, cin.shape[2], -1))
    else:
        w1 = _official_dorefa_sym(w[:bo], bits.basis_bit)
    if cout is not None:
        w2 = _official_dorefa_sym(cout, bits.coeff_out_bit) @ w1.reshape(bo, -1)
    else:
        w2 = w1
    return w2.reshape(co, ci, k, k)


@pytest.mark.parametrize("bits", [OfficialBits(3, 6, 3, 8), OfficialBits(2, 4, 5, 4)])
def test_import_reproduces_official_weights(bits):
    sd = official_resnet18_state(bi=2, bo=44, seed=1)
    model = build_from_official(sd, bits)
    n_conv = 0
    for name, m in model.named_modules():
        if not isinstance(m, (MLGConv2d, MLGLinear)):
            continue
        ref = _official_build_weight(sd, name, bits, m.out_channels, m.in_channels, m.kernel_size)
        got = m.float_generated_weight()
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 1e-5, (name, rel)
        n_conv += isinstance(m, MLGConv2d)
    assert n_conv == 20  # 17 3x3 convs + 3 shortcut 1x1 convs


def test_levels_follow_the_checkpoint():
    sd = official_resnet18_state(bi=2, bo=44)
    model = build_from_official(sd, OfficialBits())
    assert not model.conv1.has_l2 and model.conv1.has_l1          # bo=44 >= min(64, 27)
    sc = model.layer2[0].shortcut[0]
    assert sc.has_l2 and not sc.has_l1 and sc.base_out == 44       # 1x1: level 2 only
    assert model.layer4[1].conv2.has_l1 and model.layer4[1].conv2.base_out == 44
    assert model.linear.dense


@pytest.mark.parametrize("container", ["plain", "wrapped", "dataparallel"])
def test_import_end_to_end(tmp_path, container):
    sd = official_resnet18_state(seed=2)
    if container == "dataparallel":
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 199} if container == "wrapped" else sd
    ckpt = tmp_path / "official.pt"
    torch.save(obj, ckpt)
    out = tmp_path / "r18.pt"
    logs = []
    m = import_official(ckpt, OfficialBits(), out_path=out, calib_images=4, log=logs.append)
    assert any("synthetic" in line for line in logs)
    assert m["calibration"] == "synthetic" and 0 <= m["golden_float_agreement"] <= 1
    data = load_model_file(out)
    net = data["network"]
    assert data["arch"] == "resnet18" and len(net.conv_layers()) == 21
    assert [l.op for l in net.layers].count("pool") == 1


def _save(tmp_path, sd):
    p = tmp_path / "c.pt"
    torch.save(sd, p)
    return p


def test_unsupported_layers_listed_up_front(tmp_path):
    sd = official_resnet18_state()
    sd["fc.weight"] = torch.zeros(10, 512)
    sd["layer1.0.conv3.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ImportError_) as e:
        import_official(_save(tmp_path, sd), OfficialBits(), log=lambda *a: None)
    msg = str(e.value)
    assert "fc.weight" in msg and "layer1.0.conv3.weight" in msg and "2 unsupported" in msg


def test_missing_key_names_layer_and_field(tmp_path):
    sd = official_resnet18_state()
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(ImportError_, match=r"layer3\.1\.bn2\.running_var \(layer layer3\.1\.bn2, field running_var\)"):
        import_official(_save(tmp_path, sd), OfficialBits(), log=lambda *a: None)


def test_shape_mismatch_names_layer_and_field(tmp_path):
    sd = official_resnet18_state()
    sd["layer2.0.conv1.coeff_out"] = torch.zeros(128, 40)  # bo differs from other layers
    sd["layer2.0.conv1.coeff_in"] = torch.zeros(44, 64, 2)
    with pytest.raises(ImportError_, match="layer2.0.conv1"):
        import_official(_save(tmp_path, sd), OfficialBits(), log=lambda *a: None)
    sd = official_resnet18_state()
    sd["layer1.0.bn1.weight"] = torch.zeros(32)
    with pytest.raises(ImportError_, match=r"layer layer1\.0\.bn1, field weight: shape \(32,\), expected \(64,\)"):
        import_official(_save(tmp_path, sd), OfficialBits(), log=lambda *a: None)


def test_level_contradicting_official_rules(tmp_path):
    sd = official_resnet18_state()
    sd["conv1.coeff_out"] = torch.zeros(64, 44)   # Ci*k*k = 27 <= 44: level 2 impossible
    with pytest.raises(ImportError_, match="conv1.*contradict the official level rules"):
        import_official(_save(tmp_path, sd), OfficialBits(), log=lambda *a: None)


@pytest.mark.parametrize("field,kw", [("basis_bit", dict(basis_bit=1)), ("coeff_in_bit", dict(coeff_in_bit=9)),
                                      ("weight_bit", dict(weight_bit=32))])
def test_bit_widths_out_of_range(tmp_path, field, kw):
    with pytest.raises(ImportError_, match=f"{field} = "):
        import_official(_save(tmp_path, official_resnet18_state()), OfficialBits(**kw), log=lambda *a: None)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ImportError_, match="junk.pt: not a readable"):
        read_official_checkpoint(p)
    with pytest.raises(ImportError_, match="no such checkpoint"):
        read_official_checkpoint(tmp_path / "absent.pt")
    torch.save([1, 2, 3], p)
    with pytest.raises(ImportError_, match="expected a state_dict"):
        read_official_checkpoint(p)


# ---------------------------------------------------------------------------
# Errors name the layer and field at fault, and list every problem at once


def _import_error(tmp_path, sd, bits=OfficialBits(), arch=None) -> str:
    with pytest.raises(ImportError_) as e:
        import_official(_save(tmp_path, sd), bits, log=lambda *a: None, arch=arch)
    return str(e.value)


def test_missing_coeff_out_is_named_not_coeff_in(tmp_path):
    sd = official_resnet18_state()
    del sd["layer2.0.conv1.coeff_out"]
    msg = _import_error(tmp_path, sd)
    assert "missing key 'layer2.0.conv1.coeff_out' (field coeff_out)" in msg
    assert "field coeff_in" not in msg and "bo = 44 < Co = 128" in msg


@pytest.mark.parametrize("shape", [(100, 44), (128, 44, 1), (44,)])
def test_misshaped_coeff_out_is_named_not_coeff_in(tmp_path, shape):
    sd = official_resnet18_state()
    sd["layer2.0.conv1.coeff_out"] = torch.zeros(shape)
    msg = _import_error(tmp_path, sd)
    assert f"layer layer2.0.conv1, field coeff_out: shape {shape}, expected [Co=128, bo]" in msg
    assert "field coeff_in" not in msg


def test_coeff_in_and_coeff_out_disagreeing_name_both(tmp_path):
    sd = official_resnet18_state()
    sd["layer2.0.conv1.coeff_out"] = torch.zeros(128, 40)
    msg = _import_error(tmp_path, sd)
    assert "layer layer2.0.conv1: coeff_in (44, 64, 2) holds bo = 44 but coeff_out (128, 40) " \
           "holds bo = 40" in msg


def test_nan_or_infinity_names_layer_and_field(tmp_path):
    sd = official_resnet18_state()
    sd["layer3.0.bn1.running_var"][5] = float("nan")
    sd["layer1.0.conv2.weight"][0, 1, 2, 0] = float("inf")
    sd["layer1.0.conv2.weight"][3, 0, 0, 0] = float("-inf")
    sd["layer1.0.conv2.weight"][4, 0, 0, 0] = float("nan")
    msg = _import_error(tmp_path, sd)
    assert "2 tensor(s) hold NaN or infinity" in msg and "cannot convert" not in msg
    assert ("layer layer1.0.conv2, field weight: 1 NaN, 2 infinite of 36864 value(s), "
            "first at index (0, 1, 2, 0)") in msg
    assert "layer layer3.0.bn1, field running_var: 1 NaN of 256 value(s), first at index (5,)" in msg


def _torchvision_resnet18_state(num_classes=1000):
    """The keys and shapes of torchvision's ImageNet ResNet-18 (7 x 7 stem, fc, downsample)."""
    sd = {"conv1.weight": torch.randn(64, 3, 7, 7)}
    bn = lambda name, c: {f"{name}.{f}": torch.ones(c) for f in  # noqa: E731
                          ("weight", "bias", "running_mean", "running_var")}
    sd.update(bn("bn1", 64))
    ci = 64
    for i, co in enumerate((64, 128, 256, 512), 1):
        for j in range(2):
            p, cin = f"layer{i}.{j}", ci if j == 0 else co
            sd[f"{p}.conv1.weight"] = torch.randn(co, cin, 3, 3)
            sd.update(bn(f"{p}.bn1", co))
            sd[f"{p}.conv2.weight"] = torch.randn(co, co, 3, 3)
            sd.update(bn(f"{p}.bn2", co))
            if j == 0 and cin != co:
                sd[f"{p}.downsample.0.weight"] = torch.randn(co, cin, 1, 1)
                sd.update(bn(f"{p}.downsample.1", co))
        ci = co
    sd["fc.weight"], sd["fc.bias"] = torch.randn(num_classes, 512), torch.zeros(num_classes)
    return sd


def test_torchvision_resnet_lists_every_missing_key_at_once(tmp_path):
    msg = _import_error(tmp_path, _torchvision_resnet18_state())
    shortcuts = [f"layer{i}.0.shortcut.{s}" for i in (2, 3, 4) for s in
                 ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var")]
    for key in ["linear.weight"] + shortcuts:
        layer, field = key.rsplit(".", 1)
        assert f"{key} (layer {layer}, field {field})" in msg, key
    assert "16 missing key(s)" in msg
    assert "fc.weight (1000, 512)" in msg and "layer2.0.downsample.0.weight (128, 64, 1, 1)" in msg
    assert "layer conv1, field weight: shape (64, 3, 7, 7), expected (64, 3, 3, 3)" in msg
    assert "looks like a torchvision ResNet" in msg


def test_import_and_train_accept_the_same_code_widths(tmp_path):
    """One range per width, from gen.contract.WIDTHS via gen.layers.setting_problem; the
    import refuses 1 bit only, naming the official code's own 1-bit quantizer."""
    from gen.contract import WIDTHS
    from gen.layers import MLGSettings

    for official, field in (("basis_bit", "qb"), ("coeff_in_bit", "qu"),
                            ("coeff_out_bit", "qv"), ("weight_bit", "qd")):
        f = next(f for f in WIDTHS if f.name == field)
        for v in range(-1, f.hi + 3):
            try:
                MLGSettings(**{field: v}).validate()
                train_ok, train_msg = True, ""
            except ValueError as e:
                train_ok, train_msg = False, str(e)
            try:
                OfficialBits(**{official: v}).validate()
                import_ok, import_msg = True, ""
            except ImportError_ as e:
                import_ok, import_msg = False, str(e)
            assert train_ok == (f.lo <= v <= f.hi), (field, v)
            assert import_ok == (train_ok and v != 1), (official, v)
            if not train_ok:
                assert f"accepted: {f.accepted}" in train_msg and train_msg.split(": ", 1)[1] in import_msg
                assert f"{official} = {v} (--{official.replace('_', '-')}, the network's {field})" in import_msg
            elif not import_ok:
                assert "own" in import_msg and f"accepted: 2..{f.hi}" in import_msg


# ---------------------------------------------------------------------------
# The official ResNet family: ResNet-34 (basic blocks), ResNet-50/101/152 (bottlenecks)

# Published conv counts (stem + blocks x convs per block + projection shortcuts).
OFFICIAL_CONVS = {34: 1 + 16 * 2 + 3, 50: 1 + 16 * 3 + 4}


@pytest.mark.parametrize("depth,num_classes,in_channels", [(34, 10, 3), (50, 100, 1)])
def test_resnet34_and_50_import_reproduce_official_weights(depth, num_classes, in_channels):
    bits = OfficialBits(3, 6, 3, 8)
    sd = official_resnet_state(depth, bi=2, bo=44, seed=3, num_classes=num_classes,
                               in_channels=in_channels)
    said = []
    model = build_from_official(sd, bits, log=said.append)
    assert model.arch == f"resnet{depth}" and said and f"resnet{depth}" in said[0]
    assert "inferred" in said[0]
    assert model.in_channels == in_channels and model.num_classes == num_classes
    n_conv, worst = 0, 0.0
    for name, m in model.named_modules():
        if not isinstance(m, (MLGConv2d, MLGLinear)):
            continue
        ref = _official_build_weight(sd, name, bits, m.out_channels, m.in_channels, m.kernel_size)
        diff = float((m.float_generated_weight().double() - ref).abs().max())
        assert diff < 1e-5, (name, diff)
        worst = max(worst, diff)
        n_conv += isinstance(m, MLGConv2d)
    assert n_conv == OFFICIAL_CONVS[depth]
    if depth == 50:   # the bottleneck's 1x1 convs and stride on the 3x3
        b = model.layer2[0]
        assert (b.conv1.kernel_size, b.conv2.kernel_size, b.conv3.kernel_size) == (1, 3, 1)
        assert (b.conv1.stride, b.conv2.stride, b.shortcut[0].stride) == (1, 2, 2)
        assert b.conv3.out_channels == 512 and model.linear.in_features == 2048
        assert model.layer1[0].shortcut[0].out_channels == 256    # stride 1, 64 -> 256


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_arch_inferred_from_the_keys(depth):
    assert infer_arch(official_resnet_state(depth, widths=(8, 8, 8, 8))
                      if depth > 50 else official_resnet_state(depth)) == (f"resnet{depth}", 0)


def test_wrong_arch_lists_every_key_at_once_and_names_the_right_one(tmp_path):
    sd = official_resnet_state(50, seed=4)
    msg = _import_error(tmp_path, sd, arch="resnet34")
    # every bottleneck's conv3 and bn3 and the stage-1 shortcut are not in a ResNet-34
    for j in range(3):
        assert f"layer1.{j}.conv3.weight" in msg and f"layer1.{j}.bn3.running_var" in msg
    assert "layer layer2.0.shortcut.0, field coeff_out: shape (512, 44), expected [Co=128, bo]" in msg
    assert "layer1.0.shortcut.0.weight" in msg          # a ResNet-34 has no stage-1 shortcut
    assert "layer layer1.0.conv1, field weight: shape (64, 64, 1, 1), expected (64, 64, 3, 3)" in msg
    assert "layer linear, field weight: shape (10, 2048), expected (10, 512)" in msg
    assert "--arch resnet50" in msg
    with pytest.raises(ImportError_, match=r"architecture 'resnet20' \(--arch\): accepted resnet18, "
                                           r"resnet34, resnet50, resnet101, resnet152"):
        build_from_official(sd, OfficialBits(), arch="resnet20")


def test_arch_given_is_said_and_saved(tmp_path):
    ckpt = _save(tmp_path, official_resnet_state(34, seed=5))
    said, logs = [], []
    out = tmp_path / "r34.pt"
    m = import_official(ckpt, OfficialBits(), out_path=out, calib_images=2, log=logs.append,
                        arch="resnet34", info=said.append)
    assert m["arch"] == "resnet34" and any("(--arch)" in line for line in said)
    data = load_model_file(out)
    assert data["arch"] == "resnet34" and data["network"].arch == "resnet34"
    assert len(data["network"].conv_layers()) == OFFICIAL_CONVS[34] + 1   # + linear


def _reduced_resnet50(seed=0, size=8):
    """A ResNet-50-shaped network (bottleneck blocks, every stage and shortcut kind: a
    stride-1 projection, identity, stride-2 projections) at reduced widths and depths,
    calibrated on synthetic images and lowered to integers."""
    from gen.importer import calibrate
    from gen.layers import MLGSettings
    from gen.lower import lower_model
    from gen.models import ResNet50

    torch.manual_seed(seed)
    model = ResNet50(MLGSettings(bi=2, bo=6, qb=3, qu=6, qv=3, qd=8), size=size,
                     widths=(4, 8, 8, 8), depths=(2, 1, 1, 1))
    x = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    calibrate(model, x)
    return model, lower_model(model), x


def test_reduced_resnet50_compiles_and_its_golden_model_runs():
    from gen.compiler import compile_network, format_report
    from gen.golden import golden_forward, quantize_input
    from tests.test_accelerator import LINK_TIMEOUT

    model, net, x = _reduced_resnet50()
    assert model.arch == "resnet50"
    result = compile_network(net, rows=4, cols=4, gen_lanes=4, link_timeout=LINK_TIMEOUT)
    rows = {r["layer"]: r for r in result.report["layers"]}
    convs = [n for n, m in model.named_modules() if isinstance(m, (MLGConv2d, MLGLinear))]
    assert sorted(rows) == sorted(convs)        # every bottleneck conv in the memory table
    for b in ("layer1.0", "layer2.0"):
        assert [rows[f"{b}.{c}"]["k"] for c in ("conv1", "conv2", "conv3", "shortcut.0")] == [1, 3, 1, 1]
    assert rows["layer2.0.conv2"]["stride"] == 2 and rows["layer2.0.shortcut.0"]["stride"] == 2
    assert rows["layer1.0.conv3"]["co"] == 16 and "layer1.1.shortcut.0" not in rows  # identity
    assert "layer1.0.conv3" in format_report(result.report)
    xi = quantize_input(net, x)
    golden = golden_forward(result.network, xi)
    assert torch.equal(golden, golden_forward(net, xi))   # buffer allocation keeps the outputs
    with torch.no_grad():
        steps = (model(x).double() / net.layers[-1].out_scale - golden.double()).abs()
    # the float model and the integers differ by the rounding of each layer only
    assert float(steps.mean()) <= 1.0 and float(steps.max()) <= 6.0


def test_reduced_resnet50_bit_exact_on_the_simulated_board():
    from gen.compiler import compile_network
    from gen.program import read_program
    from host.driver import Driver
    from host.transport import SerialTransport
    from sim.board import SimulatedBoard
    from sim.runner import simulator_available
    from tests.test_accelerator import LINK_TIMEOUT, _check_images

    if not simulator_available("verilator"):
        pytest.skip("Verilator not installed")
    _, net, _ = _reduced_resnet50()
    result = compile_network(net, rows=4, cols=4, gen_lanes=4, link_timeout=LINK_TIMEOUT)
    program = read_program(result.program, config=result.config)
    with SimulatedBoard(result.config, "verilator", fast_build=True) as board:
        with SerialTransport(board.url) as tr:
            drv = Driver(tr, timeout=30)
            drv.load_program(result.config, program)
            _check_images(drv, program, 3, seed=5)
            log = drv.layer_log()
            assert [e["macs"] for e in log] == [l.macs for l in program.network().layers]


def test_cli_says_the_inferred_arch_on_stderr_and_refuses_a_wrong_one(tmp_path, capsys):
    import json

    from mlg.cli import main

    ckpt = _save(tmp_path, official_resnet18_state(seed=6))
    bits = ["--basis-bit", "3", "--coeff-in-bit", "6", "--coeff-out-bit", "3"]
    out = tmp_path / "m.pt"
    assert main(["import", str(ckpt), "--out", str(out), *bits, "--calib-images", "2",
                 "--json"]) == 0
    cap = capsys.readouterr()
    assert "architecture resnet18 (basic blocks, 2, 2, 2, 2 per stage), inferred" in cap.err
    assert json.loads(cap.out)["arch"] == "resnet18"
    assert main(["import", str(ckpt), "--out", str(out), *bits, "--arch", "resnet50"]) == 2
    err = capsys.readouterr().err
    assert "architecture resnet50 (bottleneck blocks, 3, 4, 6, 3 per stage) (--arch)" in err
    assert "layer1.0.conv3.weight (layer layer1.0.conv3, field weight)" in err
    assert "--arch resnet18" in err
