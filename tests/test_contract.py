"""The contract between compiler, host and RTL (gen.contract): its own consistency."""

from __future__ import annotations

import ast
import dataclasses
import re
import struct
from pathlib import Path

import pytest

import host.protocol
from gen import contract
from gen.config import AcceleratorConfig
from gen.contract import (ARG_BYTES, COUNTERS, ENGINE_COUNTS, FIXED_LENGTH, LINK_COUNTERS,
                          LOG_COUNTERS, OP_ERROR, REGION_LOG, REGION_NAMES, REGION_STREAM,
                          REQUESTS, RESPONSE, WIDTHS, channel_layout, const_bytes,
                          descriptor_fields, descriptor_layout, layer_descriptor,
                          layer_record_layout, record_bytes, region_sizes, region_words)
from gen.layers import MLGSettings
from gen.network import LayerSpec, QuantizedNetwork
from gen.program import Program
from host.protocol import pack_struct, unpack_struct

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "default": AcceleratorConfig(),
    "small": AcceleratorConfig(rows=2, cols=3, a_bits=5, w_bits=4, m_bits=9, max_ci=5, max_co=4,
                               max_k=3, max_h=6, max_w=5, max_bi=2, max_bo=4, act_buffers=3,
                               base_store_bytes=300, const_depth=20, max_layers=4),
    "compact": AcceleratorConfig(rows=4, cols=4, max_ci=16, max_co=16, max_h=8, max_w=8,
                                 compact=True, level2=False, layer_log=False, stream=False),
    "wide": AcceleratorConfig(a_bits=12, w_bits=12, m_bits=16, max_ci=512, max_co=4096,
                              max_k=7, max_h=1024, max_w=1024, base_store_bytes=1 << 24,
                              const_depth=1 << 20, act_buffers=16),
}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module or function level (relative ones resolved)."""
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = mod.split(".")[:-node.level] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
    return out


# ---- who imports whom ---------------------------------------------------------------------

def test_the_contract_imports_nothing_of_the_project():
    own = {m.split(".")[0] for m in _imports(ROOT / "gen" / "contract.py")}
    assert not own & {"gen", "host", "hw", "sim", "mlg"}


def test_host_never_imports_hw():
    for path in sorted((ROOT / "host").glob("*.py")):
        hw = sorted(m for m in _imports(path) if m.split(".")[0] == "hw")
        assert not hw, f"{path.name} imports {hw}"


# ---- layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_record_and_constant_words_hold_their_layouts(name):
    cfg = CONFIGS[name]
    for layout, nbytes in ((layer_record_layout(cfg), record_bytes(cfg)),
                           (channel_layout(cfg), const_bytes(cfg))):
        assert nbytes & (nbytes - 1) == 0, "a word is a power of two bytes"
        assert 8 * nbytes >= layout.size > 8 * nbytes // 2 - 8
    assert layer_record_layout(cfg)["desc"].shape == descriptor_layout(cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_layer_at_the_config_maxima_fits_its_descriptor_and_record(name):
    cfg = CONFIGS[name]
    fields = layer_descriptor(
        ci=cfg.max_ci, co=cfg.max_co, h=cfg.max_h, w=cfg.max_w, k=cfg.max_k, stride=3,
        pad=cfg.max_k // 2, has_l1=True, has_l2=True, bi=cfg.max_bi, bo=cfg.max_bo,
        src=cfg.act_buffers - 1, dst=cfg.act_buffers - 1, res=cfg.act_buffers - 1,
        dense_bits="qv", w_shift=cfg.w_shift_max, shift=cfg.shift_max,
        m_res=-(1 << (cfg.m_bits - 1)), relu=True)
    layout = descriptor_layout(cfg)
    assert set(fields) == {n for n, _ in layout}
    assert unpack_struct(layout, pack_struct(layout, fields)) == fields
    rec = layer_record_layout(cfg)
    streamed_len = cfg.max_co * cfg.max_ci * cfg.max_k ** 2
    word = pack_struct(rec, {"desc": pack_struct(layout, fields),
                             "code_addr": cfg.base_store_bytes - 1,
                             "code_len": max(cfg.base_store_bytes, streamed_len),
                             "const_addr": cfg.const_depth - 1, "streamed": 1})
    assert word < 1 << (8 * record_bytes(cfg))
    with pytest.raises(ValueError, match="field ci"):
        pack_struct(layout, {**fields, "ci": 1 << layout["ci"].width})


def test_layer_descriptor_maps_a_layer_spec_and_zeroes_unused_levels():
    conv = LayerSpec(name="c", op="conv", ci=3, co=5, h=4, w=4, k=3, pad=1, bi=0, bo=5,
                     src=1, dst=2, res=0, relu=True, w_shift=2, shift=9, m_res=-3)
    f = descriptor_fields(conv)
    assert (f["op"], f["relu"], f["has_res"], f["res"], f["co"]) == (0, 1, 1, 0, 5)
    assert (f["has_l1"], f["has_l2"], f["bi"], f["bo"]) == (0, 0, 0, 0)
    pool = LayerSpec(name="p", op="pool", ci=6, co=6, h=2, w=2, src=2, dst=3)
    f = descriptor_fields(pool)
    assert (f["op"], f["co"], f["has_res"], f["res"]) == (1, 6, 0, 0)
    assert layer_descriptor(ci=2, co=9, op="pool")["co"] == 2
    assert layer_descriptor(ci=2, co=9, dense_bits="qb")["dense_bits"] == 1


# ---- requests, regions, counters ----------------------------------------------------------

def _spec_table() -> dict[str, list[tuple[str, str]]]:
    """The request table of host.protocol's specification: name -> [(field, type)]."""
    doc = host.protocol.__doc__
    table = doc[doc.index("opcode   request payload"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if line.startswith("===="):
            break
        name, request = line[:9].strip(), line[9:52].strip()
        fields = [] if request == "(none)" else [f.strip().split() for f in request.split(",")]
        rows[name] = [(f[0], f[1] if len(f) > 1 else "") for f in fields]
    return rows


def test_request_table_matches_the_protocol_specification():
    sizes = {"u8": 1, "u16": 2, "u32": 4}
    spec = _spec_table()
    assert set(spec) == {r.name for r in REQUESTS.values()}
    for r in REQUESTS.values():
        args = [(f, t) for f, t in spec[r.name] if f != "data"]
        assert [(f, sizes[t]) for f, t in args] == list(r.args)
        assert r.data == any(f == "data" for f, _ in spec[r.name])


def test_error_codes_are_distinct_and_named():
    codes = {name: getattr(contract, name) for name in contract.__all__
             if name.startswith("ERR_") and name not in ("ERR_DESCRIPTOR", "ERR_WEIGHTS",
                                                         "ERR_ABORTED")}
    assert len(set(codes.values())) == len(codes)
    assert set(codes.values()) == set(contract.ERRORS)
    assert all(contract.ERRORS.values())


def test_frame_header_holds_sync_op_len_and_tag():
    # SYNC, OP and TAG a byte each, LEN a u16; a tag is one byte.
    assert contract.HEADER_BYTES == 1 + 1 + 2 + 1
    assert contract.TAGS == 256
    assert host.protocol.encode_frame(0x05, b"", contract.TAGS - 1)[contract.HEADER_BYTES - 1] == 0xFF


def test_request_table_is_consistent():
    ops = set(REQUESTS)
    assert all(0 < op < RESPONSE for op in ops) and OP_ERROR not in ops
    assert not {op | RESPONSE for op in ops} & (ops | {OP_ERROR})
    for op, r in REQUESTS.items():
        assert struct.calcsize(r.arg_format) == r.arg_bytes
        assert ARG_BYTES.get(op, 0) == r.arg_bytes
        assert (op in FIXED_LENGTH) != r.data


@pytest.mark.parametrize("name", CONFIGS)
def test_regions_are_whole_words(name):
    cfg = CONFIGS[name]
    sizes, words = region_sizes(cfg), region_words(cfg)
    assert set(words) == set(REGION_NAMES)
    assert REGION_STREAM not in sizes and (REGION_LOG in sizes) == cfg.layer_log
    for region, size in sizes.items():
        assert size > 0 and size % words[region] == 0


def test_counter_tables():
    assert len(set(COUNTERS)) == len(COUNTERS)
    assert len(LOG_COUNTERS) & (len(LOG_COUNTERS) - 1) == 0
    assert LOG_COUNTERS[0] == "cycles"
    assert set(LINK_COUNTERS) <= set(COUNTERS) and set(ENGINE_COUNTS) <= set(LOG_COUNTERS)
    assert not set(LINK_COUNTERS) & set(LOG_COUNTERS)


def test_host_protocol_re_exports_the_contract():
    for name in host.protocol.__all__:
        if hasattr(contract, name):
            assert getattr(host.protocol, name) is getattr(contract, name), name


# ---- widths -------------------------------------------------------------------------------

def _settings(**w):
    MLGSettings(**w).validate()


def _network(**w):
    widths = {**contract.widths_of(AcceleratorConfig()), **w}
    QuantizedNetwork(arch="t", input_shape=(1, 1, 1), input_scale=1.0, num_classes=1,
                     **widths).validate()


def _program(**w):
    widths = {**contract.widths_of(AcceleratorConfig()), **w}
    Program(version=1, config_digest=bytes(32), **widths, input_shape=(1, 1, 1), num_classes=1,
            input_scale=1.0, output_scale=1.0)


def _config(**w):
    AcceleratorConfig(**w)


HOLDERS = {"MLGSettings": _settings, "QuantizedNetwork": _network, "Program": _program,
           "AcceleratorConfig": _config}


def test_the_four_holders_declare_the_width_fields_in_order():
    names = [f.name for f in WIDTHS]
    for cls in (MLGSettings, QuantizedNetwork, Program, AcceleratorConfig):
        own = [f.name for f in dataclasses.fields(cls)]
        start = own.index(names[0])
        assert own[start:start + len(names)] == names, cls.__name__
    defaults = {f.name: f.default for f in WIDTHS}
    assert contract.widths_of(MLGSettings()) == contract.widths_of(AcceleratorConfig()) == defaults


@pytest.mark.parametrize("holder", HOLDERS)
@pytest.mark.parametrize("field", WIDTHS, ids=lambda f: f.name)
def test_every_holder_enforces_the_one_range(holder, field):
    make = HOLDERS[holder]
    if field.choices is not None:
        for ok in field.choices:
            make(**{field.name: ok})
        bad = ["even", 1]
    else:
        make(**{field.name: field.lo})
        # (2-bit codes: MLGSettings needs a symmetric level for decode "signed"; odd here.)
        make(**{field.name: field.hi})
        bad = [field.lo - 1, field.hi + 1, "3"]
    for value in bad:
        with pytest.raises(ValueError, match=rf"\b{field.name} = {re.escape(repr(value))}"):
            make(**{field.name: value})

