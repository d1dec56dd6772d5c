"""The code loaders of the generation units: descriptor in, packed codes into the stores.

A loader accepts a layer's descriptor, works out the layer's geometry (the loop
ends and address strides the rest of the unit walks), then reads the layer's packed
code stream (``i_codes``, bytes) through a :class:`~hw.unpacker.CodeUnpacker`, one
code per cycle, and writes every code to its word of the on-chip stores. The
sections arrive in the order B (or the codes of a dense layer), U (with level 1),
V (with level 2), each in the order of its ``gen.network.LayerSpec`` tensor. With
``section_align`` every section starts on a byte boundary (the unpacker drops the
rest of a byte in an ``ALIGN`` cycle); without it the sections follow each other
bit for bit, and only the layer's end is aligned.

Once the last code is stored the loader raises ``start`` for one cycle and holds
the layer fields (``layer``) until the unit signals ``done``; it accepts the next
descriptor in the cycle after that. Write requests are combinational: the unit
registers them in front of its memories.

* :class:`CodeLoader` fills the stores of :class:`hw.generation.GenerationUnit`,
  words of ``rows`` (U, W1) or ``cols`` (V) codes, one lane a code.
* :class:`SerialCodeLoader` fills those of :class:`hw.serialgen.SerialGenerationUnit`,
  one code a word at consecutive addresses.
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from gen.config import KERNEL_SIZES, AcceleratorConfig
from hw.interfaces import descriptor_layout
from hw.unpacker import CodeUnpacker, decode_code

__all__ = ["CodeLoader", "SerialCodeLoader", "LoadPhase", "SerialLoadPhase", "LOADING_BIT",
           "layer_layout", "serial_layer_layout", "store_depths", "serial_store_depths",
           "w1_value_bits",
           "address_limit", "word_shape", "store_write_signature", "register_write",
           "dense_code_bits", "decode_dense", "kernel_taps"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class LoadPhase(enum.Enum, shape=5):
    """:class:`CodeLoader`'s state. The load states share bit 4 (:data:`LOADING_BIT`): the code
    stream's ready is that one state register bit, no decode in front of the
    unpacker's handshake."""
    IDLE = 0
    SETUP = 1
    ALIGN = 2
    GENERATE = 3    # the layer's codes are stored; its weights are being generated
    LOAD_B = 16
    LOAD_U = 17
    LOAD_V = 18


LOADING_BIT = 4


class SerialLoadPhase(enum.Enum, shape=3):
    """:class:`SerialCodeLoader`'s state: the phases it has, in three bits (its code
    stream's ready is decoded from them)."""
    IDLE = 0
    SETUP = 1
    LOAD_B = 2
    LOAD_U = 3
    ALIGN = 4
    GENERATE = 5


# Sizes ---------------------------------------------------------------------------

def w1_value_bits(config: AcceleratorConfig) -> int:
    """Signed width of a W1 entry: a level-1 sum, a basis or a dense value (``qd``,
    ``qb`` or ``qv`` bits)."""
    c = config
    return max(c.w1_bits, c.b_value_bits, c.d_value_bits, c.v_value_bits)


def store_depths(config: AcceleratorConfig) -> dict[str, int]:
    """Words in each code store and in the W1 buffer of :class:`CodeLoader`.

    Without level 2, ``bo = co``; so ``bo`` never exceeds ``max(max_bo, max_co)``.
    """
    c = config
    bo = max(c.max_bo, c.max_co)
    kk = c.max_k * c.max_k
    ci_tiles = _cdiv(c.max_ci, c.rows)
    return {
        "B": bo * c.max_bi * kk,
        "U": bo * ci_tiles * c.max_bi,
        "V": _cdiv(c.max_co, c.cols) * c.max_bo,
        "W1": bo * ci_tiles * kk,
    }


def serial_store_depths(config: AcceleratorConfig) -> dict[str, int]:
    """Words of the B store and of the U (or dense code) store of :class:`SerialCodeLoader`."""
    c = config
    kk = c.max_k * c.max_k
    return {"B": c.max_co * c.max_bi * kk,
            "U": c.max_co * c.max_ci * max(kk, c.max_bi)}


def address_limit(config: AcceleratorConfig) -> int:
    """A bound on every store address (and address base) the lane unit computes."""
    c = config
    kk_max = c.max_k * c.max_k
    bo_cap = max(c.max_bo, c.max_co)
    return (bo_cap + c.cols + 1) * _cdiv(c.max_ci, c.rows) * kk_max + kk_max + 1


def word_shape(elem, count: int):
    """The word of a :class:`~hw.memory.BlockMemory` of ``count`` elements ``elem``."""
    return data.ArrayLayout(elem, count) if count > 1 else elem


def store_write_signature(elem, count: int, depth: int, *, granular: bool = True):
    """A write request to a :class:`~hw.memory.BlockMemory`: its write port's ``en``
    (one bit per element if ``granular``), ``addr`` and ``data``."""
    return wiring.Signature({
        "en": Out(count if granular else 1),
        "addr": Out(range(depth)),
        "data": Out(word_shape(elem, count)),
    })


def register_write(m: Module, port, request) -> None:
    """Drive the memory write ``port`` from registers loaded with ``request``: a memory
    write leaves a cycle after it is decided, so the handshakes and counters that decide
    it do not reach the block RAM inputs in the same cycle."""
    m.d.sync += [port.en.eq(request.en), port.addr.eq(request.addr),
                 port.data.eq(request.data)]


# Layer fields -------------------------------------------------------------------------

def layer_layout(config: AcceleratorConfig) -> data.StructLayout:
    """The layer fields :class:`CodeLoader` holds: the descriptor's, with ``bo = co``
    without level 2, and the derived loop ends (``*_m1``, ``ci_last``/``co_last``: the
    first channel of the last ci/co tile), ``stride`` (W1 words per basis ``o``:
    ``ceil(ci/rows) * k*k``) and ``bikk`` (``bi * k*k``)."""
    c = config
    desc = descriptor_layout(c)
    kk_max = c.max_k * c.max_k
    bo_cap = max(c.max_bo, c.max_co)
    return data.StructLayout({
        "ci": desc["ci"].shape, "co": desc["co"].shape, "bi": desc["bi"].shape,
        "bo": range(bo_cap + 1), "kk": range(kk_max + 1),
        "has_l1": 1, "has_l2": 1, "w_shift": desc["w_shift"].shape,
        "stride": range(_cdiv(c.max_ci, c.rows) * kk_max + 1),
        "bikk": range(c.max_bi * kk_max + 1),
        "bi_m1": desc["bi"].shape, "bo_m1": range(bo_cap + 1), "kk_m1": range(kk_max + 1),
        "ci_last": range(c.max_ci + c.rows + 1), "co_last": range(c.max_co + c.cols + 1),
    })


def serial_layer_layout(config: AcceleratorConfig) -> data.StructLayout:
    """The layer fields :class:`SerialCodeLoader` holds: the descriptor's, ``inner``
    (``bi`` with level 1, else ``k*k``: codes per U or dense row), ``s_o`` (``ci *
    inner``: U or dense codes per output channel) and ``bikk`` (``bi * k*k``: B codes
    per output channel)."""
    c = config
    desc = descriptor_layout(c)
    kk_max = c.max_k * c.max_k
    inner_max = max(kk_max, c.max_bi)
    return data.StructLayout({
        "ci": desc["ci"].shape, "co": desc["co"].shape, "bi": desc["bi"].shape,
        "has_l1": 1, "dense_sel": 2, "w_shift": desc["w_shift"].shape,
        "kk": range(kk_max + 1), "inner": range(inner_max + 1),
        "s_o": range(c.max_ci * inner_max + 1), "bikk": range(c.max_bi * kk_max + 1),
    })


def dense_code_bits(config: AcceleratorConfig, dense_sel):
    """The code width of a dense layer whose descriptor says ``dense_bits`` (0 ``qd``,
    1 ``qb``, 2 ``qv``)."""
    return Mux(dense_sel == 1, config.qb, Mux(dense_sel == 2, config.qv, config.qd))


def decode_dense(config: AcceleratorConfig, code, dense_sel):
    """The value of a dense layer's raw ``code`` (its width chosen by ``dense_sel``)."""
    form = config.decode
    return Mux(dense_sel == 1, decode_code(code, config.qb, form),
               Mux(dense_sel == 2, decode_code(code, config.qv, form),
                   decode_code(code, config.qd, form)))


def kernel_taps(m: Module, domain, k, kk, max_k: int) -> None:
    """``kk = k * k`` for the kernel sizes up to ``max_k``, as a table of ``k``."""
    with m.Switch(k):
        for size in KERNEL_SIZES:
            if size <= max_k:
                with m.Case(size):
                    domain += kk.eq(size * size)


def _members(config: AcceleratorConfig, layer) -> dict:
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, got {type(config).__name__}")
    return {
        "i_desc": In(stream.Signature(descriptor_layout(config))),
        "i_codes": In(stream.Signature(unsigned(8))),
        "layer": Out(layer),
        "start": Out(1),
        "done": In(1),
        "idle": Out(1),
    }


class _SectionLoader(wiring.Component):
    """What both loaders share: the phases around the sections, ``start``/``done``.
    ``Phase`` is the loader's state enum (members ``IDLE``, ``SETUP``, ``ALIGN``,
    ``GENERATE``, ``LOAD_B``, ``LOAD_U``)."""

    Phase = LoadPhase

    def _phases(self, m: Module):
        """The phase registers (``state``, ``pend``: where ALIGN goes next), the
        descriptor's ready, ``idle``, ``start`` and the end of a layer."""
        P = self.Phase
        state, pend = Signal(P), Signal(P)
        m.d.comb += [self.i_desc.ready.eq(state == P.IDLE), self.idle.eq(state == P.IDLE)]
        with m.If(state == P.ALIGN):
            m.d.sync += state.eq(pend)
            with m.If(pend == P.GENERATE):
                m.d.comb += self.start.eq(1)
        with m.If((state == P.GENERATE) & self.done):
            m.d.sync += state.eq(P.IDLE)
        return state, pend

    def _end_section(self, m: Module, state, pend, nxt) -> None:
        """After a section's last code: on to ``nxt`` (a load phase, or ``GENERATE``),
        through ALIGN if the sections are byte aligned or the layer's codes are done."""
        P = self.Phase
        if self.section_align:
            m.d.sync += [state.eq(P.ALIGN), pend.eq(nxt)]
        else:
            with m.If(nxt == P.GENERATE):
                m.d.sync += [state.eq(P.ALIGN), pend.eq(nxt)]
            with m.Else():
                m.d.sync += state.eq(nxt)


class CodeLoader(_SectionLoader):
    """Descriptor and code stream in, the B/U/V stores and the dense W1 words written.

    The stores (depths :func:`store_depths`):

    * ``B`` ``[bo, bi, k*k]`` raw codes (only with level 1), at consecutive addresses;
    * ``U`` words ``(o, ci_tile, j)`` of ``rows`` raw codes (``ci`` within the tile);
    * ``V`` words ``(co_tile, o)`` of ``cols`` raw codes (``co`` within the tile);
    * ``W1`` words ``(o, ci_tile, tap)`` of ``rows`` signed values: without level 1
      the B section is decoded into it (the dense bypass and the level-2-only basis).

    Timing: the descriptor is taken in ``IDLE``; ``SETUP`` then takes ``max(ceil(ci /
    rows), bi, ceil(co / cols)) + 1`` cycles to work out the geometry; the sections
    follow at up to one code per cycle (the code bytes pass a three-entry FIFO first,
    so the unpacker's shifts start from registers). ``start`` is high in the ALIGN cycle
    that follows the cycle of the last code (and of its write request).

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig`.
    section_align:
        Whether each code section (B, U, V) of a layer starts on a byte boundary.

    Members
    -------
    i_desc: In(stream.Signature(hw.interfaces.descriptor_layout(config)))
    i_codes: In(stream.Signature(unsigned(8)))
    layer: Out(layer_layout(config))
        The fields of the layer being loaded or generated.
    start: Out(1)
        The layer's codes are stored (one cycle).
    done: In(1)
        The layer's last weight is generated; the loader is idle from the next cycle.
    idle: Out(1)
    b_wr, u_wr, v_wr, w1_wr: Out(store_write_signature(...))
        Write requests to the stores.
    """

    def __init__(self, config: AcceleratorConfig, *, section_align: bool = True):
        members = _members(config, layer_layout(config))
        c = config
        depth = store_depths(c)
        members |= {
            "b_wr": Out(store_write_signature(unsigned(c.qb), 1, depth["B"], granular=False)),
            "u_wr": Out(store_write_signature(unsigned(c.qu), c.rows, depth["U"])),
            "v_wr": Out(store_write_signature(unsigned(c.qv), c.cols, depth["V"])),
            "w1_wr": Out(store_write_signature(signed(w1_value_bits(c)), c.rows, depth["W1"])),
        }
        self.config = config
        self.section_align = bool(section_align)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        depth = store_depths(cfg)
        kk_max = cfg.max_k * cfg.max_k
        bo_cap = max(cfg.max_bo, cfg.max_co)

        m.submodules.code_in = code_in = SyncFIFOBuffered(width=8, depth=3)
        m.submodules.unpacker = unpacker = CodeUnpacker(8)
        wiring.connect(m, wiring.flipped(self.i_codes), code_in.w_stream)
        wiring.connect(m, code_in.r_stream, unpacker.i_stream)
        code = unpacker.o_stream

        # Layer registers -------------------------------------------------------
        lay = self.layer
        desc = descriptor_layout(cfg)
        ci, co, k = Signal.like(lay.ci), Signal.like(lay.co), Signal(desc["k"].shape)
        bi, bo, kk = Signal.like(lay.bi), Signal.like(lay.bo), Signal.like(lay.kk)
        has_l1, has_l2 = Signal(), Signal()
        w_shift = Signal.like(lay.w_shift)
        stride, bikk = Signal.like(lay.stride), Signal.like(lay.bikk)
        dense = Signal()
        m.d.comb += dense.eq(~has_l1 & ~has_l2)
        dense_sel = Signal(2)       # a dense layer's code width: 0 qd, 1 qb, 2 qv
        kernel_taps(m, m.d.comb, k, kk, cfg.max_k)
        setup_ci = Signal.like(lay.ci_last)
        setup_j = Signal(range(cfg.max_bi + 1))
        setup_co = Signal.like(lay.co_last)
        # End-of-loop values, so that the issue stage compares registers for equality
        # instead of adding and comparing magnitudes.
        bi_m1, bo_m1, kk_m1 = Signal.like(bi), Signal.like(bo), Signal.like(kk)
        ci_last, co_last = Signal.like(setup_ci), Signal.like(setup_co)
        m.d.comb += [lay.ci.eq(ci), lay.co.eq(co), lay.bi.eq(bi), lay.bo.eq(bo), lay.kk.eq(kk),
                     lay.has_l1.eq(has_l1), lay.has_l2.eq(has_l2), lay.w_shift.eq(w_shift),
                     lay.stride.eq(stride), lay.bikk.eq(bikk), lay.bi_m1.eq(bi_m1),
                     lay.bo_m1.eq(bo_m1), lay.kk_m1.eq(kk_m1), lay.ci_last.eq(ci_last),
                     lay.co_last.eq(co_last)]

        # Load counters: c0/c1/c2 the section's loops, ln the lane of the code, lb the
        # word address of lane 0, la the B address.
        c0 = Signal(range(bo_cap + cfg.max_co + 1))
        c1 = Signal(range(max(cfg.max_ci, bo_cap, cfg.max_bi) + 1))
        c2 = Signal(range(max(kk_max, cfg.max_bi) + 1))
        ln = Signal(range(max(R, C)))
        lb = Signal(range(address_limit(cfg)))
        la = Signal(range(depth["B"] + 1))

        def reset_load():
            return [x.eq(0) for x in (c0, c1, c2, ln, lb, la)]

        state, pend = self._phases(m)
        d = self.i_desc.payload
        # (A config without level 2 takes every layer as one without: its level-2 logic
        # is then constant, and the engine refuses such a layer.)
        d_l2 = d.has_l2 if cfg.level2 else Const(0)
        with m.If(self.i_desc.valid & self.i_desc.ready):
            m.d.sync += [
                ci.eq(d.ci), co.eq(d.co), k.eq(d.k), bi.eq(d.bi),
                bo.eq(Mux(d_l2, d.bo, d.co)),
                has_l1.eq(d.has_l1), has_l2.eq(d_l2), dense_sel.eq(d.dense_bits),
                w_shift.eq(d.w_shift),
                stride.eq(0), bikk.eq(0), setup_ci.eq(0), setup_j.eq(0), setup_co.eq(0),
                bi_m1.eq(d.bi - 1), bo_m1.eq(Mux(d_l2, d.bo, d.co) - 1),
                state.eq(LoadPhase.SETUP),
            ]

        # SETUP: stride and bikk by repeated addition, and the last tiles' channels.
        with m.If(state == LoadPhase.SETUP):
            ci_more = setup_ci < ci
            j_more = setup_j < bi
            co_more = setup_co < co
            m.d.sync += kk_m1.eq(kk - 1)
            with m.If(co_more):
                m.d.sync += setup_co.eq(setup_co + C)
            with m.If(ci_more):
                m.d.sync += [setup_ci.eq(setup_ci + R), stride.eq(stride + kk)]
            with m.If(j_more):
                m.d.sync += [setup_j.eq(setup_j + 1), bikk.eq(bikk + kk)]
            with m.If(~ci_more & ~j_more & ~co_more):
                m.d.sync += [state.eq(LoadPhase.LOAD_B), ci_last.eq(setup_ci - R),
                             co_last.eq(setup_co - C), *reset_load()]

        # Sections ----------------------------------------------------------------
        in_b, in_u, in_v = (state == phase for phase in (LoadPhase.LOAD_B, LoadPhase.LOAD_U,
                                                         LoadPhase.LOAD_V))
        # Per-section settings: the code width, the loop ends minus one and the lane
        # address step of the section being loaded.
        width = Signal(range(9))
        lim0, lim1, lim2 = Signal.like(c0), Signal.like(c1), Signal.like(c2)
        inc = Signal(range(max(kk_max, cfg.max_bi, bo_cap) + 1))

        def section_settings(st):
            is_u, is_v = st == LoadPhase.LOAD_U, st == LoadPhase.LOAD_V
            width_b = Mux(dense, dense_code_bits(cfg, dense_sel), cfg.qb)
            return [width.eq(Mux(is_u, cfg.qu, Mux(is_v, cfg.qv, width_b))),
                    lim0.eq(Mux(is_v, co, bo) - 1),
                    lim1.eq(Mux(is_v, bo, Mux(is_u | ~has_l1, ci, bi)) - 1),
                    lim2.eq(Mux(is_v, 1, Mux(is_u, bi, kk)) - 1),
                    inc.eq(Mux(is_v, bo, Mux(is_u, bi, kk)))]
        if self.section_align:
            # Registered: every load phase is entered from SETUP (B first) or through
            # ALIGN, whose one cycle sets up the phase that follows it.
            m.d.sync += section_settings(Mux(state == LoadPhase.ALIGN, pend,
                                             Mux(state == LoadPhase.SETUP, LoadPhase.LOAD_B,
                                                 state)))
        else:
            m.d.comb += section_settings(state)
        m.d.comb += [
            unpacker.width.eq(width),
            code.ready.eq(state.as_value()[LOADING_BIT]),
            unpacker.align.eq(state == LoadPhase.ALIGN),
        ]
        wrap2 = c2 == lim2
        wrap1 = wrap2 & (c1 == lim1)
        wrap0 = wrap1 & (c0 == lim0)
        lane_step = Mux(in_v, wrap1, wrap2)
        lane_wrap = Mux(in_v, ln == C - 1, (ln == R - 1) | (c1 == lim1))
        onehot = Signal(max(R, C))
        m.d.comb += onehot.eq(Const(1, max(R, C)) << ln)
        load_addr = lb + Mux(in_v, c1, c2)

        dec_b = decode_code(code.payload, cfg.qb, cfg.decode)
        dec_d = decode_dense(cfg, code.payload, dense_sel)
        # Write addresses and data follow the code whatever the handshake: only the
        # enables wait for it.
        b_wr, u_wr, v_wr, w1_wr = self.b_wr, self.u_wr, self.v_wr, self.w1_wr
        m.d.comb += [b_wr.addr.eq(la), b_wr.data.eq(code.payload),
                     w1_wr.addr.eq(load_addr), u_wr.addr.eq(load_addr), v_wr.addr.eq(load_addr),
                     *[w1_wr.data[r].eq(Mux(dense, dec_d, dec_b)) for r in range(R)],
                     *[u_wr.data[r].eq(code.payload) for r in range(R)],
                     *[v_wr.data[c].eq(code.payload) for c in range(C)]]
        with m.If(code.valid & code.ready):
            m.d.sync += c2.eq(Mux(wrap2, 0, c2 + 1))
            with m.If(wrap2):
                m.d.sync += c1.eq(Mux(wrap1, 0, c1 + 1))
            with m.If(wrap1):
                m.d.sync += c0.eq(c0 + 1)
            with m.If(lane_step):
                with m.If(lane_wrap):
                    m.d.sync += [ln.eq(0), lb.eq(lb + inc)]
                with m.Else():
                    m.d.sync += ln.eq(ln + 1)
            with m.If(in_b & has_l1):
                m.d.comb += b_wr.en.eq(1)
                m.d.sync += la.eq(la + 1)
            with m.If(in_b & ~has_l1):
                m.d.comb += w1_wr.en.eq(onehot[:R])
            with m.If(in_u):
                m.d.comb += u_wr.en.eq(onehot[:R])
            with m.If(in_v):
                m.d.comb += v_wr.en.eq(onehot[:C])
            with m.If(wrap0):
                m.d.sync += reset_load()
                nxt = Signal(LoadPhase)
                with m.If(in_b):
                    m.d.comb += nxt.eq(Mux(has_l1, LoadPhase.LOAD_U,
                                           Mux(has_l2, LoadPhase.LOAD_V, LoadPhase.GENERATE)))
                with m.Elif(in_u):
                    m.d.comb += nxt.eq(Mux(has_l2, LoadPhase.LOAD_V, LoadPhase.GENERATE))
                with m.Else():
                    m.d.comb += nxt.eq(LoadPhase.GENERATE)
                self._end_section(m, state, pend, nxt)
        return m


class SerialCodeLoader(_SectionLoader):
    """Descriptor and code stream in, the B store and the U (or dense code) store written.

    Both stores hold raw codes, one a word, written in stream order at consecutive
    addresses (depths :func:`serial_store_depths`): ``B`` ``[co, bi, k*k]`` (level 1);
    ``U`` ``[co, ci, bi]`` with level 1, else the dense codes ``[co, ci, k*k]``.
    A descriptor's ``has_l2`` and ``bo`` are ignored (``bo = co``).

    Timing: the descriptor is taken in ``IDLE``; ``SETUP`` takes ``max(ci, bi) + 1``
    cycles; then up to one code per cycle, straight from ``i_codes`` through an
    unpacker of the narrow byte-window kind. ``start`` is high in the ALIGN cycle that
    follows the cycle of the last code.

    Members as :class:`CodeLoader`, with ``layer: Out(serial_layer_layout(config))``
    and the write requests ``b_wr`` and ``u_wr``.
    """

    Phase = SerialLoadPhase

    def __init__(self, config: AcceleratorConfig, *, section_align: bool = True):
        members = _members(config, serial_layer_layout(config))
        c = config
        depth = serial_store_depths(c)
        members |= {
            "b_wr": Out(store_write_signature(unsigned(c.qb), 1, depth["B"], granular=False)),
            "u_wr": Out(store_write_signature(unsigned(self.code_bits_of(c)), 1, depth["U"],
                                              granular=False)),
        }
        self.config = config
        self.section_align = bool(section_align)
        super().__init__(members)

    @staticmethod
    def code_bits_of(config: AcceleratorConfig) -> int:
        """Width of a U store word: the widest code it holds."""
        return max(config.qb, config.qu, config.qd, config.qv)

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        kk_max = cfg.max_k * cfg.max_k
        inner_max = max(kk_max, cfg.max_bi)
        depth = serial_store_depths(cfg)

        m.submodules.unpacker = unpacker = CodeUnpacker(8, self.code_bits_of(cfg),
                                                        byte_window=True)
        wiring.connect(m, wiring.flipped(self.i_codes), unpacker.i_stream)
        code = unpacker.o_stream

        lay = self.layer
        co_m1 = Signal.like(lay.co)
        # (The loader's last indices: its compares take them from registers.)
        xb_last, xs_last = Signal.like(lay.bikk), Signal.like(lay.s_o)
        fields = {name: Signal.like(getattr(lay, name), name=name)
                  for name in ("ci", "co", "bi", "has_l1", "dense_sel", "w_shift", "kk",
                               "s_o", "bikk")}
        ci, co, bi, has_l1, kk = (fields[n] for n in ("ci", "co", "bi", "has_l1", "kk"))
        s_o, bikk = fields["s_o"], fields["bikk"]
        m.d.comb += [getattr(lay, name).eq(sig) for name, sig in fields.items()]
        m.d.comb += lay.inner.eq(Mux(has_l1, bi, kk))

        state, pend = self._phases(m)
        d = self.i_desc.payload
        n = Signal(range(max(cfg.max_ci, cfg.max_bi) + 1))
        with m.If(self.i_desc.valid & self.i_desc.ready):
            m.d.sync += [ci.eq(d.ci), co.eq(d.co), co_m1.eq(d.co - 1), bi.eq(d.bi),
                         has_l1.eq(d.has_l1), fields["dense_sel"].eq(d.dense_bits),
                         fields["w_shift"].eq(d.w_shift),
                         s_o.eq(0), bikk.eq(0), n.eq(0), state.eq(SerialLoadPhase.SETUP)]
            kernel_taps(m, m.d.sync, d.k, kk, cfg.max_k)

        # SETUP: s_o = ci * inner and bikk = bi * kk by repeated addition, then the
        # loader's last indices.
        with m.If(state == SerialLoadPhase.SETUP):
            m.d.sync += n.eq(n + 1)
            with m.If(n < ci):
                m.d.sync += s_o.eq(s_o + lay.inner)
            with m.If(n < bi):
                m.d.sync += bikk.eq(bikk + kk)
            with m.If((n >= ci) & (n >= bi)):
                m.d.sync += [state.eq(SerialLoadPhase.LOAD_B), xb_last.eq(bikk - 1),
                             xs_last.eq(s_o - 1)]

        # A section is co runs of x codes, written at consecutive addresses.
        in_b, in_u = state == SerialLoadPhase.LOAD_B, state == SerialLoadPhase.LOAD_U
        lx = Signal(range(max(cfg.max_ci * inner_max, cfg.max_bi * kk_max) + 1))
        lo = Signal(range(cfg.max_co + 1))
        la = Signal(range(max(depth["B"], depth["U"]) + 1))
        x_last = Mux(in_b & has_l1, xb_last, xs_last)
        width_b = Mux(has_l1, cfg.qb, dense_code_bits(cfg, fields["dense_sel"]))
        m.d.comb += [unpacker.width.eq(Mux(in_u, cfg.qu, width_b)),
                     code.ready.eq(in_b | in_u),
                     unpacker.align.eq(state == SerialLoadPhase.ALIGN)]
        take = code.valid & code.ready
        m.d.comb += [self.b_wr.en.eq(take & in_b & has_l1),
                     self.u_wr.en.eq(take & (in_u | (in_b & ~has_l1))),
                     self.b_wr.addr.eq(la), self.u_wr.addr.eq(la),
                     self.b_wr.data.eq(code.payload), self.u_wr.data.eq(code.payload)]
        with m.If(take):
            m.d.sync += [la.eq(la + 1), lx.eq(lx + 1)]
            with m.If(lx == x_last):
                m.d.sync += [lx.eq(0), lo.eq(lo + 1)]
                with m.If(lo == co_m1):
                    m.d.sync += [lo.eq(0), la.eq(0)]
                    nxt = Mux(in_b & has_l1, SerialLoadPhase.LOAD_U, SerialLoadPhase.GENERATE)
                    self._end_section(m, state, pend, nxt)
        return m
