"""The code loaders: descriptor and packed codes in, store writes and layer fields out.

Each test packs random codes of random layers itself (LSB first, sections byte
aligned or bit for bit), runs the loader in the Amaranth simulator with idle input,
records every write request it makes, and compares the stores it writes with the
placement the loader's docstring gives, computed here from the codes.
"""

from __future__ import annotations

import random

import pytest
import torch
from amaranth.hdl import Const, Value

from gen.config import KERNEL_SIZES, AcceleratorConfig
from gen.integer import decode_codes
from hw.gen_loader import CodeLoader, SerialCodeLoader, w1_value_bits
from hw.interfaces import descriptor_layout
from tests.support import TINY, TINY_SERIAL, put_stream, simulate

SMALL = AcceleratorConfig(rows=3, cols=4, max_ci=7, max_co=9, max_k=3, max_bi=2, max_bo=4,
                          gen_lanes=3, qb=3, qu=4, qv=2, qd=5, w_bits=6)
SMALL_SERIAL = AcceleratorConfig(rows=2, cols=3, max_ci=5, max_co=6, max_k=5, max_bi=3, max_bo=1,
                                 gen_lanes=1, qb=2, qu=7, qv=4, qd=3, w_bits=4, decode="signed",
                                 compact=True, level2=False)


def _cdiv(a, b):
    return -(-a // b)


def _random_layer(cfg, rng, mode):
    """Shape and raw codes of a layer: ``sections`` are (name, width, flat codes) in
    stream order, ``b``/``u``/``v`` the codes as nested lists."""
    has_l1, has_l2 = mode in ("both", "l1"), mode in ("both", "l2")
    ci, co = rng.randint(1, cfg.max_ci), rng.randint(1, cfg.max_co)
    k = rng.choice([s for s in KERNEL_SIZES if s <= cfg.max_k])
    kk = k * k
    bi = rng.randint(1, cfg.max_bi) if has_l1 else 0
    bo = rng.randint(1, cfg.max_bo) if has_l2 else co
    dense_bits = rng.randrange(3) if not (has_l1 or has_l2) else 0
    b_bits = cfg.qb if has_l1 or has_l2 else (cfg.qd, cfg.qb, cfg.qv)[dense_bits]

    def codes(bits, *shape):
        if not shape:
            return rng.randrange(1 << bits)
        return [codes(bits, *shape[1:]) for _ in range(shape[0])]

    b = codes(b_bits, bo, bi if has_l1 else ci, kk)
    u = codes(cfg.qu, bo, ci, bi) if has_l1 else None
    v = codes(cfg.qv, co, bo) if has_l2 else None
    def flat(x):
        return [c for row in x for c in (flat(row) if isinstance(row, list) else [row])]

    sections = [("B", b_bits, flat(b))] + ([("U", cfg.qu, flat(u))] if has_l1 else []) + \
        ([("V", cfg.qv, flat(v))] if has_l2 else [])
    fields = {"ci": ci, "co": co, "k": k, "bi": bi, "bo": bo if has_l2 else 0,
              "has_l1": int(has_l1), "has_l2": int(has_l2), "dense_bits": dense_bits,
              "w_shift": rng.randrange(1 << descriptor_layout(cfg)["w_shift"].shape.width)}
    return {"fields": fields, "ci": ci, "co": co, "kk": kk, "bi": bi, "bo": bo, "b": b, "u": u,
            "v": v, "b_bits": b_bits, "sections": sections, "has_l1": has_l1, "has_l2": has_l2}


def _pack(sections, align):
    """LSB-first bit stream of the sections, each from a byte boundary if ``align``."""
    acc, n = 0, 0
    for _, bits, codes in sections:
        for c in codes:
            acc |= c << n
            n += bits
        if align:
            n = _cdiv(n, 8) * 8
    return [(acc >> i) & 0xFF for i in range(0, _cdiv(n, 8) * 8, 8)]


def _decode(code, bits, form):
    return int(decode_codes(torch.tensor([code]), bits, form)[0])


def _elements(value, width, count, signed=False):
    out = []
    for i in range(count):
        x = (value >> (i * width)) & ((1 << width) - 1)
        out.append(x - (1 << width) if signed and x >> (width - 1) else x)
    return out


def _run(dut, cfg, layers, align, stores, seed):
    """Load ``layers``; returns, per layer, the writes (store, addr, lane) -> value, the
    layer fields at ``start`` and the cycles ``start`` was high."""
    stream = [b for layer in layers for b in _pack(layer["sections"], align)]
    descs = [Const.cast(descriptor_layout(cfg).const(layer["fields"])).value for layer in layers]
    results = []
    ports = {name: getattr(dut, f"{name.lower()}_wr") for name, *_ in stores}
    sampled = [x for name, *_ in stores
               for x in (ports[name].en, ports[name].addr, Value.cast(ports[name].data))]
    lay = dut.layer

    async def loads(ctx):
        await put_stream(ctx, dut.i_codes, stream, random.Random(seed), idle=0.3)

    async def tb(ctx):
        for desc in descs:
            ctx.set(dut.i_desc.payload.as_value(), desc)
            ctx.set(dut.i_desc.valid, 1)
            await ctx.tick().until(dut.i_desc.ready)
            ctx.set(dut.i_desc.valid, 0)
            writes, starts, fields, cycle = {}, [], None, 0
            while True:
                _, _, *vals, start, layer_v = await ctx.tick().sample(*sampled, dut.start,
                                                                      lay.as_value())
                for (name, width, count, signed), (en, addr, data) in zip(
                        stores, zip(vals[0::3], vals[1::3], vals[2::3])):
                    for lane, x in enumerate(_elements(data, width, count, signed)):
                        if en >> lane & 1:
                            assert (name, addr, lane) not in writes, (name, addr, lane)
                            writes[(name, addr, lane)] = x
                if start:
                    starts.append(cycle)
                    fields = lay.shape().from_bits(layer_v)
                cycle += 1
                if starts and cycle > starts[0] + 3:
                    break
                assert cycle < 5000, "no start"
            assert not ctx.get(dut.i_desc.ready), "a descriptor taken before done"
            ctx.set(dut.done, 1)
            await ctx.tick()
            ctx.set(dut.done, 0)
            assert ctx.get(dut.idle) and ctx.get(dut.i_desc.ready)
            results.append((writes, fields, starts))

    simulate(dut, tb, background=[loads])
    return results


@pytest.mark.parametrize("cfg", [SMALL, TINY], ids=["small", "tiny"])
@pytest.mark.parametrize("align", [True, False])
def test_code_loader_places_every_code(cfg, align):
    """Every mode: B raw at consecutive addresses (level 1) or decoded into W1 words,
    U and V into lane words; the layer fields as the docstring defines them."""
    rng = random.Random(7 + align)
    R, C = cfg.rows, cfg.cols
    modes = ["both", "l1", "l2", "dense", "dense", "dense", "both", "l2"]
    layers = [_random_layer(cfg, rng, mode) for mode in modes]
    stores = [("B", cfg.qb, 1, False), ("U", cfg.qu, R, False), ("V", cfg.qv, C, False),
              ("W1", w1_value_bits(cfg), R, True)]
    dut = CodeLoader(cfg, section_align=align)
    for layer, (writes, f, starts) in zip(layers, _run(dut, cfg, layers, align, stores, 3)):
        ci, co, kk, bi, bo = (layer[n] for n in ("ci", "co", "kk", "bi", "bo"))
        cit, cot = _cdiv(ci, R), _cdiv(co, C)
        want = {}
        for o in range(bo):
            if layer["has_l1"]:
                for j in range(bi):
                    for t in range(kk):
                        want[("B", (o * bi + j) * kk + t, 0)] = layer["b"][o][j][t]
                for i in range(ci):
                    for j in range(bi):
                        want[("U", (o * cit + i // R) * bi + j, i % R)] = layer["u"][o][i][j]
            else:
                for i in range(ci):
                    for t in range(kk):
                        want[("W1", (o * cit + i // R) * kk + t, i % R)] = _decode(
                            layer["b"][o][i][t], layer["b_bits"], cfg.decode)
        if layer["has_l2"]:
            for c in range(co):
                for o in range(bo):
                    want[("V", (c // C) * bo + o, c % C)] = layer["v"][c][o]
        assert writes == want
        assert len(starts) == 1
        assert (f.ci, f.co, f.bo, f.kk, f.has_l1, f.has_l2) == (
            ci, co, bo, kk, layer["has_l1"], layer["has_l2"])
        assert (f.stride, f.bo_m1, f.kk_m1, f.ci_last, f.co_last, f.w_shift) == (
            cit * kk, bo - 1, kk - 1, (cit - 1) * R, (cot - 1) * C, layer["fields"]["w_shift"])
        if layer["has_l1"]:
            assert (f.bi, f.bikk, f.bi_m1) == (bi, bi * kk, bi - 1)


@pytest.mark.parametrize("cfg", [SMALL_SERIAL, TINY_SERIAL], ids=["small", "tiny"])
@pytest.mark.parametrize("align", [True, False])
def test_serial_code_loader_places_every_code(cfg, align):
    """Level-1 and dense layers: B and U (or the dense codes) raw, one a word, in stream
    order; ``inner``, ``s_o`` and ``bikk`` as the docstring defines them."""
    rng = random.Random(11 + align)
    layers = [_random_layer(cfg, rng, mode) for mode in ("l1", "dense", "dense", "l1", "dense")]
    u_bits = SerialCodeLoader.code_bits_of(cfg)
    stores = [("B", cfg.qb, 1, False), ("U", u_bits, 1, False)]
    dut = SerialCodeLoader(cfg, section_align=align)
    for layer, (writes, f, starts) in zip(layers, _run(dut, cfg, layers, align, stores, 5)):
        ci, kk, bi = layer["ci"], layer["kk"], layer["bi"]
        b_codes = layer["sections"][0][2]
        if layer["has_l1"]:
            want = {("B", a, 0): x for a, x in enumerate(b_codes)}
            want |= {("U", a, 0): x for a, x in enumerate(layer["sections"][1][2])}
        else:
            want = {("U", a, 0): x for a, x in enumerate(b_codes)}
        assert writes == want
        assert len(starts) == 1
        inner = bi if layer["has_l1"] else kk
        assert (f.ci, f.co, f.kk, f.has_l1, f.inner, f.s_o) == (
            ci, layer["co"], kk, layer["has_l1"], inner, ci * inner)
        assert f.dense_sel == layer["fields"]["dense_bits"]
        if layer["has_l1"]:
            assert (f.bi, f.bikk) == (bi, bi * kk)
