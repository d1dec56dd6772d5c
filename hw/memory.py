"""Deep memories stored as narrow slices, one block RAM deep each.

Yosys maps a memory deeper than one block RAM at its width to several block RAMs
stacked in depth, with a select after their outputs. On ECP5 a block RAM's data
output comes some 5.8 ns after the clock, so that select (and the route to it
from the stacked blocks) leaves little of a 10 ns cycle for anything else.
:class:`SlicedMemory` stores the same words as narrow slices that each fit one
block RAM at the full depth (a DP16KD holds 16 Kbit: 4096 x 4, 8192 x 2, ...),
so every read data bit comes straight from one block.

The ports behave as ``amaranth.lib.memory`` ports of a memory of
``ArrayLayout(elem, count)``: a synchronous, non-transparent read port and a
write port with one enable per element.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Shape, Signal, Value
from amaranth.lib import data
from amaranth.lib.memory import Memory

__all__ = ["SlicedMemory", "slice_bits"]

BLOCK_BITS = 16384


def slice_bits(depth: int) -> int:
    """The widest slice that fits one block RAM of ``BLOCK_BITS`` at ``depth`` words."""
    pow2 = 1 << max(0, (depth - 1).bit_length())
    return max(1, BLOCK_BITS // pow2)


class _Port:
    def __init__(self, shape, count, depth, name, write):
        self.addr = Signal(range(depth), name=f"{name}_addr")
        self.data = Signal(shape, name=f"{name}_data")
        # A write enable per element; a read enable (the data holds while it is low).
        self.en = Signal(count, name=f"{name}_en") if write else Signal(init=1, name=f"{name}_en")


class SlicedMemory:
    """A memory of ``depth`` words of ``count`` elements of ``elem`` (a shape; the
    words are ``ArrayLayout(elem, count)``, or ``elem`` itself for ``count == 1``),
    elaborated into ``m`` as per-element slices of at most :func:`slice_bits` bits.

    ``write_port()`` and ``read_port()`` may each be called once.
    """

    def __init__(self, m: Module, name: str, elem, count: int, depth: int):
        self.elem = Shape.cast(elem)
        self.count = count
        self.depth = depth
        self.shape = self.elem if count == 1 else data.ArrayLayout(elem, count)
        self.name = name
        self._m = m
        self._mems = []
        width = self.elem.width
        step = slice_bits(depth)
        for e in range(count):
            for lo in range(0, width, step):
                hi = min(width, lo + step)
                mem = Memory(shape=hi - lo, depth=depth, init=[])
                m.submodules[f"{name}_{e}_{lo}"] = mem
                self._mems.append((e, lo, hi, mem))
        self._wr = self._rd = None

    def write_port(self) -> _Port:
        assert self._wr is None, "one write port"
        self._wr = p = _Port(self.shape, self.count, self.depth, f"{self.name}_w", True)
        width = self.elem.width
        flat = Value.cast(p.data)
        for e, lo, hi, mem in self._mems:
            wp = mem.write_port()
            self._m.d.comb += [wp.addr.eq(p.addr), wp.en.eq(p.en[e]),
                               wp.data.eq(flat[e * width + lo:e * width + hi])]
        return p

    def read_port(self) -> _Port:
        assert self._rd is None, "one read port"
        self._rd = p = _Port(self.shape, self.count, self.depth, f"{self.name}_r", False)
        parts = []
        for e, lo, hi, mem in self._mems:
            rp = mem.read_port()
            self._m.d.comb += [rp.addr.eq(p.addr), rp.en.eq(p.en)]
            parts.append(rp.data)
        self._m.d.comb += Value.cast(p.data).eq(Cat(*parts))
        return p
