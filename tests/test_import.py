"""``mlg import`` on checkpoints laid out as the official MLG code saves them."""

import pytest
import torch

from gen.importer import (ImportError_, OfficialBits, build_from_official, import_official,
                          read_official_checkpoint)
from gen.layers import MLGConv2d, MLGLinear
from gen.network import load_model_file
from tests.official import official_resnet18_state


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
