"""Training of the digits MLG CNN on the data set embedded in scikit-learn.

Flow (as the official MLG method): train a dense float teacher, project its
weights onto the MLG bases by SVD, then train the MLG student with
hardware-exact fake quantization, knowledge distillation from the teacher and
the multi-level orthonormality regularizer. The result is lowered to integers
and evaluated by the golden model on a held-out test split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .golden import golden_predict
from .contract import WIDTH_NAMES, width_problem
from .layers import MLGConv2d, MLGLinear, MLGSettings, setting_problem
from .lower import lower_model
from .models import DigitsNet
from .network import save_model_file

__all__ = ["TrainOptions", "load_digits_split", "train_digits", "evaluate_float", "level_ranges",
           "check_training"]


@dataclass
class TrainOptions:
    epochs: int = 60
    teacher_epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    ortho: float = 0.05
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    distill: bool = True
    seed: int = 0
    test_fraction: float = 0.2
    widths: tuple[int, int] = (24, 48)
    plain: bool = False      # no residual add, no pooling (DigitsNet's ``plain``)
    progress: bool = True

    def problems(self) -> list[tuple[str, str]]:
        """``(field, what is wrong and what is accepted)`` for every option out of range."""
        out = []
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            out.append(("epochs", f"{self.epochs!r} trains no student; accepted: a whole "
                                  "number of epochs >= 1"))
        if (isinstance(self.teacher_epochs, bool) or not isinstance(self.teacher_epochs, int)
                or self.teacher_epochs < 0):
            out.append(("teacher_epochs", f"{self.teacher_epochs!r}; accepted: a whole number "
                                          "of epochs >= 0 (0 trains no teacher)"))
        return out


def level_ranges(widths=(24, 48), plain: bool = False) -> dict[str, tuple[int, int]]:
    """The values of ``bi`` and ``bo`` that put level 1 / level 2 on at least one layer
    of the digits network with these stage widths (the official rules,
    :func:`gen.layers.level_sizes`: level 1 needs ``0 < bi < min(Ci, k*k)``, level 2
    ``0 < bo < min(Co, Ci*k*k)``)."""
    net = DigitsNet(MLGSettings(bi=0, bo=0), quant=False, widths=widths, plain=plain)
    convs = [m for m in net.modules() if isinstance(m, MLGConv2d)]
    kk = [m.kernel_size ** 2 for m in convs]
    hi_bi = max(min(m.in_channels, k) for m, k in zip(convs, kk)) - 1
    hi_bo = max(min(m.out_channels, m.in_channels * k) for m, k in zip(convs, kk)) - 1
    return {"bi": (1, hi_bi), "bo": (1, hi_bo)}


def check_training(settings: MLGSettings, opt: TrainOptions, names=None) -> None:
    """Refuse, before any work, settings and options that cannot train what they say:
    widths out of range (:meth:`MLGSettings.validate`), no epoch, and a ``bi`` that
    leaves level 1 out of every layer of the network (it would train silently without
    the bases of level 1). A ``bo`` outside :func:`level_ranges` is accepted: it
    leaves level 2 out, as the smallest builds want (:func:`train_digits` says so).
    ``names`` maps a field to the name the message gives it (the
    command line options); the error names the value and what is accepted."""
    names = names or {}
    name = lambda f: names.get(f, f)  # noqa: E731
    problems = opt.problems()
    if problems:
        field, problem = problems[0]
        raise ValueError(f"{name(field)} {problem}")
    lo, hi = level_ranges(opt.widths, opt.plain)["bi"]
    v = settings.bi
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(
            f"{name('bi')} {v!r} puts level 1 (the bases B and coefficients U) on no layer "
            f"of the digits network (widths {opt.widths[0]},{opt.widths[1]}"
            f"{', plain' if opt.plain else ''}: level 1 needs 0 < bi < min(Ci, k*k)); "
            f"accepted: {lo}..{hi}")
    decode = settings.decode if width_problem("decode", settings.decode) is None else "odd"
    for field in WIDTH_NAMES:
        problem = setting_problem(field, getattr(settings, field), decode)
        if problem:
            raise ValueError(f"{name(field)}: {problem}" if field in names else problem)


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """The 1797 8x8 digits (pixels 0..16 scaled to [0, 1]), stratified split.

    Returns ``(x_train, y_train, x_test, y_test)`` as float32 ``[N, 1, 8, 8]`` and int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


@torch.no_grad()
def evaluate_float(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (zero fill)."""
    dy, dx = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if dy == 1:
        x[:, :, 0] = 0
    elif dy == -1:
        x[:, :, -1] = 0
    if dx == 1:
        x[:, :, :, 0] = 0
    elif dx == -1:
        x[:, :, :, -1] = 0
    return x


def _fit(model, x, y, epochs, opt: TrainOptions, desc, teacher=None, g=None):
    optim = torch.optim.Adam(model.parameters(), lr=opt.lr)
    steps = epochs * ((len(y) + opt.batch_size - 1) // opt.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opt.lr, total_steps=max(steps, 1))
    bar = tqdm(range(epochs), desc=desc, disable=not opt.progress, leave=False)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), opt.batch_size):
            b = perm[i:i + opt.batch_size]
            xb, yb = _augment(x[b], g), y[b]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(xb)
                T = opt.kd_temperature
                kd = F.kl_div(F.log_softmax(out / T, 1), F.softmax(t / T, 1),
                              reduction="batchmean") * T * T
                loss = (1 - opt.kd_alpha) * loss + opt.kd_alpha * kd
            if opt.ortho and hasattr(model, "ortho_loss"):
                loss = loss + opt.ortho * model.ortho_loss()
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def train_digits(settings: MLGSettings, opt: TrainOptions, out_path=None, log=print) -> dict:
    """Train, lower and evaluate; save the model file if ``out_path`` is given.

    Returns the metrics (``float_acc``, ``golden_acc``, ``teacher_acc``, ``train_seconds``).
    """
    settings.validate("train settings")
    check_training(settings, opt)
    t0 = time.perf_counter()
    torch.manual_seed(opt.seed)
    g = torch.Generator().manual_seed(opt.seed)
    xtr, ytr, xte, yte = load_digits_split(opt.test_fraction, opt.seed)
    metrics: dict = {"train_images": len(ytr), "test_images": len(yte)}

    student = DigitsNet(settings, quant=True, widths=opt.widths, plain=opt.plain)
    if not any(m.has_l2 for m in student.mlg_layers()):
        lo, hi = level_ranges(opt.widths, opt.plain)["bo"]
        log(f"bo = {settings.bo}: level 2 is on no layer (it needs bo in {lo}..{hi} for "
            f"widths {opt.widths[0]},{opt.widths[1]})")
    teacher = None
    if opt.distill and opt.teacher_epochs > 0:
        dense = MLGSettings(**{**settings.to_dict(), "bi": 0, "bo": 0})
        teacher = DigitsNet(dense, quant=False, widths=opt.widths, plain=opt.plain)
        teacher.set_act_quant(False)
        _fit(teacher, xtr, ytr, opt.teacher_epochs, opt, "teacher", g=g)
        metrics["teacher_acc"] = evaluate_float(teacher, xte, yte)
        log(f"dense teacher: test accuracy {metrics['teacher_acc']:.4f}")
        with torch.no_grad():
            for (name, m), (_, tm) in zip(student.named_modules(), teacher.named_modules()):
                if isinstance(m, (MLGConv2d, MLGLinear)):
                    m.init_from_dense(tm.weight4d().detach())
                    if m.bias is not None:
                        m.bias.copy_(tm.bias)
                elif isinstance(m, torch.nn.BatchNorm2d):
                    m.load_state_dict(tm.state_dict())
    _fit(student, xtr, ytr, opt.epochs, opt, "mlg student", teacher=teacher, g=g)

    metrics["float_acc"] = evaluate_float(student, xte, yte)
    net = lower_model(student)
    metrics["golden_acc"] = float((golden_predict(net, xte) == yte).float().mean())
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    if out_path is not None:
        save_model_file(out_path, arch="digits", mlg={**settings.to_dict(), "widths": list(opt.widths),
                                                     **({"plain": True} if opt.plain else {})},
                        network=net, state_dict=student.state_dict(), metrics=metrics)
    return metrics
