"""The factorized execution form, the form choice, the cost model's structure and the
performance bench (:mod:`sim.perf`)."""

from __future__ import annotations

import pytest
import torch

from gen.compiler import CompileError, choose_forms, compile_network
from gen.cost import layer_costs
from gen.factorize import FactorizeError, factorizable, factorize
from gen.golden import golden_forward, golden_layer
from gen.integer import int_range
from gen.network import LayerSpec, QuantizedNetwork
from gen.program import read_program
from sim.runner import simulator_available
from tests.test_accelerator import LINK_TIMEOUT, _check_images, random_network

FACTORIZED = ["both_s2", "l2_only_res"]


def _calib(net: QuantizedNetwork, n: int = 8, seed: int = 3) -> torch.Tensor:
    lo, hi = int_range(net.a_bits)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n, *net.input_shape), generator=g)


def test_factorized_parts_replace_the_layer_and_approximate_it():
    net = random_network(seed=1)
    x = _calib(net)
    f = factorize(net, FACTORIZED, x)
    names = [l.name for l in f.layers]
    assert names == ["dense", "both_s2.w1", "both_s2.v", "l1_only", "l2_only_res.w1",
                     "l2_only_res.v", "pool", "classifier"]
    by = {l.name: l for l in f.layers}
    for name in FACTORIZED:
        orig = next(l for l in net.layers if l.name == name)
        a, b = by[f"{name}.w1"], by[f"{name}.v"]
        assert (a.co, a.k, a.stride, a.pad, a.has_l2, a.relu, a.res) == (orig.bo, orig.k, orig.stride,
                                                                          orig.pad, False, False, None)
        assert (b.ci, b.co, b.k, b.dense, b.relu, b.res) == (orig.bo, orig.co, 1, True, orig.relu, orig.res)
        assert a.has_l1 == orig.has_l1 and b.dst == orig.dst and a.dst == b.src
    # The parts keep the layer's codes at their own widths: form 2 moves form 1's bytes.
    assert sum(l.aligned_code_bytes(f) for l in f.layers) == sum(
        l.aligned_code_bytes(net) for l in net.layers)
    assert (by["both_s2.w1"].dense_bits, by["l2_only_res.w1"].dense_bits,
            by["both_s2.v"].dense_bits) == ("qd", "qb", "qv")
    # Each factorized layer, given the same inputs, lands near the original: the
    # intermediate requant and the rescaled constants keep the output scale.
    bufs = golden_forward(net, x, keep=True)
    fbufs = golden_forward(f, x, keep=True)
    for name in FACTORIZED:
        orig = next(l for l in net.layers if l.name == name)
        ref = bufs[orig.dst].double()
        res = bufs[orig.res] if orig.res is not None else None
        a, b = by[f"{name}.w1"], by[f"{name}.v"]
        mid = golden_layer(f, a, bufs[orig.src])
        got = golden_layer(f, b, mid, res).double()
        assert ref.std() > 4
        assert (got - ref).abs().mean() < 0.1 * ref.abs().mean(), name
        assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.95, name
    assert fbufs[f.output_buffer].shape == bufs[net.output_buffer].shape


def test_factorize_refuses_layers_without_level_2_and_unknown_names():
    net = random_network(seed=1)
    x = _calib(net)
    assert not factorizable(next(l for l in net.layers if l.name == "l1_only"))
    with pytest.raises(FactorizeError, match="l1_only"):
        factorize(net, ["l1_only"], x)
    with pytest.raises(FactorizeError, match="no layer named nope"):
        factorize(net, ["nope"], x)
    with pytest.raises(CompileError, match="calibration"):
        choose_forms(net, 4, 4, "auto", None)
    with pytest.raises(CompileError, match="accepted: generate, auto, factorized"):
        choose_forms(net, 4, 4, "fastest", x)


def _one_layer(ci, co, h, bo, seed=0) -> QuantizedNetwork:
    g = torch.Generator().manual_seed(seed)
    net = QuantizedNetwork(arch="test", input_shape=(ci, h, h), input_scale=1.0, num_classes=co,
                           a_bits=8, w_bits=8, m_bits=16, qb=3, qu=6, qv=3, qd=8, decode="odd")
    net.layers.append(LayerSpec(
        name="conv", op="conv", ci=ci, co=co, h=h, w=h, k=3, stride=1, pad=1, bi=2, bo=bo,
        src=0, dst=1, relu=True, b=torch.randint(0, 8, (bo, 2, 9), generator=g),
        u=torch.randint(0, 64, (bo, ci, 2), generator=g), v=torch.randint(0, 8, (co, bo), generator=g),
        w_shift=8, mult=torch.full((co,), 1 << 12), bias=torch.zeros(co, dtype=torch.int64),
        shift=20))
    return net


def test_auto_form_follows_the_cost_model():
    # A deep layer on a 2x2 map spends its time generating W2: factorized.
    deep = _one_layer(64, 64, 2, 16)
    chosen = choose_forms(deep, 4, 4, "auto", _calib(deep))
    assert [l.name for l in chosen.layers] == ["conv.w1", "conv.v"]
    # On a 16x16 map generation hides behind compute, and with bo near co the
    # factorized form has no fewer MACs (its 1x1 part comes on top): form 1 stays.
    wide = _one_layer(8, 8, 16, 6)
    assert [l.name for l in choose_forms(wide, 4, 4, "auto", _calib(wide)).layers] == ["conv"]
    result = compile_network(deep, 4, 4, form="auto", calib=_calib(deep))
    assert result.report["factorized"] == ["conv"]
    assert result.report["predicted_cycles"] == sum(
        c.cycles for c in layer_costs(result.network, result.config))


def test_cost_model_counts_tiles_and_bytes():
    net = _one_layer(16, 12, 6, 4)
    result = compile_network(net, 4, 4)
    (c,) = layer_costs(result.network, result.config)
    layer = result.network.layers[0]
    assert c.tiles == 3 * 4 * 9 and c.macs == layer.macs
    assert c.weight_bytes == layer.aligned_code_bytes(result.network)
    assert c.act_bytes == 16 * 36 + 12 * 36
    assert c.generation == c.gen_load + c.gen_level1 + c.gen_tiles
    assert c.cycles >= c.compute and c.cycles >= c.generation


@pytest.mark.skipif(not simulator_available("verilator"), reason="Verilator not installed")
def test_factorized_network_bit_exact_on_the_simulated_board():
    from host.driver import Driver
    from host.transport import SerialTransport
    from sim.board import SimulatedBoard

    net = random_network(seed=1)
    result = compile_network(net, rows=4, cols=4, gen_lanes=4, link_timeout=LINK_TIMEOUT,
                             form="factorized", calib=_calib(net))
    assert result.report["factorized"] == FACTORIZED
    program = read_program(result.program, config=result.config)
    with SimulatedBoard(result.config, "verilator", fast_build=True) as board:
        with SerialTransport(board.url) as tr:
            drv = Driver(tr, timeout=30)
            drv.load_program(result.config, program)
            _check_images(drv, program, 3, seed=5)
            log = drv.layer_log()
            assert [e["macs"] for e in log] == [l.macs for l in program.network().layers]


def test_compile_packs_two_pe_products_per_multiplier_where_the_weights_allow():
    narrow = random_network(seed=1, w_bits=4)
    assert compile_network(narrow, 4, 4).config.pe_pack == 2
    assert compile_network(narrow, 4, 4, pe_pack=1).config.pe_pack == 1
    assert compile_network(narrow, 4, 4, compact=True).config.pe_pack == 1
    assert compile_network(narrow, 4, 5).config.pe_pack == 1        # odd cols
    assert compile_network(random_network(seed=1), 4, 4).config.pe_pack == 1  # 8-bit weights
    with pytest.raises(CompileError, match="pe_pack = 2: .*25 bits"):
        compile_network(random_network(seed=1), 4, 4, pe_pack=2)


def test_array_sized_for_a_multiplier_budget():
    from gen.compiler import size_array

    wide, narrow = random_network(seed=1), random_network(seed=1, w_bits=4)
    picks = {}
    for budget in (40, 80, 156):
        for name, net in (("w8", wide), ("w4", narrow)):
            p = size_array(net, budget)
            cfg = compile_network(net, p["rows"], p["cols"]).config
            assert cfg.multiplier_blocks == p["multiplier_blocks"]
            assert p["multiplier_blocks"]["total"] <= budget
            assert p["predicted_cycles"] == compile_network(net, p["rows"], p["cols"]).report[
                "predicted_cycles"]
            picks[name, budget] = p
    for name in ("w8", "w4"):   # a larger budget is never slower
        cycles = [picks[name, b]["predicted_cycles"] for b in (40, 80, 156)]
        assert cycles == sorted(cycles, reverse=True) and cycles[0] > cycles[-1]
    # two products per block: 4-bit weights get more PEs from the same blocks
    assert all(picks["w4", b]["pe_pack"] == 2 for b in (40, 80, 156))
    assert picks["w4", 80]["predicted_cycles"] < picks["w8", 80]["predicted_cycles"]
    # a fixed side is kept; a budget nothing fits is refused with the shape it tried
    assert size_array(wide, 80, fixed={"rows": 4})["rows"] == 4
    with pytest.raises(CompileError, match="no array of rows = 4 fits 5 multiplier blocks"):
        size_array(wide, 5, fixed={"rows": 4})


@pytest.mark.skipif(not simulator_available("verilator"), reason="Verilator not installed")
def test_packed_pe_products_bit_exact_on_the_simulated_board():
    """4-bit PE weights, two products per multiplier: every logit as the golden model's."""
    from host.driver import Driver
    from host.transport import SerialTransport
    from sim.board import SimulatedBoard

    net = random_network(seed=1, w_bits=4)
    result = compile_network(net, rows=4, cols=4, gen_lanes=4, link_timeout=LINK_TIMEOUT)
    assert result.config.pe_pack == 2
    program = read_program(result.program, config=result.config)
    # the PE weights span the 4-bit range, both extremes included
    w = torch.cat([l.weights_pe(program.network()).flatten()
                   for l in program.network().conv_layers()])
    assert int(w.min()) == -8 and int(w.max()) == 7
    with SimulatedBoard(result.config, "verilator", fast_build=True) as board:
        with SerialTransport(board.url) as tr:
            drv = Driver(tr, timeout=30)
            drv.load_program(result.config, program)
            _check_images(drv, program, 3, seed=5)


@pytest.mark.skipif(not simulator_available("verilator"), reason="Verilator not installed")
def test_bench_suite_runs_mlg_and_dense_bit_exact():
    from sim.perf import format_report, run_suite

    net = random_network(seed=2)
    report = run_suite("test", net, 4, 4, fast_build=True, form="auto", gen_lanes=4,
                       link_timeout=LINK_TIMEOUT)
    assert report["mismatches"] == {"mlg": 0, "dense": 0}
    layers = report["layers"]
    assert [r["layer"] for r in layers][0] == "dense"
    for r in layers:
        assert r["cycles"] > 0 and r["dense_preloaded"] > 0
        assert r["util"] is None or 0 < r["util"] <= 1
    assert report["total"]["mlg_code_bytes_measured"] == report["total"]["mlg_w_bytes"]
    assert report["total"]["dense_w_bytes"] > report["total"]["mlg_w_bytes"]
    assert "outputs differing from golden: MLG 0, dense 0" in format_report({"suites": [report]})


def test_program_keeps_dense_code_widths_and_rejects_them_elsewhere():
    from gen.program import DESCRIPTOR, HEADER_SIZE, ProgramError, write_program

    net = random_network(seed=1)
    result = compile_network(net, 4, 4, form="factorized", calib=_calib(net))
    program = read_program(result.program, config=result.config)
    got = [(l.name, l.dense_bits) for l in program.network().layers]
    want = [(f"layer{i}", l.dense_bits) for i, l in enumerate(result.network.layers)]
    assert got == want and {b for _, b in got} == {"qd", "qb", "qv"}
    # The first layer is dense with qd codes; on layer 1 (level 1) the width bits are refused.
    data = bytearray(result.program)
    off = HEADER_SIZE + DESCRIPTOR.size + 1
    data[off] |= 1 << 4
    import zlib
    data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "little")
    with pytest.raises(ProgramError, match="flags"):
        read_program(bytes(data))
    assert write_program(result.network, result.config) == result.program


def test_a_factorized_form_that_costs_accuracy_is_warned_of():
    from gen.compiler import form_accuracy_warning

    report = {"factorized": ["conv2", "conv3"], "program_golden_acc": 0.9361,
              "generate_golden_acc": 0.9778}
    w = form_accuracy_warning(report)
    assert w.startswith("the factorized form of conv2, conv3 costs 4.2 points")
    assert "--form generate" in w
    assert form_accuracy_warning({**report, "program_golden_acc": 0.9700}) is None  # 0.8 points
    assert form_accuracy_warning({**report, "program_golden_acc": 0.9972}) is None  # better
    assert form_accuracy_warning({"program_golden_acc": 0.9}) is None   # nothing factorized
