"""Autotuning of the knobs that change how fast a training step runs, never what it computes.

Tuned (``train.autotune = true``): torch's intra-op thread count (1, 2, 4, ... and the cores this
process may use; only when ``train.threads = 0``, since an explicit count is the user's) and the
``scaled_dot_product_attention`` backend (torch's own choice, or one backend forced: those that
run on this device, as ``neat hw`` lists them). Everything that changes the model's outputs
(chunk size, window, precision, which has a probe of its own) is a hyperparameter and is not
tuned here; threads and attention kernels change float summation order only.

Each candidate runs the run's own model on one real micro-batch, forward and backward, warmed;
the candidates take turns and each keeps its fastest of several rounds, so a busy moment hurts
every candidate alike. A candidate replaces the default only when it is at least 10% faster, as
for the precision probe: on this project's 2-core development host a 30-step run varies by about
10%, and a tuner that took a 7% measured gain chose a backend whose run was then 16% slower.

The result is cached per machine fingerprint and model (the config sections that define the
model and the batch shape), beside the hardware profile, and recorded in the run's checkpoints,
so a resumed run uses what it measured when it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .hw_profile import SDPA_BACKENDS, cache_dir, cpu_cores, identify, sdpa_backends, write_json_atomic

log = logging.getLogger("neatlm.autotune")

SCHEMA = 1
MIN_GAIN = 0.10
DEFAULT = "default"   # the attention backend torch picks itself


@dataclass
class Tuning:
    """The chosen knobs and what each candidate measured (seconds per step, by label)."""

    threads: int
    attention: str
    timings: dict[str, float] = field(default_factory=dict)
    baseline: str = ""    # the label of the defaults the choice was compared with

    def kernels(self) -> ContextManager:
        """The context a forward runs in: the chosen attention backend first, the plain math one
        behind it (a fused kernel refuses some calls, e.g. flash with an explicit mask: those
        run as math rather than fail), or nothing for torch's own choice."""
        if self.attention == DEFAULT:
            return contextlib.nullcontext()
        chosen = getattr(SDPBackend, SDPA_BACKENDS[self.attention])
        order = [chosen] if chosen == SDPBackend.MATH else [chosen, SDPBackend.MATH]
        return sdpa_kernel(order, set_priority=True)

    def apply(self) -> None:
        torch.set_num_threads(self.threads)

    def describe(self) -> str:
        here = label(self.threads, self.attention)
        chosen, default = self.timings.get(here), self.timings.get(self.baseline)
        note = ""
        if chosen and default and here != self.baseline:
            note = f" ({default / chosen - 1:+.0%} faster than the defaults, {self.baseline})"
        elif chosen:
            others = {k: v for k, v in self.timings.items() if k != here and math.isfinite(v)}
            if others:
                runner = min(others, key=others.get)
                note = (f" (the defaults kept: nothing was {MIN_GAIN:.0%} faster; the best other, {runner}, took "
                        f"{others[runner] / chosen:.2f}x their time)")
        return f"threads {self.threads}, attention {self.attention}{note}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Tuning":
        timings = {str(k): float(v) for k, v in dict(data.get("timings", {})).items()}
        tuning = cls(int(data["threads"]), str(data["attention"]), timings, str(data.get("baseline", "")))
        if tuning.threads < 1 or (tuning.attention != DEFAULT and tuning.attention not in SDPA_BACKENDS):
            raise ValueError(f"not a tuning: {data!r}")
        return tuning


def label(threads: int, attention: str) -> str:
    return f"threads={threads} attention={attention}"


def thread_candidates(cores: int) -> list[int]:
    """1, 2, 4, ... below ``cores``, and ``cores``."""
    found, n = [], 1
    while n < cores:
        found.append(n)
        n *= 2
    return found + [cores]


def attention_candidates(device: torch.device) -> list[str]:
    return [DEFAULT] + [name for name, works in sdpa_backends(device).items() if works]


def measure(step: Callable[[], None], candidates: list[tuple[int, str]], rounds: int = 5) -> dict[str, float]:
    """Seconds of ``step`` under each (threads, attention) candidate: one warm-up each, then
    ``rounds`` rounds in which the candidates take turns; the fastest of each (inf for a candidate
    that cannot run the step)."""
    before = torch.get_num_threads()
    timings = {label(t, a): float("inf") for t, a in candidates}
    try:
        for r in range(rounds + 1):
            for threads, attention in candidates:
                torch.set_num_threads(threads)
                try:
                    with Tuning(threads, attention).kernels():
                        start = time.perf_counter()
                        step()
                        seconds = time.perf_counter() - start
                except RuntimeError:   # a candidate this step cannot run under stays at inf
                    continue
                if r > 0:
                    key = label(threads, attention)
                    timings[key] = min(timings[key], seconds)
    finally:
        torch.set_num_threads(before)
    return timings


def choose(timings: dict[str, float], candidates: list[tuple[int, str]], default: tuple[int, str]) -> Tuning:
    """The fastest candidate if it beats ``default`` by :data:`MIN_GAIN`, else the default."""
    best = min(candidates, key=lambda c: timings[label(*c)])
    if timings[label(*best)] < (1 - MIN_GAIN) * timings[label(*default)]:
        return Tuning(best[0], best[1], timings, label(*default))
    return Tuning(default[0], default[1], timings, label(*default))


def tune(step: Callable[[], None], device: torch.device, tune_threads: bool, rounds: int = 5) -> Tuning:
    """Measure every candidate on ``step`` (one forward and backward of the run) and choose; the
    defaults are the thread count torch has now and torch's own attention backend."""
    now = torch.get_num_threads()       # torch's default (OMP_NUM_THREADS, else the cores) or the user's
    threads = sorted(set(thread_candidates(cpu_cores())) | {now}) if tune_threads else [now]
    default = (now, DEFAULT)
    candidates = [(t, a) for t in threads for a in attention_candidates(device)]
    return choose(measure(step, candidates, rounds), candidates, default)


def cache_key(model_sections: dict[str, Any], batch_shape: tuple[int, ...], tune_threads: bool) -> str:
    text = json.dumps([identify().fingerprint, model_sections, list(batch_shape), tune_threads, SCHEMA],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_or_tuned(step: Callable[[], None], device: torch.device, tune_threads: bool, key: str,
                    directory: Path | None = None) -> tuple[Tuning, bool]:
    """(tuning, whether it came from the cache): the cached tuning of this machine and model, else
    a new measurement, saved atomically (a cache that cannot be written only costs a re-measure)."""
    path = (directory or cache_dir()) / f"autotune-{key}.json"
    try:
        return Tuning.from_dict(json.loads(path.read_text(encoding="utf-8"))), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tuning = tune(step, device, tune_threads)
    try:
        write_json_atomic(path, tuning.to_dict())
    except OSError as exc:
        log.warning("warning: the autotune cache %s cannot be written (%s)", path.parent, exc.strerror or exc)
    return tuning, False
