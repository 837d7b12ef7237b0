"""Device and precision, chosen by what exists and what measures faster, never by assumption.

bf16 autocast is a win on recent GPUs, far slower than fp32 on CPUs without bf16 matrix
instructions, and in between on CPUs with them (AVX-512 BF16), where a square matmul says bf16
is twice as fast and a whole training step gains far less. So ``precision = "auto"`` times what
the model will run: one block and the output head at the model's shapes (:class:`ProbeShape`),
forward and backward, warmed, the precisions taking turns, the minimum of several rounds; and a
reduced precision must beat fp32 by 10% to be chosen.

A measurement can come out differently the next time (a busy machine, another process on the
GPU), and a run whose precision changed half-way is no longer reproducible. So a run records what
it resolved (in every checkpoint), and :func:`detect` reuses that record on resume: "auto" then
means "what this run measured when it started" as long as the device type is the same.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NeatError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Hardware:
    device: torch.device
    precision: str  # fp32 | bf16
    timings: dict[str, float]  # seconds per probe training step, by precision (empty if not measured)
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


@dataclass(frozen=True)
class ProbeShape:
    """The shapes of one training step of the model, which the precision probe runs.

    Whether bf16 pays depends on more than one matmul: a step multiplies (batch * seq, dim)
    activations by (dim, 3 dim), (dim, dim), (dim, 2 hidden), (hidden, dim) and (dim, vocab)
    weights, forward and backward, and runs norms, attention and a softmax over the vocabulary
    in between, whose autocast casts cost time of their own. So the probe runs one block and the
    head at these shapes with autograd, rather than a square matmul of the model's width.
    """

    batch: int
    seq: int
    dim: int      # model width
    heads: int    # attention heads (divide dim)
    hidden: int   # MLP hidden width (SwiGLU: the up projection is dim x 2 hidden)
    vocab: int    # output head

    @classmethod
    def for_width(cls, dim: int) -> "ProbeShape":
        """A step of a model of width ``dim`` at the tiny preset's 16 x 256 tokens."""
        return cls(batch=16, seq=256, dim=dim, heads=4 if dim % 4 == 0 else 1,
                   hidden=16 * math.ceil(8 * dim / 3 / 16), vocab=256)

    def flops(self) -> float:
        """FLOPs of one forward and backward (backward = twice the forward): the matmuls and the
        causal attention."""
        d, h, n = self.dim, self.hidden, self.batch * self.seq
        matmuls = 2 * n * (d * 3 * d + d * d + d * 2 * h + h * d + d * self.vocab)
        attention = 2 * self.batch * self.seq ** 2 * d   # QK^T and AV, half of each masked away
        return 3 * (matmuls + attention)

    def capped(self, max_flops: float) -> "ProbeShape":
        """Fewer rows when one step would cost more than ``max_flops``: the probe must stay short,
        and a dtype's speed per row changes little once a matmul has a few hundred rows. The batch
        shrinks first (down to one sequence), then the sequence is halved (down to 64 tokens: a
        very wide model may stay above the cap)."""
        shape = self
        while shape.flops() > max_flops:
            if shape.batch > 1:
                shape = replace(shape, batch=max(1, int(shape.batch * max_flops / shape.flops())))
            elif shape.seq > 64:
                shape = replace(shape, seq=max(64, shape.seq // 2))
            else:
                break
        return shape


class _ProbeNet(nn.Module):
    """One pre-norm block (attention without RoPE, SwiGLU MLP) and the head with its cross-entropy:
    what a step of the model does per layer, at the model's shapes. The memory's inner loop is left
    out: it runs in fp32 whatever the precision."""

    def __init__(self, shape: ProbeShape):
        super().__init__()
        d, h = shape.dim, shape.hidden
        self.heads = shape.heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * h, bias=False)
        self.down = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, shape.vocab, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        logits = self.head(x)
        return F.cross_entropy(logits.float().view(b * t, -1), targets.view(b * t))


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _time_step(net: _ProbeNet, x: torch.Tensor, targets: torch.Tensor, precision: str) -> float:
    """Seconds of one forward and backward of the probe at ``precision`` (autocast, as training)."""
    ctx = nullcontext() if precision == "fp32" else torch.autocast(x.device.type, dtype=DTYPES[precision])
    net.zero_grad(set_to_none=True)
    x.grad = None
    _sync(x.device)
    start = time.perf_counter()
    with ctx:
        loss = net(x, targets)
    loss.backward()
    _sync(x.device)
    return time.perf_counter() - start


# the probe's cost: one step at most this many FLOPs, rounds until this many seconds have passed
PROBE_FLOPS = {"cuda": 1e12, "mps": 5e10, "cpu": 3e9}
PROBE_SECONDS = {"cuda": 0.3, "mps": 0.4, "cpu": 0.4}
PROBE_ROUNDS = (3, 10)  # at least, at most


def probe_timings(device: torch.device, shape: ProbeShape, precisions: list[str]) -> dict[str, float]:
    """Seconds of one training step of ``shape`` in each precision: the minimum over rounds.

    Each precision is warmed once, then the precisions take turns round after round (a machine
    that gets busier half-way slows them alike), and the minimum of a precision's rounds is the
    least disturbed measurement of it. A precision the backend cannot run is left out.
    """
    shape = shape.capped(PROBE_FLOPS.get(device.type, PROBE_FLOPS["cpu"]))
    with torch.random.fork_rng(devices=[]):   # the global RNG is the run's: left as it was
        torch.manual_seed(0)
        net = _ProbeNet(shape)
        x = torch.randn(shape.batch, shape.seq, shape.dim)
        targets = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    net, x, targets = net.to(device), x.to(device).requires_grad_(True), targets.to(device)
    working = []
    for p in precisions:
        try:
            _time_step(net, x, targets, p)   # warm-up: kernels chosen, memory allocated
            working.append(p)
        except (RuntimeError, TypeError):   # dtype not supported by this backend
            continue
    best = {p: math.inf for p in working}
    low, high = PROBE_ROUNDS
    budget = PROBE_SECONDS.get(device.type, PROBE_SECONDS["cpu"])
    start = time.perf_counter()
    for r in range(high):
        elapsed = time.perf_counter() - start
        # enough rounds; or far over budget (an oversubscribed CPU): keep what was measured
        if (r >= low and elapsed > budget) or (r >= 1 and elapsed > 4 * budget):
            break
        for p in working:
            best[p] = min(best[p], _time_step(net, x, targets, p))
    return best


def candidate_precisions(device: torch.device) -> list[str]:
    if device.type == "cuda":
        # fp16 would need loss scaling; GPUs without bf16 train in fp32
        return ["fp32", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32"]
    return ["fp32", "bf16"]


MARGIN = 0.1   # a reduced precision must be this much faster than fp32 to be chosen


def fastest_precision(timings: dict[str, float]) -> str:
    """The precision to train in, given the seconds of a step in each: the fastest, but a reduced
    precision only if it beats fp32 by ``MARGIN`` (it costs accuracy, so it has to pay for itself);
    fp32 when nothing was measured."""
    if "fp32" not in timings:
        return "fp32"
    best = min(timings, key=timings.get)
    if best != "fp32" and timings[best] > (1 - MARGIN) * timings["fp32"]:
        return "fp32"
    return best


def choose_precision(device: torch.device, requested: str = "auto",
                     probe: ProbeShape | int = 256) -> tuple[str, dict[str, float]]:
    """Return the requested precision, or for "auto" the fastest candidate by :func:`probe_timings`
    of a training step of ``probe`` (a :class:`ProbeShape`, or a model width) and the timings."""
    if requested != "auto":
        return requested, {}
    shape = probe if isinstance(probe, ProbeShape) else ProbeShape.for_width(probe)
    timings = probe_timings(device, shape, candidate_precisions(device))
    return fastest_precision(timings), timings


def detect(device: str = "auto", precision: str = "auto", probe_size: int = 256,
           recorded: dict | None = None, probe: ProbeShape | None = None) -> Hardware:
    """The device and precision to use. ``recorded`` is what a run resolved before (``{"device":
    "cuda", "precision": "bf16"}`` from its checkpoint): "auto" reuses the recorded device when it
    is available here, and the recorded precision instead of measuring again when the device type
    is the same, so a resumed run computes as it did. The probe times a training step of ``probe``
    (the model's shapes; by default a model of width ``probe_size``)."""
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
    prec, timings = choose_precision(dev, precision, probe or ProbeShape.for_width(probe_size))
    return Hardware(dev, prec, timings)
