"""The layer program: the versioned binary the host streams to the accelerator.

This docstring is the specification the hardware loader and the host driver
implement. A program holds everything the accelerator needs to run one network
(layer descriptors, packed codes, requant multipliers and biases) and nothing
else: no layer names, no per-layer float scales.

File layout (version 1)
-----------------------
Every multi-byte field is little endian. The file has four parts, back to back::

    +--------------------+  offset 0
    | header             |  HEADER_SIZE = 94 bytes
    +--------------------+  descriptor table offset (= HEADER_SIZE)
    | descriptor table   |  n_layers records of DESCRIPTOR_SIZE = 46 bytes
    +--------------------+  data offset (= table offset + table size)
    | data section       |  ceil(data_bits / 8) bytes: one packed bit stream
    +--------------------+
    | CRC-32             |  u32, zlib.crc32 of every byte before it
    +--------------------+

Header (struct format :data:`HEADER_FORMAT`)::

    off  type      field
      0  4 bytes   magic, b"MLGP"
      4  u16       format version (PROGRAM_VERSION = 1)
      6  u16       header size in bytes (94)
      8  32 bytes  SHA-256 digest of the AcceleratorConfig the program is built for
     40  u16       n_layers (>= 1)
     42  u8 x 8    a_bits, w_bits, m_bits, qb, qu, qv, qd, decode (0 signed, 1 odd)
     50  u16 x 4   input C, input H, input W, num_classes
     58  f64       input scale (host side: quantizes the image)
     66  f64       output scale (host side: real value of one logit step)
     74  u32       descriptor table offset (bytes from the file start)
     78  u32       descriptor table size (bytes, = n_layers * 46)
     82  u32       data section offset (bytes from the file start)
     86  u32       data section size in bytes (= ceil(data bits / 8))
     90  u32       data section size in bits (the end of the last tensor)

A reader checks, in this order: the magic; the version (any other is
rejected, whatever follows); the length (a file shorter than its header says
is reported as truncated); the CRC; the config digest against the config of
the accelerator when one is given; the header placement fields (table right
after the header, data right after the table, ``data bytes = ceil(data bits
/ 8)``); and then every header and descriptor field against its accepted range
(the config maxima when a config is given).

Descriptor (struct format :data:`DESCRIPTOR_FORMAT`, one per layer, in run order)::

    off  type      field
      0  u8        op: 0 conv, 1 pool (global average pool to 1x1)
      1  u8        flags: bit0 ReLU, bit1 level 1 (U present), bit2 level 2
                   (V present), bit3 residual add; bits 4..5 the code width of a
                   dense layer's B (0 qd, 1 qb, 2 qv; 0 on other layers); bits
                   6..7 are zero
      2  u8 x 3    k, stride, pad
      5  u8 x 3    src, dst, res activation buffer ids (res is 0 without bit3)
      8  u8        w_shift: W2 rounding shift
      9  u8        shift: requant shift
     10  u16 x 6   ci, co, h, w (input feature map), bi, bo
     22  i32       m_res: residual multiplier (signed, fits m_bits)
     26  u32 x 5   bit offsets of B, U, V, mult, bias inside the data section,
                   counted from its first bit; ABSENT (0xFFFFFFFF) for a tensor
                   the layer does not have

A conv layer always has B, mult and bias; U iff flag bit1; V iff flag bit2. A
pool layer has no codes (B, U, V absent) but has mult and bias (``co`` each,
``ci == co``, ``k = stride = 1``, ``pad = 0``). Without level 2, ``bo == co``.

Data section
------------
One contiguous bit stream. Element ``i`` of a tensor of width ``b`` starting at
bit offset ``o`` occupies stream bits ``o + i*b`` .. ``o + i*b + b - 1``, least
significant bit first; stream bit ``n`` is bit ``n % 8`` of byte ``n // 8``
(the order of :func:`gen.packing.pack_codes`). Tensors are flattened in C
order and are not aligned: a tensor starts at whatever bit the previous one
ended. The writer emits, layer after layer::

    B     [bo, bi, k*k] (level 1) or [bo, ci, k*k]   qb bits (dense: see flags), unsigned
    U     [bo, ci, bi]                               qu bits, unsigned
    V     [co, bo]                                   qv bits, unsigned
    mult  [co]                                       m_bits, two's complement
    bias  [co]                                       config.bias_bits, two's complement

A layer is *dense* when it has neither U nor V; its B codes are ``qd`` bits, or
``qb`` / ``qv`` bits as flag bits 4..5 say (the parts of a factorized layer).
Only the end of the stream is padded, with zero bits, to a whole byte, so the
data section is ``ceil(total bits / 8)`` bytes: the packing overhead of the
whole program is under one byte. ``data bits`` is the end of the last tensor,
the last layer's bias: a reader without the config recovers ``bias_bits``
(not in the header, it is a config property) as ``(data bits - that bias
offset) / co``; a reader with the config checks that this holds.

Codes are the raw unsigned codes of :class:`gen.network.LayerSpec`; how they
decode to integers (``decode``) and everything the hardware computes from them
is defined by :mod:`gen.integer`.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DECODE_FORMS, KERNEL_SIZES, AcceleratorConfig
from .contract import DENSE_BITS, WIDTH_NAMES, check_widths, width_fields, widths_of
from .integer import int_range
from .network import LayerSpec, QuantizedNetwork
from .packing import PackingError, pack_codes, unpack_codes

__all__ = [
    "Program", "ProgramError", "write_program", "read_program", "save_program",
    "load_program", "PROGRAM_MAGIC", "PROGRAM_VERSION", "HEADER_FORMAT", "HEADER_SIZE",
    "DESCRIPTOR_FORMAT", "DESCRIPTOR_SIZE", "ABSENT", "CRC_SIZE", "VERSION_OFFSET",
    "DIGEST_OFFSET",
]

PROGRAM_MAGIC = b"MLGP"
PROGRAM_VERSION = 1

HEADER = struct.Struct("<4sHH32sH8B4H2d5I")
HEADER_FORMAT = HEADER.format
HEADER_SIZE = HEADER.size  # 94

DESCRIPTOR = struct.Struct("<10B6Hi5I")
DESCRIPTOR_FORMAT = DESCRIPTOR.format
DESCRIPTOR_SIZE = DESCRIPTOR.size  # 46

CRC = struct.Struct("<I")
CRC_SIZE = CRC.size

ABSENT = 0xFFFFFFFF
OP_CODES = {"conv": 0, "pool": 1}
OP_NAMES = {v: k for k, v in OP_CODES.items()}
DECODE_CODES = {form: i for i, form in enumerate(DECODE_FORMS)}  # signed 0, odd 1

FLAG_RELU, FLAG_L1, FLAG_L2, FLAG_RES = 1, 2, 4, 8
DENSE_SHIFT = 4       # flag bits 4..5: index into gen.contract.DENSE_BITS
TENSORS = ("B", "U", "V", "mult", "bias")

U8, U16, U32 = 0xFF, 0xFFFF, 0xFFFFFFFF
MAX_BUFFERS = 16      # the largest act_buffers an AcceleratorConfig accepts
MAX_STRIDE = 3        # the descriptor's stride field is 2 bits wide
MAX_SHIFT_ANY = 62    # without a config: shifts must leave int64 arithmetic meaningful

# Field positions in the header and descriptor tuples.
_H_HSIZE, _H_DIGEST, _H_NLAYERS = 2, 3, 4
_H_WIDTHS = slice(5, 13)
_H_SHAPE = slice(13, 17)
_H_SCALES = slice(17, 19)
_H_SECTIONS = slice(19, 24)
_D_NAMES = ("op", "flags", "k", "stride", "pad", "src", "dst", "res", "w_shift", "shift",
            "ci", "co", "h", "w", "bi", "bo", "m_res",
            "off_B", "off_U", "off_V", "off_mult", "off_bias")

# Header byte offsets of a few fields (used by tests and tools that patch files).
VERSION_OFFSET = 4
DIGEST_OFFSET = 8


class ProgramError(ValueError):
    """A program cannot be written (a value does not fit its field) or read."""


def _hex8(digest: bytes) -> str:
    return digest.hex()[:8]


# ----------------------------------------------------------------------------
# Program


@dataclass
@width_fields(after="config_digest", defaults=False)
class Program:
    """A parsed layer program: header fields (the width fields of
    :data:`gen.contract.WIDTHS` after ``config_digest``), the layers and the section
    sizes."""

    version: int
    config_digest: bytes
    input_shape: tuple[int, int, int]
    num_classes: int
    input_scale: float
    output_scale: float
    layers: list[LayerSpec] = field(default_factory=list)
    header_size: int = HEADER_SIZE
    descriptor_offset: int = HEADER_SIZE
    descriptor_size: int = 0
    data_offset: int = HEADER_SIZE
    data_bytes: int = 0
    data_bits: int = 0
    crc: int = 0
    info_bits: int = 0

    def __post_init__(self):
        check_widths(self, ProgramError, "program: ")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def config_hash(self) -> str:
        return self.config_digest.hex()

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.data_bytes + CRC_SIZE

    def network(self) -> QuantizedNetwork:
        """The :class:`QuantizedNetwork` this program runs (arch ``"program"``).

        Layer scales are not stored: every layer has scale 1.0, except that the
        last layer's ``out_scale`` is the header's output scale.
        """
        return QuantizedNetwork(
            arch="program", input_shape=tuple(self.input_shape), input_scale=self.input_scale,
            num_classes=self.num_classes, **widths_of(self), layers=list(self.layers))

    def size_report(self) -> dict:
        """Byte counts of every part, and ``info_bits``: the bits of every packed tensor."""
        return {
            "header": self.header_size,
            "descriptor_table": self.descriptor_size,
            "data": self.data_bytes,
            "crc": CRC_SIZE,
            "total": self.total_bytes,
            "info_bits": self.info_bits,
            "data_bits": self.data_bits,
            "padding_bits": 8 * self.data_bytes - self.data_bits,
        }


# ----------------------------------------------------------------------------
# Writing


def _tensor_np(t, what: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex():
            raise ProgramError(f"{what}: expected an integer tensor, got {t.dtype}")
        return t.detach().cpu().to(torch.int64).reshape(-1).numpy()
    a = np.asarray(t)
    if a.dtype.kind not in "iub":
        raise ProgramError(f"{what}: expected an integer array, got {a.dtype}")
    return a.astype(np.int64).reshape(-1)


class _Writer:
    """Collects the layer tensors as one bit stream and checks every field."""

    def __init__(self, net: QuantizedNetwork, config: AcceleratorConfig):
        self.net, self.config = net, config
        self.chunks: list[np.ndarray] = []  # bit arrays (uint8 of 0/1)
        self.bits = 0

    def fail(self, layer: LayerSpec, fld: str, msg: str):
        raise ProgramError(f"cannot write program: layer {layer.name!r}, field {fld}: {msg}")

    def check_int(self, layer, fld: str, value, lo: int, hi: int, why: str = ""):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            self.fail(layer, fld, f"expected an integer, got {value!r}")
        if not lo <= int(value) <= hi:
            self.fail(layer, fld, f"value {int(value)} out of range; accepted {lo}..{hi}"
                      + (f" ({why})" if why else ""))
        return int(value)

    def add(self, layer: LayerSpec, fld: str, t, shape: tuple, bits: int,
            signed: bool) -> int:
        if t is None:
            self.fail(layer, fld, "missing")
        if tuple(t.shape) != tuple(shape):
            self.fail(layer, fld, f"shape {tuple(t.shape)}, expected {tuple(shape)}")
        a = _tensor_np(t, f"cannot write program: layer {layer.name!r}, field {fld}")
        lo, hi = int_range(bits) if signed else (0, (1 << bits) - 1)
        if a.size:
            amin, amax = int(a.min()), int(a.max())
            if amin < lo or amax > hi:
                bad = amin if amin < lo else amax
                kind = "signed" if signed else "unsigned"
                self.fail(layer, fld, f"value {bad} does not fit {bits} bits {kind}; "
                          f"accepted {lo}..{hi}")
        offset = self.bits
        if offset + a.size * bits > U32:
            self.fail(layer, fld, f"bit offset {offset} past the 32-bit offset range")
        try:
            packed = pack_codes(a, bits, signed=signed)
        except PackingError as e:
            self.fail(layer, fld, str(e))
        nbits = a.size * bits
        stream = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="little")
        self.chunks.append(stream[:nbits])
        self.bits += nbits
        return offset

    def layer(self, layer: LayerSpec) -> bytes:
        net, cfg = self.net, self.config
        chk = self.check_int
        if layer.op not in OP_CODES:
            self.fail(layer, "op", f"{layer.op!r} unsupported; accepted: conv, pool")
        for name in cfg.lacks(op=layer.op, has_l2=layer.has_l2, has_res=layer.res is not None):
            self.fail(layer, _FEATURE_FIELDS[name], f"needs {name}, which the accelerator config "
                      f"leaves out ({name} = false); compile the config from this network")
        ci = chk(layer, "ci", layer.ci, 1, min(U16, cfg.max_ci), "config max_ci")
        co = chk(layer, "co", layer.co, 1, min(U16, cfg.max_co), "config max_co")
        h = chk(layer, "h", layer.h, 1, min(U16, cfg.max_h), "config max_h")
        w = chk(layer, "w", layer.w, 1, min(U16, cfg.max_w), "config max_w")
        bi = chk(layer, "bi", layer.bi, 0, U16)
        bo = chk(layer, "bo", layer.bo, 0, U16)
        k = chk(layer, "k", layer.k, 1, U8)
        stride = chk(layer, "stride", layer.stride, 1, MAX_STRIDE)
        pad = chk(layer, "pad", layer.pad, 0, U8)
        nbuf = cfg.act_buffers
        src = chk(layer, "src", layer.src, 0, nbuf - 1, "buffer ids < config act_buffers")
        dst = chk(layer, "dst", layer.dst, 0, nbuf - 1, "buffer ids < config act_buffers")
        res = 0
        if layer.res is not None:
            res = chk(layer, "res", layer.res, 0, nbuf - 1, "buffer ids < config act_buffers")
        w_shift = chk(layer, "w_shift", layer.w_shift, 0, cfg.w_shift_max, "config w_shift_max")
        shift = chk(layer, "shift", layer.shift, 0, cfg.shift_max, "config shift_max")
        lo, hi = int_range(cfg.m_bits)
        m_res = chk(layer, "m_res", layer.m_res, lo, hi, f"{cfg.m_bits}-bit signed")

        flags = (FLAG_RELU if layer.relu else 0) | (FLAG_RES if layer.res is not None else 0)
        offs = {name: ABSENT for name in TENSORS}
        kk = k * k
        if layer.op == "pool":
            if layer.relu:
                self.fail(layer, "relu", "a pool layer has no ReLU")
            for fld, t in (("B", layer.b), ("U", layer.u), ("V", layer.v)):
                if t is not None:
                    self.fail(layer, fld, "a pool layer has no codes")
            if ci != co:
                self.fail(layer, "co", f"value {co}; a pool layer keeps its channels (ci = {ci})")
            for fld, v, want in (("k", k, 1), ("stride", stride, 1), ("pad", pad, 0)):
                if v != want:
                    self.fail(layer, fld, f"value {v}; a pool layer has {fld} = {want}")
        else:
            if k not in KERNEL_SIZES or k > cfg.max_k:
                self.fail(layer, "k", f"value {k} unsupported; accepted "
                          + ", ".join(str(s) for s in KERNEL_SIZES if s <= cfg.max_k)
                          + f" (config max_k = {cfg.max_k})")
            chk(layer, "pad", pad, 0, k // 2, "at most k // 2")
            if layer.u is not None:
                flags |= FLAG_L1
                chk(layer, "bi", bi, 1, cfg.max_bi, "config max_bi")
            if layer.v is not None:
                flags |= FLAG_L2
                chk(layer, "bo", bo, 1, cfg.max_bo, "config max_bo")
            elif bo != co:
                self.fail(layer, "bo", f"value {bo}; without level 2 bo must equal co = {co}")
            ho, wo = layer.ho, layer.wo
            if ho < 1 or wo < 1:
                self.fail(layer, "k", f"kernel {k} with pad {pad} does not fit a {h}x{w} map")
            if co * ho * wo > cfg.act_depth:
                self.fail(layer, "co", f"output {co}x{ho}x{wo} exceeds config act_depth "
                          f"{cfg.act_depth}")
            b_shape = (bo, bi, kk) if layer.u is not None else (bo, ci, kk)
            offs["B"] = self.add(layer, "B", layer.b, b_shape, layer.b_bits(net), False)
            flags |= DENSE_BITS.index(layer.dense_bits) << DENSE_SHIFT
            if layer.u is not None:
                offs["U"] = self.add(layer, "U", layer.u, (bo, ci, bi), net.qu, False)
            if layer.v is not None:
                offs["V"] = self.add(layer, "V", layer.v, (co, bo), net.qv, False)
        offs["mult"] = self.add(layer, "mult", layer.mult, (co,), cfg.m_bits, True)
        offs["bias"] = self.add(layer, "bias", layer.bias, (co,), cfg.bias_bits, True)
        return DESCRIPTOR.pack(OP_CODES[layer.op], flags, k, stride, pad, src, dst, res,
                               w_shift, shift, ci, co, h, w, bi, bo, m_res,
                               *(offs[n] for n in TENSORS))

    def stream(self) -> bytes:
        if not self.chunks:
            return b""
        bits = np.concatenate(self.chunks)
        return np.packbits(bits, bitorder="little").tobytes()


def write_program(net: QuantizedNetwork, config: AcceleratorConfig) -> bytes:
    """Serialise ``net`` as the layer program of the accelerator built from ``config``.

    Raises :class:`ProgramError` naming the layer and field of any value that
    does not fit its field or the config.
    """
    pre = "cannot write program"
    if not net.layers:
        raise ProgramError(f"{pre}: the network has no layers")
    if len(net.layers) > U16:
        raise ProgramError(f"{pre}: {len(net.layers)} layers; at most {U16} fit the header")
    for name in WIDTH_NAMES:
        have, want = getattr(net, name), getattr(config, name)
        if have != want:
            raise ProgramError(f"{pre}: network {name} = {have!r} but the accelerator config "
                               f"has {name} = {want!r}; compile the config from this network")
    if len(net.input_shape) != 3:
        raise ProgramError(f"{pre}: input_shape {tuple(net.input_shape)} must be (C, H, W)")
    for fld, v in zip(("input C", "input H", "input W", "num_classes"),
                      (*net.input_shape, net.num_classes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= U16:
            raise ProgramError(f"{pre}: header field {fld} = {v!r} out of range; "
                               f"accepted 1..{U16}")
    c, h, w = (int(v) for v in net.input_shape)
    if c * h * w > config.act_depth:
        raise ProgramError(f"{pre}: input {c}x{h}x{w} exceeds config act_depth "
                           f"{config.act_depth}")

    writer = _Writer(net, config)
    table = b"".join(writer.layer(layer) for layer in net.layers)
    data = writer.stream()
    data_bits = writer.bits
    if data_bits > U32:
        raise ProgramError(f"{pre}: data section of {data_bits} bits exceeds the u32 size field")

    table_off = HEADER_SIZE
    data_off = table_off + len(table)
    header = HEADER.pack(
        PROGRAM_MAGIC, PROGRAM_VERSION, HEADER_SIZE, config.digest, len(net.layers),
        *(DECODE_CODES[net.decode] if name == "decode" else getattr(net, name)
          for name in WIDTH_NAMES), c, h, w, int(net.num_classes),
        float(net.input_scale), float(net.output_scale),
        table_off, len(table), data_off, len(data), data_bits)
    body = header + table + data
    return body + CRC.pack(zlib.crc32(body))


def save_program(path, net: QuantizedNetwork, config: AcceleratorConfig) -> bytes:
    """Write the program of ``net`` to ``path``; returns its bytes."""
    data = write_program(net, config)
    Path(path).write_bytes(data)
    return data


# ----------------------------------------------------------------------------
# Reading


# The layer field that asks for each optional layer feature (AcceleratorConfig.lacks).
_FEATURE_FIELDS = {"level2": "v", "residual": "res", "pool": "op"}


def _bad_field(source: str, i: int, fld: str, value, accepted: str):
    raise ProgramError(f"{source}: layer {i} descriptor field {fld} = {value} out of range; "
                       f"accepted {accepted}")


def _check_descriptor(source: str, i: int, raw: tuple, nbuf: int, limits: dict, max_k: int,
                      w_shift_max: int, shift_max: int, widths: dict,
                      features: AcceleratorConfig | None = None) -> dict:
    """Range-check one descriptor (and, with ``features``, that the config has the
    layer features it needs); returns its fields plus the tensors it implies.

    ``tensors`` maps each of B, U, V, mult, bias to ``(shape, bits, signed)``
    or None (absent); the bias width is None here (fixed later).
    """
    f = dict(zip(_D_NAMES, raw))

    def rng(fld, lo, hi, why=""):
        if not lo <= f[fld] <= hi:
            _bad_field(source, i, fld, f[fld], f"{lo}..{hi}" + (f" ({why})" if why else ""))

    if f["op"] not in OP_NAMES:
        _bad_field(source, i, "op", f["op"], "0 (conv), 1 (pool)")
    op = OP_NAMES[f["op"]]
    flags = f["flags"]
    dense_sel = (flags >> DENSE_SHIFT) & 3
    if flags & ~0x3F or dense_sel >= len(DENSE_BITS):
        _bad_field(source, i, "flags", f"{flags:#04x}",
                   f"bits 0..5, with bits 4..5 below {len(DENSE_BITS)}")
    has_l1, has_l2, has_res = bool(flags & FLAG_L1), bool(flags & FLAG_L2), bool(flags & FLAG_RES)
    if features is not None:
        for name in features.lacks(op=op, has_l2=has_l2, has_res=has_res):
            fld, value = ("op", f["op"]) if name == "pool" else ("flags", f"{flags:#04x}")
            raise ProgramError(f"{source}: layer {i} descriptor field {fld} = {value} needs "
                               f"{name}, which the accelerator config leaves out "
                               f"({name} = false)")
    rng("ci", 1, limits["max_ci"])
    rng("co", 1, limits["max_co"])
    rng("h", 1, limits["max_h"])
    rng("w", 1, limits["max_w"])
    why_buf = f"{nbuf} activation buffers"
    rng("src", 0, nbuf - 1, why_buf)
    rng("dst", 0, nbuf - 1, why_buf)
    if has_res:
        rng("res", 0, nbuf - 1, why_buf)
    else:
        rng("res", 0, 0, "no residual flag")
    rng("w_shift", 0, w_shift_max)
    rng("shift", 0, shift_max)
    m_bits = widths["m_bits"]
    m_lo, m_hi = int_range(m_bits)
    rng("m_res", m_lo, m_hi, f"{m_bits}-bit signed")
    ci, co, k = f["ci"], f["co"], f["k"]
    if op == "pool":
        if flags & (FLAG_RELU | FLAG_L1 | FLAG_L2):
            _bad_field(source, i, "flags", f"{flags:#04x}",
                       "0x00 or 0x08 for a pool layer (no ReLU, no levels)")
        rng("k", 1, 1, "pool")
        rng("stride", 1, 1, "pool")
        rng("pad", 0, 0, "pool")
        rng("co", ci, ci, "a pool layer keeps its ci channels")
    else:
        accepted = [s for s in KERNEL_SIZES if s <= max_k]
        if k not in accepted:
            _bad_field(source, i, "k", k, ", ".join(map(str, accepted)))
        rng("stride", 1, MAX_STRIDE)
        rng("pad", 0, k // 2, "at most k // 2")
        if has_l1:
            rng("bi", 1, limits["max_bi"])
        if has_l2:
            rng("bo", 1, limits["max_bo"])
        else:
            rng("bo", co, co, "bo = co without level 2")
        if f["h"] + 2 * f["pad"] < k or f["w"] + 2 * f["pad"] < k:
            _bad_field(source, i, "k", k, f"a kernel that fits the {f['h']}x{f['w']} map "
                       f"with pad {f['pad']}")

    kk, bi, bo = k * k, f["bi"], f["bo"]
    dense = op == "conv" and not has_l1 and not has_l2
    if dense_sel and not dense:
        _bad_field(source, i, "flags", f"{flags:#04x}", "bits 4..5 zero on a layer that is not "
                   "a dense conv")
    want = {
        "B": ((bo, bi, kk) if has_l1 else (bo, ci, kk),
              widths[DENSE_BITS[dense_sel]] if dense else widths["qb"], False) if op == "conv" else None,
        "U": ((bo, ci, bi), widths["qu"], False) if has_l1 else None,
        "V": ((co, bo), widths["qv"], False) if has_l2 else None,
        "mult": ((co,), m_bits, True),
        "bias": ((co,), None, True),
    }
    for name in TENSORS:
        off = f["off_" + name]
        if want[name] is None and off != ABSENT:
            _bad_field(source, i, f"{name} offset", off, f"{ABSENT:#x} (this layer has no {name})")
        if want[name] is not None and off == ABSENT:
            raise ProgramError(f"{source}: layer {i} descriptor: {name} is absent but a "
                               f"{op} layer with flags {flags:#04x} needs it")
    f["tensors"] = want
    return f


def _bias_width(source: str, descs: list[tuple], data_bits: int,
                bias_bits: int | None) -> int:
    """The bias width: from the config, else from the end of the stream.

    The last tensor of the stream is the last layer's bias, so without a config
    its width is ``(data_bits - bias offset) / co``; with one, that must hold too.
    """
    last = descs[-1]
    off, co = last["off_bias"], last["co"]
    i = len(descs) - 1
    if off == ABSENT or co < 1 or off > data_bits:
        raise ProgramError(f"{source}: layer {i} descriptor: bias offset {off} (co = {co}); "
                           f"expected the last tensor of the data section of {data_bits} bits")
    span = data_bits - off
    if bias_bits is None:
        if span % co or not 2 <= span // co <= 64:
            raise ProgramError(
                f"{source}: layer {i} bias spans {span} bits for co = {co}; expected co x "
                "bias_bits (2..64) bits ending the data section")
        return span // co
    if span != co * bias_bits:
        raise ProgramError(
            f"{source}: layer {i} bias spans {span} bits to the end of the data section; "
            f"expected {co} x {bias_bits} (config bias_bits) = {co * bias_bits}")
    return bias_bits


def read_program(data: bytes, *, source: str = "program",
                 config: AcceleratorConfig | None = None) -> Program:
    """Parse and check a program; with ``config``, also check it was built for it."""
    data = bytes(data)
    n = len(data)
    if n < 4:
        raise ProgramError(f"{source}: truncated: {n} bytes, expected at least "
                           f"{HEADER_SIZE + CRC_SIZE} (header and CRC)")
    if data[:4] != PROGRAM_MAGIC:
        raise ProgramError(f"{source}: bad magic {data[:4]!r}; expected {PROGRAM_MAGIC!r} "
                           "(not an MLG layer program)")
    if n < 6:
        raise ProgramError(f"{source}: truncated: {n} bytes, expected at least "
                           f"{HEADER_SIZE + CRC_SIZE} (header and CRC)")
    # The CRC (the file's last 4 bytes in every version) is checked before the version:
    # a damaged version field is a damaged file, not a file of another version.
    version = struct.unpack_from("<H", data, VERSION_OFFSET)[0]
    unsupported = f"version {version} unsupported; this reader accepts {PROGRAM_VERSION}"
    if version != PROGRAM_VERSION:
        if n >= VERSION_OFFSET + 2 + CRC_SIZE:
            stored = CRC.unpack_from(data, n - CRC_SIZE)[0]
            computed = zlib.crc32(memoryview(data)[:n - CRC_SIZE])
            if stored != computed:
                raise ProgramError(f"{source}: CRC mismatch: stored {stored:#010x}, computed "
                                   f"{computed:#010x} (the file is corrupted; its version "
                                   f"field reads {version}, this reader accepts "
                                   f"{PROGRAM_VERSION})")
        raise ProgramError(f"{source}: {unsupported}")
    if n < HEADER_SIZE + CRC_SIZE:
        raise ProgramError(f"{source}: truncated: {n} bytes, expected at least "
                           f"{HEADER_SIZE + CRC_SIZE} (header and CRC)")
    hdr = HEADER.unpack_from(data, 0)
    hsize = hdr[_H_HSIZE]
    n_layers = hdr[_H_NLAYERS]
    table_off, table_size, data_off, data_bytes, data_bits = hdr[_H_SECTIONS]
    expected = data_off + data_bytes + CRC_SIZE
    placement = [
        (hsize == HEADER_SIZE,
         f"header size {hsize}; version {PROGRAM_VERSION} expects {HEADER_SIZE}"),
        (table_off == HEADER_SIZE,
         f"descriptor table offset {table_off}; expected {HEADER_SIZE} (right after the header)"),
        (table_size == n_layers * DESCRIPTOR_SIZE,
         f"descriptor table size {table_size}; expected {n_layers * DESCRIPTOR_SIZE} "
         f"({n_layers} layers x {DESCRIPTOR_SIZE} bytes)"),
        (data_off == table_off + table_size,
         f"data offset {data_off}; expected {table_off + table_size} "
         "(right after the descriptor table)"),
        (data_bytes == (data_bits + 7) // 8,
         f"data section is {data_bytes} bytes for {data_bits} bits; expected "
         f"{(data_bits + 7) // 8} bytes"),
    ]
    consistent = all(ok for ok, _ in placement)
    stored = CRC.unpack_from(data, n - CRC_SIZE)[0]
    computed = zlib.crc32(memoryview(data)[:n - CRC_SIZE])
    if stored != computed:
        # A consistent header and a short file: the file was cut, and the CRC
        # read from its last 4 bytes is not the CRC at all.
        if consistent and n < expected:
            raise ProgramError(f"{source}: truncated: {n} bytes, expected {expected}")
        if consistent and n > expected:
            raise ProgramError(f"{source}: {n} bytes, expected {expected} "
                               f"({n - expected} trailing bytes)")
        raise ProgramError(f"{source}: CRC mismatch: stored {stored:#010x}, computed "
                           f"{computed:#010x} (the file is corrupted)")
    for ok, msg in placement:
        if not ok:
            raise ProgramError(f"{source}: {msg}")
    if n != expected:
        raise ProgramError(f"{source}: {n} bytes, expected {expected} from the header")
    digest = hdr[_H_DIGEST]
    if config is not None and digest != config.digest:
        raise ProgramError(f"{source}: built for config {_hex8(digest)} but the accelerator "
                           f"config is {_hex8(config.digest)}")

    # Header fields.
    if not 1 <= n_layers <= U16:
        raise ProgramError(f"{source}: header field n_layers = {n_layers} out of range; "
                           f"accepted 1..{U16}")
    widths = dict(zip(WIDTH_NAMES, hdr[_H_WIDTHS]))
    decode_id = widths["decode"]
    if not 0 <= decode_id < len(DECODE_FORMS):
        raise ProgramError(f"{source}: header field decode = {decode_id} out of range; "
                           f"accepted 0..{len(DECODE_FORMS) - 1}")
    widths["decode"] = DECODE_FORMS[decode_id]
    check_widths(widths, ProgramError, f"{source}: header field ")
    c, h, w, num_classes = hdr[_H_SHAPE]
    for fld, v in (("input C", c), ("input H", h), ("input W", w), ("num_classes", num_classes)):
        if v < 1:
            raise ProgramError(f"{source}: header field {fld} = {v} out of range; "
                               f"accepted 1..{U16}")
    input_scale, output_scale = hdr[_H_SCALES]
    if config is not None:
        for fld, v in widths.items():
            if v != getattr(config, fld):
                raise ProgramError(f"{source}: header field {fld} = {v!r} but the accelerator "
                                   f"config has {fld} = {getattr(config, fld)!r}")
        bias_bits = config.bias_bits
    else:
        bias_bits = None

    nbuf = config.act_buffers if config is not None else MAX_BUFFERS
    limits = {name: (getattr(config, name) if config is not None else U16)
              for name in ("max_ci", "max_co", "max_h", "max_w", "max_bi", "max_bo")}
    max_k = config.max_k if config is not None else max(KERNEL_SIZES)
    w_shift_max = config.w_shift_max if config is not None else MAX_SHIFT_ANY
    shift_max = config.shift_max if config is not None else MAX_SHIFT_ANY
    descs = [_check_descriptor(source, i,
                               DESCRIPTOR.unpack_from(data, table_off + i * DESCRIPTOR_SIZE),
                               nbuf, limits, max_k, w_shift_max, shift_max, widths, config)
             for i in range(n_layers)]
    bias_bits = _bias_width(source, descs, data_bits, bias_bits)

    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=data_bytes, offset=data_off),
                         bitorder="little")
    if bits[data_bits:].any():
        raise ProgramError(f"{source}: padding bits after data bit {data_bits} are not zero")

    layers: list[LayerSpec] = []
    info_bits = 0
    for i, f in enumerate(descs):
        tensors = {}
        for name in TENSORS:
            spec = f["tensors"][name]
            if spec is None:
                tensors[name] = None
                continue
            shape, tbits, signed = spec
            if tbits is None:
                tbits = bias_bits
            off = f["off_" + name]
            count = math.prod(shape)
            end = off + count * tbits
            if end > data_bits:
                raise ProgramError(
                    f"{source}: layer {i} {name} at bit offset {off} ({count} x {tbits} bits) "
                    f"ends at bit {end}, past the data section of {data_bits} bits")
            chunk = np.packbits(bits[off:end], bitorder="little").tobytes()
            try:
                vals = unpack_codes(chunk, tbits, count, signed=signed)
            except PackingError as e:
                raise ProgramError(f"{source}: layer {i} {name}: {e}") from None
            tensors[name] = torch.from_numpy(np.array(vals, dtype=np.int64)).reshape(shape)
            info_bits += count * tbits
        flags = f["flags"]
        layers.append(LayerSpec(
            name=f"layer{i}", op=OP_NAMES[f["op"]], ci=f["ci"], co=f["co"], h=f["h"],
            w=f["w"], k=f["k"], stride=f["stride"], pad=f["pad"], bi=f["bi"], bo=f["bo"],
            src=f["src"], dst=f["dst"], res=f["res"] if flags & FLAG_RES else None,
            relu=bool(flags & FLAG_RELU), b=tensors["B"], u=tensors["U"], v=tensors["V"],
            dense_bits=DENSE_BITS[(flags >> DENSE_SHIFT) & 3],
            w_shift=f["w_shift"], mult=tensors["mult"], bias=tensors["bias"],
            shift=f["shift"], m_res=f["m_res"]))
    layers[-1].out_scale = output_scale

    return Program(
        version=version, config_digest=digest, **widths, input_shape=(c, h, w),
        num_classes=num_classes, input_scale=input_scale, output_scale=output_scale,
        layers=layers, header_size=hsize, descriptor_offset=table_off,
        descriptor_size=table_size, data_offset=data_off, data_bytes=data_bytes,
        data_bits=data_bits, crc=stored, info_bits=info_bits)


def load_program(path, config: AcceleratorConfig | None = None) -> Program:
    """Read and check the program file at ``path`` (errors name the path)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProgramError(f"{path}: cannot read program ({e.strerror})") from None
    return read_program(data, source=str(path), config=config)
