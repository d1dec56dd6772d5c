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
from .layers import MLGConv2d, MLGLinear, MLGSettings
from .lower import lower_model
from .models import DigitsNet
from .network import save_model_file

__all__ = ["TrainOptions", "load_digits_split", "train_digits", "evaluate_float"]


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
    t0 = time.perf_counter()
    torch.manual_seed(opt.seed)
    g = torch.Generator().manual_seed(opt.seed)
    xtr, ytr, xte, yte = load_digits_split(opt.test_fraction, opt.seed)
    metrics: dict = {"train_images": len(ytr), "test_images": len(yte)}

    student = DigitsNet(settings, quant=True, widths=opt.widths, plain=opt.plain)
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
