"""Leak check: RSS over a long run of a memory model carrying state across segments and steps.

    python benchmarks/leak_check.py [--steps 2000]

A small model with a memory branch (MAG), state carried across 4 segments per window and across
steps (memory.reset = "never"), trained for ``--steps`` steps. If any graph or state were kept
across segments or steps, RSS would grow with the step count; the table shows it every 10%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import load_config  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=[
        "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.window=16", "memory.enabled=true",
        "memory.chunk_size=8", "memory.reset=never", "train.segments=4", "train.seq_len=32",
        "train.batch_size=4", f"train.steps={args.steps}", "train.progress=false", "eval.every=0",
        f"train.save_every={args.steps}", "train.log_every=100"])
    trainer = Trainer(cfg, run_dir=tempfile.mkdtemp())
    every = max(1, args.steps // 10)
    rows = []
    while trainer.step < args.steps:
        trainer.train_step()
        if trainer.step % every == 0:
            rows.append((trainer.step, rss_mb()))
    print(f"\nleak check: {args.steps} steps, memory state carried across segments and steps")
    print(f"{'step':>8}{'RSS MB':>10}")
    for step, rss in rows:
        print(f"{step:>8}{rss:>10.1f}")
    first, last = rows[0][1], rows[-1][1]
    print(f"growth from step {rows[0][0]} to {rows[-1][0]}: {last - first:+.1f} MB ({(last / first - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
