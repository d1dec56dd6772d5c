"""Weight-stationary systolic array of integer multiply-accumulate processing elements.

``PE[r][c]`` holds the weight of input channel ``ci0 + r`` and output channel
``co0 + c`` for one kernel tap (the order of :mod:`hw.interfaces`). An input
vector carries the activations of the ``rows`` input channels of one pixel;
activations move right along the rows, partial sums move down the columns, and
the array emits one column-sum vector per input vector after a fixed latency.

Each PE keeps two weight banks. The bank an input vector uses travels with it
(``i_sel``), so consecutive weight tiles stream through the array back to back
without draining it. New weights reach a bank through a *staging* tile outside
the PEs: the weight-vector stream fills the staging rows, then a transfer wave
copies staging row ``r`` into the chosen bank of array row ``r`` at cycle
``X + r``, the same diagonal the activation wavefront follows, so a bank can
be refilled while its last activations are still crossing the array.

With ``config.pe_pack == 2`` the two PEs of columns ``2j`` and ``2j + 1`` of a row
share one multiplier block: their weights are packed into one operand and both
products come out of one multiplication (:meth:`SystolicArray._pair_products`), so
an array of narrow weights needs half as many blocks as it has PEs.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig, clog2

from .dsp import registered_multiply

__all__ = ["SystolicArray", "lut_multiply", "pipelined_lut_multiply", "PE_MULTIPLIERS"]

PE_MULTIPLIERS = ("infer", "lut")


def _partial_products(a: Value, b: Value) -> list[Value]:
    sb = b.shape()
    terms = []
    for i in range(sb.width):
        pp = Mux(b[i], a, 0) << i
        terms.append(-pp if (sb.signed and i == sb.width - 1) else pp)
    return terms


def _adder_tree(terms: list[Value]) -> Value:
    while len(terms) > 1:
        paired = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        terms = paired + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0] if terms else Value.cast(0)


def _product_width(a: Value, b: Value, total: Value) -> Value:
    sa, sb = a.shape(), b.shape()
    width = sa.width + sb.width
    return total[:width].as_signed() if (sa.signed or sb.signed) else total[:width]


def pipelined_lut_multiply(m: Module, a, b, name: str) -> Signal:
    """``a * b`` in fabric over two register stages; returns the registered product.

    The narrower operand selects the partial products; pairs of them are added and
    registered, then the adder tree of the pairs is registered as the product.
    """
    a, b = Value.cast(a), Value.cast(b)
    if len(b) > len(a):
        a, b = b, a
    prod = Signal(signed(len(a) + len(b)) if (a.shape().signed or b.shape().signed)
                  else len(a) + len(b), name=name)
    terms = _partial_products(a, b)
    half = []
    for i in range(0, len(terms), 2):
        part = _adder_tree(terms[i:i + 2])
        reg = Signal(signed(len(part) + 1), name=f"{name}_part{i // 2}")
        m.d.sync += reg.eq(part)
        half.append(reg)
    m.d.sync += prod.eq(_product_width(a, b, _adder_tree(half)))
    return prod


def lut_multiply(a, b) -> Value:
    """Product ``a * b`` as a balanced adder tree of shifted partial products.

    Synthesis maps the result to fabric logic instead of a DSP block (there is
    no multiplier cell to infer one from). Either operand may be signed; the
    result has the exact width of the product.
    """
    a, b = Value.cast(a), Value.cast(b)
    return _product_width(a, b, _adder_tree(_partial_products(a, b)))


class SystolicArray(wiring.Component):
    """``rows x cols`` weight-stationary MAC array with double-buffered PE weights.

    Parameters
    ----------
    config:
        The :class:`~gen.config.AcceleratorConfig`; uses ``rows``, ``cols``,
        ``a_bits``, ``w_bits`` and ``acc_bits``.
    pe_mult:
        ``"infer"`` writes the PE product as ``*`` (synthesis maps it to DSP
        blocks); ``"lut"`` builds it from partial products in fabric, for arrays
        with more PEs than the device has multipliers. With ``config.pe_pack == 2``
        and ``"infer"``, neighbouring columns share one multiplier
        (:meth:`_pair_products`); ``"lut"`` builds every product on its own.

    Ports
    -----
    i_valid, i_sel, i_act:
        One input vector per cycle: ``rows`` activations and the weight bank
        they multiply with.
    o_valid, o_sum:
        Column sums of the vector that entered :attr:`latency` cycles earlier.
    stage_en, stage_row, stage_w:
        Write one row of ``cols`` weights into the staging tile.
    xfer, xfer_bank:
        Start the transfer wave of the staging tile into ``xfer_bank``: row
        ``r`` is copied ``r`` cycles after ``xfer``. The staging rows may be
        rewritten in order starting the same cycle.

    Timing
    ------
    A vector presented at cycle ``T`` reads the weights of ``PE[r][c]`` at cycle
    ``T + 1 + r + c``; a transfer started at ``X`` makes row ``r``'s new
    weights visible from ``X + r + 1``. :attr:`latency` is ``rows + cols + 2``.

    Raises
    ------
    ValueError
        If ``pe_mult`` is not one of :data:`PE_MULTIPLIERS`.
    """

    def __init__(self, config: AcceleratorConfig, *, pe_mult: str = "infer"):
        if pe_mult not in PE_MULTIPLIERS:
            raise ValueError(f"pe_mult {pe_mult!r} unsupported; accepted: {', '.join(PE_MULTIPLIERS)}")
        self.config = config
        self.pe_mult = pe_mult
        # Two PEs per multiplier (config.pe_pack) where the products use multiplier blocks.
        self.packed = config.pe_pack == 2 and pe_mult == "infer"
        # The product takes two register stages either way: DSP inputs registered next to
        # the DSP, or a fabric multiplier split after its first adder level.
        self.latency = config.rows + config.cols + 2
        R, C = config.rows, config.cols
        super().__init__({
            "i_valid": In(1),
            "i_sel": In(1),
            "i_act": In(data.ArrayLayout(signed(config.a_bits), R)),
            "o_valid": Out(1),
            "o_sum": Out(data.ArrayLayout(signed(config.acc_bits), C)),
            "stage_en": In(1),
            "stage_row": In(range(R)),
            "stage_w": In(data.ArrayLayout(signed(config.w_bits), C)),
            "xfer": In(1),
            "xfer_bank": In(1),
        })

    def _pair_products(self, m, a, w, name, platform):
        """The products of ``a`` with the weights ``w[0]`` (column ``c``) and ``w[1]``
        (column ``c + 1``) from one multiplier, each at the cycle the unpacked PEs would
        give it: column ``c``'s two cycles after the operands, column ``c + 1``'s one
        cycle later (it sees the activation one cycle after column ``c``).

        The multiplier's second operand is ``w[0] + w[1] * 2**S`` with ``S = a_bits +
        w_bits``, the exact width of one product, so ``a * w[0]`` is the low ``S`` bits of
        the result read as signed, and ``a * w[1]`` is the rest plus the sign bit of the
        low field (a negative low product borrowed one from the high one).
        """
        S = self.config.a_bits + self.config.w_bits
        packed = Signal(signed(S + self.config.w_bits + 1), name=f"{name}_w")
        m.d.comb += packed.eq(w[0] + (w[1] << S))
        p = registered_multiply(m, a, packed, name, platform)
        lo = Signal(signed(S), name=f"{name}_lo")
        hi = Signal(signed(S), name=f"{name}_hi")
        m.d.comb += lo.eq(p[:S])
        m.d.sync += hi.eq(p[S:].as_signed() + lo[S - 1])
        return [lo, hi]

    def _product(self, m, a, w, name, platform):
        """The PE product after two register stages (operands are sampled in the first)."""
        if self.pe_mult == "infer":
            return registered_multiply(m, a, w, name, platform)
        return pipelined_lut_multiply(m, a, w, name)

    def elaborate(self, platform):
        cfg = self.config
        R, C, A, W = cfg.rows, cfg.cols, cfg.a_bits, cfg.w_bits
        m = Module()

        stage = [[Signal(signed(W), name=f"stage_{r}_{c}") for c in range(C)] for r in range(R)]
        with m.If(self.stage_en):
            with m.Switch(self.stage_row):
                for r in range(R):
                    with m.Case(r):
                        m.d.sync += [stage[r][c].eq(self.stage_w[c]) for c in range(C)]

        # The transfer wave moves down one row per cycle, matching the activation skew.
        xv = [Signal(name=f"xfer_{r}") for r in range(R)]
        xb = [Signal(name=f"xfer_bank_{r}") for r in range(R)]
        m.d.comb += [xv[0].eq(self.xfer), xb[0].eq(self.xfer_bank)]
        for r in range(1, R):
            m.d.sync += [xv[r].eq(xv[r - 1]), xb[r].eq(xb[r - 1])]
        bank = [[[Signal(signed(W), name=f"w{b}_{r}_{c}") for c in range(C)] for r in range(R)]
                for b in range(2)]
        for r in range(R):
            with m.If(xv[r]):
                for c in range(C):
                    with m.If(xb[r]):
                        m.d.sync += bank[1][r][c].eq(stage[r][c])
                    with m.Else():
                        m.d.sync += bank[0][r][c].eq(stage[r][c])

        # Row r enters the array r cycles late (after one input register), so that
        # partial sums meet the activations of the same vector on their way down.
        row_act, row_sel = [], []
        for r in range(R):
            a_prev, s_prev = self.i_act[r], self.i_sel
            for d in range(r + 1):
                a_d = Signal(signed(A), name=f"skew_a_{r}_{d}")
                s_d = Signal(name=f"skew_s_{r}_{d}")
                m.d.sync += [a_d.eq(a_prev), s_d.eq(s_prev)]
                a_prev, s_prev = a_d, s_d
            row_act.append(a_prev)
            row_sel.append(s_prev)

        psum_above = [None] * C
        step = 2 if self.packed else 1
        for r in range(R):
            a_in, s_in = row_act[r], row_sel[r]
            width = A + W + clog2(r + 1)
            for c in range(0, C, step):
                w = [Mux(s_in, bank[1][r][c + j], bank[0][r][c + j]) for j in range(step)]
                # The product is registered before the add: the extra cycles are the same
                # for every PE, so the diagonal timing of the partial sums is unchanged.
                if self.packed:
                    prods = self._pair_products(m, a_in, w, f"prod_{r}_{c}", platform)
                else:
                    prods = [self._product(m, a_in, w[0], f"prod_{r}_{c}", platform)]
                for j, prod in enumerate(prods):
                    psum = Signal(signed(width), name=f"psum_{r}_{c + j}")
                    m.d.sync += psum.eq(prod if r == 0 else psum_above[c + j] + prod)
                    psum_above[c + j] = psum
                # The activation reaches the next PE (pair) one cycle per column later.
                for j in range(step if c + step < C else 0):
                    a_nx = Signal(signed(A), name=f"act_{r}_{c + j}")
                    s_nx = Signal(name=f"sel_{r}_{c + j}")
                    m.d.sync += [a_nx.eq(a_in), s_nx.eq(s_in)]
                    a_in, s_in = a_nx, s_nx

        # Column c finishes c cycles after column 0: delay it by cols - 1 - c to realign.
        for c in range(C):
            v = psum_above[c]
            for d in range(C - 1 - c):
                v_d = Signal(v.shape(), name=f"deskew_{c}_{d}")
                m.d.sync += v_d.eq(v)
                v = v_d
            m.d.comb += self.o_sum[c].eq(v)

        valid = self.i_valid
        for d in range(self.latency):
            v_d = Signal(name=f"valid_{d}")
            m.d.sync += v_d.eq(valid)
            valid = v_d
        m.d.comb += self.o_valid.eq(valid)
        return m
