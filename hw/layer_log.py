"""The layer log: the run counters as they stood when each layer of the last run ended.

:class:`LayerLog` keeps, for each of ``max_layers`` layers, the counters named
in :data:`host.protocol.LOG_COUNTERS`, one small memory per counter so that a
layer's whole entry is written in one cycle (``we``: ``counts`` into entry
``layer``). The host reads it as ``REGION_LOG`` (``LOG_COUNTERS`` words of 8
bytes per layer): ``rd_layer`` addresses an entry, and from the next cycle on
``rd_data`` is word ``rd_word`` of that entry (the select is combinational).
Only configs with ``layer_log`` build one.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig
from gen.contract import LOG_COUNTERS

__all__ = ["LayerLog"]


class LayerLog(wiring.Component):
    """Per-layer copies of the run counters (see the module doc).

    Members
    -------
    we, layer, counts: In; write ``counts`` (one word per ``LOG_COUNTERS`` name) as
        entry ``layer``.
    rd_layer, rd_word: In; rd_data: Out, ``counter_bits`` wide.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        bits = config.counter_bits
        super().__init__({
            "we": In(1),
            "layer": In(range(config.max_layers + 1)),
            "counts": In(data.StructLayout({name: bits for name in LOG_COUNTERS})),
            "rd_layer": In(range(config.max_layers)),
            "rd_word": In(range(len(LOG_COUNTERS))),
            "rd_data": Out(bits),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        words = []
        for name in LOG_COUNTERS:
            m.submodules[f"log_{name}"] = mem = Memory(shape=cfg.counter_bits,
                                                       depth=cfg.max_layers, init=[])
            wp, rp = mem.write_port(), mem.read_port()
            m.d.comb += [wp.addr.eq(self.layer), wp.en.eq(self.we), wp.data.eq(self.counts[name]),
                         rp.addr.eq(self.rd_layer)]
            words.append(rp.data)
        m.d.comb += self.rd_data.eq(Array(words)[self.rd_word])
        return m
