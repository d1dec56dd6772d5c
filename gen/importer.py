"""Import of checkpoints saved by the official MLG code (the CIFAR ResNets).

The official code defines ResNet-18 and -34 (basic blocks) and ResNet-50, -101
and -152 (bottleneck blocks: 1x1, 3x3, 1x1 and a 1x1 projection shortcut), for
any ``num_classes`` and ``in_channels``. The architecture is given by the user
or inferred from the checkpoint's conv layer names (:func:`infer_arch`).

The file is a ``torch.save`` of a state_dict, or of a dict holding it under
``"state_dict"``. Level presence is read from the keys (``coeff_in``,
``coeff_out``) and ``bi``/``bo`` from their shapes; bit-widths are not in the
file and come from the user (the official YAML keys ``mlg.basis_bit``,
``mlg.coeff_in_bit``, ``mlg.coeff_out_bit``, ``model.weight_bit``). Bases are
quantized with the official dorefa_sym scheme, so the generated weights are the
ones the official ``build_weight()`` returns; BatchNorm is folded and
activation scales calibrated before lowering to the integer network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .golden import golden_forward, quantize_input
from .contract import WIDTHS
from .layers import ActQuant, MLGConv2d, MLGLinear, MLGSettings, level_sizes, setting_problem
from .lower import lower_model
from .models import ARCHS, BLOCKS, OFFICIAL_RESNETS, OFFICIAL_WIDTHS, ResNet
from .network import save_model_file

__all__ = ["ImportError_", "OfficialBits", "read_official_checkpoint", "build_from_official",
           "calibrate", "import_official", "load_calibration_data", "infer_arch",
           "official_conv_names"]


class ImportError_(ValueError):
    """An official checkpoint cannot be imported (names the file, layer and field)."""


@dataclass(frozen=True)
class OfficialBits:
    """Bit-widths of an official run (YAML keys in parentheses)."""

    basis_bit: int = 3        # mlg.basis_bit
    coeff_in_bit: int = 6     # mlg.coeff_in_bit
    coeff_out_bit: int = 3    # mlg.coeff_out_bit
    weight_bit: int = 8       # model.weight_bit (dense layers and the classifier)

    def validate(self):
        """The accelerator's range for each width (:func:`gen.layers.setting_problem`, the
        check of ``mlg train`` too), less 1 bit, where the official code differs."""
        for name, field in OFFICIAL_FIELDS.items():
            v = getattr(self, name)
            problem = setting_problem(field, v, "odd")
            option = "--" + name.replace("_", "-")
            if problem:
                extra = (" (the official code keeps weights in float at >= 16 bits)"
                         if isinstance(v, int) and v >= 16 else "")
                raise ImportError_(f"{name} = {v!r} ({option}, the network's {field}): "
                                   f"{problem}{extra}")
            if v == 1:
                raise ImportError_(
                    f"{name} = 1 ({option}, the network's {field}): the official code quantizes "
                    "1-bit tensors with a sign quantizer of its own, which the import does not "
                    f"reproduce; accepted: 2..{_hi(field)} (the accelerator's {field} range "
                    "above 1 bit)")


# The official bit-width of each network width field.
OFFICIAL_FIELDS = {"basis_bit": "qb", "coeff_in_bit": "qu", "coeff_out_bit": "qv", "weight_bit": "qd"}


def _hi(field: str) -> int:
    return next(f.hi for f in WIDTHS if f.name == field)


def read_official_checkpoint(path) -> dict[str, torch.Tensor]:
    """Load the state_dict of an official checkpoint (either container form)."""
    path = Path(path)
    if not path.exists():
        raise ImportError_(f"{path}: no such checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ImportError_(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ImportError_(f"{path}: expected a state_dict (name -> tensor) or a dict with key "
                           "'state_dict'")
    return {k[7:] if k.startswith("module.") else k: v for k, v in data.items()}


def _expected_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, ActQuant):
            continue
        for pname, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            keys.add(f"{name}.{pname}" if name else pname)
    return keys


def _nonfinite(sd: dict[str, torch.Tensor]) -> list[str]:
    """One line per floating tensor holding NaN or infinity: key, counts, first index."""
    out = []
    for k in sorted(sd):
        v = sd[k]
        if not v.is_floating_point():
            continue
        bad = ~torch.isfinite(v)
        if bad.any():
            nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            first = tuple(int(i) for i in bad.nonzero()[0]) if v.dim() else ()
            what = ", ".join(p for p in (f"{nan} NaN" if nan else "",
                                         f"{inf} infinite" if inf else "") if p)
            out.append(f"{_layer_field(k)}: {what} of {v.numel()} value(s), first at index {first}")
    return out


def _layer_field(key: str) -> str:
    layer, _, field = key.rpartition(".")
    return f"layer {layer}, field {field}" if layer else f"field {field}"


def _shape(t) -> str:
    return "absent" if t is None else str(tuple(t.shape))


def _coeff_shape_problem(name: str, ci: int, co: int, cin, cout) -> str | None:
    """What is wrong with the shape of a layer's coeff_out [Co, bo] or coeff_in
    [bo, Ci, bi] on its own, naming the field at fault."""
    if cout is not None and (cout.dim() != 2 or cout.shape[0] != co):
        return (f"layer {name}, field coeff_out: shape {_shape(cout)}, expected [Co={co}, bo] "
                f"(coeff_in {_shape(cin)})")
    if cin is not None and (cin.dim() != 3 or cin.shape[1] != ci):
        return f"layer {name}, field coeff_in: shape {_shape(cin)}, expected [bo, Ci={ci}, bi]"
    return None


def _coeff_pair_problem(name: str, co: int, cin, cout) -> str | None:
    """What is wrong with a layer's coeff_in / coeff_out pair (each well formed): their bo
    disagree (both named), or coeff_in needs a coeff_out that is absent."""
    if cin is not None and cout is not None and cin.shape[0] != cout.shape[1]:
        return (f"layer {name}: coeff_in {_shape(cin)} holds bo = {cin.shape[0]} but coeff_out "
                f"{_shape(cout)} holds bo = {cout.shape[1]}; they must agree (coeff_in "
                "[bo, Ci, bi], coeff_out [Co, bo])")
    if cin is not None and cout is None and cin.shape[0] != co:
        return (f"layer {name}: missing key '{name}.coeff_out' (field coeff_out): coeff_in "
                f"{_shape(cin)} holds bo = {cin.shape[0]} < Co = {co} bases, which level 2 "
                f"combines with coeff_out [{co}, {cin.shape[0]}]")
    return None


def official_conv_names(arch: str, widths: tuple = OFFICIAL_WIDTHS) -> list[str]:
    """The conv layer names of an official ResNet (stem, blocks, projection shortcuts),
    in program order, computed from the architecture alone."""
    block, depths = OFFICIAL_RESNETS[arch]
    cls = BLOCKS[block]
    main = ("conv1", "conv2", "conv3") if block == "bottleneck" else ("conv1", "conv2")
    names, ci = ["conv1"], widths[0]
    for i, (planes, stride) in enumerate(zip(widths, (1, 2, 2, 2)), 1):
        for j in range(depths[i - 1]):
            co = planes * cls.expansion
            names += [f"layer{i}.{j}.{c}" for c in main]
            if (stride if j == 0 else 1) != 1 or ci != co:
                names.append(f"layer{i}.{j}.shortcut.0")
            ci = co
    return names


def infer_arch(sd: dict[str, torch.Tensor]) -> tuple[str, int]:
    """The official architecture whose conv layer names are nearest to the checkpoint's
    (4-D ``.weight`` keys), and how many conv layers differ (0: an exact match). Ties go
    to the smaller network."""
    have = {k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 4}
    scores = {a: len(have ^ set(official_conv_names(a))) for a in OFFICIAL_RESNETS}
    best = min(OFFICIAL_RESNETS, key=lambda a: scores[a])
    return best, scores[best]


def _arch_text(arch: str) -> str:
    block, depths = OFFICIAL_RESNETS[arch]
    return f"{arch} ({block} blocks, {', '.join(map(str, depths))} per stage)"


def build_from_official(sd: dict[str, torch.Tensor], bits: OfficialBits, source: str = "checkpoint",
                        a_bits: int = 8, w_bits: int = 8, m_bits: int = 16,
                        arch: str | None = None, log=None) -> ResNet:
    """Instantiate our ResNet of ``arch`` (one of :data:`gen.models.OFFICIAL_RESNETS`; by
    default inferred from the keys, and said through ``log``) with the levels and shapes
    the checkpoint holds.

    Every problem is listed in one error (unsupported keys, missing keys, shape
    mismatches, coeff keys at fault), each by layer and field; tensors holding NaN or
    infinity are named by layer and field before that."""
    if arch is not None and arch not in OFFICIAL_RESNETS:
        raise ImportError_(f"architecture {arch!r} (--arch): accepted "
                           f"{', '.join(OFFICIAL_RESNETS)}")
    bits.validate()
    nonfinite = _nonfinite(sd)
    if nonfinite:
        raise ImportError_(f"{source}: {len(nonfinite)} tensor(s) hold NaN or infinity (a "
                           "diverged or damaged checkpoint): " + "; ".join(nonfinite))
    conv_w, lin = sd.get("conv1.weight"), sd.get("linear.weight")
    in_ch = conv_w.shape[1] if conv_w is not None and conv_w.dim() == 4 else 3
    n_cls = lin.shape[0] if lin is not None and lin.dim() == 2 else 10
    bi = next((v.shape[2] for k, v in sd.items() if k.endswith(".coeff_in") and v.dim() == 3), 0)
    bo = next((v.shape[1] for k, v in sd.items() if k.endswith(".coeff_out") and v.dim() == 2), 0)
    settings = MLGSettings(bi=int(bi), bo=int(bo), qb=bits.basis_bit, qu=bits.coeff_in_bit,
                           qv=bits.coeff_out_bit, qd=bits.weight_bit, decode="odd",
                           w_bits=w_bits, a_bits=a_bits, m_bits=m_bits)
    nearest, differ = infer_arch(sd)
    if arch is None:
        arch = nearest
        if log is not None:
            if differ == 0:
                log(f"architecture {_arch_text(arch)}, inferred from the checkpoint's keys")
            else:
                log(f"architecture {_arch_text(arch)}: the nearest official ResNet to the "
                    f"checkpoint's keys ({differ} conv layer(s) differ); pass --arch to choose")
    elif log is not None:
        log(f"architecture {_arch_text(arch)} (--arch)")
    model = ARCHS[arch](settings, quant=True, in_channels=in_ch, num_classes=n_cls)

    # Pre-flight: every key the accelerator cannot place, every key it lacks and every
    # shape that differs is listed in one error.
    convs = {n: m for n, m in model.named_modules() if isinstance(m, (MLGConv2d, MLGLinear))}
    expected = _expected_keys(model)
    coeff_keys = {f"{n}.{c}" for n in convs for c in ("coeff_in", "coeff_out")}
    problems = []
    unknown = sorted(k for k in sd if k not in expected and k not in coeff_keys)
    if unknown:
        layers = sorted({k.rsplit(".", 1)[0] for k in unknown})
        problems.append(f"{len(layers)} unsupported layer(s) or field(s): "
                        + ", ".join(f"{k} {tuple(sd[k].shape)}" for k in unknown)
                        + f"; an official {arch} holds MLGConv2d, BatchNorm2d and linear")

    # Each layer's levels are read from its coeff keys; a layer whose keys are at fault is
    # named once (its coeff keys are then left out of the missing and shape lists).
    bad_coeff = set()
    for name, m in convs.items():
        ci, co, k = m.in_channels, m.out_channels, m.kernel_size
        cin, cout = sd.get(f"{name}.coeff_in"), sd.get(f"{name}.coeff_out")
        problem = None
        if isinstance(m, MLGLinear) and cin is not None:
            problem = (f"layer {name}: field coeff_in is not supported on the classifier (the "
                       "official code never enables it)")
        problem = problem or _coeff_shape_problem(name, ci, co, cin, cout)
        if problem is None:
            l_bi = int(cin.shape[2]) if cin is not None else 0
            l_bo = int(cout.shape[1]) if cout is not None else 0
            r_bi, r_bo, l1, l2 = level_sizes(ci, co, k, l_bi, l_bo)
            if (cin is not None) != l1 or (cout is not None) != l2:
                problem = (f"layer {name}: coeff_in {_shape(cin)} / coeff_out {_shape(cout)} "
                           f"contradict the official level rules for Ci={ci}, Co={co}, k={k} "
                           f"(level 1 needs 0 < bi < {min(ci, k * k)}, level 2 needs 0 < bo < "
                           f"{min(co, ci * k * k)})")
        problem = problem or _coeff_pair_problem(name, co, cin, cout)
        if problem:
            problems.append(problem)
            bad_coeff |= {f"{name}.coeff_in", f"{name}.coeff_out"}
            continue
        m.base_in, m.base_out = r_bi, r_bo
        m.coeff_in = nn.Parameter(torch.empty(r_bo, ci, r_bi)) if l1 else None
        m.coeff_out = nn.Parameter(torch.empty(co, r_bo)) if l2 else None

    expected = _expected_keys(model)
    missing = sorted(k for k in expected - bad_coeff
                     if k not in sd and not k.endswith("num_batches_tracked"))
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(
            f"{k} ({_layer_field(k)})" for k in missing))
    own = model.state_dict()
    wrong = [f"{_layer_field(k)}: shape {tuple(sd[k].shape)}, expected {tuple(own[k].shape)}"
             for k in sorted((expected - bad_coeff) & set(sd))
             if tuple(own[k].shape) != tuple(sd[k].shape)]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong))
    if problems:
        hint = ""
        if any(k.startswith("fc.") or ".downsample." in k for k in sd):
            hint = ("; this looks like a torchvision ResNet (fc, downsample): mlg import reads "
                    "the official MLG CIFAR ResNets (linear, shortcut, 3 x 3 conv1)")
        elif "conv1.weight" not in sd and "linear.weight" not in sd:
            hint = ("; this does not look like an official ResNet checkpoint (accepted: "
                    f"{', '.join(OFFICIAL_RESNETS)})")
        elif nearest != arch and differ == 0:
            hint = f"; the checkpoint's keys are those of {_arch_text(nearest)}: --arch {nearest}"
        raise ImportError_(f"{source}: " + "; ".join(problems) + hint)
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return model


def load_calibration_data(path, in_channels: int = 3, size: int = 32):
    """Images ``[N, C, H, W]`` (already normalized as for training) and optional
    labels from ``.npz`` (arrays ``x`` and optional ``y``), ``.npy`` or ``.pt``."""
    path = Path(path)
    if not path.exists():
        raise ImportError_(f"{path}: no such calibration data file")
    y = None
    if path.suffix == ".npz":
        with np.load(path) as d:
            if "x" not in d:
                raise ImportError_(f"{path}: .npz needs an array 'x' [N, {in_channels}, {size}, {size}]")
            x = torch.tensor(d["x"], dtype=torch.float32)
            y = torch.tensor(d["y"], dtype=torch.int64) if "y" in d else None
    elif path.suffix == ".npy":
        x = torch.tensor(np.load(path), dtype=torch.float32)
    elif path.suffix == ".pt":
        x = torch.load(path, map_location="cpu", weights_only=True).float()
    else:
        raise ImportError_(f"{path}: unsupported data format {path.suffix!r}; accepted .npz, .npy, .pt")
    if x.dim() != 4 or tuple(x.shape[1:]) != (in_channels, size, size):
        raise ImportError_(f"{path}: images have shape {tuple(x.shape)}, expected "
                           f"[N, {in_channels}, {size}, {size}]")
    return x, y


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor, batch: int = 32) -> None:
    """Fix every activation scale from the float activations of ``x`` (running max)."""
    model.eval()
    qs = [q for q in model.modules() if isinstance(q, ActQuant)]
    for q in qs:
        q.enabled, q.calibrating, q.momentum = False, True, 0.1
    for i in range(0, x.shape[0], batch):
        model(x[i:i + batch])
    for q in qs:
        q.enabled, q.calibrating = True, False


def import_official(path, bits: OfficialBits, out_path=None, data=None, calib_images: int = 64,
                    seed: int = 0, log=print, arch: str | None = None, info=None) -> dict:
    """Import, calibrate, lower and (optionally) save a model file. Returns metrics.

    ``arch`` is an official ResNet name, or None to infer it from the keys; the
    architecture is said through ``info`` (by default ``log``)."""
    sd = read_official_checkpoint(path)
    model = build_from_official(sd, bits, source=str(path), arch=arch, log=info or log)
    if data is not None:
        x, y = load_calibration_data(data, model.in_channels, model.size)
        log(f"calibrating activation scales on {x.shape[0]} images from {data}")
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(calib_images, model.in_channels, model.size, model.size, generator=g)
        y = None
        log(f"calibrating activation scales on {calib_images} synthetic N(0, 1) images "
            "(no data set given: pass --data FILE.npz for real calibration)")
    calibrate(model, x)
    net = lower_model(model)
    metrics: dict = {"arch": model.arch, "calibration": "data" if data is not None else "synthetic",
                     "calibration_images": int(x.shape[0])}
    n_eval = x.shape[0] if y is not None else min(x.shape[0], 16)
    with torch.no_grad():
        f = model(x[:n_eval]).argmax(1)
    g_ = golden_forward(net, quantize_input(net, x[:n_eval])).argmax(1)
    metrics["golden_float_agreement"] = float((f == g_).float().mean())
    metrics["agreement_images"] = n_eval
    if y is not None:
        metrics["float_acc"] = float((f == y[:n_eval]).float().mean())
        metrics["golden_acc"] = float((g_ == y[:n_eval]).float().mean())
    if out_path is not None:
        save_model_file(out_path, arch=model.arch, mlg={**model.settings.to_dict()},
                        network=net, state_dict=model.state_dict(), metrics=metrics)
    return metrics
