"""Images through an accelerator, every output checked against the golden model.

Shared by ``mlg sim`` (the simulated board) and ``mlg run`` (a board): the same
driver calls, the same checks, the same report.
"""

from __future__ import annotations

import time

import torch

from gen.config import AcceleratorConfig
from gen.golden import golden_forward, quantize_input
from gen.program import Program

from .driver import Driver

__all__ = ["run_images", "format_summary"]


def run_images(driver: Driver, config: AcceleratorConfig, program: Program, x: torch.Tensor,
               y: torch.Tensor | None = None, *, progress: bool = False,
               timeout: float = 120.0) -> dict:
    """Load ``program``, run the float images ``x`` ``[N, C, H, W]`` one by one.

    Returns a report: outputs that differ from the golden model (``mismatches``,
    which must be 0), RTL and golden accuracy (if labels ``y`` are given), cycles
    per image, and the bytes moved: codes streamed into the generation unit
    (weights), activations and everything else on the link.
    """
    t_load = time.monotonic()
    image = driver.load_program(config, program)
    load_s = time.monotonic() - t_load
    link0 = (driver.transport.bytes_sent, driver.transport.bytes_received)
    net = program.network()
    x_int = quantize_input(net, x)
    golden = golden_forward(net, x_int)
    rows = []
    mismatched_images = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=x.shape[0], desc="images", unit="img", leave=False)
    t0 = time.monotonic()
    for i in range(x.shape[0]):
        logits = driver.infer(x_int[i], timeout=timeout)
        c = driver.counters()
        diff = int((logits != golden[i]).sum())
        if diff:
            mismatched_images.append(i)
        rows.append({"image": i, "mismatches": diff, "pred": int(logits.argmax()),
                     "cycles": c["cycles"], "code_bytes": c["code_bytes"],
                     "engine_busy": c["engine_busy"], "gen_busy": c["gen_busy"],
                     "mac_cycles": c["mac_cycles"], "macs": c["macs"],
                     "stall_weights": c["stall_weights"], "stall_output": c["stall_output"]})
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    run_s = time.monotonic() - t0
    n = max(1, len(rows))
    sent = driver.transport.bytes_sent - link0[0]
    received = driver.transport.bytes_received - link0[1]
    act_in = int(x_int[0].numel()) * driver.identity.act_bytes
    act_out = net.layers[-1].out_channels * driver.identity.act_bytes
    report = {
        "images": len(rows),
        "mismatches": sum(r["mismatches"] for r in rows),
        "mismatched_images": mismatched_images,
        "cycles_per_image": sum(r["cycles"] for r in rows) / n,
        "engine_busy_per_image": sum(r["engine_busy"] for r in rows) / n,
        "gen_busy_per_image": sum(r["gen_busy"] for r in rows) / n,
        "stall_weights_per_image": sum(r["stall_weights"] for r in rows) / n,
        "macs_per_image": sum(r["macs"] for r in rows) / n,
        "weight_bytes_per_image": sum(r["code_bytes"] for r in rows) / n,
        "activation_bytes_per_image": act_in + act_out,
        "link_bytes_per_image": (sent + received) / n,
        "program_load": {"records": len(image.records), "bases": len(image.bases),
                         "consts": len(image.consts), "seconds": load_s},
        "wall_seconds": run_s,
        "per_image": rows,
    }
    # A run counter wraps at 2^counter_bits: the MACs of an image are known from the
    # network, and a count that may have wrapped is not reported as a number.
    wrap = 1 << config.counter_bits
    if sum(layer.macs for layer in net.layers) >= wrap:
        report["macs_per_image"] = None
        report["counters_wrapped"] = [f"macs (an image has more than 2^{config.counter_bits}; "
                                      "config counter_bits)"]
    if y is not None:
        preds = torch.tensor([r["pred"] for r in rows])
        report["rtl_acc"] = float((preds == y[:len(rows)]).float().mean())
        report["golden_acc"] = float((golden.argmax(dim=1) == y[:len(rows)]).float().mean())
    return report


def format_summary(report: dict, extra: dict | None = None) -> str:
    """A short table of a :func:`run_images` report (and ``extra`` rows)."""
    lines = []
    rows = list((extra or {}).items())
    if "rtl_acc" in report:
        rows.append(("accuracy golden / RTL", f"{report['golden_acc']:.4f} / {report['rtl_acc']:.4f} "
                     f"on {report['images']} images"))
    rows += [
        ("outputs differing from golden", f"{report['mismatches']}"),
        ("cycles per image", f"{report['cycles_per_image']:,.0f} (engine busy "
         f"{report['engine_busy_per_image']:,.0f}, generation busy {report['gen_busy_per_image']:,.0f})"),
        ("weight code bytes per image", f"{report['weight_bytes_per_image']:,.0f} (from the on-chip base store)"),
        ("activation bytes per image", f"{report['activation_bytes_per_image']:,} (image in, logits out)"),
        ("link bytes per image", f"{report['link_bytes_per_image']:,.0f} (frames, status polls included)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
