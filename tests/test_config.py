import hashlib
import json

import pytest

from gen.config import OPTIONAL_FIELDS, AcceleratorConfig, ConfigError, clog2


def test_defaults_valid_and_derived_widths():
    c = AcceleratorConfig()
    assert c.b_value_bits == 4 and c.u_value_bits == 7 and c.v_value_bits == 4  # odd: q + 1
    assert c.w1_bits == 4 + 7 + clog2(c.max_bi)
    assert c.w2_bits == c.w1_bits + 4 + clog2(c.max_bo)
    assert c.acc_bits == c.a_bits + c.w_bits + clog2(c.max_ci * 9)
    assert c.post_bits == c.acc_bits + c.m_bits + 1
    s = AcceleratorConfig(decode="signed")
    assert s.b_value_bits == 3


def test_json_round_trip_and_hash():
    c = AcceleratorConfig(rows=4, cols=16, qb=2, decode="signed")
    d = AcceleratorConfig.from_json(c.to_json())
    assert d == c and d.digest == c.digest and len(c.digest) == 32
    assert AcceleratorConfig(rows=5).digest != c.digest


def test_frozen():
    with pytest.raises(Exception):
        AcceleratorConfig().rows = 3


@pytest.mark.parametrize("field,value,needle", [
    ("rows", 1, "rows = 1"), ("cols", 100, "cols = 100"), ("qb", 0, "qb = 0"), ("qv", 9, "qv = 9"),
    ("decode", "gray", "decode"), ("max_k", 4, "max_k = 4"), ("a_bits", 1, "a_bits"),
    ("rows", 2.5, "integer"),
])
def test_validation_names_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        AcceleratorConfig(**{field: value})


def test_from_dict_unknown_and_missing(tmp_path):
    d = AcceleratorConfig().to_dict()
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        AcceleratorConfig.from_dict({**d, "bogus": 1})
    del d["rows"]
    with pytest.raises(ConfigError, match="missing field.*rows"):
        AcceleratorConfig.from_dict(d)
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=str(p)):
        AcceleratorConfig.load(p)
    p.write_text(json.dumps({**AcceleratorConfig().to_dict(), "qu": 12}))
    with pytest.raises(ConfigError, match="qu = 12"):
        AcceleratorConfig.load(p)


def test_optional_fields_keep_older_configs_and_their_digest(tmp_path):
    c = AcceleratorConfig(rows=4)
    older = {k: v for k, v in c.to_dict().items() if k not in OPTIONAL_FIELDS}
    # A config written before the optional fields existed loads, and keeps its identity:
    # the digest of the form it was hashed in then.
    p = tmp_path / "old.json"
    p.write_text(json.dumps(older))
    loaded = AcceleratorConfig.load(p)
    assert loaded == c
    assert loaded.digest == hashlib.sha256(json.dumps(older, sort_keys=True).encode()).digest()
    # A field away from its default is part of the identity.
    for name, value in (("counter_bits", 24), ("layer_log", False), ("compact", True),
                        ("level2", False), ("residual", False), ("pool", False),
                        ("pe_pack", 2)):
        other = AcceleratorConfig(rows=4, **({name: value, "w_bits": 4} if name == "pe_pack"
                                             else {name: value}))
        assert other.digest != c.digest
        assert f'"{name}"' in other.canonical_json() and f'"{name}"' not in c.canonical_json()
        assert AcceleratorConfig.from_json(other.to_json()).digest == other.digest


@pytest.mark.parametrize("field,value,needle", [
    ("counter_bits", 8, "counter_bits = 8 is out of range; accepted: 16..48"),
    ("counter_bits", 64, "counter_bits = 64"),
    ("layer_log", "yes", "layer_log = 'yes' must be true or false"),
    ("pool", 0, "pool = 0 must be true or false"),
    ("pe_pack", 3, "pe_pack = 3 is not supported; accepted: 1, 2"),
])
def test_optional_fields_validated(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        AcceleratorConfig(**{field: value})


@pytest.mark.parametrize("fields,needle", [
    ({"w_bits": 8}, r"a_bits \+ 2 \* w_bits \+ 1 = 25 bits.*w_bits <= 4 with a_bits = 8"),
    ({"w_bits": 4, "a_bits": 10}, r"= 19 bits.*w_bits <= 3 with a_bits = 10"),
    ({"w_bits": 4, "cols": 7}, "cols = 7 is odd"),
])
def test_pe_pack_refused_where_the_packed_operand_does_not_fit(fields, needle):
    with pytest.raises(ConfigError, match="pe_pack = 2: .*" + needle):
        AcceleratorConfig(pe_pack=2, **fields)
    # the widest packings that fit
    AcceleratorConfig(pe_pack=2, w_bits=4, a_bits=9)
    AcceleratorConfig(pe_pack=2, w_bits=2, a_bits=13)


def test_lacks_names_the_features_a_layer_needs_and_the_config_leaves_out():
    full = AcceleratorConfig()
    assert full.lacks(op="pool", has_l2=True, has_res=True) == []
    bare = AcceleratorConfig(level2=False, residual=False, pool=False)
    assert bare.lacks(op="conv", has_l2=False, has_res=False) == []
    assert bare.lacks(op="conv", has_l2=True, has_res=True) == ["level2", "residual"]
    assert bare.lacks(op="pool", has_l2=False, has_res=False) == ["pool"]
