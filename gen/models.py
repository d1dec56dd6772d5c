"""MLG networks: the digits CNN trained by ``mlg train`` and the official CIFAR ResNets
(ResNet-18/34 of basic blocks, ResNet-50/101/152 of bottleneck blocks).

Each model describes itself as a layer program (:meth:`program`): the ordered
operations, which activation buffers they read and write and which quantizers
fix their scales. :func:`gen.lower.lower_model` turns that into integers. The
float ``forward`` computes exactly the same graph with fake quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ActQuant, MLGConv2d, MLGLinear, MLGSettings, ste_round
from .integer import int_range

__all__ = ["Op", "DigitsNet", "ResNet", "ResNet18", "ResNet34", "ResNet50", "ResNet101",
           "ResNet152", "BasicBlock", "Bottleneck", "BLOCKS", "OFFICIAL_RESNETS",
           "OFFICIAL_WIDTHS", "build_model", "ARCHS", "mlg_conv"]


@dataclass
class Op:
    """One step of a model's layer program (see :func:`gen.lower.lower_model`)."""

    name: str
    op: str                       # "conv" or "pool"
    src: int
    dst: int
    in_q: ActQuant
    out_q: ActQuant
    h: int
    w: int
    conv: nn.Module | None = None
    bn: nn.BatchNorm2d | None = None
    relu: bool = False
    res: int | None = None
    res_q: ActQuant | None = None


def mlg_conv(ci, co, k, stride, s: MLGSettings, quant: bool) -> MLGConv2d:
    """Model-level rule of the official code: a 1x1 conv whose requested ``bo`` is
    at least ``min(Co, Ci)`` uses ``bo = int(0.9 * min(Co, Ci))``."""
    bo = s.bo
    if k == 1 and bo >= min(co, ci):
        bo = int(0.9 * min(co, ci))
    return MLGConv2d(ci, co, k, stride, settings=s, quant=quant, bo=bo)


def _pool_q(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """Global average pool rounded at the input scale (the integer pool keeps the scale)."""
    m = x.mean(dim=(2, 3))
    if not q.enabled:
        return m
    lo, hi = int_range(q.bits)
    return ste_round(m / q.scale).clamp(lo, hi) * q.scale


class _MLGModel(nn.Module):
    arch = "?"

    def mlg_layers(self):
        return [m for m in self.modules() if isinstance(m, (MLGConv2d, MLGLinear))]

    def act_quants(self):
        return [m for m in self.modules() if isinstance(m, ActQuant)]

    def ortho_loss(self):
        return sum((m.ortho_loss() for m in self.mlg_layers()), torch.zeros(()))

    def set_act_quant(self, enabled: bool):
        for q in self.act_quants():
            q.enabled = enabled


class DigitsNet(_MLGModel):
    """Small residual MLG CNN for the 8x8 digits: 3x3 stem, a stride-2 3x3 conv,
    one residual block of two 3x3 convs, global average pooling, a classifier.

    With ``plain``, a network with neither residual adds nor pooling, for the
    smallest builds (``mlg compile --trim`` then leaves that logic out): the
    block's second conv has stride 2, and the classifier is a 3 x 3 conv of
    stride 2 (with batch norm for its bias) that sees the whole 2 x 2 map of the
    8 x 8 digits and leaves one pixel."""

    arch = "digits"

    def __init__(self, settings: MLGSettings, quant: bool = True, widths=(16, 32),
                 in_channels: int = 1, size: int = 8, num_classes: int = 10,
                 plain: bool = False):
        super().__init__()
        s, a = settings, settings.a_bits
        c1, c2 = widths
        self.settings, self.size, self.in_channels = s, size, in_channels
        self.num_classes, self.widths, self.plain = num_classes, tuple(widths), bool(plain)
        if plain and self._plain_sizes()[-1] != 1:
            raise ValueError(f"a plain digits network needs an input of at most 8 x 8 pixels "
                             f"(three stride-2 convs to a 1 x 1 map), not {size} x {size}")
        self.aq_in = ActQuant(a, scale=1.0 / int_range(a)[1])
        self.conv1, self.bn1, self.aq1 = mlg_conv(in_channels, c1, 3, 1, s, quant), nn.BatchNorm2d(c1), ActQuant(a)
        self.conv2, self.bn2, self.aq2 = mlg_conv(c1, c2, 3, 2, s, quant), nn.BatchNorm2d(c2), ActQuant(a)
        self.conv3, self.bn3, self.aq3 = mlg_conv(c2, c2, 3, 1, s, quant), nn.BatchNorm2d(c2), ActQuant(a)
        self.conv4, self.bn4, self.aq4 = (mlg_conv(c2, c2, 3, 2 if plain else 1, s, quant),
                                          nn.BatchNorm2d(c2), ActQuant(a))
        if plain:
            self.cls, self.bn_cls = mlg_conv(c2, num_classes, 3, 2, s, quant), nn.BatchNorm2d(num_classes)
        else:
            self.linear = MLGLinear(c2, num_classes, bias=True, settings=s, quant=quant)
        self.aq_out = ActQuant(a)

    def _plain_sizes(self) -> list[int]:
        """(plain) The map size at the input of conv1, conv2, conv3, conv4 and the
        classifier, and after the classifier."""
        half = lambda n: (n + 1) // 2  # noqa: E731 (3x3, pad 1, stride 2)
        n, h2 = self.size, half(self.size)
        return [n, n, h2, h2, half(h2), half(half(h2))]

    def forward(self, x):
        x = self.aq_in(x)
        a1 = self.aq1(F.relu(self.bn1(self.conv1(x))))
        a2 = self.aq2(F.relu(self.bn2(self.conv2(a1))))
        a3 = self.aq3(F.relu(self.bn3(self.conv3(a2))))
        if self.plain:
            a4 = self.aq4(F.relu(self.bn4(self.conv4(a3))))
            return self.aq_out(self.bn_cls(self.cls(a4))).flatten(1)
        a4 = self.aq4(F.relu(self.bn4(self.conv4(a3)) + a2))
        return self.aq_out(self.linear(_pool_q(a4, self.aq4)))

    def program(self) -> list[Op]:
        if self.plain:
            n1, n2, n3, n4, n5, _ = self._plain_sizes()
            return [
                Op("conv1", "conv", 0, 1, self.aq_in, self.aq1, n1, n1, self.conv1, self.bn1, True),
                Op("conv2", "conv", 1, 2, self.aq1, self.aq2, n2, n2, self.conv2, self.bn2, True),
                Op("conv3", "conv", 2, 3, self.aq2, self.aq3, n3, n3, self.conv3, self.bn3, True),
                Op("conv4", "conv", 3, 4, self.aq3, self.aq4, n4, n4, self.conv4, self.bn4, True),
                Op("cls", "conv", 4, 5, self.aq4, self.aq_out, n5, n5, self.cls, self.bn_cls,
                   False),
            ]
        n, h2 = self.size, (self.size + 1) // 2
        return [
            Op("conv1", "conv", 0, 1, self.aq_in, self.aq1, n, n, self.conv1, self.bn1, True),
            Op("conv2", "conv", 1, 2, self.aq1, self.aq2, n, n, self.conv2, self.bn2, True),
            Op("conv3", "conv", 2, 3, self.aq2, self.aq3, h2, h2, self.conv3, self.bn3, True),
            Op("conv4", "conv", 3, 4, self.aq3, self.aq4, h2, h2, self.conv4, self.bn4, True,
               res=2, res_q=self.aq2),
            Op("pool", "pool", 4, 5, self.aq4, self.aq4, h2, h2),
            Op("linear", "conv", 5, 6, self.aq4, self.aq_out, 1, 1, self.linear, None, False),
        ]


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs); module names match the official checkpoint."""

    expansion = 1

    def __init__(self, ci, co, stride, s: MLGSettings, quant: bool):
        super().__init__()
        a = s.a_bits
        self.conv1, self.bn1, self.aq1 = mlg_conv(ci, co, 3, stride, s, quant), nn.BatchNorm2d(co), ActQuant(a)
        self.conv2, self.bn2 = mlg_conv(co, co, 3, 1, s, quant), nn.BatchNorm2d(co)
        self.shortcut = nn.Sequential()
        self.aq_sc = None
        if stride != 1 or ci != co:
            self.shortcut = nn.Sequential(mlg_conv(ci, co, 1, stride, s, quant), nn.BatchNorm2d(co))
            self.aq_sc = ActQuant(a)
        self.aq_out = ActQuant(a)
        self.stride = stride

    def forward(self, x):
        out = self.aq1(F.relu(self.bn1(self.conv1(x))))
        sc = self.aq_sc(self.shortcut(x)) if self.aq_sc is not None else x
        return self.aq_out(F.relu(self.bn2(self.conv2(out)) + sc))

    def convs(self):
        """(name, conv, bn, relu) of the main path in order; the last one adds the shortcut."""
        return [("conv1", self.conv1, self.bn1, self.aq1), ("conv2", self.conv2, self.bn2, None)]


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 (to ``planes``), 3x3 (the block's stride), 1x1 (to
    ``4 * planes``), and a 1x1 projection shortcut where the stride or the width changes;
    module names match the official checkpoint."""

    expansion = 4

    def __init__(self, ci, planes, stride, s: MLGSettings, quant: bool):
        super().__init__()
        a, co = s.a_bits, planes * self.expansion
        self.conv1, self.bn1, self.aq1 = (mlg_conv(ci, planes, 1, 1, s, quant),
                                          nn.BatchNorm2d(planes), ActQuant(a))
        self.conv2, self.bn2, self.aq2 = (mlg_conv(planes, planes, 3, stride, s, quant),
                                          nn.BatchNorm2d(planes), ActQuant(a))
        self.conv3, self.bn3 = mlg_conv(planes, co, 1, 1, s, quant), nn.BatchNorm2d(co)
        self.shortcut = nn.Sequential()
        self.aq_sc = None
        if stride != 1 or ci != co:
            self.shortcut = nn.Sequential(mlg_conv(ci, co, 1, stride, s, quant), nn.BatchNorm2d(co))
            self.aq_sc = ActQuant(a)
        self.aq_out = ActQuant(a)
        self.stride = stride

    def forward(self, x):
        out = self.aq1(F.relu(self.bn1(self.conv1(x))))
        out = self.aq2(F.relu(self.bn2(self.conv2(out))))
        sc = self.aq_sc(self.shortcut(x)) if self.aq_sc is not None else x
        return self.aq_out(F.relu(self.bn3(self.conv3(out)) + sc))

    def convs(self):
        """(name, conv, bn, relu) of the main path in order; the last one adds the shortcut."""
        return [("conv1", self.conv1, self.bn1, self.aq1), ("conv2", self.conv2, self.bn2, self.aq2),
                ("conv3", self.conv3, self.bn3, None)]


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}

# The official depths: architecture name -> (block, blocks per stage).
OFFICIAL_RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
OFFICIAL_WIDTHS = (64, 128, 256, 512)


class ResNet(_MLGModel):
    """The official CIFAR ResNet (3x3 stem of stride 1, four stages of stride 1, 2, 2, 2,
    global average pooling, a classifier named ``linear``) with the official module names.

    ``block`` is ``"basic"`` or ``"bottleneck"``, ``depths`` the blocks per stage and
    ``widths`` the stage widths (``planes``; a bottleneck stage outputs 4x that). The
    official networks use :data:`OFFICIAL_WIDTHS`; smaller widths give reduced networks
    of the same shape."""

    arch = "resnet"
    block = "basic"
    default_depths = (2, 2, 2, 2)

    def __init__(self, settings: MLGSettings, quant: bool = True, in_channels: int = 3,
                 size: int = 32, num_classes: int = 10, depths: tuple | None = None,
                 widths: tuple = OFFICIAL_WIDTHS, block: str | None = None):
        super().__init__()
        block = block or self.block
        depths = tuple(self.default_depths if depths is None else depths)
        if block not in BLOCKS:
            raise ValueError(f"ResNet block {block!r}: accepted {', '.join(BLOCKS)}")
        if len(depths) != 4 or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"{type(self).__name__} depths {depths!r}: four block counts >= 1 accepted")
        widths = tuple(widths)
        if len(widths) != 4 or any(not isinstance(c, int) or c < 1 for c in widths):
            raise ValueError(f"{type(self).__name__} widths {widths!r}: four stage widths >= 1 accepted")
        cls = BLOCKS[block]
        s, a = settings, settings.a_bits
        self.settings, self.size, self.in_channels, self.num_classes = s, size, in_channels, num_classes
        self.block, self.depths, self.widths = block, depths, widths
        self.aq_in = ActQuant(a)
        c0 = widths[0]
        self.conv1, self.bn1, self.aq1 = mlg_conv(in_channels, c0, 3, 1, s, quant), nn.BatchNorm2d(c0), ActQuant(a)
        ci = c0
        for i, (planes, stride) in enumerate(zip(widths, (1, 2, 2, 2)), 1):
            blocks = []
            for j in range(depths[i - 1]):
                blocks.append(cls(ci, planes, stride if j == 0 else 1, s, quant))
                ci = planes * cls.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.features = ci
        self.linear = MLGLinear(ci, num_classes, bias=False, settings=s, quant=quant)
        self.aq_out = ActQuant(a)

    def blocks(self):
        return [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]

    def forward(self, x):
        x = self.aq1(F.relu(self.bn1(self.conv1(self.aq_in(x)))))
        for b in self.blocks():
            x = b(x)
        last = self.blocks()[-1].aq_out
        return self.aq_out(self.linear(_pool_q(x, last)))

    def program(self) -> list[Op]:
        n = self.size
        ops = [Op("conv1", "conv", 0, 1, self.aq_in, self.aq1, n, n, self.conv1, self.bn1, True)]
        buf, q, nxt = 1, self.aq1, 2
        for i in range(1, 5):
            for j, b in enumerate(getattr(self, f"layer{i}")):
                p = f"layer{i}.{j}"
                main = b.convs()
                # logical buffers: one per main-path output, then the shortcut's
                outs = [nxt + t for t in range(len(main) - 1)] + [nxt + len(main)]
                sc = nxt + len(main) - 1
                res, res_q = buf, q
                src, src_q = buf, q
                for t, (cname, conv, bn, aq) in enumerate(main):
                    last = t == len(main) - 1
                    if last:
                        ops.append(Op(f"{p}.{cname}", "conv", src, outs[t], src_q, b.aq_out, n, n,
                                      conv, bn, True, res=res, res_q=res_q))
                        break
                    ops.append(Op(f"{p}.{cname}", "conv", src, outs[t], src_q, aq, n, n, conv, bn,
                                  True))
                    if t == 0 and b.aq_sc is not None:
                        ops.append(Op(f"{p}.shortcut.0", "conv", buf, sc, q, b.aq_sc, n, n,
                                      b.shortcut[0], b.shortcut[1], False))
                        res, res_q = sc, b.aq_sc
                    if conv.stride != 1:
                        n = (n + 2 * conv.padding - conv.kernel_size) // conv.stride + 1
                    src, src_q = outs[t], aq
                buf, q, nxt = outs[-1], b.aq_out, nxt + len(main) + 1
        ops.append(Op("pool", "pool", buf, nxt, q, q, n, n))
        ops.append(Op("linear", "conv", nxt, nxt + 1, q, self.aq_out, 1, 1, self.linear, None, False))
        return ops


class ResNet18(ResNet):
    """ResNet-18 for 32x32 CIFAR-10 with the official module names (``depths`` may be
    reduced for small builds; the architecture name stays ``resnet18``)."""

    arch, block, default_depths = "resnet18", *OFFICIAL_RESNETS["resnet18"]


class ResNet34(ResNet):
    arch, block, default_depths = "resnet34", *OFFICIAL_RESNETS["resnet34"]


class ResNet50(ResNet):
    arch, block, default_depths = "resnet50", *OFFICIAL_RESNETS["resnet50"]


class ResNet101(ResNet):
    arch, block, default_depths = "resnet101", *OFFICIAL_RESNETS["resnet101"]


class ResNet152(ResNet):
    arch, block, default_depths = "resnet152", *OFFICIAL_RESNETS["resnet152"]


ARCHS = {"digits": DigitsNet, "resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50,
         "resnet101": ResNet101, "resnet152": ResNet152}


def build_model(arch: str, settings: MLGSettings, quant: bool = True, **kw) -> _MLGModel:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; accepted: {', '.join(ARCHS)}")
    return ARCHS[arch](settings, quant=quant, **kw)
