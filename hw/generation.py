"""The on-chip generation unit: packed MLG codes in, PE weight vectors out.

Block diagram
-------------
::

                 +------------+   writes    +------------------+
      i_desc --> | CodeLoader | ----------> |  B, U, V, W1     | <---- level-1 sums ----+
     i_codes --> |            |             |  stores          |                        |
                 +------------+             +------------------+                        |
           layer, start |  ^ done             ^ read      | read data                   |
                        v  |                  | addresses v (two cycles later)          |
                 +---------------+ -----------+      +-----------------+                |
                 | TileSequencer | ---- tags ------> | GenerationLanes | ---------------+
                 +---------------+                   +-----------------+
      slot, slot_free ^  | tile_start, tile_end        | weights and their tags
                      |  v                             v
                 +----------------------------------------------------+
                 |                     WeightTiler                    | --> o_weights
                 +----------------------------------------------------+

* :class:`hw.gen_loader.CodeLoader`: descriptor, layer geometry, code stream into
  the stores (steps 1 and 2 below);
* :class:`hw.gen_sequencer.TileSequencer`: the level-1 and weight-tile loops, one
  store read and its tag per cycle;
* :class:`hw.gen_lanes.GenerationLanes`: the multiply-accumulate lanes, the bypass
  and the rounding (steps 3 and 4);
* :class:`hw.gen_tiling.WeightTiler`: the work tiles and the output tile.

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

Memory writes leave from registers here, a cycle after the loader or the lanes
decide them: the unpacker's handshake, the loader's counters and the lane select do
not reach the block RAM inputs in the same cycle. A section is read no earlier than
two cycles after its last code (ALIGN comes between).

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

from amaranth.hdl import Module, Mux, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from gen.config import AcceleratorConfig, lane_plan
from hw.gen_lanes import GenerationLanes
from hw.gen_loader import CodeLoader, register_write, store_depths, w1_value_bits
from hw.gen_rounding import WeightRounder, round_half, saturate, shift_saturate
from hw.gen_sequencer import TileSequencer
from hw.gen_tiling import WeightTiler
from hw.interfaces import descriptor_layout, weight_stream_signature
from hw.memory import BlockMemory

__all__ = ["GenerationUnit", "generation_members", "WeightRounder", "round_half", "shift_saturate",
           "saturate", "lane_plan"]


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

    @property
    def w1_value_bits(self) -> int:
        """Signed width of a W1 buffer entry (:func:`hw.gen_loader.w1_value_bits`)."""
        return w1_value_bits(self.config)

    @property
    def memory_depths(self) -> dict[str, int]:
        """Words in each code memory and in the W1 buffer (:func:`hw.gen_loader.store_depths`)."""
        return store_depths(self.config)

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.rows, cfg.cols
        depth = self.memory_depths

        # Stores: read data arrive in registers two cycles after the address (hw.memory:
        # the block RAMs' own output registers on ECP5); W1, the deepest, is sliced.
        m.submodules.b_mem = b_mem = BlockMemory(unsigned(cfg.qb), 1, depth["B"], name="b_mem")
        m.submodules.u_mem = u_mem = BlockMemory(unsigned(cfg.qu), R, depth["U"],
                                                 granular=True, name="u_mem")
        m.submodules.v_mem = v_mem = BlockMemory(unsigned(cfg.qv), C, depth["V"],
                                                 granular=True, name="v_mem")
        # (compact: in single-port RAM; W1 is written by the load and level 1, and read
        # only after them.)
        m.submodules.w1_mem = w1_mem = BlockMemory(signed(self.w1_value_bits), R, depth["W1"],
                                                   granular=True, single_port=cfg.compact,
                                                   name="w1_mem")
        b_port, b_rd = b_mem.write_port(), b_mem.read_port()
        u_port, u_rd = u_mem.write_port(), u_mem.read_port()
        v_port, v_rd = v_mem.write_port(), v_mem.read_port()
        w1_port, w1_rd = w1_mem.write_port(), w1_mem.read_port()

        m.submodules.loader = loader = CodeLoader(cfg, section_align=self.section_align)
        m.submodules.sequencer = seq = TileSequencer(cfg)
        m.submodules.lanes = lanes = GenerationLanes(cfg)
        m.submodules.tiler = tiler = WeightTiler(cfg)

        # Loader: descriptor and codes in, store writes out (W1 shared with level 1).
        wiring.connect(m, wiring.flipped(self.i_desc), loader.i_desc)
        wiring.connect(m, wiring.flipped(self.i_codes), loader.i_codes)
        register_write(m, b_port, loader.b_wr)
        register_write(m, u_port, loader.u_wr)
        register_write(m, v_port, loader.v_wr)
        l1_wr, load_wr = lanes.w1_wr, loader.w1_wr
        l1_write = l1_wr.en.any()
        m.d.sync += [w1_port.en.eq(Mux(l1_write, l1_wr.en, load_wr.en)),
                     w1_port.addr.eq(Mux(l1_write, l1_wr.addr, load_wr.addr)),
                     w1_port.data.eq(Mux(l1_write, l1_wr.data, load_wr.data))]

        # Sequencer: a stored layer's reads, their tags into the lanes.
        m.d.comb += [seq.layer.eq(loader.layer), seq.start.eq(loader.start),
                     loader.done.eq(seq.done), seq.pipe_empty.eq(lanes.pipe_empty),
                     b_rd.addr.eq(seq.b_addr), u_rd.addr.eq(seq.u_addr),
                     v_rd.addr.eq(seq.v_addr), w1_rd.addr.eq(seq.w1_addr)]
        wiring.connect(m, seq.o_tag, lanes.i_tag)

        # Lanes: the read data in, rounded weights out to the tiler.
        m.d.comb += [lanes.w_shift.eq(loader.layer.w_shift),
                     lanes.b_data.eq(b_rd.data), lanes.u_data.eq(u_rd.data),
                     lanes.v_data.eq(v_rd.data), lanes.w1_data.eq(w1_rd.data)]
        wiring.connect(m, lanes.o_lanes, tiler.i_lanes)
        wiring.connect(m, lanes.o_lanes_next, tiler.i_lanes_next)
        wiring.connect(m, lanes.o_bypass, tiler.i_bypass)
        wiring.connect(m, lanes.o_bypass_next, tiler.i_bypass_next)

        # Tiler: the slots the sequencer issues into, the weight vectors out.
        m.d.comb += [seq.slot.eq(tiler.slot), seq.slot_free.eq(tiler.slot_free),
                     tiler.tile_start.eq(seq.tile_start), tiler.tile_end.eq(seq.tile_end)]
        wiring.connect(m, tiler.o_weights, wiring.flipped(self.o_weights))
        m.d.comb += self.idle.eq(loader.idle & tiler.empty)
        return m
