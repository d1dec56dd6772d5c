"""Block memories with registered read data, stored as slices one block RAM deep.

Two costs of block RAM reads on ECP5 shape this module:

* A DP16KD without its output register drives its data some 5.8 ns after the clock,
  which leaves little of a 10 ns cycle for the route to the next register. With the
  block's own output register (``REGMODE = "OUTREG"``) the data leaves 1 ns after the
  clock. Yosys never uses that register, so on an ECP5 platform (see
  :func:`hw.dsp.is_ecp5`) :class:`BlockMemory` instantiates the blocks itself
  (write on port A, read on port B; memories deeper than a block's 16384 x 1 are
  left to Yosys).
* Yosys maps a memory deeper than one block RAM at its width to blocks stacked in
  depth with a select after their outputs. :class:`BlockMemory` stores every word as
  narrow slices that each fit one block at the full depth (16 Kbit: 4096 x 4,
  8192 x 2, ...), so every read data bit comes straight from one block.

Read ports have a latency of two: ``data`` is a register (no reset) loaded, when
``out_en`` is high, with the word the port addressed at the previous edge where ``en``
was high. Write ports write ``data`` at ``addr`` where ``en`` is high; ``en`` has one
bit per element when the memory is built with ``granular=True``.

A word written at any edge from the one where ``en`` takes its address up to the one
where ``out_en`` loads ``data`` is read as undefined. The blocks differ there: a DP16KD
reads at the first of those edges (and is undefined if the word is written at it), an
iCE40 block at the last (see below). The memory simulation gets stands for both: an
address register, the memory read without a clock, and ``data`` loaded with all ones
instead of such a word, so that a read that depends on the order shows up in
simulation. (Other platforms, and an ECP5 memory deeper than one block, get a read
port with a clock and the ``data`` register after it.)

On an iCE40 platform the memory is the same address register and a read without a
clock, marked ``no_rw_check``: Yosys then moves the ``data`` register into the block
RAM, whose read a write of the same word at that edge leaves undefined. (A read port
with a clock and a register after it costs a copy of the write port's data, address
and enable and a compare in flip-flops, which Yosys adds to give the memory's
read-before-write order at a collision.) A granular memory is one memory with a write
mask per element: the blocks' 256 x 16 mode masks every bit, so the elements share
blocks instead of each filling, in part, blocks of its own.

A memory built with ``single_port=True`` has one address for its write port and its
one read port, for users that never read and write in the same cycle: on an iCE40
platform it is made of the UP5K's single-port RAMs (``SB_SPRAM256KA``, 16384 x 16;
an element of a granular memory gets RAMs of its own), which hold much more than its
block RAMs. A write cycle leaves the read port's first stage undefined, as the RAM
does (its output is undefined after a write); elsewhere the memory says so by
loading it with all ones, so that a read that overlaps a write shows up in
simulation.
"""

from __future__ import annotations

from amaranth.hdl import ClockSignal, Const, Elaboratable, Instance, Module, Mux, Shape, Signal, Value
from amaranth.lib import data
from amaranth.lib.memory import Memory

from .dsp import is_ecp5, is_ice40

SPRAM_WIDTH, SPRAM_DEPTH = 16, 16384
# Attribute of the registers whose power-on value is left undefined: an iCE40 build
# removes their ``init`` before synthesis (``hw.flow.synth``), so that Yosys moves them into
# the block RAMs without flip-flops that would supply that value.
UNDEFINED_INIT = "mlg_undefined_init"

__all__ = ["BlockMemory", "slice_bits", "ECP5_MODES", "UNDEFINED_INIT"]

BLOCK_BITS = 16384
# DP16KD data widths and the depth each holds; the word address sits in the top
# address bits (a width-4 port uses AD13..AD2).
ECP5_MODES = ((18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384))
_ECP5_ADDR_SHIFT = {18: 4, 9: 3, 4: 2, 2: 1, 1: 0}


def slice_bits(depth: int) -> int:
    """The widest slice that fits one block RAM of ``BLOCK_BITS`` at ``depth`` words."""
    pow2 = 1 << max(0, (depth - 1).bit_length())
    return max(1, BLOCK_BITS // pow2)


def ecp5_mode(depth: int):
    """The widest DP16KD data width that holds ``depth`` words, or None if none does."""
    for width, words in ECP5_MODES:
        if depth <= words:
            return width
    return None


class _WritePort:
    def __init__(self, shape, depth, en_width, name):
        self.addr = Signal(range(depth), name=f"{name}_addr")
        self.data = Signal(shape, name=f"{name}_data")
        self.en = Signal(en_width, name=f"{name}_en")


class _ReadPort:
    def __init__(self, shape, depth, name):
        self.addr = Signal(range(depth), name=f"{name}_addr")
        self.en = Signal(init=1, name=f"{name}_en")
        self.out_en = Signal(init=1, name=f"{name}_out_en")
        self.data = Signal(shape, name=f"{name}_data", reset_less=True)


class BlockMemory(Elaboratable):
    """``depth`` words of ``count`` elements of ``elem`` (the words are
    ``ArrayLayout(elem, count)``, or ``elem`` itself for ``count == 1``).

    One write port (``write_port()``) and any number of read ports (``read_port()``),
    all in the ``sync`` domain.
    """

    def __init__(self, elem, count: int, depth: int, *, granular: bool = False,
                 single_port: bool = False, name: str = "mem"):
        self.elem = Shape.cast(elem)
        self.count = count
        self.depth = depth
        self.granular = granular
        self.single_port = single_port
        if single_port and depth > SPRAM_DEPTH:
            raise ValueError(f"{name}: a single-port memory holds at most {SPRAM_DEPTH} words, "
                             f"not {depth}")
        if count > 1:
            self.shape = data.ArrayLayout(elem, count)
        else:
            self.shape = elem if isinstance(elem, data.Layout) else self.elem
        self.name = name
        self._wr = None
        self._rds = []

    def write_port(self) -> _WritePort:
        assert self._wr is None, "one write port"
        self._wr = _WritePort(self.shape, self.depth, self.count if self.granular else 1,
                              f"{self.name}_w")
        return self._wr

    def read_port(self) -> _ReadPort:
        assert not (self.single_port and self._rds), "a single-port memory has one read port"
        p = _ReadPort(self.shape, self.depth, f"{self.name}_r{len(self._rds)}")
        self._rds.append(p)
        return p

    def _slices(self, step):
        """(enable bit, low bit, high bit) of the flat word, per slice of at most ``step``."""
        width = self.elem.width
        if self.granular:
            return [(e, e * width + lo, e * width + min(width, lo + step))
                    for e in range(self.count) for lo in range(0, width, step)]
        total = width * self.count
        return [(0, lo, min(total, lo + step)) for lo in range(0, total, step)]

    def elaborate(self, platform):
        m = Module()
        wr = self._wr
        assert wr is not None, f"{self.name}: no write port"
        wdata = Value.cast(wr.data)
        if self.single_port:
            self._single_port(m, wr, wdata, platform)
            return m
        mode = ecp5_mode(self.depth)
        if is_ecp5(platform) and mode is not None:
            self._ecp5(m, wr, wdata, mode)
            return m
        ice40 = is_ice40(platform)
        if platform is not None and not ice40:
            self._clocked(m, wr, wdata)
            return m
        attrs = {"no_rw_check": 1} if ice40 else None
        # The address registers, and (generic memory) whether the word they hold has been
        # written since (see the module doc).
        regs = []
        for p in self._rds:
            aq = Signal.like(p.addr, name=f"{p.addr.name[:-5]}_aq")
            with m.If(p.en):
                m.d.sync += aq.eq(p.addr)
            if ice40:
                # The block RAM's output has no power-on value: no flip-flops for one.
                Value.cast(p.data).attrs[UNDEFINED_INIT] = 1
                regs.append((aq, None))
                continue
            hit_new, hit_old = (Signal(name=f"{p.addr.name[:-5]}_{w}") for w in ("wnew", "wold"))
            written = Signal(name=f"{p.addr.name[:-5]}_written")
            m.d.comb += [hit_new.eq(wr.en.any() & (wr.addr == p.addr)),
                         hit_old.eq(wr.en.any() & (wr.addr == aq))]
            m.d.sync += written.eq(Mux(p.en, hit_new, written | hit_old))
            regs.append((aq, written | hit_old))
        if ice40 and self.granular and self.count > 1:
            # iCE40 block RAMs have a write mask per bit (256 x 16): one memory with the
            # elements' write enables fills blocks that per-element slices half use.
            parts = [(None, 0, len(wdata))]
        else:
            parts = self._slices(slice_bits(self.depth))
        for i, (e, lo, hi) in enumerate(parts):
            mem = Memory(shape=hi - lo, depth=self.depth, init=[], attrs=attrs)
            m.submodules[f"s{i}"] = mem
            if e is None:
                wp = mem.write_port(granularity=self.elem.width)
                m.d.comb += wp.en.eq(wr.en)
            else:
                wp = mem.write_port()
                m.d.comb += wp.en.eq(wr.en[e])
            m.d.comb += [wp.addr.eq(wr.addr), wp.data.eq(wdata[lo:hi])]
            for p, (aq, undefined) in zip(self._rds, regs):
                rp = mem.read_port(domain="comb")
                m.d.comb += rp.addr.eq(aq)
                word = rp.data if undefined is None else Mux(undefined, ~Const(0, hi - lo), rp.data)
                with m.If(p.out_en):
                    m.d.sync += Value.cast(p.data)[lo:hi].eq(word)
        return m

    def _clocked(self, m, wr, wdata):
        """Other platforms (an ECP5 memory deeper than its blocks): read ports with a
        clock, in slices, each followed by the ``data`` register."""
        for i, (e, lo, hi) in enumerate(self._slices(slice_bits(self.depth))):
            mem = Memory(shape=hi - lo, depth=self.depth, init=[])
            m.submodules[f"s{i}"] = mem
            wp = mem.write_port()
            m.d.comb += [wp.addr.eq(wr.addr), wp.en.eq(wr.en[e]), wp.data.eq(wdata[lo:hi])]
            for p in self._rds:
                rp = mem.read_port()
                m.d.comb += [rp.addr.eq(p.addr), rp.en.eq(p.en)]
                with m.If(p.out_en):
                    m.d.sync += Value.cast(p.data)[lo:hi].eq(rp.data)

    def _single_port(self, m, wr, wdata, platform):
        p = self._rds[0] if self._rds else _ReadPort(self.shape, self.depth, f"{self.name}_r0")
        writing = wr.en.any()
        addr = Signal.like(wr.addr, name=f"{self.name}_a")
        m.d.comb += addr.eq(Mux(writing, wr.addr, p.addr))
        rdata = Value.cast(p.data)
        if not is_ice40(platform):
            mem = Memory(shape=len(wdata), depth=self.depth, init=[])
            m.submodules.mem = mem
            en_bits = len(wr.en)
            wp = mem.write_port(granularity=len(wdata) // en_bits if en_bits > 1 else None)
            rp = mem.read_port(transparent_for=())
            raw = Signal(len(wdata), name=f"{self.name}_q")
            m.d.comb += [wp.addr.eq(addr), wp.data.eq(wdata), wp.en.eq(wr.en),
                         rp.addr.eq(addr), rp.en.eq(p.en & ~writing)]
            # The first stage after a write: all ones (undefined on the RAM).
            poisoned = Signal(name=f"{self.name}_poison")
            m.d.sync += poisoned.eq(writing | (poisoned & ~p.en))
            m.d.comb += raw.eq(Mux(poisoned, ~Const(0, len(wdata)), rp.data))
            with m.If(p.out_en):
                m.d.sync += rdata.eq(raw)
            return
        # SB_SPRAM256KA: 16-bit words, a write mask per nibble; slices of 16 bits (per
        # element of a granular memory).
        for i, (e, lo, hi) in enumerate(self._slices(SPRAM_WIDTH)):
            out = Signal(SPRAM_WIDTH, name=f"{self.name}_do{i}")
            din = Signal(SPRAM_WIDTH, name=f"{self.name}_di{i}")
            a14 = Signal(14, name=f"{self.name}_a{i}")
            m.d.comb += [din.eq(wdata[lo:hi]), a14.eq(addr)]
            m.submodules[f"spram{i}"] = Instance(
                "SB_SPRAM256KA",
                i_ADDRESS=a14, i_DATAIN=din, i_MASKWREN=Const(0xF, 4), i_WREN=wr.en[e],
                i_CHIPSELECT=p.en | writing, i_CLOCK=ClockSignal(), i_STANDBY=Const(0),
                i_SLEEP=Const(0), i_POWEROFF=Const(1), o_DATAOUT=out)
            with m.If(p.out_en):
                m.d.sync += rdata[lo:hi].eq(out[:hi - lo])

    def _ecp5(self, m, wr, wdata, mode):
        shift = _ECP5_ADDR_SHIFT[mode]
        abits = len(wr.addr)

        def address(prefix, addr):
            pins = {}
            for i in range(14):
                j = i - shift
                if 0 <= j < abits:
                    pins[f"i_{prefix}{i}"] = addr[j]
                else:
                    # Below the word address: byte enables in x18 mode, else unused.
                    pins[f"i_{prefix}{i}"] = Const(1 if (mode == 18 and i < 2) else 0)
            return pins

        for i, (e, lo, hi) in enumerate(self._slices(mode)):
            for k, p in enumerate(self._rds):
                out = Signal(18, name=f"{p.addr.name[:-5]}_do{i}")
                pins = {
                    "i_CLKA": ClockSignal(), "i_CEA": Const(1), "i_OCEA": Const(1),
                    "i_WEA": wr.en[e], "i_RSTA": Const(0),
                    "i_CLKB": ClockSignal(), "i_CEB": p.en, "i_OCEB": p.out_en,
                    "i_WEB": Const(0), "i_RSTB": Const(0),
                    **address("ADA", wr.addr), **address("ADB", p.addr),
                }
                for b in range(3):
                    pins[f"i_CSA{b}"] = pins[f"i_CSB{b}"] = Const(0)
                for b in range(18):
                    pins[f"i_DIA{b}"] = wdata[lo + b] if lo + b < hi else Const(0)
                    pins[f"i_DIB{b}"] = Const(0)
                    pins[f"o_DOB{b}"] = out[b]
                m.submodules[f"s{i}_r{k}"] = Instance(
                    "DP16KD",
                    p_DATA_WIDTH_A=mode, p_DATA_WIDTH_B=mode,
                    p_REGMODE_A="NOREG", p_REGMODE_B="OUTREG",
                    p_RESETMODE="SYNC", p_ASYNC_RESET_RELEASE="SYNC",
                    p_CSDECODE_A="0b000", p_CSDECODE_B="0b000",
                    p_WRITEMODE_A="NORMAL", p_WRITEMODE_B="NORMAL",
                    p_GSR="DISABLED", **pins)
                m.d.comb += Value.cast(p.data)[lo:hi].eq(out[:hi - lo])
