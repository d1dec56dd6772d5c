"""The binary layer program: round trip, golden equivalence, size and every error path."""

import math
import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st
import torch

from gen.config import AcceleratorConfig
from gen.contract import WIDTHS, widths_of
from gen.golden import golden_forward
from gen.integer import generate_w2, decode_codes, pool_multiplier, w2_shift
from gen.network import LayerSpec, QuantizedNetwork
from gen.program import (ABSENT, CRC_SIZE, DESCRIPTOR_FORMAT, DESCRIPTOR_SIZE, HEADER_FORMAT,
                         HEADER_SIZE, PROGRAM_VERSION, ProgramError, load_program,
                         read_program, save_program, write_program)

# Byte offsets of descriptor fields, as the module docstring specifies them.
D_OFF = {"op": 0, "flags": 1, "k": 2, "stride": 3, "pad": 4, "src": 5, "dst": 6, "res": 7,
         "w_shift": 8, "shift": 9, "ci": 10, "co": 12, "h": 14, "w": 16, "bi": 18, "bo": 20,
         "m_res": 22, "off_B": 26, "off_U": 30, "off_V": 34, "off_mult": 38, "off_bias": 42}
H_DATA_BITS = 90  # header offset of the data size in bits
H_WIDTHS = 42     # header offset of the eight width bytes

CFG = AcceleratorConfig()
CFG_SIGNED = AcceleratorConfig(decode="signed", qb=2, qu=5, qv=4, qd=7, m_bits=12)


def randcodes(gen, shape, bits):
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64)


def randsigned(gen, shape, bits):
    lo = -(1 << (bits - 1))
    return torch.randint(lo, -lo, shape, generator=gen, dtype=torch.int64)


def make_net(cfg, layers, shape=(3, 6, 6), classes=10):
    return QuantizedNetwork(
        arch="test", input_shape=shape, input_scale=0.0173, num_classes=classes,
        **widths_of(cfg), layers=layers)


def conv(gen, cfg, name, ci, co, h, w, k=3, l1=False, l2=False, bi=2, bo=4, **kw):
    """A conv layer with random codes; ``bo = co`` without level 2."""
    kk = k * k
    if not l2:
        bo = co
    dense = not l1 and not l2
    b = randcodes(gen, (bo, bi if l1 else ci, kk), cfg.qd if dense else cfg.qb)
    u = randcodes(gen, (bo, ci, bi), cfg.qu) if l1 else None
    v = randcodes(gen, (co, bo), cfg.qv) if l2 else None
    layer = LayerSpec(name=name, op="conv", ci=ci, co=co, h=h, w=w, k=k, pad=k // 2,
                      bi=bi if l1 else 0, bo=bo, b=b, u=u, v=v,
                      mult=randsigned(gen, (co,), cfg.m_bits),
                      bias=torch.randint(-(1 << 20), 1 << 20, (co,), generator=gen), **kw)
    if "w_shift" not in kw:
        bits_b = cfg.qd if dense else cfg.qb
        w2 = generate_w2(decode_codes(b, bits_b, cfg.decode),
                         decode_codes(u, cfg.qu, cfg.decode) if l1 else None,
                         decode_codes(v, cfg.qv, cfg.decode) if l2 else None)
        layer.w_shift = w2_shift(w2, cfg.w_bits)
    return layer


def pool(gen, cfg, name, c, h, w, **kw):
    m, sh = pool_multiplier(h * w, cfg.m_bits)
    return LayerSpec(name=name, op="pool", ci=c, co=c, h=h, w=w, mult=torch.full((c,), m),
                     bias=torch.zeros(c, dtype=torch.int64), shift=sh, **kw)


def all_kinds_net(cfg, seed=0):
    """One layer of every kind; extreme mult/bias values in the first layer."""
    g = torch.Generator().manual_seed(seed)
    layers = [
        conv(g, cfg, "dense", 3, 5, 6, 6, src=0, dst=1, relu=True, shift=20),
        conv(g, cfg, "level1", 5, 6, 6, 6, l1=True, bi=2, src=1, dst=2, shift=7, stride=2),
        conv(g, cfg, "level2", 6, 7, 3, 3, l2=True, bo=3, src=2, dst=3, res=1, m_res=-77,
             shift=13),
        conv(g, cfg, "both", 7, 8, 3, 3, l1=True, l2=True, bi=1, bo=5, src=3, dst=0, res=2,
             m_res=(1 << (cfg.m_bits - 1)) - 1, relu=True, k=1),
        pool(g, cfg, "pool", 8, 3, 3, src=0, dst=1),
    ]
    lo_m, hi_m = -(1 << (cfg.m_bits - 1)), (1 << (cfg.m_bits - 1)) - 1
    lo_b, hi_b = -(1 << (cfg.bias_bits - 1)), (1 << (cfg.bias_bits - 1)) - 1
    layers[0].mult[:2] = torch.tensor([lo_m, hi_m])
    layers[0].bias[:3] = torch.tensor([lo_b, hi_b, -1])
    layers[-1].out_scale = 0.25
    return make_net(cfg, layers)


def golden_net(cfg, seed=1):
    """A consistent little network: conv 3x3 -> conv 3x3 + residual -> pool -> 1x1 classifier."""
    g = torch.Generator().manual_seed(seed)
    c1 = conv(g, cfg, "c1", 3, 8, 8, 8, l1=True, l2=True, bi=2, bo=4, src=0, dst=1, relu=True)
    c2 = conv(g, cfg, "c2", 8, 8, 8, 8, l1=True, bi=2, src=1, dst=2, res=1, relu=True)
    p = pool(g, cfg, "pool", 8, 8, 8, src=2, dst=3)
    fc = conv(g, cfg, "fc", 8, 10, 1, 1, k=1, src=3, dst=1)
    for layer, mlo, mhi, shift in ((c1, 1 << 10, 1 << 13, 22), (c2, 1 << 10, 1 << 13, 23),
                                   (fc, 1 << 11, 1 << 14, 20)):
        layer.mult = torch.randint(mlo, mhi, (layer.co,), generator=g)
        layer.bias = torch.randint(-(1 << (shift + 3)), 1 << (shift + 3), (layer.co,),
                                   generator=g)
        layer.shift = shift
    c2.m_res = 3 << 9
    fc.out_scale = 0.125
    net = make_net(cfg, [c1, c2, p, fc], shape=(3, 8, 8))
    net.validate("golden test net")
    return net


def fix_crc(data: bytes) -> bytes:
    body = data[:-CRC_SIZE]
    return body + struct.pack("<I", zlib.crc32(body))


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    """Overwrite one field and recompute the CRC, so only that field is wrong."""
    buf = bytearray(data)
    struct.pack_into("<" + fmt, buf, offset, value)
    return fix_crc(bytes(buf))


def desc_offset(i: int, fld: str) -> int:
    return HEADER_SIZE + i * DESCRIPTOR_SIZE + D_OFF[fld]


@pytest.fixture(scope="module")
def prog_bytes():
    return write_program(all_kinds_net(CFG), CFG)


# ---------------------------------------------------------------------------
# Format


def test_struct_layout_matches_spec():
    assert struct.calcsize(HEADER_FORMAT) == HEADER_SIZE == 94
    assert struct.calcsize(DESCRIPTOR_FORMAT) == DESCRIPTOR_SIZE == 46
    # Every documented descriptor offset holds the field it names.
    values = list(range(1, 11)) + [1000 + i for i in range(6)] + [-123456] + \
        [10 ** 6 + i for i in range(5)]
    raw = struct.pack(DESCRIPTOR_FORMAT, *values)
    fmts = ["B"] * 10 + ["H"] * 6 + ["i"] + ["I"] * 5
    for (name, off), fmt, v in zip(D_OFF.items(), fmts, values):
        assert struct.unpack_from("<" + fmt, raw, off)[0] == v, name


def test_header_fields(prog_bytes):
    net = all_kinds_net(CFG)
    assert prog_bytes[:4] == b"MLGP"
    assert struct.unpack_from("<HH", prog_bytes, 4) == (PROGRAM_VERSION, HEADER_SIZE)
    assert prog_bytes[8:40] == CFG.digest
    hdr = struct.unpack_from(HEADER_FORMAT, prog_bytes)
    assert hdr[4] == len(net.layers)
    assert hdr[5:13] == (8, 8, 16, 3, 6, 3, 8, 1)
    assert hdr[13:17] == (3, 6, 6, 10)
    assert hdr[17:19] == (0.0173, 0.25)
    table_off, table_size, data_off, data_bytes, data_bits = hdr[19:24]
    assert table_off == HEADER_SIZE and table_size == 5 * DESCRIPTOR_SIZE
    assert data_off == table_off + table_size and data_bytes == math.ceil(data_bits / 8)
    assert len(prog_bytes) == data_off + data_bytes + CRC_SIZE
    assert struct.unpack("<I", prog_bytes[-4:])[0] == zlib.crc32(prog_bytes[:-4])


def test_data_stream_is_contiguous_lsb_first(prog_bytes):
    """Tensors follow each other bit for bit; the first B code sits in the low bits."""
    net = all_kinds_net(CFG)
    widths = []
    for layer in net.layers:
        widths += [(t.numel(), bits) for _, t, bits in layer.code_tensors(net)]
        widths += [(layer.co, CFG.m_bits), (layer.co, CFG.bias_bits)]
    offs = []
    for i, layer in enumerate(net.layers):
        for name in ("B", "U", "V", "mult", "bias"):
            off = struct.unpack_from("<I", prog_bytes, desc_offset(i, "off_" + name))[0]
            if off != ABSENT:
                offs.append(off)
    expect = [0]
    for n, bits in widths[:-1]:
        expect.append(expect[-1] + n * bits)
    assert offs == expect
    data_off = HEADER_SIZE + 5 * DESCRIPTOR_SIZE
    first = net.layers[0].b.reshape(-1)
    assert prog_bytes[data_off] == int(first[0])          # qd = 8: one code per byte
    assert prog_bytes[data_off + 1] == int(first[1])
    # Pool: no codes; mult and bias present.
    assert [struct.unpack_from("<I", prog_bytes, desc_offset(4, "off_" + n))[0] == ABSENT
            for n in ("B", "U", "V", "mult", "bias")] == [True, True, True, False, False]


# ---------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("cfg", [CFG, CFG_SIGNED], ids=["odd", "signed"])
@pytest.mark.parametrize("with_config", [True, False])
def test_round_trip(cfg, with_config):
    net = all_kinds_net(cfg, seed=3)
    prog = read_program(write_program(net, cfg), config=cfg if with_config else None)
    assert prog.version == PROGRAM_VERSION and prog.config_digest == cfg.digest
    assert (prog.a_bits, prog.w_bits, prog.m_bits, prog.qb, prog.qu, prog.qv, prog.qd,
            prog.decode) == (cfg.a_bits, cfg.w_bits, cfg.m_bits, cfg.qb, cfg.qu, cfg.qv,
                             cfg.qd, cfg.decode)
    assert prog.input_shape == net.input_shape and prog.num_classes == net.num_classes
    assert prog.input_scale == net.input_scale and prog.output_scale == net.output_scale
    assert len(prog.layers) == len(net.layers)
    for i, (a, b) in enumerate(zip(net.layers, prog.layers)):
        assert b.name == f"layer{i}"
        for f in ("op", "ci", "co", "h", "w", "k", "stride", "pad", "bi", "bo", "src", "dst",
                  "res", "relu", "w_shift", "shift", "m_res"):
            assert getattr(a, f) == getattr(b, f), (a.name, f)
        for f in ("b", "u", "v", "mult", "bias"):
            ta, tb = getattr(a, f), getattr(b, f)
            assert (ta is None) == (tb is None), (a.name, f)
            if ta is not None:
                assert tb.dtype == torch.int64 and tb.shape == ta.shape
                assert torch.equal(ta, tb), (a.name, f)
    rebuilt = prog.network()
    assert rebuilt.arch == "program" and rebuilt.output_scale == net.output_scale
    assert all(l.in_scale == 1.0 for l in rebuilt.layers)
    assert [l.out_scale for l in rebuilt.layers] == [1.0] * 4 + [net.output_scale]
    # Writing the rebuilt network gives the same bytes.
    assert write_program(rebuilt, cfg) == write_program(net, cfg)


def test_golden_equality():
    net = golden_net(CFG)
    prog = read_program(write_program(net, CFG), config=CFG)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-128, 128, (6, 3, 8, 8), generator=g)
    want = golden_forward(net, x)
    got = golden_forward(prog.network(), x)
    assert want.shape == (6, 10)
    assert len(set(want.reshape(-1).tolist())) > 5  # not saturated to a constant
    assert torch.equal(want, got)
    # Every intermediate buffer too.
    bufs_a = golden_forward(net, x, keep=True)
    bufs_b = golden_forward(prog.network(), x, keep=True)
    assert bufs_a.keys() == bufs_b.keys()
    assert all(torch.equal(bufs_a[k], bufs_b[k]) for k in bufs_a)


def test_save_load(tmp_path):
    net = golden_net(CFG)
    path = tmp_path / "program.bin"
    data = save_program(path, net, CFG)
    assert path.read_bytes() == data
    prog = load_program(path, config=CFG)
    assert torch.equal(prog.layers[0].b, net.layers[0].b)


# ---------------------------------------------------------------------------
# Size


@pytest.mark.parametrize("cfg", [CFG, CFG_SIGNED], ids=["odd", "signed"])
def test_size(cfg):
    net = all_kinds_net(cfg)
    data = write_program(net, cfg)
    prog = read_program(data)
    rep = prog.size_report()
    info = sum(t.numel() * bits for l in net.layers for _, t, bits in l.code_tensors(net))
    info += sum(l.co * (cfg.m_bits + cfg.bias_bits) for l in net.layers)
    assert rep["info_bits"] == info == prog.data_bits
    assert rep["header"] == HEADER_SIZE and rep["crc"] == 4
    assert rep["descriptor_table"] == len(net.layers) * DESCRIPTOR_SIZE
    assert rep["data"] == math.ceil(info / 8)
    assert rep["total"] == len(data) == (rep["header"] + rep["descriptor_table"] + rep["data"]
                                         + rep["crc"])
    assert rep["total"] <= (1.01 * math.ceil(info / 8) + HEADER_SIZE
                            + rep["descriptor_table"] + CRC_SIZE)


# ---------------------------------------------------------------------------
# Read errors


def test_flip_any_byte_is_a_crc_error(prog_bytes):
    read_program(prog_bytes)  # intact: fine
    for pos in range(4, len(prog_bytes)):  # from the version field on
        buf = bytearray(prog_bytes)
        buf[pos] ^= 0xFF
        with pytest.raises(ProgramError) as e:
            read_program(bytes(buf), source="prog.bin")
        msg = str(e.value)
        assert msg.startswith("prog.bin: CRC mismatch: stored 0x"), (pos, msg)
        assert "computed 0x" in msg


def test_flip_in_data_reports_stored_and_computed(prog_bytes):
    buf = bytearray(prog_bytes)
    buf[HEADER_SIZE + 5 * DESCRIPTOR_SIZE + 3] ^= 0x10
    with pytest.raises(ProgramError) as e:
        read_program(bytes(buf))
    stored = struct.unpack("<I", prog_bytes[-4:])[0]
    computed = zlib.crc32(bytes(buf[:-4]))
    assert f"stored {stored:#010x}, computed {computed:#010x}" in str(e.value)


@pytest.mark.parametrize("cut", [0, 3, 5, 40, HEADER_SIZE + 3, HEADER_SIZE + 60,
                                 HEADER_SIZE + 5 * DESCRIPTOR_SIZE + 7, -5, -1])
def test_truncated(prog_bytes, cut):
    data = prog_bytes[:cut]
    with pytest.raises(ProgramError) as e:
        read_program(data, source="p.bin")
    msg = str(e.value)
    assert msg.startswith("p.bin: truncated:") and f"{len(data)} bytes" in msg
    if len(data) >= HEADER_SIZE + CRC_SIZE:
        assert f"expected {len(prog_bytes)}" in msg
    else:
        assert "expected at least" in msg


def test_trailing_bytes(prog_bytes):
    with pytest.raises(ProgramError, match=f"expected {len(prog_bytes)} .3 trailing bytes"):
        read_program(prog_bytes + b"\0\0\0")


def test_bad_magic(prog_bytes):
    with pytest.raises(ProgramError) as e:
        read_program(b"ELF\x7f" + prog_bytes[4:], source="x.bin")
    msg = str(e.value)
    assert msg.startswith("x.bin: bad magic") and "ELF" in msg and "b'MLGP'" in msg


def test_unsupported_version(prog_bytes):
    data = patch(prog_bytes, 4, "H", 2)
    read_crc = struct.unpack("<I", data[-4:])[0]
    assert read_crc == zlib.crc32(data[:-4])  # only the version is wrong
    with pytest.raises(ProgramError, match=r"^program: version 2 unsupported; "
                                           r"this reader accepts 1$"):
        read_program(data)
    with pytest.raises(ProgramError, match="version 7 unsupported; this reader accepts 1"):
        read_program(patch(prog_bytes, 4, "H", 7))


@pytest.mark.parametrize("bit", range(16))
def test_flipped_version_bit_is_a_crc_error_not_an_unsupported_version(prog_bytes, bit):
    """The CRC is checked before the version: a damaged version field is a damaged file."""
    buf = bytearray(prog_bytes)
    struct.pack_into("<H", buf, 4, struct.unpack_from("<H", buf, 4)[0] ^ (1 << bit))
    version = struct.unpack_from("<H", buf, 4)[0]
    with pytest.raises(ProgramError) as e:
        read_program(bytes(buf), source="p.bin")
    msg = str(e.value)
    assert msg.startswith("p.bin: CRC mismatch: stored 0x") and "unsupported" not in msg
    assert f"its version field reads {version}, this reader accepts 1" in msg


@pytest.mark.parametrize("field", [f for f in WIDTHS if f.choices is None],
                         ids=lambda f: f.name)
def test_header_width_out_of_range(prog_bytes, field):
    at = H_WIDTHS + [f.name for f in WIDTHS].index(field.name)
    for value in (field.lo - 1, field.hi + 1):
        with pytest.raises(ProgramError, match=rf"^program: header field {field.name} = {value} "
                                               rf"is out of range; accepted: {field.lo}\.\.{field.hi}$"):
            read_program(patch(prog_bytes, at, "B", value))


def test_header_decode_out_of_range(prog_bytes):
    with pytest.raises(ProgramError, match=r"header field decode = 2 out of range; accepted 0\.\.1"):
        read_program(patch(prog_bytes, H_WIDTHS + len(WIDTHS) - 1, "B", 2))


@pytest.mark.parametrize("layer,fld,fmt,value,config,needle", [
    (1, "k", "B", 4, None, "layer 1 descriptor field k = 4 out of range; accepted 1, 3, 5, 7"),
    (1, "k", "B", 5, CFG, "layer 1 descriptor field k = 5 out of range; accepted 1, 3"),
    (0, "src", "B", 9, CFG, "layer 0 descriptor field src = 9 out of range; accepted 0..3"),
    (2, "dst", "B", 16, None, "layer 2 descriptor field dst = 16 out of range; accepted 0..15"),
    (0, "op", "B", 2, None, "layer 0 descriptor field op = 2 out of range; accepted 0 (conv)"),
    (3, "flags", "B", 0x1F, None, "layer 3 descriptor field flags = 0x1f out of range"),
    (0, "res", "B", 2, None, "layer 0 descriptor field res = 2 out of range; accepted 0..0 "
                             "(no residual flag)"),
    (2, "w_shift", "B", CFG.w_shift_max + 1, CFG,
     f"layer 2 descriptor field w_shift = {CFG.w_shift_max + 1} out of range; "
     f"accepted 0..{CFG.w_shift_max}"),
    (1, "shift", "B", 200, None, "layer 1 descriptor field shift = 200 out of range; "
                                 "accepted 0..62"),
    (0, "ci", "H", 0, None, "layer 0 descriptor field ci = 0 out of range; accepted 1..65535"),
    (0, "ci", "H", 65, CFG, "layer 0 descriptor field ci = 65 out of range; accepted 1..64"),
    (1, "bi", "H", 3, CFG, "layer 1 descriptor field bi = 3 out of range; accepted 1..2"),
    (0, "bo", "H", 4, None, "layer 0 descriptor field bo = 4 out of range; accepted 5..5 "
                            "(bo = co without level 2)"),
    (0, "m_res", "i", 1 << 15, None, "layer 0 descriptor field m_res = 32768 out of range; "
                                     "accepted -32768..32767"),
    (4, "k", "B", 3, None, "layer 4 descriptor field k = 3 out of range; accepted 1..1 (pool)"),
    (4, "off_B", "I", 0, None, "layer 4 descriptor field B offset = 0 out of range; "
                               "accepted 0xffffffff (this layer has no B)"),
])
def test_descriptor_out_of_range(prog_bytes, layer, fld, fmt, value, config, needle):
    data = patch(prog_bytes, desc_offset(layer, fld), fmt, value)
    with pytest.raises(ProgramError) as e:
        read_program(data, source="d.bin", config=config)
    assert str(e.value).startswith("d.bin: ") and needle in str(e.value)


def test_missing_tensor(prog_bytes):
    data = patch(prog_bytes, desc_offset(1, "off_U"), "I", ABSENT)
    with pytest.raises(ProgramError, match="layer 1 descriptor: U is absent but a conv layer"):
        read_program(data)


def test_bit_offset_past_data(prog_bytes):
    data_bits = struct.unpack_from("<I", prog_bytes, H_DATA_BITS)[0]
    data = patch(prog_bytes, desc_offset(0, "off_mult"), "I", data_bits - 10)
    with pytest.raises(ProgramError) as e:
        read_program(data, config=CFG)
    msg = str(e.value)
    assert f"layer 0 mult at bit offset {data_bits - 10} (5 x 16 bits)" in msg
    assert f"past the data section of {data_bits} bits" in msg


def test_bias_width_mismatch(prog_bytes):
    other = AcceleratorConfig()
    data_bits = struct.unpack_from("<I", prog_bytes, H_DATA_BITS)[0]
    data = patch(prog_bytes, desc_offset(4, "off_bias"), "I", data_bits - 8 * 40)
    with pytest.raises(ProgramError, match=rf"layer 4 bias spans 320 bits .* expected 8 x "
                                           rf"{other.bias_bits} \(config bias_bits\)"):
        read_program(data, config=other)


def test_config_digest_mismatch(prog_bytes):
    other = AcceleratorConfig(rows=4)
    with pytest.raises(ProgramError) as e:
        read_program(prog_bytes, source="b/program.bin", config=other)
    assert str(e.value) == (f"b/program.bin: built for config {CFG.digest.hex()[:8]} but the "
                            f"accelerator config is {other.digest.hex()[:8]}")
    read_program(prog_bytes, config=AcceleratorConfig())  # an equal config is accepted


def test_load_names_path(tmp_path, prog_bytes):
    path = tmp_path / "broken.bin"
    path.write_bytes(prog_bytes[:-1])
    with pytest.raises(ProgramError, match=f"^{path}: truncated"):
        load_program(path)
    with pytest.raises(ProgramError, match=f"^{tmp_path / 'absent.bin'}: cannot read program"):
        load_program(tmp_path / "absent.bin")
    path.write_bytes(prog_bytes)
    with pytest.raises(ProgramError, match=f"^{path}: built for config"):
        load_program(path, config=AcceleratorConfig(cols=4))


# ---------------------------------------------------------------------------
# Write errors


def _edit(fn):
    net = all_kinds_net(CFG)
    fn(net)
    return net


@pytest.mark.parametrize("edit,needle", [
    (lambda n: n.layers[0].mult.__setitem__(3, 1 << 15),
     "layer 'dense', field mult: value 32768 does not fit 16 bits signed; "
     "accepted -32768..32767"),
    (lambda n: n.layers[1].bias.__setitem__(0, -(1 << 41) - 1),
     f"layer 'level1', field bias: value {-(1 << 41) - 1} does not fit 42 bits signed"),
    (lambda n: n.layers[2].b.__setitem__((0, 0, 0), 8),
     "layer 'level2', field B: value 8 does not fit 3 bits unsigned; accepted 0..7"),
    (lambda n: n.layers[0].b.__setitem__((0, 0, 0), -1),
     "layer 'dense', field B: value -1 does not fit 8 bits unsigned"),
    (lambda n: setattr(n.layers[1], "src", 4),
     "layer 'level1', field src: value 4 out of range; accepted 0..3"),
    (lambda n: setattr(n.layers[3], "w_shift", CFG.w_shift_max + 1),
     f"layer 'both', field w_shift: value {CFG.w_shift_max + 1} out of range; "
     f"accepted 0..{CFG.w_shift_max}"),
    (lambda n: setattr(n.layers[3], "shift", CFG.shift_max + 1),
     f"field shift: value {CFG.shift_max + 1} out of range; accepted 0..{CFG.shift_max}"),
    (lambda n: setattr(n.layers[2], "m_res", -(1 << 15) - 1),
     "layer 'level2', field m_res: value -32769 out of range; accepted -32768..32767"),
    (lambda n: setattr(n.layers[0], "co", 70000),
     "layer 'dense', field co: value 70000 out of range; accepted 1..64"),
    (lambda n: setattr(n.layers[1], "u", n.layers[1].u[:, :, :1]),
     "layer 'level1', field U: shape (6, 5, 1), expected (6, 5, 2)"),
    (lambda n: setattr(n.layers[4], "b", torch.zeros(8, 8, 1, dtype=torch.int64)),
     "layer 'pool', field B: a pool layer has no codes"),
    (lambda n: setattr(n.layers[0], "mult", n.layers[0].mult.double()),
     "layer 'dense', field mult: expected an integer tensor"),
])
def test_write_errors(edit, needle):
    with pytest.raises(ProgramError) as e:
        write_program(_edit(edit), CFG)
    assert str(e.value).startswith("cannot write program: ") and needle in str(e.value)


def test_write_config_mismatch():
    with pytest.raises(ProgramError, match="network qb = 3 but the accelerator config has "
                                           "qb = 4"):
        write_program(all_kinds_net(CFG), AcceleratorConfig(qb=4))
    with pytest.raises(ProgramError, match="the network has no layers"):
        write_program(make_net(CFG, []), CFG)


@pytest.mark.parametrize("feature,layer,needle", [
    ("level2", "level2", "layer 'level2', field v: needs level2"),
    ("residual", "level2", "layer 'level2', field res: needs residual"),
    ("pool", "pool", "layer 'pool', field op: needs pool"),
])
def test_write_refuses_a_layer_feature_the_config_leaves_out(feature, layer, needle):
    lean = AcceleratorConfig(**{feature: False})
    with pytest.raises(ProgramError) as e:
        write_program(all_kinds_net(lean), lean)
    assert needle in str(e.value) and f"({feature} = false)" in str(e.value)


@pytest.mark.parametrize("feature,needle", [
    ("level2", "layer 2 descriptor field flags = 0x0c needs level2"),
    ("residual", "layer 2 descriptor field flags = 0x0c needs residual"),
    ("pool", "layer 4 descriptor field op = 1 needs pool"),
])
def test_read_refuses_a_layer_feature_the_config_leaves_out(prog_bytes, feature, needle):
    # A program that claims the lean config (its digest) but has every layer kind.
    lean = AcceleratorConfig(**{feature: False})
    data = fix_crc(prog_bytes[:8] + lean.digest + prog_bytes[8 + len(lean.digest):])
    read_program(data)  # well formed on its own
    with pytest.raises(ProgramError) as e:
        read_program(data, source="p.bin", config=lean)
    assert str(e.value).startswith("p.bin: ") and needle in str(e.value)
    assert f"which the accelerator config leaves out ({feature} = false)" in str(e.value)


# ---------------------------------------------------------------------------
# Fuzzing: whatever the bytes, the reader returns a checked program or raises
# ProgramError naming the problem; nothing else escapes it.

_FUZZ_BASE = write_program(all_kinds_net(CFG), CFG)


def _recrc(body: bytes) -> bytes:
    return fix_crc(body + bytes(CRC_SIZE))


def _read_or_program_error(data: bytes):
    try:
        prog = read_program(data, source="fuzz.bin", config=CFG)
    except ProgramError as e:
        assert str(e).startswith("fuzz.bin"), e
        return None
    assert prog.n_layers >= 1
    return prog


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_BASE) - CRC_SIZE - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_fuzz_byte_edits_with_a_valid_crc(edits):
    body = bytearray(_FUZZ_BASE[:-CRC_SIZE])
    for pos, value in edits:
        body[pos] = value
    _read_or_program_error(_recrc(bytes(body)))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_FUZZ_BASE) - CRC_SIZE), st.binary(max_size=64), st.booleans())
def test_fuzz_cut_and_splice_with_a_valid_crc(pos, junk, cut):
    body = _FUZZ_BASE[:-CRC_SIZE]
    body = body[:pos] + junk + (b"" if cut else body[pos:])
    _read_or_program_error(_recrc(body))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data):
    _read_or_program_error(data)
    _read_or_program_error(b"MLGP" + data)
