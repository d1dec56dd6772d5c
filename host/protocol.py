"""The host link protocol: framed commands over a byte stream (UART or simulation).

This module is the specification the device (:mod:`hw.link`, :mod:`hw.accelerator`)
and the driver (:mod:`host.driver`) both implement, and the host's half of it:
frame encoding and decoding, the IDENTITY parser, struct packing. Its numbers (opcodes,
argument sizes, regions, error and state codes, counters, word sizes) are defined in
:mod:`gen.contract`, which both sides import; they are re-exported here.

Frame
-----
Both directions use the same frame::

    SYNC  u8        0xA5
    OP    u8        request opcode; a response carries OP | 0x80, an error OP_ERROR
    LEN   u16 LE    payload bytes (a request is refused above the device's max_payload)
    TAG   u8        chosen by the host per request; the answer carries the same
    PAYLOAD         LEN bytes
    CRC   u16 BE    CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) of OP, LEN, TAG, PAYLOAD

The CRC goes most significant byte first, so a receiver that runs the CRC over
the whole frame after SYNC, CRC included, ends on the residue 0.

A device answers every request with exactly one frame, which carries the
request's TAG (error frames too). It executes a request only after its CRC has
been checked; a request with a bad CRC, a length above ``max_payload``, an
unknown opcode, a bad argument or an out-of-range address gets an error frame
(``OP_ERROR``, payload ``[error code, request opcode]``) and changes no state.
A frame whose bytes stop arriving for ``link_timeout`` cycles is dropped with
``ERR_TIMEOUT``. A frame whose LEN is above ``max_payload`` is still read to
its declared end (LEN payload bytes and the CRC) and dropped, then answered
with ``ERR_LENGTH``: no byte inside a declared frame starts another frame (a
gap of ``link_timeout`` cycles ends the drop early). Between frames the device
skips every byte that is not SYNC.

The host gives every request a new TAG (:data:`TAGS` values, in turn) and takes
as its answer only a frame with that TAG: an answer that arrives late, after
its request was given up, is recognised and dropped.

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
READ_ACT buffer u8, channels u16, pixels u32        channels * pixels * act_bytes (*)
ABORT    (none)                                     (none)
======== ========================================== =======================================

(*) refused with ``ERR_NO_RESULT`` while the device is in the error state (the
last run stopped on a fault or was aborted): a stopped run leaves no result.

:data:`gen.contract.REQUESTS` holds this table's argument fields and sizes.
All multi-byte fields are little endian except the CRC.

Memory regions (``WRITE``/``READ``) are byte addressed; a word region is
written in whole words (address and length multiples of its word size):

* ``REGION_PROGRAM``: the layer records (:func:`gen.contract.layer_record_layout`),
  ``record_bytes(config)`` each;
* ``REGION_BASES``: the base store, packed codes (bytes);
* ``REGION_CONSTS``: per-channel requant constants (:func:`gen.contract.channel_layout`),
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

from amaranth.hdl import Shape

from gen.contract import (
    ARG_BYTES, COUNTER_BYTES, FIXED_LENGTH, REQUESTS, RUN_ERRORS, STATUS, STATUS_BYTES, Request,
    COUNTERS, CRC_BYTES, ERR_ADDRESS, ERR_ARGUMENT, ERR_BUSY, ERR_CRC, ERR_LENGTH, ERR_OPCODE,
    ERR_NO_RESULT, ERR_STATE, ERR_TIMEOUT, ERRORS, HEADER_BYTES, IDENTITY, IDENTITY_BYTES, IDENTITY_MAGIC,
    LOG_COUNTERS, N_COUNTERS, OP_ABORT, OP_COUNTERS, OP_ERROR, OP_IDENTIFY, OP_LOAD_ACT,
    OP_NAMES, OP_READ, OP_READ_ACT, OP_RUN, OP_STATUS, OP_WRITE, PROTOCOL_VERSION,
    REGION_BASES, REGION_CONSTS, REGION_LOG, REGION_NAMES, REGION_PROGRAM, REGION_STREAM,
    RESPONSE, STATE_DONE, STATE_ERROR, STATE_IDLE, STATE_NAMES, STATE_RUNNING, SYNC, TAGS,
    act_bytes, const_bytes, identity_bytes, record_bytes)
from gen.integer import int_range

__all__ = [
    "SYNC", "PROTOCOL_VERSION", "IDENTITY_MAGIC", "OP_IDENTIFY", "OP_WRITE", "OP_READ",
    "OP_RUN", "OP_STATUS", "OP_COUNTERS", "OP_LOAD_ACT", "OP_READ_ACT", "OP_ABORT",
    "OP_ERROR", "OP_NAMES", "RESPONSE", "REGION_PROGRAM", "REGION_BASES", "REGION_CONSTS",
    "REGION_STREAM", "REGION_LOG", "LOG_COUNTERS",
    "REGION_NAMES", "ERRORS", "ERR_CRC", "ERR_LENGTH", "ERR_OPCODE", "ERR_ADDRESS",
    "ERR_BUSY", "ERR_TIMEOUT", "ERR_ARGUMENT", "ERR_STATE", "ERR_NO_RESULT", "TAGS", "STATE_IDLE", "STATE_RUNNING", "STATE_DONE",
    "STATE_ERROR", "STATE_NAMES", "COUNTERS", "N_COUNTERS", "HEADER_BYTES", "CRC_BYTES",
    "IDENTITY_BYTES", "crc16", "encode_frame", "Frame", "FrameDecoder", "ProtocolError",
    "Identity", "parse_identity", "identity_bytes", "act_bytes", "record_bytes",
    "const_bytes", "pack_struct", "unpack_struct", "Request", "REQUESTS", "ARG_BYTES",
    "FIXED_LENGTH", "STATUS", "STATUS_BYTES", "COUNTER_BYTES", "RUN_ERRORS", "IDENTITY",
]


class ProtocolError(Exception):
    """A frame is malformed (bad sync, CRC or length) or not what was expected."""


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE of ``data``."""
    return binascii.crc_hqx(bytes(data), 0xFFFF)


def encode_frame(op: int, payload: bytes = b"", tag: int = 0) -> bytes:
    """One frame: SYNC, OP, LEN, TAG, PAYLOAD, CRC."""
    if not 0 <= op <= 0xFF:
        raise ValueError(f"opcode {op} out of range 0..255")
    if not 0 <= tag < TAGS:
        raise ValueError(f"tag {tag} out of range 0..{TAGS - 1}")
    if len(payload) > 0xFFFF:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the 65535 a frame carries")
    body = struct.pack("<BHB", op, len(payload), tag) + bytes(payload)
    return bytes([SYNC]) + body + struct.pack(">H", crc16(body))


@dataclass(frozen=True)
class Frame:
    op: int
    payload: bytes
    tag: int = 0

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
            self.frames.append(Frame(op, body[HEADER_BYTES - 1:], body[HEADER_BYTES - 2]))
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


def parse_identity(payload: bytes) -> Identity:
    if len(payload) != IDENTITY_BYTES:
        raise ProtocolError(f"IDENTITY payload of {len(payload)} bytes, expected {IDENTITY_BYTES}")
    magic, proto, digest, max_payload, ab, rb, cb, nbuf, rows, cols = IDENTITY.unpack(payload)
    if magic != IDENTITY_MAGIC:
        raise ProtocolError(f"IDENTITY magic {magic!r}, expected {IDENTITY_MAGIC!r}: "
                            "not an MLG accelerator")
    return Identity(proto, digest, max_payload, ab, rb, cb, nbuf, rows, cols)


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
    return Shape.cast(shape).width


def _signed(shape) -> bool:
    try:
        return Shape.cast(shape).signed
    except TypeError:
        return False


def _fit(name: str, v: int, width: int, signed: bool) -> int:
    lo, hi = int_range(width) if signed else (0, (1 << width) - 1)
    if not lo <= v <= hi:
        raise ValueError(f"field {name} = {v} does not fit {width} bits "
                         f"{'signed' if signed else 'unsigned'} (accepted {lo}..{hi})")
    return v & ((1 << width) - 1)
