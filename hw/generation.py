"""The on-chip generation unit: packed MLG codes in, PE weight vectors out.

Dataflow of one layer
---------------------
1. **Descriptor.** ``i_desc`` delivers the run-time fields (``ci``, ``co``,
   ``k``, ``bi``, ``bo``, ``has_l1``, ``has_l2``, ``w_shift``; the others are
   ignored). Without level 2 the unit uses ``bo = co``.
2. **Load.** The layer's packed code stream arrives on ``i_codes`` as bytes:
   the B section (``qb`` bits; for a dense layer ``qd``, or ``qb`` / ``qv`` as the
   descriptor's ``dense_bits`` says), then U (``qu``, if
   level 1 exists), then V (``qv``, if level 2 exists), each in the order of
   its ``gen.network.LayerSpec`` tensor. With ``section_align`` (the default)
   every section starts on a byte boundary, as three separately packed tensors
   concatenated; without it the sections follow each other bit for bit. The
   stream of a layer always ends on a byte boundary. A :class:`CodeUnpacker`
   splits it into codes, one per cycle, written to on-chip memories:

   * ``B`` ``[bo, bi, k*k]`` raw codes (only with level 1);
   * ``U`` words ``(o, ci_tile, j)`` of ``rows`` raw codes (``ci`` within the tile);
   * ``V`` words ``(co_tile, o)`` of ``cols`` raw codes (``co`` within the tile);
   * ``W1`` words ``(o, ci_tile, tap)`` of ``rows`` signed values. Without
     level 1 the B codes are decoded straight into it (this is the dense
     bypass and the level-2-only basis); with level 1 it is filled by step 3.

3. **Level 1** (``has_l1``): ``W1[o, c, t] = sum_j U[o, c, j] * B[o, j, t]``,
   the lanes working across the ``rows`` input channels of a W1 word.
4. **Weight tiles**, in the order of ``hw.interfaces`` (co tile, ci tile, tap):

   * with level 2, ``W2[c, r] = sum_o V[co0+c, o] * W1[o, ci0+r, tap]``: each
     cycle one V word and one W1 word are read and the lanes accumulate part
     of their ``cols x rows`` outer product, ``bo`` cycles per lane group;
   * without level 2, ``W2 = W1``: one W1 word (a column of the tile) per cycle.

   Every weight is rounded exactly as ``gen.integer.round_w2`` (add
   ``2**(s-1)``, arithmetic shift right by ``s = w_shift``, saturate to
   ``w_bits``), and forced to zero past ``Co`` / ``Ci``.

Lanes
-----
``config.gen_lanes`` multipliers, shared by level 1 and level 2. In level 2,
with ``L <= cols`` lanes a group covers ``L`` columns of one tile row; with
more, ``cols`` columns of ``L // cols`` rows (at most ``rows``). Level 1 uses
``min(lanes, rows)`` of them. One lane does one multiply-accumulate per cycle,
so a level-2 tile takes ``ceil(cols/Lc) * ceil(rows/Lr) * bo`` cycles.

Tile buffers
------------
Results are written into one of two *work* tiles (``rows x cols`` registers
each), which successive tiles use in turn. A complete work tile moves in one
cycle to the *output* tile once that is empty; the output tile shifts its
``rows`` vectors out on ``o_weights``. The first operands of a tile are issued
only when its work tile is free, so the pipeline behind the issue stage never
stalls: its registers carry no enable, which keeps the 64-lane datapath free of
a high-fanout stall net.

Memory
------
The W1 buffer holds a whole layer: ``max(max_bo, max_co) * ceil(max_ci/rows) *
max_k**2`` words of ``rows`` entries (it doubles as the store of dense
weights, whose ``bo`` is ``co``). That is 4608 x 96 bits for the default
config; for ResNet-18 maxima (512 channels) it would exceed an ECP5-85F, where
a per-ci-tile W1 buffer regenerated for each co tile is the way to go.

All streams are valid/ready; the unit tolerates any idle cycles on its inputs
and any backpressure on its output. The next descriptor is accepted once the
last tile of a layer has been generated, so loading overlaps the emission of
the last tiles.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from gen.config import KERNEL_SIZES, AcceleratorConfig, lane_plan
from hw.interfaces import descriptor_layout, weight_stream_signature
from hw.dsp import registered_multiply
from hw.memory import BlockMemory
from hw.unpacker import CodeUnpacker, decode_code

__all__ = ["GenerationUnit", "generation_members", "WeightRounder", "round_half", "shift_saturate", "saturate",
           "lane_plan"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_half(shift, width: int):
    """``2**(shift-1)`` (0 for ``shift == 0``) as a ``width``-bit unsigned value."""
    return ((Const(1, width + 1) << shift) >> 1)[:width]


def saturate(y, w_bits: int):
    """Signed ``y`` clamped to ``w_bits``: it fits iff every bit from ``w_bits - 1`` up
    equals the sign, a reduction rather than two magnitude comparisons."""
    y = y.as_signed()
    top = y[w_bits - 1:]
    if len(top) <= 1:
        return y
    fits = (top == 0) | (top == (1 << len(top)) - 1)
    hi, lo = (1 << (w_bits - 1)) - 1, -(1 << (w_bits - 1))
    return Mux(fits, y[:w_bits].as_signed(), Mux(y[-1], lo, hi))


def shift_saturate(x, shift, w_bits: int):
    """Arithmetic shift right of signed ``x`` by ``shift``, saturated to ``w_bits``."""
    return saturate(x.as_signed() >> shift, w_bits)


class WeightRounder(wiring.Component):
    """Combinational ``sat_w(round_shift(x, shift))``, the W2 rounding of ``gen.integer``.

    The generation unit uses the same three steps (:func:`round_half` add, shift,
    :func:`saturate`) with registers between them.

    Parameters
    ----------
    in_bits:
        Signed width of ``x``.
    w_bits:
        Signed width of the result.
    shift_bits:
        Width of the ``shift`` input; shifts beyond ``in_bits + 1`` give the
        same result as ``in_bits + 1`` (0).
    held_shift:
        ``shift`` is a layer constant: the clamped shift and the rounding constant
        are registered, so ``y`` follows a new ``shift`` one cycle later (and the
        path from ``x`` to ``y`` has no decoder in front of the adder).
    """

    def __init__(self, in_bits: int, w_bits: int, shift_bits: int, *, held_shift: bool = False):
        self.in_bits, self.w_bits = in_bits, w_bits
        self.held_shift = held_shift
        super().__init__({
            "x": In(signed(in_bits)),
            "shift": In(unsigned(shift_bits)),
            "y": Out(signed(w_bits)),
        })

    def elaborate(self, platform):
        m = Module()
        lim = self.in_bits + 1
        s = Signal(range(lim + 1))
        half = Signal(self.in_bits + 1)
        dom = m.d.sync if self.held_shift else m.d.comb
        clamped = Mux(self.shift > lim, lim, self.shift)
        dom += [s.eq(clamped), half.eq(round_half(clamped, self.in_bits + 1))]
        t = Signal(signed(self.in_bits + 2))
        m.d.comb += t.eq(self.x + half)
        m.d.comb += self.y.eq(shift_saturate(t, s, self.w_bits))
        return m


class _State(enum.Enum, shape=5):
    IDLE = 0
    SETUP = 1
    ALIGN = 2
    ISSUE_L1 = 3
    DRAIN_L1 = 4
    ISSUE_MAIN = 5
    DRAIN_MAIN = 6
    # The load states share bit 4 (LOADING_BIT): the code stream's ready is that one
    # state register bit, no decode in front of the unpacker's handshake.
    LOAD_B = 16
    LOAD_U = 17
    LOAD_V = 18


LOADING_BIT = 4


class _WritePortRegs:
    """Combinational stand-ins for a write port's ``en``/``addr``/``data``."""

    def __init__(self, port, name):
        self.en = Signal.like(port.en, name=f"{name}_en")
        self.addr = Signal.like(port.addr, name=f"{name}_addr")
        self.data = Signal.like(port.data, name=f"{name}_data")


def generation_members(config: AcceleratorConfig) -> dict:
    """The ports of a generation unit of ``config`` (this one and ``hw.serialgen``'s)."""
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, got {type(config).__name__}")
    return {
        "i_desc": In(stream.Signature(descriptor_layout(config))),
        "i_codes": In(stream.Signature(unsigned(8))),
        "o_weights": Out(weight_stream_signature(config)),
        "idle": Out(1),
    }


class GenerationUnit(wiring.Component):
    """Generates a layer's PE weights from its packed MLG codes (see the module doc).

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig`: array shape, ``w_bits``,
        ``qb``/``qu``/``qv``/``qd``, ``decode``, ``gen_lanes`` and the maxima
        that size the code and W1 memories.
    section_align:
        Whether each code section (B, U, V) of a layer starts on a byte boundary.

    Members
    -------
    i_desc: In(stream.Signature(hw.interfaces.descriptor_layout(config)))
    i_codes: In(stream.Signature(unsigned(8)))
        Packed code bytes of the layers, in descriptor order.
    o_weights: Out(hw.interfaces.weight_stream_signature(config))
    idle: Out(1)
        No layer in progress and every generated weight delivered.

    Descriptors must respect the config maxima (``ci <= max_ci``, ``co <=
    max_co``, ``k`` one of the kernel sizes up to ``max_k``, ``bi <= max_bi``
    with level 1, ``bo <= max_bo`` with level 2, all at least 1).
    """

    def __init__(self, config: AcceleratorConfig, *, section_align: bool = True):
        members = generation_members(config)
        self.config = config
        self.section_align = bool(section_align)
        self.plan = lane_plan(config)
        super().__init__(members)

    # Sizes derived from the config ------------------------------------------

    @property
    def w1_value_bits(self) -> int:
        """Signed width of a W1 buffer entry: a level-1 sum, a basis or a dense value
        (``qd``, ``qb`` or ``qv`` bits)."""
        c = self.config
        return max(c.w1_bits, c.b_value_bits, c.d_value_bits, c.v_value_bits)

    @property
    def memory_depths(self) -> dict[str, int]:
        """Words in each code memory and in the W1 buffer.

        Without level 2, ``bo = co``; so ``bo`` never exceeds ``max(max_bo, max_co)``.
        """
        c = self.config
        bo = max(c.max_bo, c.max_co)
        kk = c.max_k * c.max_k
        ci_tiles = _cdiv(c.max_ci, c.rows)
        return {
            "B": bo * c.max_bi * kk,
            "U": bo * ci_tiles * c.max_bi,
            "V": _cdiv(c.max_co, c.cols) * c.max_bo,
            "W1": bo * ci_tiles * kk,
        }

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        form = cfg.decode
        plan = self.plan
        Lc, Lr, Pc, Pr = plan["Lc"], plan["Lr"], plan["Pc"], plan["Pr"]
        NL, L1L, P1 = plan["lanes"], plan["L1"], plan["P1"]
        depth = self.memory_depths
        w1w = self.w1_value_bits
        a_w = max(cfg.u_value_bits, cfg.v_value_bits)
        acc_w = max(cfg.w2_bits, a_w + w1w)
        kk_max = cfg.max_k * cfg.max_k
        bo_cap = max(cfg.max_bo, cfg.max_co)
        ci_tiles_max = _cdiv(cfg.max_ci, R)
        addr_lim = (bo_cap + C + 1) * ci_tiles_max * kk_max + kk_max + 1

        # Memories --------------------------------------------------------
        # Read data arrive in registers two cycles after the address (hw.memory: the
        # block RAMs' own output registers on ECP5); W1, the deepest, is sliced.
        m.submodules.b_mem = b_mem = BlockMemory(unsigned(cfg.qb), 1, depth["B"], name="b_mem")
        m.submodules.u_mem = u_mem = BlockMemory(unsigned(cfg.qu), R, depth["U"],
                                                 granular=True, name="u_mem")
        m.submodules.v_mem = v_mem = BlockMemory(unsigned(cfg.qv), C, depth["V"],
                                                 granular=True, name="v_mem")
        # (compact: in single-port RAM; W1 is written by the load and level 1, and read
        # only after them.)
        m.submodules.w1_mem = w1_mem = BlockMemory(signed(w1w), R, depth["W1"], granular=True,
                                                   single_port=cfg.compact, name="w1_mem")
        b_port, b_rd = b_mem.write_port(), b_mem.read_port()
        u_port, u_rd = u_mem.write_port(), u_mem.read_port()
        v_port, v_rd = v_mem.write_port(), v_mem.read_port()
        w1_port, w1_rd = w1_mem.write_port(), w1_mem.read_port()
        # Every memory write (code loads, level-1 results) leaves from registers, a
        # cycle after it is decided: the unpacker's handshake, the loader's counters and
        # the lane select do not reach the block RAM inputs in the same cycle. A section
        # is read no earlier than two cycles after its last code (ALIGN comes between).
        wr = {}
        for name, port in (("b", b_port), ("u", u_port), ("v", v_port), ("w1", w1_port)):
            wr[name] = regs = _WritePortRegs(port, f"{name}_wq")
            m.d.sync += [port.en.eq(regs.en), port.addr.eq(regs.addr), port.data.eq(regs.data)]
        b_wr, u_wr, v_wr, w1_wr = wr["b"], wr["u"], wr["v"], wr["w1"]

        # The code bytes land in registers before the unpacker: their sources (block
        # RAM outputs, a source select) leave no time for its shifts in the same cycle.
        # Three entries take a byte every cycle (two would alternate full and empty).
        m.submodules.code_in = code_in = SyncFIFOBuffered(width=8, depth=3)
        m.submodules.unpacker = unpacker = CodeUnpacker(8)
        wiring.connect(m, wiring.flipped(self.i_codes), code_in.w_stream)
        wiring.connect(m, code_in.r_stream, unpacker.i_stream)
        code = unpacker.o_stream

        # Layer registers -------------------------------------------------
        desc = descriptor_layout(cfg)
        ci = Signal(desc["ci"].shape)
        co = Signal(desc["co"].shape)
        k = Signal(desc["k"].shape)
        has_l1, has_l2 = Signal(), Signal()
        bi = Signal(desc["bi"].shape)
        bo = Signal(range(bo_cap + 1))
        kk = Signal(range(kk_max + 1))
        stride = Signal(range(ci_tiles_max * kk_max + 1))  # W1 words per basis o
        bikk = Signal(range(cfg.max_bi * kk_max + 1))
        ws_acc = Signal(range(acc_w + 2))                  # w_shift clamped per path
        ws_byp = Signal(range(w1w + 2))
        half_acc = Signal(acc_w + 1)
        half_byp = Signal(w1w + 1)
        dense = Signal()
        m.d.comb += dense.eq(~has_l1 & ~has_l2)
        dense_sel = Signal(2)       # a dense layer's code width: 0 qd, 1 qb, 2 qv
        dense_w = Mux(dense_sel == 1, cfg.qb, Mux(dense_sel == 2, cfg.qv, cfg.qd))

        with m.Switch(k):
            for size in KERNEL_SIZES:
                if size <= cfg.max_k:
                    with m.Case(size):
                        m.d.comb += kk.eq(size * size)

        state = Signal(_State)
        pend = Signal(_State)       # where ALIGN goes next
        setup_ci = Signal(range(cfg.max_ci + R + 1))
        setup_j = Signal(range(cfg.max_bi + 1))
        setup_co = Signal(range(cfg.max_co + C + 1))
        # End-of-loop values of the issue counters, so that the issue stage compares
        # registers for equality instead of adding and comparing magnitudes.
        bi_m1 = Signal.like(bi)
        bo_m1 = Signal.like(bo)
        kk_m1 = Signal.like(kk)
        ci_last = Signal.like(setup_ci)
        co_last = Signal.like(setup_co)

        # Loader counters -------------------------------------------------
        c0 = Signal(range(bo_cap + cfg.max_co + 1))
        c1 = Signal(range(max(cfg.max_ci, bo_cap, cfg.max_bi) + 1))
        c2 = Signal(range(max(kk_max, cfg.max_bi) + 1))
        ln = Signal(range(max(R, C)))
        lb = Signal(range(addr_lim))
        la = Signal(range(depth["B"] + 1))

        # Issue counters and addresses -------------------------------------
        l0 = Signal(range(bo_cap + cfg.max_co + C + 1))   # o (level 1) or co0
        ci0 = Signal(range(cfg.max_ci + R + 1))
        tap = Signal(range(kk_max))
        pr = Signal(range(Pr))
        pc = Signal(range(max(Pc, P1, C)))
        n = Signal(range(max(cfg.max_bi, bo_cap) + 1))
        ub = Signal(range(addr_lim))
        bb = Signal(range(addr_lim))
        bt = Signal(range(addr_lim))
        nk = Signal(range(addr_lim))
        wa = Signal(range(addr_lim))
        vb = Signal(range(addr_lim))
        toff = Signal(range(addr_lim))
        wo = Signal(range(addr_lim))
        ob = Signal(range(addr_lim))
        cob = Signal(range(addr_lim))
        obt = Signal(len(ob) + 1)    # ob + toff, kept up to date with them

        ctrl_layout = data.StructLayout({
            "l1": 1, "l2": 1, "byp": 1, "first": 1, "last": 1,
            "pr": range(Pr), "pc": range(max(Pc, P1, C)), "wa": range(addr_lim),
            "rmask": R, "cmask": C, "tile_done": 1, "layer_last": 1, "slot": 1,
        })

        # Pipeline stage registers: they advance every cycle; only the issue stage waits.
        s0 = Signal(ctrl_layout)
        s0_valid = Signal()
        s1, s2, s3, s4, s5, s6, s7 = (Signal(ctrl_layout, name=f"s{i}") for i in range(1, 8))
        v1, v2, v3, v4, v5, v6, v7 = (Signal(name=f"s{i}_valid") for i in range(1, 8))

        # Tiles: two work tiles, filled in turn, and the output tile ---------------
        w_shape = signed(cfg.w_bits)
        work = [[[Signal(w_shape, name=f"work{t}_{r}_{c}") for c in range(C)] for r in range(R)]
                for t in range(2)]
        busy = Signal(2)       # a tile has been issued into the slot and not yet copied out
        full = Signal(2)       # the slot's tile is complete
        work_last = Signal(2)
        cur_slot = Signal()    # slot of the tile being issued
        rd_slot = Signal()     # slot copied out next
        out = [[Signal(w_shape, name=f"out_{r}_{c}") for c in range(C)] for r in range(R)]
        out_cnt = Signal(range(R + 1))
        out_last = Signal()

        # Descriptor and control FSM -----------------------------------------
        issue_l1 = state == _State.ISSUE_L1
        issue_main = state == _State.ISSUE_MAIN
        pipe_empty = Signal()
        m.d.comb += self.idle.eq((state == _State.IDLE) & (busy == 0) & (out_cnt == 0))

        def reset_issue():
            return [x.eq(0) for x in (l0, ci0, tap, pr, pc, n, ub, bb, bt, nk, wa, vb,
                                      toff, wo, ob, cob, obt)]

        def reset_load():
            return [x.eq(0) for x in (c0, c1, c2, ln, lb, la)]

        d = self.i_desc.payload
        # (A config without level 2 takes every layer as one without: its level-2 logic
        # is then constant, and the engine refuses such a layer.)
        d_l2 = d.has_l2 if cfg.level2 else Const(0)
        m.d.comb += self.i_desc.ready.eq(state == _State.IDLE)
        with m.If(self.i_desc.valid & self.i_desc.ready):
            ws_a = Mux(d.w_shift > acc_w + 1, acc_w + 1, d.w_shift)
            ws_b = Mux(d.w_shift > w1w + 1, w1w + 1, d.w_shift)
            m.d.sync += [
                ci.eq(d.ci), co.eq(d.co), k.eq(d.k), bi.eq(d.bi),
                bo.eq(Mux(d_l2, d.bo, d.co)),
                has_l1.eq(d.has_l1), has_l2.eq(d_l2), dense_sel.eq(d.dense_bits),
                ws_acc.eq(ws_a), ws_byp.eq(ws_b),
                half_acc.eq(round_half(ws_a, acc_w + 1)),
                half_byp.eq(round_half(ws_b, w1w + 1)),
                stride.eq(0), bikk.eq(0), setup_ci.eq(0), setup_j.eq(0), setup_co.eq(0),
                bi_m1.eq(d.bi - 1), bo_m1.eq(Mux(d_l2, d.bo, d.co) - 1),
                state.eq(_State.SETUP),
            ]

        with m.If(state == _State.SETUP):
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
                m.d.sync += [state.eq(_State.LOAD_B), ci_last.eq(setup_ci - R),
                             co_last.eq(setup_co - C), *reset_load()]

        # Loader ------------------------------------------------------------
        in_b, in_u, in_v = (state == _State.LOAD_B), (state == _State.LOAD_U), (state == _State.LOAD_V)
        # Per-section loader settings: the code width, the loop ends minus one and the
        # lane address step of the section being loaded.
        width = Signal(range(9))
        lim0 = Signal.like(c0)
        lim1 = Signal.like(c1)
        lim2 = Signal.like(c2)
        inc = Signal(range(max(kk_max, cfg.max_bi, bo_cap) + 1))

        def section_settings(st):
            is_u, is_v = st == _State.LOAD_U, st == _State.LOAD_V
            return [width.eq(Mux(is_u, cfg.qu, Mux(is_v, cfg.qv, Mux(dense, dense_w, cfg.qb)))),
                    lim0.eq(Mux(is_v, co, bo) - 1),
                    lim1.eq(Mux(is_v, bo, Mux(is_u | ~has_l1, ci, bi)) - 1),
                    lim2.eq(Mux(is_v, 1, Mux(is_u, bi, kk)) - 1),
                    inc.eq(Mux(is_v, bo, Mux(is_u, bi, kk)))]
        if self.section_align:
            # Registered: every load state is entered from SETUP (B first) or through
            # ALIGN, whose one cycle sets up the state that follows it.
            m.d.sync += section_settings(Mux(state == _State.ALIGN, pend,
                                             Mux(state == _State.SETUP, _State.LOAD_B, state)))
        else:
            m.d.comb += section_settings(state)
        m.d.comb += [
            unpacker.width.eq(width),
            code.ready.eq(state.as_value()[LOADING_BIT]),
            unpacker.align.eq(state == _State.ALIGN),
        ]
        wrap2 = c2 == lim2
        wrap1 = wrap2 & (c1 == lim1)
        wrap0 = wrap1 & (c0 == lim0)
        lane_step = Mux(in_v, wrap1, wrap2)
        lane_wrap = Mux(in_v, ln == C - 1, (ln == R - 1) | (c1 == lim1))
        onehot = Signal(max(R, C))
        m.d.comb += onehot.eq(Const(1, max(R, C)) << ln)
        load_addr = lb + Mux(in_v, c1, c2)

        dec_b = decode_code(code.payload, cfg.qb, form)
        dec_d = Mux(dense_sel == 1, dec_b,
                    Mux(dense_sel == 2, decode_code(code.payload, cfg.qv, form),
                        decode_code(code.payload, cfg.qd, form)))
        # Write addresses and data follow the code whatever the handshake: only the
        # enables wait for it (level 1's W1 writes below take precedence).
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
                nxt_sig = Signal(_State)
                with m.If(in_b):
                    m.d.comb += nxt_sig.eq(Mux(has_l1, _State.LOAD_U,
                                               Mux(has_l2, _State.LOAD_V, _State.ISSUE_MAIN)))
                with m.Elif(in_u):
                    m.d.comb += nxt_sig.eq(Mux(has_l2, _State.LOAD_V, _State.ISSUE_MAIN))
                with m.Else():
                    m.d.comb += nxt_sig.eq(_State.ISSUE_MAIN)
                final = nxt_sig == _State.ISSUE_MAIN
                if self.section_align:
                    m.d.sync += [state.eq(_State.ALIGN), pend.eq(nxt_sig)]
                else:
                    with m.If(final):
                        m.d.sync += [state.eq(_State.ALIGN), pend.eq(nxt_sig)]
                    with m.Else():
                        m.d.sync += state.eq(nxt_sig)

        with m.If(state == _State.ALIGN):
            with m.If(pend == _State.ISSUE_MAIN):
                m.d.sync += [state.eq(Mux(has_l1, _State.ISSUE_L1, _State.ISSUE_MAIN)),
                             *reset_issue()]
            with m.Else():
                m.d.sync += state.eq(pend)

        # Issue stage ---------------------------------------------------------
        # The loop ends of the issue mode (level 1, level 2 or bypass) are registers,
        # set in the one state before each issue state (ALIGN, DRAIN_L1): the loop
        # conditions then start from registers, not from the state decode.
        n_lim = Signal.like(n)
        pc_lim = Signal.like(pc)
        pr_lim = Signal.like(pr)
        l0_lim = Signal.like(l0)
        mode_l1 = Signal()
        # n == n_lim and n == 0, kept as registers with n (n is 0 in ALIGN and DRAIN_L1).
        n_last, n_zero = Signal(), Signal()

        def issue_limits(l1):
            lim = Mux(l1, bi_m1, Mux(has_l2, bo_m1, 0))
            return [mode_l1.eq(l1), n_lim.eq(lim), n_last.eq(lim == 0), n_zero.eq(1),
                    pc_lim.eq(Mux(l1, P1 - 1, Mux(has_l2, Pc - 1, C - 1))),
                    pr_lim.eq(Mux(~l1 & has_l2, Pr - 1, 0)),
                    l0_lim.eq(Mux(l1, bo_m1, co_last))]
        with m.If(state == _State.ALIGN):
            m.d.sync += issue_limits(has_l1)
        with m.If(state == _State.DRAIN_L1):
            m.d.sync += issue_limits(0)
        last4 = n_last
        last3 = (pc == pc_lim) & (pr == pr_lim)
        last2 = tap == kk_m1
        last1 = ci0 == ci_last
        last0 = l0 == l0_lim

        # A tile is issued only into a free slot, so a result never waits at the end of
        # the pipeline and nothing past the issue stage needs a stall.
        tile_first = n_zero & (pc == 0) & (pr == 0)
        blocked = issue_main & tile_first & busy.bit_select(cur_slot, 1)
        m.d.comb += [
            s0_valid.eq((issue_l1 | issue_main) & ~blocked),
            s0.slot.eq(cur_slot),
            s0.l1.eq(issue_l1),
            s0.l2.eq(issue_main & has_l2),
            s0.byp.eq(issue_main & ~has_l2),
            s0.first.eq(n_zero),
            s0.last.eq(last4),
            s0.pr.eq(pr), s0.pc.eq(pc), s0.wa.eq(wa),
            s0.rmask.eq(Cat(ci0 + r < ci for r in range(R))),
            s0.cmask.eq(Cat(l0 + c < co for c in range(C))),
            s0.tile_done.eq(last3 & last4),
            s0.layer_last.eq(last4 & last3 & last2 & last1 & last0),
            u_rd.addr.eq(ub + n),
            b_rd.addr.eq(bt + nk),
            v_rd.addr.eq(vb + n),
            w1_rd.addr.eq(Mux(has_l2, wo, obt)),
        ]
        with m.If(s0_valid & issue_main & tile_first):
            m.d.sync += busy.bit_select(cur_slot, 1).eq(1)
        with m.If(s0_valid & issue_main & last3 & last4):
            m.d.sync += cur_slot.eq(~cur_slot)

        with m.If(s0_valid):
            with m.If(~last4):
                m.d.sync += [n.eq(n + 1), nk.eq(nk + kk), wo.eq(wo + stride),
                             n_last.eq(n + 1 == n_lim), n_zero.eq(0)]
            with m.Else():
                m.d.sync += [n.eq(0), nk.eq(0), n_last.eq(n_lim == 0), n_zero.eq(1)]
                with m.If(~last3):
                    with m.If(pc != pc_lim):
                        m.d.sync += pc.eq(pc + 1)
                    with m.Else():
                        m.d.sync += [pc.eq(0), pr.eq(pr + 1)]
                    m.d.sync += [wo.eq(toff), ob.eq(ob + stride), obt.eq(obt + stride)]
                with m.Else():
                    m.d.sync += [pc.eq(0), pr.eq(0)]
                    with m.If(~last2 | ~last1):
                        m.d.sync += [
                            tap.eq(Mux(last2, 0, tap + 1)),
                            ci0.eq(Mux(last2, ci0 + R, ci0)),
                            toff.eq(toff + 1), wo.eq(toff + 1), ob.eq(cob), wa.eq(wa + 1),
                            obt.eq(cob + toff + 1),
                            bt.eq(Mux(last2, bb, bt + 1)),
                            ub.eq(Mux(last2, ub + bi, ub)),
                        ]
                    with m.Else():
                        m.d.sync += [tap.eq(0), ci0.eq(0)]
                        with m.If(~last0):
                            with m.If(mode_l1):
                                m.d.sync += [l0.eq(l0 + 1), wa.eq(wa + 1), ub.eq(ub + bi),
                                             bb.eq(bb + bikk), bt.eq(bb + bikk)]
                            with m.Else():
                                m.d.sync += [l0.eq(l0 + C), vb.eq(vb + bo), toff.eq(0), wo.eq(0),
                                             cob.eq(ob + stride), ob.eq(ob + stride),
                                             obt.eq(ob + stride)]
                        with m.Else():
                            m.d.sync += state.eq(Mux(issue_l1, _State.DRAIN_L1, _State.DRAIN_MAIN))

        with m.If((state == _State.DRAIN_L1) & pipe_empty):
            m.d.sync += [state.eq(_State.ISSUE_MAIN), *reset_issue()]
        with m.If((state == _State.DRAIN_MAIN) & pipe_empty):
            m.d.sync += state.eq(_State.IDLE)

        # Stage 1: the memories' registered read data (inside the block RAMs on ECP5).
        # Stage 1a: fabric registers placed near the lanes (the block RAMs sit in rows
        # across the die, too far from the multipliers for the route, the decode and the
        # operand select in one cycle): the lanes' operands, and W1 for the bypass.
        sr, vr = Signal(ctrl_layout, name="sr"), Signal(name="sr_valid")
        sm, vm = Signal(ctrl_layout, name="sm"), Signal(name="sm_valid")
        w1_q = Signal.like(w1_rd.data, name="w1_q")
        m.d.sync += [sr.eq(s1), vr.eq(v1), sm.eq(sr), vm.eq(vr), w1_q.eq(w1_rd.data)]

        # The lanes' operands are decoded and routed from the read registers (stage 1)
        # into registers of their own at stage 1a, by the multipliers.
        u_val = [decode_code(u_rd.data[r], cfg.qu, form) for r in range(R)]
        v_val = [decode_code(v_rd.data[c], cfg.qv, form) for c in range(C)]
        b_val = decode_code(b_rd.data, cfg.qb, form)
        w1_val = [w1_q[r] for r in range(R)]
        w1_rval = [w1_rd.data[r] for r in range(R)]

        def pick(m, index, options, shape):
            out = Signal(shape)
            if len(options) == 1:
                m.d.comb += out.eq(options[0])
                return out
            with m.Switch(index):
                for i, opt in enumerate(options):
                    with m.Case(i):
                        m.d.comb += out.eq(opt)
            return out

        prod = []
        for lr in range(Lr):
            for lc in range(Lc):
                l = lr * Lc + lc
                if cfg.level2:
                    a2 = pick(m, sr.pc, [v_val[p * Lc + lc] if p * Lc + lc < C else 0
                                         for p in range(Pc)], signed(a_w))
                    b2 = pick(m, sr.pr, [w1_rval[p * Lr + lr] if p * Lr + lr < R else 0
                                         for p in range(Pr)], signed(w1w))
                else:
                    # (Without level 2 the lanes' results only count for level 1.)
                    a2, b2 = Const(0, signed(a_w)), Const(0, signed(w1w))
                if l < L1L:
                    a1 = pick(m, sr.pc, [u_val[p * L1L + l] if p * L1L + l < R else 0
                                         for p in range(P1)], signed(a_w))
                    a_next, b_next = ((Mux(sr.l1, a1, a2), Mux(sr.l1, b_val, b2)) if cfg.level2
                                      else (a1, b_val))
                else:
                    a_next, b_next = a2, b2
                # Operands registered at stage 1a and again at stage 2 (inside the DSP
                # block on ECP5), the product at stage 3. In fabric the 64 lanes cost some 7,000 LUT4 more
                # on an LFE5U-85F and congest its routing.
                a_op = Signal(signed(a_w), name=f"op_a_{l}")
                b_op = Signal(signed(w1w), name=f"op_b_{l}")
                m.d.sync += [a_op.eq(a_next), b_op.eq(b_next)]
                prod.append(registered_multiply(m, a_op, b_op, f"prod_{l}", platform))

        # Bypass: round-half add (stage 2), shift (stage 3), saturate (stage 4).
        byp = [Signal(signed(w1w + 2), name=f"byp_{r}") for r in range(R)]
        byp_sh = [Signal(signed(w1w + 2), name=f"byp_sh_{r}") for r in range(R)]
        m.d.sync += [byp[r].eq(w1_val[r] + half_byp) for r in range(R)]
        m.d.sync += [byp_sh[r].eq(byp[r] >> ws_byp) for r in range(R)]
        m.d.sync += [s1.eq(s0), v1.eq(s0_valid), s2.eq(sm), v2.eq(vm), s3.eq(s2), v3.eq(v2),
                     s4.eq(s3), v4.eq(v3), s5.eq(s4), v5.eq(v4), s6.eq(s5), v6.eq(v5),
                     s7.eq(s6), v7.eq(v6)]

        # Stages 3-7: multiply, accumulate, round-half add, shift, saturate ----------
        acc = [Signal(signed(acc_w), name=f"acc_{l}") for l in range(NL)]
        rnd = [Signal(signed(acc_w + 2), name=f"rnd_{l}") for l in range(NL)]
        rnd_sh = [Signal(signed(acc_w + 2), name=f"rnd_sh_{l}") for l in range(NL)]
        with m.If(v3):
            m.d.sync += [acc[l].eq(Mux(s3.first, 0, acc[l]) + prod[l]) for l in range(NL)]
        m.d.sync += [rnd[l].eq(acc[l] + half_acc) for l in range(NL)]
        m.d.sync += [rnd_sh[l].eq(rnd[l] >> ws_acc) for l in range(NL)]

        m.d.comb += pipe_empty.eq(~(v1 | vr | vm | v2 | v3 | v4 | v5 | v6 | v7))

        # Level 1 writes W1 straight from the accumulators.
        with m.If(v4 & s4.l1 & s4.last):
            m.d.comb += [w1_wr.addr.eq(s4.wa)]
            for p in range(P1):
                with m.If(s4.pc == p):
                    en = 0
                    for l in range(L1L):
                        r = p * L1L + l
                        if r < R:
                            en |= 1 << r
                            m.d.comb += w1_wr.data[r].eq(acc[l])
                    m.d.comb += w1_wr.en.eq(en)

        # Writeback into the work tile of the result's slot ---------------------------
        # Saturation is registered (stage 7 for the lanes, 4 for the bypass): the tile
        # write muxes start from registers.
        lane_w = [Signal(w_shape, name=f"lane_w_{l}") for l in range(NL)]
        byp_w = [Signal(w_shape, name=f"byp_w_{r}") for r in range(R)]
        m.d.sync += [lane_w[l].eq(saturate(rnd_sh[l], cfg.w_bits)) for l in range(NL)]
        m.d.sync += [byp_w[r].eq(saturate(byp_sh[r], cfg.w_bits)) for r in range(R)]
        wb_l2 = v7 & s7.l2 & s7.last
        wb_byp = v4 & s4.byp
        wb = wb_l2 | wb_byp
        wb_slot = Mux(wb_l2, s7.slot, s4.slot)
        with m.If(wb & Mux(wb_l2, s7.tile_done, s4.tile_done)):
            m.d.sync += [full.bit_select(wb_slot, 1).eq(1),
                         work_last.bit_select(wb_slot, 1).eq(Mux(wb_l2, s7.layer_last,
                                                                  s4.layer_last))]
        # The tile writes' enables are decoded a stage ahead, into registers: a lane
        # group's enable at stage 7 (decoded from stage 6), a bypass column's at stage 4
        # (from stage 3), per slot.
        l2_en = [[[Signal(name=f"l2_en_{t}_{p}_{q}") for q in range(Pc)] for p in range(Pr)]
                 for t in range(2)]
        byp_en = [[Signal(name=f"byp_en_{t}_{c}") for c in range(C)] for t in range(2)]
        for t in range(2):
            for p in range(Pr):
                for q in range(Pc):
                    m.d.sync += l2_en[t][p][q].eq(v6 & s6.l2 & s6.last & (s6.slot == t)
                                                  & (s6.pr == p) & (s6.pc == q))
            for c in range(C):
                m.d.sync += byp_en[t][c].eq(v3 & s3.byp & (s3.slot == t) & (s3.pc == c))
        for t in range(2):
            for r in range(R):
                for c in range(C):
                    l = (r % Lr) * Lc + (c % Lc)
                    with m.If(l2_en[t][r // Lr][c // Lc]):
                        keep = s7.rmask[r] & s7.cmask[c]
                        m.d.sync += work[t][r][c].eq(Mux(keep, lane_w[l], 0))
            for c in range(C):
                with m.If(byp_en[t][c]):
                    for r in range(R):
                        keep = s4.rmask[r] & s4.cmask[c]
                        m.d.sync += work[t][r][c].eq(Mux(keep, byp_w[r], 0))

        # Output tile: takes a complete work tile when empty, shifts its vectors out -------
        # Valid and the last flag are registers (out_cnt != 0, out_last & out_cnt == 1),
        # so that the handshake, which enables every output tile register, is one gate
        # of two registers and the consumer's ready.
        o_valid, o_last = Signal(), Signal()
        handshake = self.o_weights.valid & self.o_weights.ready
        copy = Signal()
        m.d.comb += copy.eq(full.bit_select(rd_slot, 1) & ~o_valid)
        m.d.comb += [self.o_weights.valid.eq(o_valid), self.o_weights.payload.last.eq(o_last)]
        m.d.comb += [self.o_weights.payload.w[c].eq(out[0][c]) for c in range(C)]
        with m.If(handshake):
            m.d.sync += [out_cnt.eq(out_cnt - 1), o_valid.eq(out_cnt != 1),
                         o_last.eq(out_last & (out_cnt == 2))]
            for r in range(R - 1):
                m.d.sync += [out[r][c].eq(out[r + 1][c]) for c in range(C)]
        with m.If(copy):
            m.d.sync += [out_cnt.eq(R), out_last.eq(work_last.bit_select(rd_slot, 1)),
                         o_valid.eq(1), o_last.eq(work_last.bit_select(rd_slot, 1) if R == 1 else 0),
                         full.bit_select(rd_slot, 1).eq(0), busy.bit_select(rd_slot, 1).eq(0),
                         rd_slot.eq(~rd_slot)]
            for t in range(2):
                with m.If(rd_slot == t):
                    m.d.sync += [out[r][c].eq(work[t][r][c]) for r in range(R) for c in range(C)]

        return m
