"""Builders of checkpoints in the official MLG format, from the published shapes.

Used by the tests to exercise ``mlg import`` without the official code: the
state dict layout follows DESIGN section 2 (ResNet-18 for CIFAR-10).
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


def _bn_entries(name, c, g):
    return {
        f"{name}.weight": 1 + 0.1 * torch.randn(c, generator=g),
        f"{name}.bias": 0.1 * torch.randn(c, generator=g),
        f"{name}.running_mean": 0.1 * torch.randn(c, generator=g),
        f"{name}.running_var": 1 + 0.1 * torch.rand(c, generator=g),
        f"{name}.num_batches_tracked": torch.tensor(100),
    }


def official_resnet18_state(bi=2, bo=44, seed=0, num_classes=10):
    """A random ResNet-18 state dict laid out as the official code saves it."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    sd.update(_conv_entries("conv1", 3, 64, 3, bi, bo, g))
    sd.update(_bn_entries("bn1", 64, g))
    ci = 64
    for i, (co, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], 1):
        for j in range(2):
            p = f"layer{i}.{j}"
            s = stride if j == 0 else 1
            cin = ci if j == 0 else co
            sd.update(_conv_entries(f"{p}.conv1", cin, co, 3, bi, bo, g))
            sd.update(_bn_entries(f"{p}.bn1", co, g))
            sd.update(_conv_entries(f"{p}.conv2", co, co, 3, bi, bo, g))
            sd.update(_bn_entries(f"{p}.bn2", co, g))
            if j == 0 and (s != 1 or cin != co):
                sd.update(_conv_entries(f"{p}.shortcut.0", cin, co, 1, bi, bo, g))
                sd.update(_bn_entries(f"{p}.shortcut.1", co, g))
        ci = co
    sd["linear.weight"] = torch.randn(num_classes, 512, generator=g) * 0.1
    return sd


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write a random official-format ResNet-18 checkpoint")
    p.add_argument("out")
    p.add_argument("--bi", type=int, default=2)
    p.add_argument("--bo", type=int, default=44)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.save({"state_dict": official_resnet18_state(a.bi, a.bo, a.seed)}, a.out)
    print(f"wrote {a.out}")
