"""Memory on vs off on the default corpus at equal wall time: which model should be the default?

    python benchmarks/ttl_ablation.py [--seconds 240] [--set key=value ...]

Each variant first times a few steps, then gets as many steps as fit in ``--seconds`` (its
cosine schedule ends there), trains, and is evaluated on the same validation windows. Variants:
the tiny preset (attention only), and the tiny preset with a memory branch (MAG) beside sliding
window attention, without and with the short conv (token-shift keys, as in the MQAR presets). Also reports RSS before and after, as a leak check over the run.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import load_config  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402

VARIANTS = {
    "attention (tiny)": [],
    "attention + memory (MAG)": ["memory.enabled=true", "model.window=64", "memory.chunk_size=32"],
    "attention + memory (MAG, conv 4)": ["memory.enabled=true", "model.window=64", "memory.chunk_size=32",
                                         "memory.conv_size=4"],
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--probe-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, extra in VARIANTS.items():
        base = ["train.progress=false", "train.device=cpu", "train.precision=fp32", "eval.every=0", *extra,
                *args.overrides]
        probe = Trainer(load_config("tiny", overrides=base + ["train.steps=1000"]), run_dir=tempfile.mkdtemp())
        probe.train_step()  # warm up
        start = time.perf_counter()
        for _ in range(args.probe_steps):
            probe.train_step()
        per_step = (time.perf_counter() - start) / args.probe_steps
        steps = max(10, int(args.seconds / per_step))
        cfg = load_config("tiny", overrides=base + [f"train.steps={steps}", f"train.save_every={steps}",
                                                    f"train.warmup_steps={min(100, steps // 10)}"])
        with tempfile.TemporaryDirectory() as run:
            trainer = Trainer(cfg, run_dir=run)
            rss0, start = rss_mb(), time.perf_counter()
            result = trainer.train()
            seconds, rss1 = time.perf_counter() - start, rss_mb()
        rows.append((name, steps, seconds, result["val_bpb"], rss0, rss1, trainer.model.num_params()))
        print(f"{name}: {steps} steps, val bpb {result['val_bpb']:.3f}", file=sys.stderr)
    print(f"\nequal wall time ~{args.seconds:.0f} s each (training + final evaluation), default corpus")
    print(f"{'variant':<34}{'steps':>7}{'seconds':>9}{'val bpb':>9}{'RSS MB start/end':>20}{'params':>11}")
    for name, steps, sec, bpb, r0, r1, params in rows:
        print(f"{name:<34}{steps:>7}{sec:>9.0f}{bpb:>9.3f}{f'{r0:.0f} / {r1:.0f}':>20}{params:>11,}")


if __name__ == "__main__":
    main()
