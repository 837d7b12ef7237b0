"""MQAR: does test-time memory recall what sliding-window attention cannot see?

    python benchmarks/mqar.py [--steps N] [--presets mqar-attention,mqar-titans,mqar-atlas]

Trains each preset from scratch on multi-query associative recall (key-value pairs at the start
of the sequence, queries later, the sequence at least 8x the attention window), then scores
query accuracy on held-out sequences. One table, side by side, from one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import load_config  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="mqar-attention,mqar-titans,mqar-atlas")
    ap.add_argument("--steps", type=int, default=0, help="0 = the preset's train.steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets.split(","):
        sets = ["train.progress=false", "train.device=cpu", *args.overrides]
        if args.steps:
            sets.append(f"train.steps={args.steps}")
        cfg = load_config(preset, overrides=sets)
        with tempfile.TemporaryDirectory() as run:
            trainer = Trainer(cfg, run_dir=run)
            start = time.perf_counter()
            result = trainer.train()
            seconds = time.perf_counter() - start
        tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len * cfg.train.segments
        rows.append((preset, result["val_acc"], result["val_loss"], seconds, tokens / seconds,
                     trainer.model.num_params()))
        print(f"{preset}: accuracy {result['val_acc']:.3f} in {seconds:.0f} s", file=sys.stderr)
    d = cfg.data
    print(f"\nMQAR: {d.mqar_pairs} pairs, seq_len {cfg.train.seq_len}, attention window {cfg.model.window}, "
          f"chance = {1 / (cfg.model.vocab_size // 2):.3f}")
    print(f"{'preset':<16}{'accuracy':>10}{'val loss':>10}{'seconds':>10}{'tokens/s':>10}{'params':>10}")
    for name, acc, loss, sec, tps, params in rows:
        print(f"{name:<16}{acc:>10.3f}{loss:>10.3f}{sec:>10.0f}{tps:>10.0f}{params:>10,}")


if __name__ == "__main__":
    main()
