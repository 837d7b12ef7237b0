"""Device and precision, chosen by what exists and what measures faster, never by assumption.

bf16 autocast is a win on recent GPUs and far slower than fp32 on many CPUs (those without bf16
matrix units), so ``precision = "auto"`` times one matmul of the model's width in each candidate
dtype on the chosen device and keeps the fastest.

A measurement can come out differently the next time (a busy machine, another process on the
GPU), and a run whose precision changed half-way is no longer reproducible. So a run records what
it resolved (in every checkpoint), and :func:`detect` reuses that record on resume: "auto" then
means "what this run measured when it started" as long as the device type is the same.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch

from .errors import NeatError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Hardware:
    device: torch.device
    precision: str  # fp32 | bf16
    timings: dict[str, float]  # seconds per probe matmul, by precision (empty if not measured)
    recorded: bool = False  # the precision is the one the run measured before (see detect)

    def autocast(self) -> ContextManager:
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def describe(self) -> str:
        probe = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.timings.items())
        note = f" (measured: {probe})" if probe else " (as measured when the run started)" if self.recorded else ""
        return f"device {self.device}, precision {self.precision}{note}"


def choose_device(requested: str = "auto") -> torch.device:
    """auto = cuda, then mps, then cpu. An explicit request that is not available is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available.get(requested, False):
        raise NeatError(f"train.device = {requested!r}: not available on this machine "
                        f"(available: {', '.join(d for d, ok in available.items() if ok)})")
    return torch.device(requested)


def _time_matmul(device: torch.device, precision: str, size: int, reps: int) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    ctx = nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=DTYPES[precision])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with ctx:
        (a @ b).sum().item()  # warm up
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        sync()
        c.sum().item()
    return (time.perf_counter() - start) / reps


def candidate_precisions(device: torch.device) -> list[str]:
    if device.type == "cuda":
        # fp16 would need loss scaling; GPUs without bf16 train in fp32
        return ["fp32", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32"]
    return ["fp32", "bf16"]


def choose_precision(device: torch.device, requested: str = "auto", size: int = 256) -> tuple[str, dict[str, float]]:
    """Return the requested precision, or for "auto" the fastest candidate by a short measurement.

    A candidate must beat fp32 by 10% to be chosen: reduced precision costs accuracy, so it has
    to pay for itself.
    """
    if requested != "auto":
        return requested, {}
    reps = 20 if device.type == "cuda" else 3
    timings = {}
    for p in candidate_precisions(device):
        try:
            timings[p] = _time_matmul(device, p, size, reps)
        except RuntimeError:  # dtype not supported by this backend
            continue
    best = min(timings, key=timings.get)
    if best != "fp32" and timings[best] > 0.9 * timings["fp32"]:
        best = "fp32"
    return best, timings


def detect(device: str = "auto", precision: str = "auto", probe_size: int = 256,
           recorded: dict | None = None) -> Hardware:
    """The device and precision to use. ``recorded`` is what a run resolved before (``{"device":
    "cuda", "precision": "bf16"}`` from its checkpoint): "auto" reuses the recorded device when it
    is available here, and the recorded precision instead of measuring again when the device type
    is the same, so a resumed run computes as it did."""
    rec = recorded or {}
    dev = None
    if device == "auto" and rec.get("device") in ("cuda", "mps", "cpu"):
        try:
            dev = choose_device(rec["device"])
        except NeatError:  # not on this machine: choose afresh
            dev = None
    if dev is None:
        dev = choose_device(device)
    if precision == "auto" and rec.get("device") == dev.type and rec.get("precision") in candidate_precisions(dev):
        return Hardware(dev, rec["precision"], {}, recorded=True)
    prec, timings = choose_precision(dev, precision, probe_size)
    return Hardware(dev, prec, timings)
