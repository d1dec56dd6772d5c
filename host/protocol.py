"""The host link protocol: framed commands over a byte stream (UART or simulation).

This module is the specification the device (:mod:`hw.link`) and the driver
(:mod:`host.driver`) both implement; every constant below is used by both.

Frame
-----
Both directions use the same frame::

    SYNC  u8        0xA5
    OP    u8        request opcode; a response carries OP | 0x80, an error OP_ERROR
    LEN   u16 LE    payload bytes (a request is refused above the device's max_payload)
    PAYLOAD         LEN bytes
    CRC   u16 BE    CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) of OP, LEN and PAYLOAD

The CRC goes most significant byte first, so a receiver that runs the CRC over
the whole frame after SYNC, CRC included, ends on the residue 0.

A device answers every request with exactly one frame. It executes a request
only after its CRC has been checked; a request with a bad CRC, a length above
``max_payload``, an unknown opcode, a bad argument or an out-of-range address
gets an error frame (``OP_ERROR``, payload ``[error code, request opcode]``)
and changes no state. A frame whose bytes stop arriving for ``link_timeout``
cycles is dropped with ``ERR_TIMEOUT``. Between frames the device skips every
byte that is not SYNC.

Requests
--------
======== ========================================== =======================================
opcode   request payload                            response payload
======== ========================================== =======================================
IDENTIFY (none)                                     IDENTITY (see :func:`parse_identity`)
WRITE    region u8, address u32, data               (none)
READ     region u8, address u32, count u16          count bytes
RUN      n_layers u16                               (none)
STATUS   (none)                                     state u8, error u8, layer u16
COUNTERS (none)                                     N_COUNTERS x u64, in COUNTERS order
LOAD_ACT buffer u8, channels u16, pixels u32, data  (none)
READ_ACT buffer u8, channels u16, pixels u32        channels * pixels * act_bytes
ABORT    (none)                                     (none)
======== ========================================== =======================================

All multi-byte fields are little endian except the CRC.

Memory regions (``WRITE``/``READ``) are byte addressed; a word region is
written in whole words (address and length multiples of its word size):

* ``REGION_PROGRAM``: the layer records (:func:`hw.interfaces.layer_record_layout`),
  ``record_bytes(config)`` each;
* ``REGION_BASES``: the base store, packed codes (bytes);
* ``REGION_CONSTS``: per-channel requant constants (:func:`hw.engine.channel_layout`),
  ``const_bytes(config)`` each;
* ``REGION_LOG`` (read only): the layer log of the last run, one entry of
  ``len(LOG_COUNTERS)`` words of 8 bytes per layer: the run counters named in
  :data:`LOG_COUNTERS` as they stood when that layer ended (entries of layers
  the run did not reach hold older values);
* ``REGION_STREAM`` (write only, address 0): code bytes of the layers that are
  not resident in the base store (record flag ``streamed``), in layer order.
  They go into a FIFO that the running program drains; the WRITE is answered
  once its last byte is in the FIFO, so the host simply sends the streamed
  layers' codes after RUN. Such a WRITE is refused with ``ERR_STATE`` when no
  run is going on, and answered with ``ERR_STATE`` when the run ends before all
  its bytes found room (so it can never wait forever). RUN and ABORT empty the
  FIFO.

Activations (``LOAD_ACT``/``READ_ACT``) are tensors ``[channels, pixels]`` in
CHW order, one element in ``act_bytes(config)`` bytes (two's complement, little
endian). ``WRITE`` and ``READ`` of the program, bases and constants regions,
``LOAD_ACT``, ``READ_ACT`` and ``RUN`` are refused with ``ERR_BUSY`` while the
device runs (``REGION_STREAM`` is written during a run).
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass

__all__ = [
    "SYNC", "PROTOCOL_VERSION", "IDENTITY_MAGIC", "OP_IDENTIFY", "OP_WRITE", "OP_READ",
    "OP_RUN", "OP_STATUS", "OP_COUNTERS", "OP_LOAD_ACT", "OP_READ_ACT", "OP_ABORT",
    "OP_ERROR", "OP_NAMES", "RESPONSE", "REGION_PROGRAM", "REGION_BASES", "REGION_CONSTS",
    "REGION_STREAM", "REGION_LOG", "LOG_COUNTERS",
    "REGION_NAMES", "ERRORS", "ERR_CRC", "ERR_LENGTH", "ERR_OPCODE", "ERR_ADDRESS",
    "ERR_BUSY", "ERR_TIMEOUT", "ERR_ARGUMENT", "ERR_STATE", "STATE_IDLE", "STATE_RUNNING", "STATE_DONE",
    "STATE_ERROR", "STATE_NAMES", "COUNTERS", "N_COUNTERS", "HEADER_BYTES", "CRC_BYTES",
    "IDENTITY_BYTES", "crc16", "encode_frame", "Frame", "FrameDecoder", "ProtocolError",
    "Identity", "parse_identity", "identity_bytes", "act_bytes", "record_bytes",
    "const_bytes", "pack_struct", "unpack_struct",
]

SYNC = 0xA5
PROTOCOL_VERSION = 1
IDENTITY_MAGIC = b"MLGA"

OP_IDENTIFY = 0x01
OP_WRITE = 0x02
OP_READ = 0x03
OP_RUN = 0x04
OP_STATUS = 0x05
OP_COUNTERS = 0x06
OP_LOAD_ACT = 0x07
OP_READ_ACT = 0x08
OP_ABORT = 0x09
OP_ERROR = 0xFF
RESPONSE = 0x80
OP_NAMES = {OP_IDENTIFY: "IDENTIFY", OP_WRITE: "WRITE", OP_READ: "READ", OP_RUN: "RUN",
            OP_STATUS: "STATUS", OP_COUNTERS: "COUNTERS", OP_LOAD_ACT: "LOAD_ACT",
            OP_READ_ACT: "READ_ACT", OP_ABORT: "ABORT"}

REGION_PROGRAM = 0
REGION_BASES = 1
REGION_CONSTS = 2
REGION_STREAM = 3
REGION_LOG = 4
REGION_NAMES = {REGION_PROGRAM: "program", REGION_BASES: "bases", REGION_CONSTS: "consts",
                REGION_STREAM: "stream", REGION_LOG: "log"}

ERR_CRC = 1
ERR_LENGTH = 2
ERR_OPCODE = 3
ERR_ADDRESS = 4
ERR_BUSY = 5
ERR_TIMEOUT = 6
ERR_ARGUMENT = 7
ERR_STATE = 8
ERRORS = {ERR_CRC: "bad CRC", ERR_LENGTH: "bad length", ERR_OPCODE: "unknown opcode",
          ERR_ADDRESS: "address out of range", ERR_BUSY: "device busy",
          ERR_TIMEOUT: "frame timed out", ERR_ARGUMENT: "bad argument",
          ERR_STATE: "no run is taking streamed codes"}

STATE_IDLE = 0
STATE_RUNNING = 1
STATE_DONE = 2
STATE_ERROR = 3
STATE_NAMES = {STATE_IDLE: "idle", STATE_RUNNING: "running", STATE_DONE: "done",
               STATE_ERROR: "error"}

# Performance counters, in the order COUNTERS returns them.
COUNTERS = (
    "cycles",            # cycles of the last run, RUN to done
    "engine_busy",       # cycles the conv engine was in a layer
    "gen_busy",          # cycles the generation unit was not idle
    "mac_cycles",        # cycles a vector entered the systolic array
    "macs",              # multiply-accumulates (additions for a pool)
    "stall_weights",     # array cycles lost waiting for generated weights
    "stall_output",      # array cycles lost waiting for accumulators or the residual port
    "code_bytes",        # packed code bytes streamed into the generation unit
    "bytes_in",          # link bytes received since reset
    "bytes_out",         # link bytes sent since reset
    "frames",            # request frames executed since reset
    "frame_errors",      # request frames refused since reset
)
N_COUNTERS = len(COUNTERS)
# The run counters the layer log keeps for every layer (REGION_LOG).
LOG_COUNTERS = COUNTERS[:8]   # a power of two: an entry is addressed by bit fields

HEADER_BYTES = 4          # SYNC, OP, LEN
CRC_BYTES = 2
# IDENTITY: magic 4s, protocol u16, config digest 32s, max_payload u16, act_bytes u8,
# record_bytes u8, const_bytes u8, act_buffers u8, rows u8, cols u8.
_IDENTITY = struct.Struct("<4sH32sH6B")
IDENTITY_BYTES = _IDENTITY.size


class ProtocolError(Exception):
    """A frame is malformed (bad sync, CRC or length) or not what was expected."""


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE of ``data``."""
    return binascii.crc_hqx(bytes(data), 0xFFFF)


def encode_frame(op: int, payload: bytes = b"") -> bytes:
    """One frame: SYNC, OP, LEN, PAYLOAD, CRC."""
    if not 0 <= op <= 0xFF:
        raise ValueError(f"opcode {op} out of range 0..255")
    if len(payload) > 0xFFFF:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the 65535 a frame carries")
    body = struct.pack("<BH", op, len(payload)) + bytes(payload)
    return bytes([SYNC]) + body + struct.pack(">H", crc16(body))


@dataclass(frozen=True)
class Frame:
    op: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return self.op == OP_ERROR

    def error(self) -> tuple[int, int]:
        """``(error code, request opcode)`` of an error frame."""
        if len(self.payload) != 2:
            raise ProtocolError(f"error frame with {len(self.payload)} payload bytes, expected 2")
        return self.payload[0], self.payload[1]


class FrameDecoder:
    """Incremental frame parser: feed bytes, collect complete frames.

    Bytes before a SYNC are skipped and counted in ``skipped``; a frame with a
    bad CRC or a length above ``max_payload`` raises :class:`ProtocolError` from
    :meth:`feed` after the good frames before it are kept in ``frames``.
    """

    def __init__(self, max_payload: int = 0xFFFF):
        self.max_payload = max_payload
        self.buf = bytearray()
        self.frames: list[Frame] = []
        self.skipped = 0

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        while True:
            start = self.buf.find(bytes([SYNC]))
            if start < 0:
                self.skipped += len(self.buf)
                self.buf.clear()
                break
            if start:
                self.skipped += start
                del self.buf[:start]
            if len(self.buf) < HEADER_BYTES:
                break
            op, length = struct.unpack_from("<BH", self.buf, 1)
            if length > self.max_payload:
                del self.buf[:1]
                raise ProtocolError(f"frame of opcode 0x{op:02x} announces {length} payload bytes, "
                                    f"more than the {self.max_payload} accepted")
            end = HEADER_BYTES + length + CRC_BYTES
            if len(self.buf) < end:
                break
            body = bytes(self.buf[1:HEADER_BYTES + length])
            (crc,) = struct.unpack_from(">H", self.buf, HEADER_BYTES + length)
            if crc != crc16(body):
                del self.buf[:1]
                raise ProtocolError(f"frame of opcode 0x{op:02x} with {length} payload bytes has "
                                    f"CRC 0x{crc:04x}, computed 0x{crc16(body):04x}")
            self.frames.append(Frame(op, body[3:]))
            del self.buf[:end]
        return self.frames

    def pop(self) -> Frame | None:
        return self.frames.pop(0) if self.frames else None


@dataclass(frozen=True)
class Identity:
    """What IDENTIFY returns: the build's config digest and the link geometry."""

    protocol: int
    config_digest: bytes
    max_payload: int
    act_bytes: int
    record_bytes: int
    const_bytes: int
    act_buffers: int
    rows: int
    cols: int

    @property
    def config_hash(self) -> str:
        return self.config_digest.hex()


def identity_bytes(config) -> bytes:
    """The IDENTITY payload of a device built for ``config``."""
    return _IDENTITY.pack(IDENTITY_MAGIC, PROTOCOL_VERSION, config.digest, config.max_payload,
                          act_bytes(config), record_bytes(config), const_bytes(config),
                          config.act_buffers, config.rows, config.cols)


def parse_identity(payload: bytes) -> Identity:
    if len(payload) != IDENTITY_BYTES:
        raise ProtocolError(f"IDENTITY payload of {len(payload)} bytes, expected {IDENTITY_BYTES}")
    magic, proto, digest, max_payload, ab, rb, cb, nbuf, rows, cols = _IDENTITY.unpack(payload)
    if magic != IDENTITY_MAGIC:
        raise ProtocolError(f"IDENTITY magic {magic!r}, expected {IDENTITY_MAGIC!r}: "
                            "not an MLG accelerator")
    return Identity(proto, digest, max_payload, ab, rb, cb, nbuf, rows, cols)


# ---- sizes derived from the config ------------------------------------------------

def act_bytes(config) -> int:
    """Bytes of one activation on the link."""
    return (config.a_bits + 7) // 8


def _pow2_bytes(bits: int) -> int:
    # Words of a power-of-two size keep byte addressing a shift and a mask on chip.
    n = (bits + 7) // 8
    return 1 << (n - 1).bit_length()


def record_bytes(config) -> int:
    """Bytes of one layer record in the program region (a power of two)."""
    from hw.interfaces import layer_record_layout

    return _pow2_bytes(layer_record_layout(config).size)


def const_bytes(config) -> int:
    """Bytes of one channel's requant constants in the constants region (a power of two)."""
    from hw.engine import channel_layout

    return _pow2_bytes(channel_layout(config).size)


# ---- struct packing (Amaranth StructLayout bit order, LSB first) --------------------

def pack_struct(layout, values: dict) -> int:
    """Raw bits of ``values`` (field -> int, or list of ints for an array field) in an
    Amaranth ``StructLayout``; missing fields are 0. Raises ``ValueError`` naming a
    field whose value does not fit."""
    word = 0
    for name, fld in layout:
        if name not in values:
            continue
        v = values[name]
        shape = fld.shape
        if hasattr(shape, "elem_shape"):
            ew = _width(shape.elem_shape)
            for i, e in enumerate(v):
                word |= _fit(name, int(e), ew, _signed(shape.elem_shape)) << (fld.offset + i * ew)
        else:
            word |= _fit(name, int(v), fld.width, _signed(shape)) << fld.offset
    return word


def unpack_struct(layout, word: int) -> dict:
    """Inverse of :func:`pack_struct` for scalar fields (signed fields sign-extended)."""
    out = {}
    for name, fld in layout:
        v = (word >> fld.offset) & ((1 << fld.width) - 1)
        if _signed(fld.shape) and v >> (fld.width - 1):
            v -= 1 << fld.width
        out[name] = v
    return out


def _width(shape) -> int:
    from amaranth.hdl import Shape

    return Shape.cast(shape).width


def _signed(shape) -> bool:
    from amaranth.hdl import Shape

    try:
        return Shape.cast(shape).signed
    except TypeError:
        return False


def _fit(name: str, v: int, width: int, signed: bool) -> int:
    lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    if not lo <= v <= hi:
        raise ValueError(f"field {name} = {v} does not fit {width} bits "
                         f"{'signed' if signed else 'unsigned'} (accepted {lo}..{hi})")
    return v & ((1 << width) - 1)
