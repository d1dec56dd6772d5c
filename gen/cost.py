"""Analytic cost model: cycles and bytes of every layer of a program on a config.

The model follows the hardware's structure (``hw.generation``, ``hw.engine``,
``hw.accelerator``); its few fixed overheads were measured on the RTL.

Per conv layer, with ``T = ceil(co/cols) * ceil(ci/rows) * k*k`` weight tiles
and ``P = ho*wo`` output pixels:

* **engine**: the array takes one vector per cycle, each tile streams all ``P``
  pixels past its weights (and needs ``rows`` cycles to load them), so a tile
  costs ``te = max(P, rows)`` (with ``compact``, ``max(P, rows, ACC_GAP)``: no
  accumulator forwarding, so a pixel comes back no sooner than ``ACC_GAP``
  cycles); after the last tile the accumulators of the last
  output-channel tile are requantized, ``P * cols / lanes`` cycles (the config's
  ``requant_lanes``);
* **generation**: loading the layer's codes takes, per tensor, one cycle per
  code but at least ``BYTE_CYCLES`` cycles per packed byte (the code-byte
  stream delivers a byte a cycle), level 1
  ``bo * ceil(ci/rows) * k*k * bi * P1`` cycles, and each weight tile
  ``tg = Pc * Pr * bo`` cycles with level 2 (``gen.config.lane_plan``), else
  ``cols`` (one W1 word per cycle);
* **serial generation** (``compact`` builds without level 2, ``hw.serialgen``):
  no level-1 pass; a weight vector takes ``cols * n`` cycles (``n = bi`` with
  level 1, else 1), but a vector's slot in the unit's ``SERIAL_OUT_VECTORS``
  output FIFO frees ``SERIAL_PIPE`` cycles after its last weight leaves the
  issue stage, so ``tg = rows * max(cols * n, ceil((cols * n + SERIAL_PIPE) /
  SERIAL_OUT_VECTORS))``; a layer's load also takes ``max(ci, bi)`` cycles of
  setup;
* **overlap**: the generation unit starts a layer's codes once the previous
  layer's last tile is generated and runs at most a few tiles ahead of the
  engine; the engine takes a tile every ``max(te, tg)`` cycles once the first
  one is there.

A layer's cycles are the cycles from the end of the previous layer to its own
end, as the layer log (``REGION_LOG``) measures them.

Bytes: a layer moves its packed codes (the weights) into the generation unit,
and reads its input (and residual) and writes its output in the on-chip
activation buffers, ``act_bytes`` bytes an element.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import AcceleratorConfig, lane_plan
from .contract import ACC_GAP, SERIAL_OUT_VECTORS, SERIAL_PIPE, act_bytes, record_bytes
from .network import LayerSpec, QuantizedNetwork

__all__ = ["LayerCost", "layer_costs", "network_cost", "ENGINE_FIXED",
           "GEN_FIXED", "LOOKAHEAD_TILES", "SEQ_FIXED", "BYTE_CYCLES", "SERIAL_OUT_VECTORS",
           "SERIAL_PIPE", "SERIAL_LOOKAHEAD_TILES", "ACC_GAP"]

# Cycles per code byte of the stream from the base store (or the stream FIFO) into
# the generation unit, measured on the RTL.
BYTE_CYCLES = 1
# Pool: per group of rows channels, the map plus this many cycles (measured).
POOL_GROUP_EXTRA = 4
POOL_FIXED = 21
# Fixed overheads in cycles, measured on the RTL (hw.engine pipeline depth and
# descriptor check; hw.generation descriptor, section alignment and tile pipeline;
# the sequencers' record fetch).
ENGINE_FIXED = 41
GEN_FIXED = 12
SEQ_FIXED = 4
# Weight tiles the generation unit can finish ahead of the engine: two work tiles,
# the output tile, the four-vector weight FIFO and the engine's staging tile.
LOOKAHEAD_TILES = 4
# The serial generation unit runs about a tile ahead (measured). Its output FIFO
# (SERIAL_OUT_VECTORS) and pipeline (SERIAL_PIPE), and the compact engine's least
# distance between two vectors of one pixel (ACC_GAP), are facts of the RTL that
# gen.contract states.
SERIAL_LOOKAHEAD_TILES = 1


def _seq_cycles(config: AcceleratorConfig) -> int:
    """A sequencer's cycles from one record to the next: with ``compact`` it reads the
    record a byte a cycle."""
    if not config.compact:
        return SEQ_FIXED
    return SEQ_FIXED + record_bytes(config)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class LayerCost:
    """Predicted cost of one layer (cycles and bytes)."""

    name: str
    op: str
    macs: int
    tiles: int
    compute: int          # cycles the array needs for the layer's vectors (T * te + tail)
    gen_load: int         # code load
    gen_level1: int
    gen_tiles: int        # all weight tiles
    generation: int       # gen_load + gen_level1 + gen_tiles
    cycles: int           # end of the previous layer to the end of this one
    # Cycles of the window in which the array does not wait for weights: the layer
    # with its weights already on chip. (On a map of fewer than rows pixels moving a
    # tile into the array takes longer than computing it; those cycles count as
    # waiting, so this is the compute alone.)
    preloaded: int
    exposed: int          # generation cycles the array waited for
    weight_bytes: int
    act_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_parts(net: QuantizedNetwork, layer: LayerSpec, config: AcceleratorConfig) -> dict:
    R, C = config.rows, config.cols
    ab = act_bytes(config)
    p = layer.ho * layer.wo
    acts = (layer.ci * layer.h * layer.w + layer.out_channels * p
            + (layer.out_channels * p if layer.res is not None else 0)) * ab
    if layer.op == "pool":
        groups = _cdiv(layer.ci, R)
        compute = groups * (layer.h * layer.w + POOL_GROUP_EXTRA) + POOL_FIXED
        return dict(tiles=0, te=0, tg=0, tail=0, compute=compute, busy=compute, load=0, l1=0,
                    gen=0, weight_bytes=0, act_bytes=acts)
    kk = layer.k * layer.k
    tiles = _cdiv(layer.co, C) * _cdiv(layer.ci, R) * kk
    te = max(p, R, ACC_GAP if config.compact else 0)
    tail = p * C // config.requant_lanes + ENGINE_FIXED
    plan = lane_plan(config)
    groups, p1 = plan["Pc"] * plan["Pr"], plan["P1"]
    load = sum(max(t.numel(), BYTE_CYCLES * ((t.numel() * bits + 7) // 8))
               for _, t, bits in layer.code_tensors(net)) + GEN_FIXED
    if config.serial_generation:
        n = C * (layer.bi if layer.has_l1 else 1)
        load += max(layer.ci, layer.bi if layer.has_l1 else 0)
        l1 = 0
        tg = R * max(n, _cdiv(n + SERIAL_PIPE, SERIAL_OUT_VECTORS))
    else:
        l1 = layer.bo * _cdiv(layer.ci, R) * kk * layer.bi * p1 if layer.has_l1 else 0
        tg = groups * layer.bo if layer.has_l2 else C
    return dict(tiles=tiles, te=te, tg=tg, tail=tail, compute=tiles * te + tail,
                busy=tiles * p + tail, load=load,
                l1=l1, gen=load + l1 + tiles * tg,
                weight_bytes=layer.aligned_code_bytes(net), act_bytes=acts)


def layer_costs(net: QuantizedNetwork, config: AcceleratorConfig) -> list[LayerCost]:
    """Predicted cost of every layer of ``net`` run as one program on ``config``."""
    out = []
    seq = _seq_cycles(config)
    eng_end = 0          # the engine finished the previous layer
    gen_free = seq       # the generation unit can take the next conv layer's codes
    for layer in net.layers:
        c = _layer_parts(net, layer, config)
        start = eng_end + seq
        if layer.op == "pool":
            end = start + c["compute"]
            exposed = 0
        else:
            first = gen_free + c["load"] + c["l1"] + c["tg"]
            rate = max(c["te"], c["tg"])
            begin = max(start, first)
            end = begin + c["tiles"] * rate + c["tail"]
            exposed = begin - start + c["tiles"] * (rate - c["te"])
            # The last tile is generated when it is due, at most LOOKAHEAD_TILES tiles
            # ahead of the engine.
            last_gen = first + (c["tiles"] - 1) * c["tg"]
            ahead = SERIAL_LOOKAHEAD_TILES if config.serial_generation else LOOKAHEAD_TILES
            gen_free = max(last_gen, end - c["tail"] - ahead * rate) + seq
        out.append(LayerCost(
            name=layer.name, op=layer.op, macs=layer.macs, tiles=c["tiles"],
            compute=c["compute"], gen_load=c["load"], gen_level1=c["l1"],
            gen_tiles=c["tiles"] * c["tg"], generation=c["gen"], cycles=end - eng_end,
            preloaded=seq + c["busy"],
            exposed=exposed, weight_bytes=c["weight_bytes"], act_bytes=c["act_bytes"]))
        eng_end = end
    return out


def network_cost(net: QuantizedNetwork, config: AcceleratorConfig) -> dict:
    """Totals of :func:`layer_costs`: cycles, MACs, weight and activation bytes."""
    costs = layer_costs(net, config)
    return {"cycles": sum(c.cycles for c in costs), "macs": sum(c.macs for c in costs),
            "weight_bytes": sum(c.weight_bytes for c in costs),
            "act_bytes": sum(c.act_bytes for c in costs), "layers": costs}
