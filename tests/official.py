"""Builders of checkpoints in the official MLG format, from the published shapes.

Used by the tests to exercise ``mlg import`` without the official code: the
state dict layout follows DESIGN section 2 (the CIFAR ResNets of the official
code: ResNet-18/34 of basic blocks, ResNet-50/101/152 of bottleneck blocks).
"""

from __future__ import annotations

import torch


def _conv_entries(name, ci, co, k, bi, bo, g):
    kk = k * k
    if k == 1 and bo >= min(co, ci):
        bo = int(0.9 * min(co, ci))
    out = {f"{name}.weight": torch.randn(co, ci, k, k, generator=g) * 0.5}
    l2 = 0 < bo < min(co, ci * kk)
    bo_eff = bo if l2 else co
    if 0 < bi < min(ci, kk):
        out[f"{name}.coeff_in"] = torch.randn(bo_eff, ci, bi, generator=g) * 0.5
    if l2:
        out[f"{name}.coeff_out"] = torch.randn(co, bo_eff, generator=g) * 0.5
    return out


def _bn_entries(name, c, g, fan_in=3):
    """A BatchNorm after a conv of ``fan_in`` = Ci k k inputs: its running variance is that
    of the conv's output (generated weights of mean square about 1/3, unit inputs), so
    that the activations of a deep random network stay in range, as in a trained one."""
    return {
        f"{name}.weight": 1 + 0.1 * torch.randn(c, generator=g),
        f"{name}.bias": 0.1 * torch.randn(c, generator=g),
        f"{name}.running_mean": 0.1 * torch.randn(c, generator=g),
        f"{name}.running_var": fan_in / 3 * (1 + 0.1 * torch.rand(c, generator=g)),
        f"{name}.num_batches_tracked": torch.tensor(100),
    }


# Published shapes of the official CIFAR ResNets: depth -> (bottleneck, blocks per stage).
OFFICIAL_DEPTHS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


def official_resnet_state(depth=18, bi=2, bo=44, seed=0, num_classes=10, in_channels=3,
                          widths=(64, 128, 256, 512), blocks=None):
    """A random state dict of the official ResNet-``depth`` laid out as the official code
    saves it: a 3x3 stem to ``widths[0]``, four stages of basic blocks (conv1, conv2: 3x3)
    or bottleneck blocks (conv1 1x1, conv2 3x3 with the stage's stride, conv3 1x1 to 4x
    the width), a 1x1 projection ``shortcut`` (conv, BatchNorm) where the stride or the
    width changes, and ``linear``. ``blocks`` overrides the blocks per stage (for reduced
    networks of the same shape)."""
    bottleneck, depths = OFFICIAL_DEPTHS[depth]
    depths = depths if blocks is None else blocks
    expansion = 4 if bottleneck else 1
    g = torch.Generator().manual_seed(seed)
    sd = {}
    sd.update(_conv_entries("conv1", in_channels, widths[0], 3, bi, bo, g))
    sd.update(_bn_entries("bn1", widths[0], g, in_channels * 9))
    ci = widths[0]
    for i, (planes, stride) in enumerate(zip(widths, (1, 2, 2, 2)), 1):
        co = planes * expansion
        for j in range(depths[i - 1]):
            p = f"layer{i}.{j}"
            s = stride if j == 0 else 1
            if bottleneck:
                main = [("conv1", ci, planes, 1), ("conv2", planes, planes, 3),
                        ("conv3", planes, co, 1)]
            else:
                main = [("conv1", ci, co, 3), ("conv2", co, co, 3)]
            for n, (name, a, b, k) in enumerate(main, 1):
                sd.update(_conv_entries(f"{p}.{name}", a, b, k, bi, bo, g))
                sd.update(_bn_entries(f"{p}.bn{n}", b, g, a * k * k))
            if s != 1 or ci != co:
                sd.update(_conv_entries(f"{p}.shortcut.0", ci, co, 1, bi, bo, g))
                sd.update(_bn_entries(f"{p}.shortcut.1", co, g, ci))
            ci = co
    sd["linear.weight"] = torch.randn(num_classes, ci, generator=g) * 0.1
    return sd


def official_resnet18_state(bi=2, bo=44, seed=0, num_classes=10):
    """A random ResNet-18 state dict laid out as the official code saves it."""
    return official_resnet_state(18, bi, bo, seed, num_classes)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write a random official-format ResNet checkpoint")
    p.add_argument("out")
    p.add_argument("--depth", type=int, default=18, choices=sorted(OFFICIAL_DEPTHS))
    p.add_argument("--bi", type=int, default=2)
    p.add_argument("--bo", type=int, default=44)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.save({"state_dict": official_resnet_state(a.depth, a.bi, a.bo, a.seed)}, a.out)
    print(f"wrote {a.out}")
