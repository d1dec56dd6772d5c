"""Integer network: what the accelerator runs, as the golden model and compiler see it.

A :class:`QuantizedNetwork` is a list of :class:`LayerSpec` operations that read
and write numbered activation buffers. It holds only integers that the hardware
receives (codes, shifts, multipliers, biases) plus the float scales that tie the
integers back to the trained model (used for reporting and input quantization,
never by the integer arithmetic).

Buffer 0 holds the quantized input image. A layer reads ``src``, optionally adds
the residual buffer ``res`` and writes ``dst``.

The model file written by ``mlg train`` and ``mlg import`` is a ``torch.save``
dictionary (loadable with ``weights_only=True``) with keys ``format``,
``version``, ``arch``, ``mlg`` (settings), ``network`` (this class as a dict),
``state_dict`` (the float PyTorch model) and ``metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .config import KERNEL_SIZES
from .contract import DENSE_BITS, check_widths, width_fields
from .integer import decode_codes, generate_w2, round_w2

__all__ = ["LayerSpec", "QuantizedNetwork", "ModelFileError", "load_model_file",
           "save_model_file", "MODEL_FORMAT", "MODEL_VERSION", "DENSE_BITS"]

MODEL_FORMAT = "mlg-model"
MODEL_VERSION = 1


class ModelFileError(ValueError):
    """A model file is unreadable, of another format, or inconsistent."""


@dataclass
class LayerSpec:
    """One operation of the layer program.

    ``op`` is ``"conv"`` (convolution, also a classifier as a 1x1 conv on a 1x1
    map) or ``"pool"`` (global average pool to 1x1). ``h``/``w`` are the input
    feature map. For conv layers the codes are raw unsigned codes:

    * ``b``: ``[bo, bi, k*k]`` with level 1, else ``[bo, ci, k*k]`` (dense: bo = co),
      at ``qb`` bits (``qd`` for a dense layer);
    * ``u``: ``[bo, ci, bi]`` at ``qu`` bits, present iff level 1 exists;
    * ``v``: ``[co, bo]`` at ``qv`` bits, present iff level 2 exists.

    ``dense_bits`` names the network width of a dense layer's codes: ``"qd"``
    (the dense layers' own width), or ``"qb"`` / ``"qv"`` for the parts of a
    factorized layer (:mod:`gen.factorize`), whose codes are a basis or ``V``.
    """

    name: str
    op: str
    ci: int
    co: int
    h: int
    w: int
    k: int = 1
    stride: int = 1
    pad: int = 0
    bi: int = 0
    bo: int = 0
    src: int = 0
    dst: int = 1
    res: int | None = None
    relu: bool = False
    b: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    w_shift: int = 0
    mult: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    shift: int = 0
    m_res: int = 0
    in_scale: float = 1.0
    out_scale: float = 1.0
    w_scale: float = 1.0
    dense_bits: str = "qd"

    @property
    def has_l1(self) -> bool:
        return self.u is not None

    @property
    def has_l2(self) -> bool:
        return self.v is not None

    @property
    def dense(self) -> bool:
        return self.op == "conv" and not self.has_l1 and not self.has_l2

    @property
    def ho(self) -> int:
        return 1 if self.op == "pool" else (self.h + 2 * self.pad - self.k) // self.stride + 1

    @property
    def wo(self) -> int:
        return 1 if self.op == "pool" else (self.w + 2 * self.pad - self.k) // self.stride + 1

    @property
    def macs(self) -> int:
        if self.op == "pool":
            return self.ci * self.h * self.w
        return self.co * self.ci * self.k * self.k * self.ho * self.wo

    def code_tensors(self, net: "QuantizedNetwork") -> list[tuple[str, torch.Tensor, int]]:
        """``(name, codes, bits)`` of every packed code tensor of this layer."""
        if self.op != "conv":
            return []
        out = [("B", self.b, self.b_bits(net))]
        if self.u is not None:
            out.append(("U", self.u, net.qu))
        if self.v is not None:
            out.append(("V", self.v, net.qv))
        return out

    def b_bits(self, net: "QuantizedNetwork") -> int:
        """Code width of ``b``: ``qb``, or the width ``dense_bits`` names for a dense layer."""
        return getattr(net, self.dense_bits) if self.dense else net.qb

    def aligned_code_bytes(self, net: "QuantizedNetwork") -> int:
        """Bytes of this layer's codes in the base store: each tensor packed on its own,
        starting on a byte boundary (the order the generation unit loads them)."""
        return sum((t.numel() * bits + 7) // 8 for _, t, bits in self.code_tensors(net))

    @property
    def out_channels(self) -> int:
        """Channels of the output: ``co`` (``ci`` for a pool), one requant constant each."""
        return self.ci if self.op == "pool" else self.co

    def weights_w2(self, net: "QuantizedNetwork") -> torch.Tensor:
        """Unrounded generated weights ``[co, ci, k*k]`` (exact integers)."""
        b = decode_codes(self.b, self.b_bits(net), net.decode)
        u = decode_codes(self.u, net.qu, net.decode) if self.u is not None else None
        v = decode_codes(self.v, net.qv, net.decode) if self.v is not None else None
        return generate_w2(b, u, v)

    def weights_pe(self, net: "QuantizedNetwork") -> torch.Tensor:
        """Weights as the processing elements use them ``[co, ci, k, k]``."""
        w = round_w2(self.weights_w2(net), self.w_shift, net.w_bits)
        return w.reshape(self.co, self.ci, self.k, self.k)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
@width_fields(after="num_classes", defaults=False)
class QuantizedNetwork:
    """A whole network in integers, with the settings that fix its widths: the width
    fields of :data:`gen.contract.WIDTHS` (``a_bits`` .. ``decode``, after
    ``num_classes``), checked by :meth:`validate`."""

    arch: str
    input_shape: tuple[int, int, int]
    input_scale: float
    num_classes: int
    layers: list[LayerSpec] = field(default_factory=list)

    @property
    def output_buffer(self) -> int:
        return self.layers[-1].dst

    @property
    def output_scale(self) -> float:
        return self.layers[-1].out_scale

    def conv_layers(self) -> list[LayerSpec]:
        return [l for l in self.layers if l.op == "conv"]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}
        d["input_shape"] = list(self.input_shape)
        d["layers"] = [l.to_dict() for l in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "model") -> "QuantizedNetwork":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(d))
        if missing:
            raise ModelFileError(f"{source}: network is missing field(s) {', '.join(missing)}")
        layer_names = {f.name for f in fields(LayerSpec)}
        layers = []
        for i, ld in enumerate(d["layers"]):
            lm = sorted({"name", "op", "ci", "co", "h", "w"} - set(ld))
            if lm:
                raise ModelFileError(f"{source}: layer {i} is missing field(s) {', '.join(lm)}")
            layers.append(LayerSpec(**{k: v for k, v in ld.items() if k in layer_names}))
        net = cls(**{k: d[k] for k in names if k != "layers"}, layers=layers)
        net.input_shape = tuple(net.input_shape)
        net.validate(source)
        return net

    def validate(self, source: str = "model") -> None:
        """Check every layer's shapes, code ranges and buffer wiring."""
        def err(layer, msg):
            raise ModelFileError(f"{source}: layer {layer.name!r}: {msg}")

        check_widths(self, ModelFileError, f"{source}: ")
        written = {0}
        for layer in self.layers:
            if layer.op not in ("conv", "pool"):
                err(layer, f"op {layer.op!r} unsupported; accepted: conv, pool")
            if layer.src not in written:
                err(layer, f"reads buffer {layer.src} before any layer writes it")
            if layer.res is not None and layer.res not in written:
                err(layer, f"residual buffer {layer.res} is never written before")
            if layer.op == "pool":
                written.add(layer.dst)
                continue
            if layer.dense_bits not in DENSE_BITS or (layer.dense_bits != "qd" and not layer.dense):
                err(layer, f"dense_bits {layer.dense_bits!r} unsupported; accepted: "
                           f"{', '.join(DENSE_BITS)} (other than qd only on a dense conv layer)")
            if layer.k not in KERNEL_SIZES:
                err(layer, f"kernel size {layer.k} unsupported; accepted {KERNEL_SIZES}")
            kk = layer.k * layer.k
            lead = layer.bo
            b_shape = (lead, layer.bi, kk) if layer.u is not None else (lead, layer.ci, kk)
            checks = [("B", layer.b, b_shape)]
            if layer.u is not None:
                checks.append(("U", layer.u, (layer.bo, layer.ci, layer.bi)))
            if layer.v is not None:
                checks.append(("V", layer.v, (layer.co, layer.bo)))
            elif layer.bo != layer.co:
                err(layer, f"bo = {layer.bo} must equal co = {layer.co} without level 2")
            for tname, t, shape in checks:
                if t is None:
                    err(layer, f"{tname} codes missing")
                if tuple(t.shape) != shape:
                    err(layer, f"{tname} has shape {tuple(t.shape)}, expected {shape}")
            for tname, t, bits in layer.code_tensors(self):
                if t.numel() and (int(t.min()) < 0 or int(t.max()) >= (1 << bits)):
                    err(layer, f"{tname} codes outside 0..{(1 << bits) - 1} ({bits} bits)")
            for tname in ("mult", "bias"):
                t = getattr(layer, tname)
                if t is None or tuple(t.shape) != (layer.co,):
                    err(layer, f"{tname} must have shape ({layer.co},)")
            written.add(layer.dst)


def save_model_file(path, *, arch: str, mlg: dict, network: QuantizedNetwork,
                    state_dict: dict, metrics: dict) -> None:
    torch.save({
        "format": MODEL_FORMAT, "version": MODEL_VERSION, "arch": arch, "mlg": dict(mlg),
        "network": network.to_dict(), "state_dict": state_dict, "metrics": dict(metrics),
    }, path)


def load_model_file(path) -> dict:
    """Load and validate a model file; returns its dict with ``network`` as an object."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a non-checkpoint file
        raise ModelFileError(f"{path}: not a readable model file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise ModelFileError(
            f"{path}: not an mlg model file (expected key format = {MODEL_FORMAT!r}); "
            "produce one with 'mlg train' or 'mlg import'")
    if data.get("version") != MODEL_VERSION:
        raise ModelFileError(f"{path}: model file version {data.get('version')!r} unsupported; "
                             f"accepted: {MODEL_VERSION}")
    data["network"] = QuantizedNetwork.from_dict(data["network"], source=str(path))
    return data
