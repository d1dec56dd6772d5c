"""cocotb bench of :class:`hw.engine.ConvEngine`: every output checked against the golden model.

Driver -> DUT -> monitor -> checker. Each layer of the plan gets random integer
activations, PE weights (sent as the weight-vector stream in
:func:`hw.interfaces.weight_vectors` order), multipliers, biases and shifts;
the bench loads the input (and residual) tensors through the host port, starts
the layer, reads the destination tensor back and compares every element with
:func:`gen.golden.golden_layer`. Every input stream gets random idle cycles and
the read-back stream random backpressure, unless the plan turns them off.

Environment
-----------
``MLG_BENCH_CONFIG``
    The :class:`~gen.config.AcceleratorConfig` the DUT was elaborated from (JSON).
``MLG_BENCH_PLAN``
    JSON ``{"seed", "idle", "backpressure", "items"}``; an item is
    ``{"layer": {...}}`` (fields of :func:`random_layer`, missing ones random),
    ``{"random": n, "max_macs": m}`` or ``{"chain": [{...}, ...]}`` (each layer
    reads the previous layer's output in place, see :func:`chain_layers`).
    ``idle`` is the probability of an idle cycle on every input stream,
    ``backpressure`` that of a cycle without ``ready`` on the read-back stream.
``MLG_BENCH_REPORT``
    Optional path: the per-layer counters are written there as JSON.

The functions above the simulator section need no simulator; the tests import
them to build plans and to drive the Amaranth simulator with the same cases.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from gen.config import KERNEL_SIZES, AcceleratorConfig
from gen.contract import channel_layout, descriptor_layout, layer_descriptor, widths_of
from gen.golden import golden_layer
from gen.integer import conv2d_int, encode_values, int_range, pool_multiplier
from gen.network import LayerSpec, QuantizedNetwork
from hw.engine import check_layer
from hw.engine_port import host_command_layout
from hw.interfaces import weight_beat_layout, weight_vectors
from host.protocol import pack_struct

# ---------------------------------------------------------------------------------------
# Cases: shapes, data and the golden result (no simulator needed)
# ---------------------------------------------------------------------------------------

LAYER_FIELDS = ("op", "ci", "co", "h", "w", "k", "stride", "pad", "relu", "src", "dst", "res")


def random_layer(config: AcceleratorConfig, rng: random.Random, max_macs: int | None = None,
                 **fixed) -> dict:
    """A random layer shape the engine accepts; ``fixed`` fields are kept as given.

    Fields: ``op`` (conv/pool), ``ci``, ``co``, ``h``, ``w``, ``k``, ``stride``,
    ``pad``, ``relu``, ``src``, ``dst``, ``res`` (buffer or None). ``max_macs``
    bounds the layer's multiply-accumulates (simulation time).
    """
    for _ in range(1000):
        s = dict(fixed)
        s.setdefault("op", "conv" if rng.random() < 0.85 else "pool")
        ks = [k for k in KERNEL_SIZES if k <= config.max_k]
        s.setdefault("k", rng.choice(ks) if s["op"] == "conv" else 1)
        s.setdefault("stride", rng.choice((1, 1, 2)) if s["op"] == "conv" else 1)
        s.setdefault("pad", rng.randint(0, s["k"] // 2) if s["op"] == "conv" else 0)
        lo = max(1, s["k"] - 2 * s["pad"])
        s.setdefault("h", rng.randint(lo, config.max_h))
        s.setdefault("w", rng.randint(lo, config.max_w))
        s.setdefault("ci", rng.randint(1, config.max_ci))
        s.setdefault("co", rng.randint(1, config.max_co) if s["op"] == "conv" else s["ci"])
        s.setdefault("relu", rng.random() < 0.5)
        bufs = list(range(config.act_buffers))
        s.setdefault("src", rng.choice(bufs))
        s.setdefault("dst", rng.choice([b for b in bufs if b != s["src"]]))
        if "res" not in s:
            choices = [b for b in bufs if b != s["dst"]]
            s["res"] = rng.choice(choices) if rng.random() < 0.4 else None
        if s["res"] is not None and s["res"] == s["src"] and out_shape(s) != (s["ci"], s["h"], s["w"]):
            # The residual then is the input tensor itself, so the shapes must agree.
            if all(f in fixed for f in LAYER_FIELDS):
                raise ValueError(f"residual buffer {s['res']} is the source buffer but the output "
                                 f"shape {out_shape(s)} is not the input shape")
            continue
        try:
            check_layer(config, **{f: v for f, v in s.items() if f != "relu"})
        except ValueError:
            if all(f in fixed for f in LAYER_FIELDS):
                raise
            continue
        if max_macs is not None and layer_macs(s) > max_macs and not all(f in fixed for f in LAYER_FIELDS):
            continue
        return s
    raise ValueError(f"no layer with fields {fixed} fits {config}")


def layer_macs(s: dict) -> int:
    """Multiply-accumulates of a layer (additions for a pool), as ``LayerSpec.macs``."""
    co, ho, wo = out_shape(s)
    if s["op"] == "pool":
        return s["ci"] * s["h"] * s["w"]
    return co * s["ci"] * s["k"] * s["k"] * ho * wo


def out_shape(s: dict) -> tuple[int, int, int]:
    if s["op"] == "pool":
        return s["ci"], 1, 1
    ho = (s["h"] + 2 * s["pad"] - s["k"]) // s["stride"] + 1
    wo = (s["w"] + 2 * s["pad"] - s["k"]) // s["stride"] + 1
    return s["co"], ho, wo


def chain_layers(config: AcceleratorConfig, rng: random.Random, first: dict, rest: list[dict]) -> list[dict]:
    """Complete a chain: layer i+1 reads layer i's ``dst`` with its output shape.

    A later layer may set ``"res": "input"`` to add the first layer's input (a
    residual block); its output shape must then equal that input's shape.
    """
    layers = [random_layer(config, rng, **first)]
    for spec in rest:
        prev = layers[-1]
        c, h, w = out_shape(prev)
        spec = dict(spec)
        if spec.get("res") == "input":
            spec["res"] = layers[0]["src"]
        spec.update(ci=c, h=h, w=w, src=prev["dst"])
        if "dst" not in spec:
            taken = {prev["dst"], spec.get("res")}
            spec["dst"] = rng.choice([b for b in range(config.act_buffers) if b not in taken])
        spec.setdefault("res", None)
        layers.append(random_layer(config, rng, **spec))
    return layers


@dataclass
class LayerCase:
    """One layer with its operands and golden output ``[co, ho, wo]``."""

    spec: dict
    x: torch.Tensor
    res: torch.Tensor | None
    w_pe: torch.Tensor | None
    mult: torch.Tensor
    bias: torch.Tensor
    shift: int
    m_res: int
    expected: torch.Tensor = field(default=None)


def _rand(gen: torch.Generator, shape, bits: int) -> torch.Tensor:
    lo, hi = int_range(bits)
    return torch.randint(lo, hi + 1, tuple(shape), generator=gen, dtype=torch.int64)


def bench_network(config: AcceleratorConfig) -> QuantizedNetwork:
    """The network frame the golden model needs: dense layers with signed ``w_bits`` codes."""
    widths = {**widths_of(config), "qd": config.w_bits, "decode": "signed"}
    return QuantizedNetwork(arch="bench", input_shape=(1, 1, 1), input_scale=1.0, num_classes=1,
                            **widths)


def make_case(config: AcceleratorConfig, spec: dict, rng: random.Random,
              x: torch.Tensor | None = None, res: torch.Tensor | None = None) -> LayerCase:
    """Random operands for ``spec`` (``x``/``res`` if given) and the golden output."""
    gen = torch.Generator().manual_seed(rng.randrange(1 << 62))
    a, mb = config.a_bits, config.m_bits
    if x is None:
        x = _rand(gen, (spec["ci"], spec["h"], spec["w"]), a)
    if spec["res"] is not None and spec["res"] == spec["src"]:
        res = x
    elif spec["res"] is not None and res is None:
        res = _rand(gen, out_shape(spec), a)
    if spec["op"] == "pool":
        w_pe = None
        m_val, shift = pool_multiplier(spec["h"] * spec["w"], mb)
        mult = torch.full((spec["ci"],), m_val, dtype=torch.int64)
        acc = x.sum(dim=(1, 2)).view(-1, 1, 1)
        bias = torch.zeros(spec["ci"], dtype=torch.int64)
        if rng.random() < 0.5:
            bias = torch.randint(-(1 << shift), (1 << shift) + 1, (spec["ci"],), generator=gen)
    else:
        w_pe = _rand(gen, (spec["co"], spec["ci"], spec["k"], spec["k"]), config.w_bits)
        mult = _rand(gen, (spec["co"],), mb)
        if rng.random() < 0.5:
            mult = mult.abs().clamp_max(int_range(mb)[1])
        acc = conv2d_int(x[None], w_pe, spec["stride"], spec["pad"])[0]
        peak = int((acc * mult.view(-1, 1, 1)).abs().max())
        shift = peak.bit_length() - (a - 1) + rng.choice((-1, 0, 0, 1, 2))
        shift = max(0, min(shift, config.shift_max))
        lim = 1 << max(0, shift + a - 2)
        bias = torch.randint(-lim, lim + 1, (spec["co"],), generator=gen)
    m_res = 0
    if res is not None:
        m_res = rng.randint(-(1 << min(mb - 1, shift)), (1 << min(mb - 1, shift)) - 1)
        m_res = max(int_range(mb)[0], min(int_range(mb)[1], m_res))
    case = LayerCase(spec=dict(spec), x=x, res=res, w_pe=w_pe, mult=mult, bias=bias,
                     shift=shift, m_res=m_res)
    case.expected = golden(config, case)
    return case


def golden(config: AcceleratorConfig, case: LayerCase) -> torch.Tensor:
    """The golden output of ``case`` through :func:`gen.golden.golden_layer`."""
    s = case.spec
    net = bench_network(config)
    if s["op"] == "pool":
        layer = LayerSpec(name="bench", op="pool", ci=s["ci"], co=s["ci"], h=s["h"], w=s["w"],
                          relu=s["relu"], mult=case.mult, bias=case.bias, shift=case.shift,
                          m_res=case.m_res)
    else:
        co, ci, k = s["co"], s["ci"], s["k"]
        codes = encode_values(case.w_pe.reshape(co, ci, k * k), config.w_bits, "signed")
        layer = LayerSpec(name="bench", op="conv", ci=ci, co=co, h=s["h"], w=s["w"], k=k,
                          stride=s["stride"], pad=s["pad"], bo=co, relu=s["relu"], b=codes,
                          mult=case.mult, bias=case.bias, shift=case.shift, m_res=case.m_res)
    res = case.res[None] if case.res is not None else None
    return golden_layer(net, layer, case.x[None], res)[0]


# ---- payload packing ----------------------------------------------------------------

def pack(layout, values: dict) -> int:
    """Raw bits of ``values`` in an Amaranth ``StructLayout`` (see :func:`host.protocol.pack_struct`)."""
    return pack_struct(layout, values)


def descriptor_word(config: AcceleratorConfig, case: LayerCase) -> int:
    """The case's descriptor (a dense layer: its weights are the PE weights)."""
    return pack(descriptor_layout(config),
                layer_descriptor(**{f: case.spec[f] for f in LAYER_FIELDS}, shift=case.shift,
                                 m_res=case.m_res))


def weight_words(config: AcceleratorConfig, case: LayerCase) -> list[int]:
    if case.w_pe is None:
        return []
    vecs = weight_vectors(config, case.w_pe)
    layout = weight_beat_layout(config)
    return [pack(layout, {"w": v, "last": int(i == len(vecs) - 1)}) for i, v in enumerate(vecs)]


def channel_words(config: AcceleratorConfig, case: LayerCase) -> list[int]:
    layout = channel_layout(config)
    return [pack(layout, {"mult": int(mv), "bias": int(bv)}) for mv, bv in zip(case.mult, case.bias)]


def host_word(config: AcceleratorConfig, write: bool, buf: int, channels: int, pixels: int) -> int:
    return pack(host_command_layout(config),
                {"write": int(write), "buf": buf, "channels": channels, "pixels": pixels})


def plan_cases(config: AcceleratorConfig, plan: dict):
    """Yield ``(case, load)`` for every layer of ``plan``; ``load`` names the buffers
    (``"src"``, ``"res"``) the bench must load before the layer."""
    rng = random.Random(plan.get("seed", 1))
    for item in plan["items"]:
        if "random" in item:
            groups = [[random_layer(config, rng, max_macs=item.get("max_macs"))]
                      for _ in range(item["random"])]
        elif "chain" in item:
            groups = [chain_layers(config, rng, item["chain"][0], item["chain"][1:])]
        else:
            groups = [[random_layer(config, rng, **item["layer"])]]
        for layers in groups:
            contents: dict[int, torch.Tensor] = {}
            for spec in layers:
                x = contents.get(spec["src"])
                if x is not None and tuple(x.shape) != (spec["ci"], spec["h"], spec["w"]):
                    x = None
                res = None
                if spec["res"] is not None and spec["res"] != spec["src"]:
                    res = contents.get(spec["res"])
                    if res is not None and tuple(res.shape) != out_shape(spec):
                        res = None
                load = []
                if x is None:
                    load.append("src")
                if spec["res"] is not None and spec["res"] != spec["src"] and res is None:
                    load.append("res")
                case = make_case(config, spec, rng, x=x, res=res)
                contents[spec["src"]] = case.x
                if case.res is not None:
                    contents[spec["res"]] = case.res
                contents[spec["dst"]] = case.expected
                yield case, load


# ---------------------------------------------------------------------------------------
# Simulator side
# ---------------------------------------------------------------------------------------

try:
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import FallingEdge, RisingEdge
except ImportError:  # pragma: no cover - the case functions work without cocotb
    cocotb = None


class Source:
    """Drives a valid/ready stream from a queue of packed words, with random idle cycles.

    Called once per cycle at the falling edge: the DUT's ``ready`` depends only
    on its state, so the handshake of the coming rising edge is known here.
    """

    def __init__(self, dut, name: str, rng: random.Random, idle: float):
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.queue: deque[int] = deque()
        self.rng, self.idle = rng, idle
        self.showing = False
        self.valid_on = False
        self.valid.value = 0

    def busy(self) -> bool:
        return self.showing or bool(self.queue)

    def step(self):
        if not self.showing:
            if not self.queue or (self.idle and self.rng.random() < self.idle):
                if self.valid_on:
                    self.valid.value = 0
                    self.valid_on = False
                return
            self.payload.value = self.queue[0]
            if not self.valid_on:
                self.valid.value = 1
                self.valid_on = True
            self.showing = True
        if int(self.ready.value):
            self.queue.popleft()
            self.showing = False


class Sink:
    """Accepts a stream with random backpressure, collecting signed payloads."""

    def __init__(self, dut, name: str, rng: random.Random, backpressure: float, bits: int):
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.rng, self.bp, self.bits = rng, backpressure, bits
        self.expect = 0
        self.items: list[int] = []
        self.ready_on = False
        self.ready.value = 0

    def step(self):
        want = self.expect > 0 and not (self.bp and self.rng.random() < self.bp)
        if want != self.ready_on:
            self.ready.value = int(want)
            self.ready_on = want
        if want and int(self.valid.value):
            v = int(self.payload.value)
            self.items.append(v - (1 << self.bits) if v >> (self.bits - 1) else v)
            self.expect -= 1


COUNTERS = ("cycles", "mac_cycles", "stall_weights", "stall_output", "macs")


class EngineBench:
    """Clock, reset, the stream models of every engine port, and the layer flow."""

    def __init__(self, dut, config: AcceleratorConfig, plan: dict):
        self.dut, self.config = dut, config
        rng = random.Random(plan.get("seed", 1) * 7919 + 17)
        idle, bp = plan.get("idle", 0.0), plan.get("backpressure", 0.0)
        self.desc = Source(dut, "i_desc", rng, idle)
        self.host = Source(dut, "i_host", rng, idle)
        self.load = Source(dut, "i_load", rng, idle)
        self.weights = Source(dut, "i_weights", rng, idle)
        self.chan = Source(dut, "i_chan", rng, idle)
        self.sources = [self.desc, self.host, self.load, self.weights, self.chan]
        self.read = Sink(dut, "o_read", rng, bp, config.a_bits)
        self.clk = dut.clk
        self.cycle = 0

    async def reset(self):
        cocotb.start_soon(Clock(self.clk, 10, unit="ns").start())
        self.dut.rst.value = 1
        for _ in range(3):
            await RisingEdge(self.clk)
        self.dut.rst.value = 0

    async def run(self, until, limit: int, what: str):
        start = self.cycle
        while not until():
            await FallingEdge(self.clk)
            self.cycle += 1
            for s in self.sources:
                if s.showing or s.queue or s.valid_on:
                    s.step()
            self.read.step()
            if self.cycle - start > limit:
                raise AssertionError(f"{what}: no completion after {limit} cycles")

    async def load_tensor(self, buf: int, t: torch.Tensor, what: str):
        c, h, w = t.shape
        self.host.queue.append(host_word(self.config, True, buf, c, h * w))
        mask = (1 << self.config.a_bits) - 1
        self.load.queue.extend(int(v) & mask for v in t.reshape(-1).tolist())
        await self.run(lambda: not self.host.busy() and not self.load.busy(), 40 * t.numel() + 200, what)
        await self.run(lambda: not int(self.dut.busy.value), 100, what)

    async def read_tensor(self, buf: int, shape, what: str) -> torch.Tensor:
        c, h, w = shape
        self.read.items, self.read.expect = [], c * h * w
        self.host.queue.append(host_word(self.config, False, buf, c, h * w))
        await self.run(lambda: self.read.expect == 0, 40 * c * h * w + 200, what)
        await self.run(lambda: not int(self.dut.busy.value), 100, what)
        return torch.tensor(self.read.items, dtype=torch.int64).reshape(c, h, w)

    async def run_layer(self, case: LayerCase, load: list[str], index: int) -> dict:
        s = case.spec
        what = f"layer {index} {s}"
        if "src" in load:
            await self.load_tensor(s["src"], case.x, what + " (load src)")
        if "res" in load:
            await self.load_tensor(s["res"], case.res, what + " (load res)")
        self.desc.queue.append(descriptor_word(self.config, case))
        self.weights.queue.extend(weight_words(self.config, case))
        self.chan.queue.extend(channel_words(self.config, case))
        done = self.dut.done
        seen = []

        def finished():
            if int(done.value):
                seen.append(1)
            return bool(seen)

        limit = 4 * layer_macs(s) + 50 * case.x.numel() + 60 * len(self.weights.queue) + 4000
        await self.run(finished, limit, what + " (compute)")
        counters = {n: int(getattr(self.dut, n).value) for n in COUNTERS}
        error = int(self.dut.error.value)
        assert error == 0, f"{what}: engine error flags {error:#x}"
        leftover = [n for n, q in (("weights", self.weights), ("chan", self.chan)) if q.busy()]
        assert not leftover, f"{what}: stream(s) {leftover} not fully consumed"
        got = await self.read_tensor(s["dst"], out_shape(s), what + " (read back)")
        if not torch.equal(got, case.expected):
            bad = (got != case.expected).nonzero().tolist()
            first = [(tuple(i), int(got[tuple(i)]), int(case.expected[tuple(i)])) for i in bad[:8]]
            raise AssertionError(f"{what}: {len(bad)} of {got.numel()} outputs differ from the "
                                 f"golden model (index, rtl, golden): {first}")
        return counters


if cocotb is not None:
    @cocotb.test()
    async def engine_matches_golden(dut):
        """Every layer of the plan, bit for bit against gen.golden.golden_layer."""
        config = AcceleratorConfig.from_json(os.environ["MLG_BENCH_CONFIG"], source="MLG_BENCH_CONFIG")
        plan = json.loads(os.environ["MLG_BENCH_PLAN"])
        tb = EngineBench(dut, config, plan)
        await tb.reset()
        report = []
        for i, (case, load) in enumerate(plan_cases(config, plan)):
            counters = await tb.run_layer(case, load, i)
            s = case.spec
            co, ho, wo = out_shape(s)
            entry = dict(s, **counters, ho=ho, wo=wo, outputs=co * ho * wo)
            report.append(entry)
            dut._log.info("layer %d ok: %s cycles=%d mac_cycles=%d stalls=%d/%d", i,
                          {k: s[k] for k in LAYER_FIELDS}, counters["cycles"], counters["mac_cycles"],
                          counters["stall_weights"], counters["stall_output"])
        path = os.environ.get("MLG_BENCH_REPORT")
        if path:
            with open(path, "w") as f:
                json.dump({"config": config.to_dict(), "layers": report}, f, indent=1)
