"""The contract between the compiler, the host and the RTL: every number and layout
that more than one of them must agree on, written once.

The compiler (``gen``) produces programs and predicts cycles, the host (``host``)
turns a program into memory images and speaks the link protocol, the RTL (``hw``)
consumes both. Each imports what it shares with the others from here; this module
imports nothing from ``gen``, ``host`` or ``hw``. The functions take an
:class:`gen.config.AcceleratorConfig` (or anything with its attributes).

Widths (:data:`WIDTHS`)
    The eight fields that fix a network's integer widths: ``a_bits``, ``w_bits``,
    ``m_bits``, ``qb``, ``qu``, ``qv``, ``qd`` and ``decode``, with their one
    accepted range and default. :class:`gen.layers.MLGSettings`,
    :class:`gen.network.QuantizedNetwork`, :class:`gen.program.Program` and
    :class:`gen.config.AcceleratorConfig` take their fields from
    :func:`width_fields` and check them with :func:`width_problem`.

Layer descriptor (:func:`descriptor_layout`, :func:`layer_descriptor`)
    The run-time fields of one layer as the engine, the window feeder and the
    generation units read them. The host builds them from a program's layers
    (:func:`descriptor_fields`); the benches from their own layer shapes
    (:func:`layer_descriptor`), so both go through the one mapping.

Layer record (:func:`layer_record_layout`)
    One entry of the accelerator's program memory: the descriptor plus where the
    layer's codes and constants sit on chip. Written by ``host.image``, read by the
    sequencers of ``hw.accelerator``; ``record_bytes(config)`` bytes each.

Channel constants (:func:`channel_layout`)
    One word of the constants memory: an output channel's requant multiplier and
    bias. Written by ``host.image``, read by ``hw.engine``; ``const_bytes(config)``
    bytes each.

Link protocol constants
    The frame bytes (:data:`SYNC`, :data:`RESPONSE`, :data:`HEADER_BYTES`,
    :data:`CRC_BYTES`, the request tags :data:`TAGS`), the requests and their
    arguments (:data:`REQUESTS`), the memory regions (``REGION_*``, :func:`region_sizes`, :func:`region_words`), the
    error and state codes, the counters (:data:`COUNTERS`), the IDENTITY and STATUS
    payloads. :mod:`host.protocol` specifies the frame format and implements the
    host's side; ``hw.link`` and ``hw.accelerator`` the device's.

Timing facts of the RTL that the cost model uses
    :data:`ACC_GAP` (``hw.engine``), :data:`SERIAL_OUT_VECTORS` and
    :data:`SERIAL_PIPE_STAGES` (``hw.serialgen``); :mod:`gen.cost` predicts cycles
    from them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from amaranth.hdl import signed, unsigned
from amaranth.lib import data

__all__ = [
    # widths
    "int_range", "WidthField", "WIDTHS", "WIDTH_NAMES", "DECODE_FORMS", "width_fields", "width_problem",
    "check_widths", "widths_of",
    # layouts
    "DENSE_BITS", "descriptor_layout", "layer_descriptor", "descriptor_fields",
    "layer_record_layout", "channel_layout", "act_bytes", "record_bytes", "const_bytes",
    # link
    "SYNC", "PROTOCOL_VERSION", "IDENTITY_MAGIC", "RESPONSE", "OP_ERROR", "HEADER_BYTES",
    "CRC_BYTES", "TAGS", "OP_IDENTIFY", "OP_WRITE", "OP_READ", "OP_RUN", "OP_STATUS", "OP_COUNTERS",
    "OP_LOAD_ACT", "OP_READ_ACT", "OP_ABORT", "Request", "REQUESTS", "OP_NAMES", "ARG_BYTES",
    "FIXED_LENGTH",
    "REGION_PROGRAM", "REGION_BASES", "REGION_CONSTS", "REGION_STREAM", "REGION_LOG",
    "REGION_NAMES", "region_sizes", "region_words",
    "ERR_CRC", "ERR_LENGTH", "ERR_OPCODE", "ERR_ADDRESS", "ERR_BUSY", "ERR_TIMEOUT",
    "ERR_ARGUMENT", "ERR_STATE", "ERR_NO_RESULT", "ERRORS", "ERR_DESCRIPTOR", "ERR_WEIGHTS", "ERR_ABORTED",
    "RUN_ERRORS", "STATE_IDLE", "STATE_RUNNING", "STATE_DONE", "STATE_ERROR", "STATE_NAMES",
    "STATUS", "STATUS_BYTES", "COUNTER_TABLE", "COUNTERS", "N_COUNTERS", "COUNTER_BYTES",
    "LOG_COUNTERS", "LINK_COUNTERS", "ENGINE_COUNTS", "IDENTITY", "IDENTITY_BYTES",
    "identity_bytes",
    # timing
    "ACC_GAP", "SERIAL_OUT_VECTORS", "SERIAL_PIPE_STAGES", "SERIAL_PIPE",
]


def _clog2(n: int) -> int:
    """Bits of an index into ``n`` things (0 for one)."""
    return max(0, (n - 1).bit_length())


# ---- widths ----------------------------------------------------------------------------

def int_range(bits: int) -> tuple[int, int]:
    """Two's complement range of a ``bits``-wide signed integer: every saturation of the
    integer contract (golden model, training layers, RTL) clamps to it."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# How a code decodes to its integer value (gen.integer): two's complement, or the odd
# integer 2c - (2**bits - 1). The program header stores the index.
DECODE_FORMS = ("signed", "odd")


@dataclass(frozen=True)
class WidthField:
    """One width field: its accepted values (``lo..hi``, or one of ``choices``) and its
    default (what a config or a training run takes when it is not given)."""

    name: str
    default: int | str
    doc: str
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] | None = None

    @property
    def annotation(self) -> str:
        return "str" if self.choices is not None else "int"

    @property
    def accepted(self) -> str:
        return ", ".join(self.choices) if self.choices is not None else f"{self.lo}..{self.hi}"


# In the order the program header stores them.
WIDTHS = (
    WidthField("a_bits", 8, "activation width (signed)", 2, 16),
    WidthField("w_bits", 8, "processing-element weight width (signed): W2 is rounded to it", 2, 16),
    WidthField("m_bits", 16, "requant multiplier width (signed)", 2, 24),
    WidthField("qb", 3, "code width of the basis B", 1, 8),
    WidthField("qu", 6, "code width of the level-1 coefficients U", 1, 8),
    WidthField("qv", 3, "code width of the level-2 coefficients V", 1, 8),
    WidthField("qd", 8, "code width of a dense layer", 1, 8),
    WidthField("decode", "odd", "how a code decodes to its value", choices=DECODE_FORMS),
)
WIDTH_NAMES = tuple(f.name for f in WIDTHS)
_WIDTHS = {f.name: f for f in WIDTHS}


def width_fields(*, after: str | None = None, defaults: bool = True):
    """Class decorator, applied below ``@dataclass``: declares the :data:`WIDTHS` fields
    in the class, after its field ``after`` (first without), with their defaults or
    without any (then they are required arguments)."""
    def add(cls):
        own = list(cls.__dict__.get("__annotations__", {}).items())
        clash = sorted(set(WIDTH_NAMES) & {name for name, _ in own})
        if clash:
            raise TypeError(f"{cls.__name__} declares width field(s) {', '.join(clash)} itself")
        at = 0 if after is None else [name for name, _ in own].index(after) + 1
        cls.__annotations__ = dict(own[:at] + [(f.name, f.annotation) for f in WIDTHS] + own[at:])
        if defaults:
            for f in WIDTHS:
                setattr(cls, f.name, f.default)
        return cls
    return add


def width_problem(name: str, value) -> str | None:
    """What is wrong with ``value`` for the width field ``name`` (a message that starts
    ``name = value``), or None if it is accepted."""
    f = _WIDTHS[name]
    if f.choices is not None:
        if value not in f.choices:
            return f"{name} = {value!r} is not supported; accepted: {f.accepted}"
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} = {value!r} is not an integer; accepted: {f.accepted}"
    if not f.lo <= value <= f.hi:
        return f"{name} = {value} is out of range; accepted: {f.accepted}"
    return None


def check_widths(obj, error: type[Exception] = ValueError, prefix: str = "") -> None:
    """Raise ``error(prefix + problem)`` for the first width field of ``obj`` (an object
    or a dict) that :func:`width_problem` rejects."""
    get = obj.get if isinstance(obj, dict) else (lambda n: getattr(obj, n))
    for name in WIDTH_NAMES:
        problem = width_problem(name, get(name))
        if problem:
            raise error(prefix + problem)


def widths_of(obj) -> dict:
    """The width fields of ``obj`` as a dict, to pass on as keyword arguments."""
    return {name: getattr(obj, name) for name in WIDTH_NAMES}


# ---- layer descriptor and record ----------------------------------------------------

# Widths a dense layer's codes may take (LayerSpec.dense_bits), in the order of the
# descriptor's dense_bits field (and of the program's flag bits 4..5).
DENSE_BITS = ("qd", "qb", "qv")


def descriptor_layout(config) -> data.StructLayout:
    """The run-time fields of one layer; each is as wide as the config maxima need."""
    dim = lambda n: unsigned(max(1, (n).bit_length()))  # noqa: E731
    buf = unsigned(max(1, _clog2(config.act_buffers)))
    return data.StructLayout({
        "op": unsigned(1),            # 0 conv, 1 pool
        "relu": unsigned(1),
        "has_l1": unsigned(1),
        "has_l2": unsigned(1),
        "has_res": unsigned(1),
        "dense_bits": unsigned(2),    # code width of a dense layer: index into DENSE_BITS
        "k": dim(config.max_k),
        "stride": unsigned(2),
        "pad": dim(config.max_k // 2),
        "ci": dim(config.max_ci),
        "co": dim(config.max_co),
        "h": dim(config.max_h),
        "w": dim(config.max_w),
        "bi": dim(config.max_bi),
        "bo": dim(config.max_bo),
        "src": buf,
        "dst": buf,
        "res": buf,
        "w_shift": dim(config.w_shift_max),
        "shift": dim(config.shift_max),
        "m_res": signed(config.m_bits),
    })


def layer_descriptor(*, ci: int, co: int, op: str = "conv", h: int = 1, w: int = 1,
                     k: int = 1, stride: int = 1, pad: int = 0, relu: bool = False,
                     has_l1: bool = False, has_l2: bool = False, bi: int = 0, bo: int = 0,
                     src: int = 0, dst: int = 1, res: int | None = None,
                     dense_bits: str = "qd", w_shift: int = 0, shift: int = 0,
                     m_res: int = 0) -> dict:
    """The :func:`descriptor_layout` fields of a layer: a pool carries ``co = ci``,
    ``bi`` and ``bo`` are 0 without the level that uses them (the units then use ``co``
    for ``bo``), ``has_res`` says whether ``res`` names a buffer."""
    pool = op == "pool"
    return {
        "op": int(pool), "relu": int(bool(relu)), "has_l1": int(bool(has_l1)),
        "has_l2": int(bool(has_l2)), "has_res": int(res is not None),
        "dense_bits": DENSE_BITS.index(dense_bits),
        "k": k, "stride": stride, "pad": pad, "ci": ci, "co": ci if pool else co,
        "h": h, "w": w, "bi": bi if has_l1 else 0, "bo": bo if has_l2 else 0,
        "src": src, "dst": dst, "res": res or 0,
        "w_shift": w_shift, "shift": shift, "m_res": m_res,
    }


def descriptor_fields(layer) -> dict:
    """:func:`layer_descriptor` of a :class:`gen.network.LayerSpec`."""
    return layer_descriptor(
        op=layer.op, ci=layer.ci, co=layer.co, h=layer.h, w=layer.w, k=layer.k,
        stride=layer.stride, pad=layer.pad, relu=layer.relu, has_l1=layer.has_l1,
        has_l2=layer.has_l2, bi=layer.bi, bo=layer.bo, src=layer.src, dst=layer.dst,
        res=layer.res, dense_bits=layer.dense_bits, w_shift=layer.w_shift,
        shift=layer.shift, m_res=layer.m_res)


def layer_record_layout(config) -> data.StructLayout:
    """One entry of the program memory: the descriptor, ``code_addr`` and ``code_len``
    (bytes of the base store holding the layer's B, U and V sections, each packed on
    its own from a byte boundary), ``const_addr`` (its first word in the constants
    memory) and ``streamed`` (the codes come through ``REGION_STREAM`` during the run
    instead; ``code_addr`` is then unused)."""
    return data.StructLayout({
        "desc": descriptor_layout(config),
        "code_addr": unsigned(max(1, _clog2(config.base_store_bytes))),
        # A streamed layer's codes may exceed the base store: up to one code byte
        # per weight of the largest layer.
        "code_len": unsigned(max(config.base_store_bytes,
                                 config.max_co * config.max_ci * config.max_k ** 2).bit_length()),
        "const_addr": unsigned(max(1, _clog2(config.const_depth))),
        "streamed": unsigned(1),
    })


def channel_layout(config) -> data.StructLayout:
    """Per-output-channel requant constants: signed multiplier and bias (product domain)."""
    return data.StructLayout({"mult": signed(config.m_bits), "bias": signed(config.bias_bits)})


def _pow2_bytes(bits: int) -> int:
    # Words of a power-of-two size keep byte addressing a shift and a mask on chip.
    n = (bits + 7) // 8
    return 1 << (n - 1).bit_length()


def act_bytes(config) -> int:
    """Bytes of one activation on the link (two's complement, little endian)."""
    return (config.a_bits + 7) // 8


def record_bytes(config) -> int:
    """Bytes of one layer record in the program region (a power of two)."""
    return _pow2_bytes(layer_record_layout(config).size)


def const_bytes(config) -> int:
    """Bytes of one channel's requant constants in the constants region (a power of two)."""
    return _pow2_bytes(channel_layout(config).size)


# ---- link: frames and requests -------------------------------------------------------

SYNC = 0xA5
PROTOCOL_VERSION = 2      # 2: a tag in every header; ERR_NO_RESULT
IDENTITY_MAGIC = b"MLGA"
HEADER_BYTES = 5          # SYNC, OP, LEN u16, TAG
CRC_BYTES = 2
TAGS = 256                # a request's tag is one byte; its answer carries the same
RESPONSE = 0x80           # a response carries its request's OP | RESPONSE
OP_ERROR = 0xFF           # ... or this, with payload [error code, request opcode]

OP_IDENTIFY = 0x01
OP_WRITE = 0x02
OP_READ = 0x03
OP_RUN = 0x04
OP_STATUS = 0x05
OP_COUNTERS = 0x06
OP_LOAD_ACT = 0x07
OP_READ_ACT = 0x08
OP_ABORT = 0x09

_ARG_FORMATS = {1: "B", 2: "H", 4: "I"}


@dataclass(frozen=True)
class Request:
    """One request: its argument fields in payload order as ``(name, bytes)``, little
    endian, and whether a data block of at least one byte follows them (``data``).
    A request without data has exactly :attr:`arg_bytes` payload bytes."""

    name: str
    args: tuple[tuple[str, int], ...] = ()
    data: bool = False
    response: str = "(none)"

    @property
    def arg_bytes(self) -> int:
        return sum(n for _, n in self.args)

    @property
    def arg_format(self) -> str:
        """The :mod:`struct` format of the arguments."""
        return "<" + "".join(_ARG_FORMATS[n] for _, n in self.args)

    def pack_args(self, *values: int) -> bytes:
        return struct.pack(self.arg_format, *values)


REQUESTS = {
    OP_IDENTIFY: Request("IDENTIFY", response="IDENTITY"),
    OP_WRITE: Request("WRITE", (("region", 1), ("address", 4)), data=True),
    OP_READ: Request("READ", (("region", 1), ("address", 4), ("count", 2)),
                     response="count bytes"),
    OP_RUN: Request("RUN", (("n_layers", 2),)),
    OP_STATUS: Request("STATUS", response="STATUS"),
    OP_COUNTERS: Request("COUNTERS", response="N_COUNTERS x COUNTER_BYTES, in COUNTERS order"),
    OP_LOAD_ACT: Request("LOAD_ACT", (("buffer", 1), ("channels", 2), ("pixels", 4)), data=True),
    OP_READ_ACT: Request("READ_ACT", (("buffer", 1), ("channels", 2), ("pixels", 4)),
                         response="channels * pixels * act_bytes"),
    OP_ABORT: Request("ABORT"),
}
OP_NAMES = {op: r.name for op, r in REQUESTS.items()}
# Argument bytes of the requests that have arguments (the executor reads them into
# its argument register), and the payload length of the requests without data.
ARG_BYTES = {op: r.arg_bytes for op, r in REQUESTS.items() if r.arg_bytes}
FIXED_LENGTH = {op: r.arg_bytes for op, r in REQUESTS.items() if not r.data}

# ---- link: memory regions --------------------------------------------------------------

REGION_PROGRAM = 0        # layer records, record_bytes each
REGION_BASES = 1          # the base store: packed codes, bytes
REGION_CONSTS = 2         # channel constants, const_bytes each
REGION_STREAM = 3         # write only, address 0: codes of the layers not resident
REGION_LOG = 4            # read only: the layer log, len(LOG_COUNTERS) counters a layer
REGION_NAMES = {REGION_PROGRAM: "program", REGION_BASES: "bases", REGION_CONSTS: "consts",
                REGION_STREAM: "stream", REGION_LOG: "log"}


def region_sizes(config) -> dict[int, int]:
    """Bytes of each byte-addressed region of a build (``REGION_LOG`` only with
    ``layer_log``; ``REGION_STREAM`` has no address space)."""
    sizes = {REGION_PROGRAM: config.max_layers * record_bytes(config),
             REGION_BASES: config.base_store_bytes,
             REGION_CONSTS: config.const_depth * const_bytes(config)}
    if config.layer_log:
        sizes[REGION_LOG] = config.max_layers * len(LOG_COUNTERS) * COUNTER_BYTES
    return sizes


def region_words(config) -> dict[int, int]:
    """Word size in bytes of each region: a WRITE or READ covers whole words."""
    return {REGION_PROGRAM: record_bytes(config), REGION_BASES: 1,
            REGION_CONSTS: const_bytes(config), REGION_LOG: 1, REGION_STREAM: 1}


# ---- link: errors, states, status ------------------------------------------------------

# Error frame codes: why a request was refused (nothing was changed).
ERR_CRC = 1
ERR_LENGTH = 2
ERR_OPCODE = 3
ERR_ADDRESS = 4
ERR_BUSY = 5
ERR_TIMEOUT = 6
ERR_ARGUMENT = 7
ERR_STATE = 8
ERR_NO_RESULT = 9
ERRORS = {ERR_CRC: "bad CRC", ERR_LENGTH: "bad length", ERR_OPCODE: "unknown opcode",
          ERR_ADDRESS: "address out of range", ERR_BUSY: "device busy",
          ERR_TIMEOUT: "frame timed out", ERR_ARGUMENT: "bad argument",
          ERR_STATE: "no run is taking streamed codes",
          ERR_NO_RESULT: "no result: the last run stopped in the error state"}

# Bits of STATUS's error byte: why a run stopped (state STATE_ERROR). The engine sets
# the first two (hw.engine), ABORT the last.
ERR_DESCRIPTOR = 0x01     # a layer's descriptor was rejected (the layer was skipped)
ERR_WEIGHTS = 0x02        # a weight vector's last flag was out of step with the layer
ERR_ABORTED = 0x40        # the run was stopped by ABORT
RUN_ERRORS = {ERR_DESCRIPTOR: "descriptor rejected", ERR_WEIGHTS: "weight stream out of step",
              ERR_ABORTED: "aborted"}

STATE_IDLE = 0
STATE_RUNNING = 1
STATE_DONE = 2
STATE_ERROR = 3
STATE_NAMES = {STATE_IDLE: "idle", STATE_RUNNING: "running", STATE_DONE: "done",
               STATE_ERROR: "error"}
# STATUS response: state, error bits, layer the run is at (or stopped at).
STATUS = struct.Struct("<BBH")
STATUS_BYTES = STATUS.size

# ---- link: counters --------------------------------------------------------------------

# Performance counters in the order COUNTERS returns them: name, the block that counts
# it ("run": the accelerator top, "engine": added up from the engine's counts of each
# layer, "link": the host link), and what it counts.
COUNTER_TABLE = (
    ("cycles", "run", "cycles of the last run, RUN to done"),
    ("engine_busy", "run", "cycles the conv engine was in a layer"),
    ("gen_busy", "run", "cycles the generation unit was not idle"),
    ("mac_cycles", "engine", "cycles a vector entered the systolic array"),
    ("macs", "engine", "multiply-accumulates (additions for a pool)"),
    ("stall_weights", "engine", "array cycles lost waiting for generated weights"),
    ("stall_output", "engine", "array cycles lost waiting for accumulators or the residual port"),
    ("code_bytes", "run", "packed code bytes streamed into the generation unit"),
    ("bytes_in", "link", "link bytes received since reset"),
    ("bytes_out", "link", "link bytes sent since reset"),
    ("frames", "link", "request frames executed since reset"),
    ("frame_errors", "link", "request frames refused since reset"),
)
COUNTERS = tuple(name for name, _, _ in COUNTER_TABLE)
N_COUNTERS = len(COUNTERS)
COUNTER_BYTES = 8         # every counter is read as a u64, zero-extended from counter_bits
# The run counters the layer log keeps for every layer (REGION_LOG).
LOG_COUNTERS = COUNTERS[:8]   # a power of two: an entry is addressed by bit fields
LINK_COUNTERS = tuple(name for name, src, _ in COUNTER_TABLE if src == "link")
ENGINE_COUNTS = tuple(name for name, src, _ in COUNTER_TABLE if src == "engine")

# ---- link: identity --------------------------------------------------------------------

# IDENTITY: magic 4s, protocol u16, config digest 32s, max_payload u16, act_bytes u8,
# record_bytes u8, const_bytes u8, act_buffers u8, rows u8, cols u8.
IDENTITY = struct.Struct("<4sH32sH6B")
IDENTITY_BYTES = IDENTITY.size


def identity_bytes(config) -> bytes:
    """The IDENTITY payload of a device built for ``config`` (the device's ROM)."""
    return IDENTITY.pack(IDENTITY_MAGIC, PROTOCOL_VERSION, config.digest, config.max_payload,
                         act_bytes(config), record_bytes(config), const_bytes(config),
                         config.act_buffers, config.rows, config.cols)


# ---- timing facts of the RTL that gen.cost uses ---------------------------------------

# (hw.engine, compact) Cycles from a vector's issue to the first issue at which another
# vector may read the accumulator word it writes: its read leaves three stages before
# the accumulate stage, the sum is written the stage after, and a block RAM read must
# take its address after the write (hw.memory). Without compact the last four sums are
# forwarded instead.
ACC_GAP = 5
# (hw.serialgen) Weight vectors its output FIFO holds, and cycles from a weight's issue
# to its result at the accumulator; a vector's FIFO slot frees SERIAL_PIPE cycles after
# its last weight is issued.
SERIAL_OUT_VECTORS = 2
SERIAL_PIPE_STAGES = 5
SERIAL_PIPE = SERIAL_PIPE_STAGES + 1
