"""The accelerator configuration: the one source of truth for every width and size.

An :class:`AcceleratorConfig` is frozen, validated on construction and
JSON-serialisable. The Amaranth elaboration, the golden model, the packer, the
host driver and the tests all read their constants from it. Widths that follow
from others (code value widths, W1/W2 growth, accumulator, requant product) are
derived properties and never stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .contract import DECODE_FORMS, WIDTH_NAMES, width_fields, width_problem

__all__ = [
    "AcceleratorConfig",
    "ConfigError",
    "DECODE_FORMS",
    "CONFIG_SCHEMA_VERSION",
    "OPTIONAL_FIELDS",
    "code_value_bits",
    "clog2",
    "lane_plan",
    "pe_pack_problem",
    "pe_pack_fits",
    "DSP_OPERAND_BITS",
]

CONFIG_SCHEMA_VERSION = 1
KERNEL_SIZES = (1, 3, 5, 7)
# Fields added after the first configs were written: a config file may leave them
# out (they take these values), and the canonical form omits them at these values.
OPTIONAL_FIELDS = {"counter_bits": 48, "layer_log": True, "compact": False, "level2": True,
                   "residual": True, "pool": True, "stream": True, "pe_pack": 1}
# Operand width of the multiplier blocks the PE products map to (ECP5 MULT18X18D).
DSP_OPERAND_BITS = 18
PE_PACKINGS = (1, 2)


class ConfigError(ValueError):
    """An :class:`AcceleratorConfig` field is out of range or inconsistent."""


def clog2(n: int) -> int:
    """Bits needed to count ``n`` distinct values (0 for n <= 1)."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def code_value_bits(bits: int, form: str) -> int:
    """Signed width of the value a ``bits``-wide code decodes to.

    ``signed`` codes are two's complement and keep their width; ``odd`` codes
    decode to ``2c - (2**bits - 1)``, an odd integer that needs one more bit.
    """
    return bits if form == "signed" else bits + 1


def pe_pack_problem(a_bits: int, w_bits: int, cols: int) -> str | None:
    """Why two PE products cannot share one multiplier block for these widths and
    ``cols`` (``None`` if they can): the packed weight operand needs
    ``a_bits + 2 * w_bits + 1`` bits (the low product's field is ``a_bits + w_bits``
    wide, the high weight sits above it with a sign bit of headroom)."""
    need = a_bits + 2 * w_bits + 1
    if need > DSP_OPERAND_BITS:
        return (f"the packed weight operand needs a_bits + 2 * w_bits + 1 = {need} bits, "
                f"more than the {DSP_OPERAND_BITS} of a multiplier block "
                f"(w_bits <= {(DSP_OPERAND_BITS - 1 - a_bits) // 2} with a_bits = {a_bits})")
    if cols % 2:
        return f"cols = {cols} is odd (columns are paired)"
    return None


def pe_pack_fits(a_bits: int, w_bits: int, cols: int) -> bool:
    """Whether :func:`pe_pack_problem` finds none."""
    return pe_pack_problem(a_bits, w_bits, cols) is None


def _check_int(name: str, value, lo: int, hi: int | None = None, *, choices=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"AcceleratorConfig.{name} must be an integer, got {value!r}")
    if choices is not None:
        if value not in choices:
            raise ConfigError(
                f"AcceleratorConfig.{name} = {value} is not supported; accepted: "
                + ", ".join(str(c) for c in choices))
        return
    if value < lo or (hi is not None and value > hi):
        accepted = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"AcceleratorConfig.{name} = {value} is out of range; accepted: {accepted}")


@dataclass(frozen=True)
@width_fields(after="cols")
class AcceleratorConfig:
    """Elaboration parameters of one accelerator build.

    Array shape, data widths and buffer maxima are fixed in hardware; layer
    shapes are run-time descriptor fields that must stay within the maxima.

    Parameters
    ----------
    rows, cols:
        Shape of the systolic array (processing elements), each >= 2.
    a_bits, w_bits, m_bits, qb, qu, qv, qd, decode:
        The widths of the integer network (:data:`gen.contract.WIDTHS` gives each
        field's meaning, accepted range and default): activations, PE weights (W2
        is rounded to ``w_bits``), the requant multiplier, the codes of the basis B,
        the level-1 and level-2 coefficients U and V and of dense layers, and how a
        code decodes to its value (``"signed"`` or ``"odd"``).
    max_ci, max_co, max_k, max_h, max_w, max_bi, max_bo:
        Maxima over the layers the build must run (input/output channels,
        kernel size, input feature map, bases).
    act_depth:
        Elements in one activation buffer (the largest tensor of the network).
    act_buffers:
        Number of activation buffers the layer program addresses.
    base_store_bytes:
        Capacity of the on-chip base store, in bytes.
    gen_lanes:
        Generation multipliers working in parallel.
    max_layers:
        Layer records the program memory holds.
    const_depth:
        Per-channel requant constant words (multiplier and bias) the constants
        memory holds, summed over the layers of a program.
    max_payload:
        Largest request payload of the host link, in bytes (the frame buffer).
    link_timeout:
        Clock cycles without a byte after which a partly received frame is dropped.
    baud:
        Host link UART rate in bit/s.
    counter_bits:
        Width of the run and link counters, 16..48. They wrap at ``2**counter_bits``
        (the host reads every counter as 8 bytes, zero-extended).
    layer_log:
        Keep the per-layer log of the counters (``REGION_LOG``). Without it, reads
        of that region are refused and the log's block RAMs are saved.
    compact:
        Build for a small device (the iCE40 UP5K of the iCEBreaker): trade a few
        cycles per layer for logic. The program memory is byte-wide, its records
        read a byte a cycle (a record-wide memory is logic cells on an iCE40); one
        requant lane of four stages; no FIFOs between the generation unit, the
        constant store and the engine; the W1 buffer and the base store in
        single-port RAM (``hw.memory``); the executor's address, length and pixel
        arithmetic only as wide as the largest region, frame and map need. Without
        ``level2`` the generation unit is the serial one (``hw.serialgen``): one
        weight at a time, with no W1 buffer.
    level2, residual, pool:
        The layer features the hardware supports: level-2 generation (``V`` codes,
        ``W2 = V x W1``), the residual add, pooling layers. A build without one
        leaves out its logic, and its engine refuses a layer that needs it
        (``ERR_DESCRIPTOR``); ``mlg compile --trim`` leaves out what the model does
        not use.
    pe_pack:
        PE products per multiplier block, 1 or 2. With 2, each pair of neighbouring
        columns ``2j, 2j + 1`` of a row shares one multiplier: the two weights are packed
        in one operand (``w_lo + w_hi * 2**(a_bits + w_bits)``), so one product of the
        row's activation gives both, and the array needs ``rows * cols / 2`` blocks. It
        needs an even ``cols`` and a packed operand that fits the block
        (``a_bits + 2 * w_bits + 1 <= 18``: weights of 4 bits or fewer with 8-bit
        activations); :func:`pe_pack_fits` says whether a config allows it.
    stream:
        Codes may be streamed from the host during a run (``REGION_STREAM``, for
        layers whose codes the base store does not hold). A build without it has no
        stream FIFO and refuses writes to that region; a program for it must keep
        every layer's codes in the base store (``mlg compile --trim`` leaves it out
        when they all fit).

    ``counter_bits``, ``layer_log``, ``compact``, ``level2``, ``residual``, ``pool``,
    ``stream`` and ``pe_pack`` may be left out of a config file; a field at its default is left out of the
    canonical form (:attr:`digest`), so that configs written before these fields
    existed keep their identity.
    """

    rows: int = 8
    cols: int = 8
    # a_bits, w_bits, m_bits, qb, qu, qv, qd, decode: from gen.contract.WIDTHS
    max_ci: int = 64
    max_co: int = 64
    max_k: int = 3
    max_h: int = 32
    max_w: int = 32
    max_bi: int = 2
    max_bo: int = 64
    act_depth: int = 65536
    act_buffers: int = 4
    base_store_bytes: int = 65536
    gen_lanes: int = 8
    max_layers: int = 32
    const_depth: int = 1024
    max_payload: int = 1024
    link_timeout: int = 1 << 20
    baud: int = 3_000_000
    counter_bits: int = 48
    layer_log: bool = True
    compact: bool = False
    level2: bool = True
    residual: bool = True
    pool: bool = True
    stream: bool = True
    pe_pack: int = 1
    schema: int = field(default=CONFIG_SCHEMA_VERSION)

    def __post_init__(self):
        _check_int("schema", self.schema, 0, choices=(CONFIG_SCHEMA_VERSION,))
        _check_int("rows", self.rows, 2, 64)
        _check_int("cols", self.cols, 2, 64)
        for name in WIDTH_NAMES:
            problem = width_problem(name, getattr(self, name))
            if problem:
                raise ConfigError(f"AcceleratorConfig.{problem}")
        _check_int("max_ci", self.max_ci, 1, 4096)
        _check_int("max_co", self.max_co, 1, 4096)
        _check_int("max_k", self.max_k, 0, choices=KERNEL_SIZES)
        _check_int("max_h", self.max_h, 1, 1024)
        _check_int("max_w", self.max_w, 1, 1024)
        _check_int("max_bi", self.max_bi, 1, 64)
        _check_int("max_bo", self.max_bo, 1, 4096)
        _check_int("act_depth", self.act_depth, 1, 1 << 24)
        _check_int("act_buffers", self.act_buffers, 2, 16)
        _check_int("base_store_bytes", self.base_store_bytes, 1, 1 << 24)
        _check_int("gen_lanes", self.gen_lanes, 1, 256)
        _check_int("max_layers", self.max_layers, 1, 4096)
        _check_int("const_depth", self.const_depth, 1, 1 << 20)
        _check_int("max_payload", self.max_payload, 64, 65535)
        _check_int("link_timeout", self.link_timeout, 16, 1 << 32)
        _check_int("baud", self.baud, 1200, 50_000_000)
        _check_int("counter_bits", self.counter_bits, 16, 48)
        for name in ("layer_log", "compact", "level2", "residual", "pool", "stream"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"AcceleratorConfig.{name} = {getattr(self, name)!r} must be "
                                  "true or false")
        _check_int("pe_pack", self.pe_pack, 1, choices=PE_PACKINGS)
        if self.pe_pack == 2:
            problem = pe_pack_problem(self.a_bits, self.w_bits, self.cols)
            if problem:
                raise ConfigError(f"AcceleratorConfig.pe_pack = 2: {problem}; use pe_pack = 1")
        if self.post_bits > 63:
            raise ConfigError(
                f"requant product needs {self.post_bits} bits (accumulator {self.acc_bits} + "
                f"multiplier {self.m_bits} + 1); at most 63 are supported: lower m_bits, "
                "a_bits, w_bits or max_ci")

    def lacks(self, *, op: str, has_l2: bool, has_res: bool) -> list[str]:
        """The layer features (``level2``, ``residual``, ``pool``) that a layer of kind
        ``op`` with these levels needs and this config leaves out."""
        need = {"level2": has_l2, "residual": has_res, "pool": op == "pool"}
        return [name for name, needed in need.items() if needed and not getattr(self, name)]

    # Derived widths -----------------------------------------------------

    # Structural variants: which component the accelerator top builds --------

    @property
    def serial_generation(self) -> bool:
        """Whether the generation unit is the serial one (``hw.serialgen``): ``compact``
        builds without level 2 produce one weight a cycle through one multiplier."""
        return self.compact and not self.level2

    @property
    def counter_bank(self) -> bool:
        """Whether the run and link counters live in one block RAM
        (``hw.counters.CounterBank``): ``compact`` builds without a layer log. With a
        layer log every counter is copied in the same cycle, which a memory cannot do."""
        return self.compact and not self.layer_log

    @property
    def compact_requantizer(self) -> bool:
        """Whether the post-processing is the one-channel-a-cycle requantizer with the
        short pipeline (``compact`` builds); otherwise ``requant_lanes`` channels a cycle."""
        return self.compact

    @property
    def requant_lanes(self) -> int:
        """Channels the requantizer takes per cycle: ``gcd(rows, cols)``, so lane groups
        tile both a channel tile of ``cols`` outputs and a bank row of ``rows``
        channels; one with ``compact``."""
        return 1 if self.compact else math.gcd(self.rows, self.cols)

    @property
    def multiplier_blocks(self) -> dict:
        """Multiplier blocks (``MULT18X18D`` on ECP5) the build instantiates, by block:
        ``pe`` (``rows * cols / pe_pack``), ``requant`` (per lane two for the
        accumulator times the multiplier, one for the residual add) and ``generation``
        (one per lane; one for the serial unit), and their ``total``."""
        n = {"pe": self.rows * self.cols // self.pe_pack,
             "requant": self.requant_lanes * (3 if self.residual else 2),
             "generation": 1 if self.serial_generation else self.gen_lanes}
        return {**n, "total": sum(n.values())}

    @property
    def b_value_bits(self) -> int:
        return code_value_bits(self.qb, self.decode)

    @property
    def u_value_bits(self) -> int:
        return code_value_bits(self.qu, self.decode)

    @property
    def v_value_bits(self) -> int:
        return code_value_bits(self.qv, self.decode)

    @property
    def d_value_bits(self) -> int:
        return code_value_bits(self.qd, self.decode)

    @property
    def w1_bits(self) -> int:
        """Signed width of a level-1 weight: sum of ``max_bi`` products B x U."""
        return self.b_value_bits + self.u_value_bits + clog2(self.max_bi)

    @property
    def w2_bits(self) -> int:
        """Signed width of an unrounded level-2 weight: sum of ``max_bo`` products V x W1."""
        w1 = max(self.w1_bits, self.b_value_bits)
        return max(w1 + self.v_value_bits + clog2(self.max_bo), self.d_value_bits)

    @property
    def max_taps(self) -> int:
        return self.max_ci * self.max_k * self.max_k

    @property
    def acc_bits(self) -> int:
        """Signed accumulator width: ``max_taps`` products of a_bits x w_bits, plus headroom
        for the pooled sum of a whole feature map."""
        conv = self.a_bits + self.w_bits + clog2(self.max_taps)
        pool = self.a_bits + clog2(self.max_h * self.max_w)
        return max(conv, pool)

    @property
    def bias_bits(self) -> int:
        """Signed width of a bias, which is added in the product domain acc * M."""
        return self.acc_bits + self.m_bits

    @property
    def post_bits(self) -> int:
        """Signed width of acc * M + bias + residual * m_res before the rounding shift."""
        return self.acc_bits + self.m_bits + 1

    @property
    def shift_max(self) -> int:
        """Largest requant shift a descriptor may carry."""
        return self.post_bits - 1

    @property
    def w_shift_max(self) -> int:
        """Largest W2 rounding shift a descriptor may carry."""
        return max(0, self.w2_bits - 1)

    # Serialisation ------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kw)

    def canonical_json(self) -> str:
        """The form :attr:`digest` hashes: :meth:`to_json` without the optional
        fields (:data:`OPTIONAL_FIELDS`) that hold their defaults."""
        d = {k: v for k, v in self.to_dict().items()
             if k not in OPTIONAL_FIELDS or v != OPTIONAL_FIELDS[k]}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "AcceleratorConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; "
                              f"accepted: {', '.join(sorted(names))}")
        missing = sorted(names - set(data) - set(OPTIONAL_FIELDS))
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "config") -> "AcceleratorConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path) -> "AcceleratorConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        return cls.from_json(text, source=str(path))

    def save(self, path) -> None:
        Path(path).write_text(self.to_json(indent=2) + "\n")

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON form (:meth:`canonical_json`): the identity
        of a build."""
        return hashlib.sha256(self.canonical_json().encode()).digest()

    @property
    def hash_hex(self) -> str:
        return self.digest.hex()


def lane_plan(config: AcceleratorConfig) -> dict:
    """How the ``gen_lanes`` multipliers map onto a weight tile.

    Returns ``Lc``/``Lr`` (columns and rows of a level-2 lane group),
    ``Pc``/``Pr`` (groups per tile along columns and rows), ``lanes`` (lanes in
    use, ``Lc * Lr``), ``L1`` (lanes used by level 1) and ``P1`` (level-1 passes
    per W1 word).
    """
    R, C, L = config.rows, config.cols, config.gen_lanes
    if L <= C:
        Lc, Lr = L, 1
    else:
        Lc, Lr = C, min(R, L // C)
    L1 = min(Lc * Lr, R)
    return {"Lc": Lc, "Lr": Lr, "Pc": -(-C // Lc), "Pr": -(-R // Lr), "lanes": Lc * Lr,
            "L1": L1, "P1": -(-R // L1)}
