"""PyTorch MLG layers with hardware-exact fake quantization.

Parameters follow the official MLG layout so official checkpoints load as they
are: a latent ``weight`` ``[Co, Ci, k, k]`` whose slice is the basis, and
optional ``coeff_in`` ``[bo, Ci, bi]`` (level 1) and ``coeff_out`` ``[Co, bo]``
(level 2). Each latent tensor is quantized with the official dorefa_sym scheme
(``tanh``, per-tensor max) to integer codes; the generated integer weights are
rounded to the processing-element width exactly as :mod:`gen.integer` defines,
and gradients pass straight through every rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .contract import WIDTH_NAMES, WIDTHS, width_fields, width_problem
from .integer import int_range

__all__ = ["MLGSettings", "MLGConv2d", "MLGLinear", "ActQuant", "quantize_latent",
           "ste_round", "level_sizes", "CODE_WIDTHS", "setting_problem"]

# The code widths of a network: basis B, coefficients U and V, dense layers.
CODE_WIDTHS = ("qb", "qu", "qv", "qd")


def setting_problem(name: str, value, decode: str = "odd") -> str | None:
    """What is wrong with ``value`` for the width field ``name`` of a network whose codes
    decode as ``decode`` (a message that starts ``name = value`` and says what is
    accepted), or None. The one check of ``mlg train``, ``mlg import`` and
    :meth:`MLGSettings.validate`: the range of :data:`gen.contract.WIDTHS`, and for
    ``signed`` codes at least 2 bits (training needs a code for +x as well as -x,
    :func:`quantize_latent`)."""
    problem = width_problem(name, value)
    if problem is None and decode == "signed" and name in CODE_WIDTHS and value < 2:
        f = next(f for f in WIDTHS if f.name == name)
        problem = (f"{name} = {value} has no symmetric signed level; accepted: 2..{f.hi} "
                   f"with decode 'signed' ({f.accepted} with 'odd')")
    return problem


@dataclass(frozen=True)
@width_fields(after="bo")
class MLGSettings:
    """Model-wide MLG and quantization settings (saved in every model file): the bases
    per layer ``bi`` and ``bo`` (0 leaves a level out) and the width fields of
    :data:`gen.contract.WIDTHS` (``a_bits``, ``w_bits``, ``m_bits``, ``qb``, ``qu``,
    ``qv``, ``qd``, ``decode``) with their defaults."""

    bi: int = 2
    bo: int = 8

    def validate(self, source: str = "settings") -> None:
        decode = self.decode if width_problem("decode", self.decode) is None else "odd"
        for name in WIDTH_NAMES:
            problem = setting_problem(name, getattr(self, name), decode)
            if problem:
                raise ValueError(f"{source}: {problem}")
        for name in ("bi", "bo"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{source}: {name} = {v!r}; accepted: integer >= 0 (0 disables)")

    def to_dict(self) -> dict:
        return asdict(self)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``floor(x + 1/2)`` forward (the hardware's round half up), identity backward."""
    return x + (torch.floor(x + 0.5) - x).detach()


def quantize_latent(x: torch.Tensor, bits: int, form: str, *, ste: bool = True):
    """Official dorefa_sym quantization of a latent tensor.

    ``w = tanh(x)``, ``r = max|w|``. Returns ``(values, codes, scale)``: integer
    ``values`` (float tensor, straight-through gradient), raw unsigned ``codes``
    (int64) and the per-tensor ``scale`` so that the quantized tensor is
    ``values * scale``.

    * ``odd``: ``c = round((w / 2r + 1/2) (2^q - 1))``, value ``2c - (2^q - 1)``,
      scale ``r / (2^q - 1)`` (exactly the official levels);
    * ``signed``: value ``round(w / r * (2^(q-1) - 1))``, scale ``r / (2^(q-1) - 1)``.
    """
    w = torch.tanh(x)
    r = w.detach().abs().max().clamp_min(1e-12)
    if form == "odd":
        n = (1 << bits) - 1
        t = (w / (2 * r) + 0.5) * n
        c = torch.round(t) if not ste else t + (torch.round(t) - t).detach()
        values = 2 * c - n
        codes = torch.round(t.detach()).to(torch.int64)
        return values, codes, (r / n)
    qmax = int_range(bits)[1]
    t = w / r * qmax
    values = t + (torch.round(t) - t).detach() if ste else torch.round(t)
    codes = torch.round(t.detach()).to(torch.int64) & ((1 << bits) - 1)
    return values, codes, (r / qmax)


def level_sizes(ci: int, co: int, k: int, bi: int, bo: int) -> tuple[int, int, bool, bool]:
    """Per-layer level enables, exactly as the official code decides them.

    Returns ``(bi, bo, has_l1, has_l2)`` with ``bo = co`` when level 2 is off.
    """
    kk = k * k
    has_l2 = 0 < bo < min(co, ci * kk)
    bo_eff = bo if has_l2 else co
    has_l1 = 0 < bi < min(ci, kk)
    return (bi if has_l1 else 0), bo_eff, has_l1, has_l2


class ActQuant(nn.Module):
    """Activation fake quantization to ``bits`` signed with a calibrated scale.

    The scale is ``max|x| / (2^(bits-1) - 1)`` from an exponential moving average
    of the batch maximum while training (or calibration), frozen in eval mode.
    Rounding is ``floor(x / s + 1/2)`` and saturation is the two's complement
    range, as in :mod:`gen.integer`.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.1, scale: float | None = None):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("running_max", torch.tensor(0.0))
        self.register_buffer("fixed", torch.tensor(scale if scale is not None else 0.0))
        self.enabled = True
        self.calibrating = False

    @property
    def scale(self) -> float:
        if float(self.fixed) > 0:
            return float(self.fixed)
        return max(float(self.running_max), 1e-8) / int_range(self.bits)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training or self.calibrating) and float(self.fixed) == 0:
            m = x.detach().abs().max()
            if float(self.running_max) == 0:
                self.running_max.copy_(m)
            else:
                self.running_max.mul_(1 - self.momentum).add_(self.momentum * m)
        if not self.enabled:
            return x
        s = self.scale
        lo, hi = int_range(self.bits)
        return ste_round(x / s).clamp(lo, hi) * s


class _MLGBase(nn.Module):
    """Shared weight generation of :class:`MLGConv2d` and :class:`MLGLinear`."""

    def _init_levels(self, ci: int, co: int, k: int, bi: int, bo: int, s: MLGSettings,
                     quant: bool, allow_l1: bool = True, weight_shape=None):
        self.in_channels, self.out_channels, self.kernel_size = ci, co, k
        self.settings = s
        self.quant = quant
        if not allow_l1:
            bi = 0
        self.base_in, self.base_out, l1, l2 = level_sizes(ci, co, k, bi, bo)
        self.weight = nn.Parameter(torch.empty(weight_shape or (co, ci, k, k)))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.coeff_in = nn.Parameter(torch.empty(self.base_out, ci, self.base_in)) if l1 else None
        self.coeff_out = nn.Parameter(torch.empty(co, self.base_out)) if l2 else None
        for p in (self.coeff_in, self.coeff_out):
            if p is not None:
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")

    @property
    def has_l1(self) -> bool:
        return self.coeff_in is not None

    @property
    def has_l2(self) -> bool:
        return self.coeff_out is not None

    @property
    def dense(self) -> bool:
        return not (self.has_l1 or self.has_l2)

    def weight4d(self) -> torch.Tensor:
        k = self.kernel_size
        return self.weight.view(self.out_channels, self.in_channels, k, k)

    def basis_latent(self) -> torch.Tensor:
        if self.has_l1:
            return self.weight4d()[: self.base_out, : self.base_in]
        return self.weight4d()[: self.base_out]

    def quantized_parts(self, ste: bool = True):
        """Integer values, codes and scales of B, U, V (U, V may be None)."""
        s = self.settings
        kk = self.kernel_size ** 2
        bits_b = s.qd if self.dense else s.qb
        bv, bc, bs = quantize_latent(self.basis_latent().double(), bits_b, s.decode, ste=ste)
        bv = bv.reshape(bv.shape[0], bv.shape[1], kk)
        bc = bc.reshape(bv.shape)
        parts = {"B": (bv, bc, bs), "U": None, "V": None}
        if self.has_l1:
            parts["U"] = quantize_latent(self.coeff_in.double(), s.qu, s.decode, ste=ste)
        if self.has_l2:
            parts["V"] = quantize_latent(self.coeff_out.double(), s.qv, s.decode, ste=ste)
        return parts

    def generated_weight(self, ste: bool = True):
        """``(w2pe_values, w_scale, w_shift)``: the PE weights as (float) integers
        ``[co, ci, kk]`` with straight-through gradients, their scale and shift."""
        p = self.quantized_parts(ste)
        w = p["B"][0]
        scale = p["B"][2]
        if p["U"] is not None:
            w = torch.einsum("ocj,ojk->ock", p["U"][0], w)
            scale = scale * p["U"][2]
        if p["V"] is not None:
            bo, ci, kk = w.shape
            w = (p["V"][0] @ w.reshape(bo, ci * kk)).reshape(-1, ci, kk)
            scale = scale * p["V"][2]
        wb = self.settings.w_bits
        peak = int(w.detach().abs().max().round())
        shift = max(0, peak.bit_length() - (wb - 1))
        lo, hi = int_range(wb)
        w_pe = ste_round(w / (1 << shift)).clamp(lo, hi)
        return w_pe, scale * (1 << shift), shift

    @torch.no_grad()
    def float_generated_weight(self) -> torch.Tensor:
        """What the official ``build_weight()`` returns: quantized bases, float product."""
        p = self.quantized_parts(ste=False)
        w = p["B"][0] * p["B"][2]
        if p["U"] is not None:
            w = torch.einsum("ocj,ojk->ock", p["U"][0] * p["U"][2], w)
        if p["V"] is not None:
            bo, ci, kk = w.shape
            w = ((p["V"][0] * p["V"][2]) @ w.reshape(bo, ci * kk)).reshape(-1, ci, kk)
        k = self.kernel_size
        return w.reshape(self.out_channels, self.in_channels, k, k)

    def effective_weight(self) -> torch.Tensor:
        k = self.kernel_size
        if not self.quant:
            return self.weight4d()
        w_pe, scale, _ = self.generated_weight()
        return (w_pe * scale).float().reshape(self.out_channels, self.in_channels, k, k)

    def ortho_loss(self) -> torch.Tensor:
        """Multi-level orthonormality regularizer on the latent bases and coefficients.

        Rows of each basis, columns of U and columns of V are pushed toward an
        orthonormal set (coefficients normalized first, as in the paper).
        """
        loss = self.weight.new_zeros(())
        if self.dense:
            return loss
        basis = self.basis_latent()
        if self.has_l1:
            b = basis.reshape(basis.shape[0], basis.shape[1], -1)
            if b.shape[1] > 1:
                eye = torch.eye(b.shape[1], device=b.device).expand(b.shape[0], -1, -1)
                loss = loss + F.mse_loss(b @ b.transpose(1, 2), eye)
                u = self.coeff_in / (self.coeff_in.detach().norm(dim=1, keepdim=True) + 1e-8)
                loss = loss + F.mse_loss(u.transpose(1, 2) @ u, eye)
        if self.has_l2:
            if not self.has_l1:
                b = basis.reshape(basis.shape[0], -1)
                loss = loss + F.mse_loss(b @ b.t(), torch.eye(b.shape[0], device=b.device))
            v = self.coeff_out / (self.coeff_out.detach().norm(dim=0, keepdim=True) + 1e-8)
            loss = loss + F.mse_loss(v.t() @ v, torch.eye(v.shape[1], device=v.device))
        return loss

    @torch.no_grad()
    def init_from_dense(self, w: torch.Tensor) -> None:
        """SVD projection of a dense teacher weight ``[co, ci, k, k]`` onto the bases.

        Level 2: ``W = (U_s S) Vh`` truncated to ``bo`` gives V and W1. Level 1:
        each basis row ``W1[o]`` (``[ci, k*k]``) truncated to ``bi`` gives U[o] and B[o].
        Latent tensors are stored through ``atanh`` so that ``tanh`` in the
        quantizer reproduces the projected values up to a per-tensor scale.
        """
        co, ci, k, _ = w.shape
        kk = k * k

        def to_latent(t):
            m = t.abs().max().clamp_min(1e-12)
            return torch.atanh(0.9 * t / m)

        w1 = w.reshape(co, ci * kk).double()
        if self.has_l2:
            us, ss, vh = torch.linalg.svd(w1, full_matrices=False)
            r = self.base_out
            self.coeff_out.copy_(to_latent(us[:, :r] * ss[:r].sqrt()))
            w1 = ss[:r].sqrt()[:, None] * vh[:r]
        w1 = w1.reshape(self.base_out, ci, kk)
        if self.has_l1:
            us, ss, vh = torch.linalg.svd(w1, full_matrices=False)  # batched over bo
            r = self.base_in
            u = us[:, :, :r] * ss[:, None, :r].sqrt()
            b = ss[:, :r, None].sqrt() * vh[:, :r, :]
            self.coeff_in.copy_(to_latent(u))
            self.weight4d()[: self.base_out, : self.base_in].copy_(
                to_latent(b).reshape(self.base_out, r, k, k))
        else:
            self.weight4d()[: self.base_out].copy_(to_latent(w1).reshape(self.base_out, ci, k, k))


class MLGConv2d(_MLGBase):
    """Conv2d whose weights are generated from MLG bases (official structure)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | None = None, settings: MLGSettings | None = None,
                 quant: bool = True, bi: int | None = None, bo: int | None = None):
        super().__init__()
        s = settings or MLGSettings()
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self._init_levels(in_channels, out_channels, kernel_size,
                          s.bi if bi is None else bi, s.bo if bo is None else bo, s, quant)
        self.bias = None

    def forward(self, x):
        return F.conv2d(x, self.effective_weight(), stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, "
                f"stride={self.stride}, bi={self.base_in}, bo={self.base_out}, "
                f"l1={self.has_l1}, l2={self.has_l2}, quant={self.quant}")


class MLGLinear(_MLGBase):
    """Linear layer (a 1x1 conv on a 1x1 map); level 2 only, as in the official code."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 settings: MLGSettings | None = None, quant: bool = True, bo: int = 0):
        super().__init__()
        s = settings or MLGSettings()
        self.in_features, self.out_features = in_features, out_features
        self._init_levels(in_features, out_features, 1, 0, bo, s, quant, allow_l1=False,
                          weight_shape=(out_features, in_features))
        nn.init.kaiming_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.stride, self.padding = 1, 0

    def forward(self, x):
        w = self.effective_weight().reshape(self.out_features, self.in_features)
        return F.linear(x, w, self.bias)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, bo={self.base_out}, "
                f"l2={self.has_l2}, bias={self.bias is not None}, quant={self.quant}")
