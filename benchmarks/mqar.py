"""MQAR: does test-time memory recall what sliding-window attention cannot see?

    python benchmarks/mqar.py [--steps N] [--presets mqar-attention,mqar-titans,mqar-atlas]
    python benchmarks/mqar.py --hard [--steps N] [--eval-batches 4]

Trains each preset from scratch on multi-query associative recall (key-value pairs at the start
of the sequence, queries later, the sequence at least 8x the attention window), then scores
query accuracy on held-out sequences. One table, side by side, from one run.

``--hard`` is the harder setting of Zoology/Based (Arora et al.): vocabulary 8192, 64 pairs in
256 tokens, queries in power-law gaps, the presets mqar-hard-{attention,swa,titans,atlas}. Each
trained model is then scored at longer sequences with more pairs, (512, 128) and (1024, 256),
read ``train.seq_len`` tokens a call with the state carried (:func:`neatlm.train.evaluate.mqar_accuracy`):
recall that holds only at the training shape is not recall. Full attention is scored only up to
its context: it is the upper reference at the training length.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import Config, load_config  # noqa: E402
from neatlm.data.source import VALIDATION_SEED  # noqa: E402
from neatlm.train.evaluate import mqar_accuracy  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402

HARD_PRESETS = "mqar-hard-attention,mqar-hard-swa,mqar-hard-titans,mqar-hard-atlas"
HARD_SHAPES = "256:64,512:128,1024:256"


def train(preset: str, args: argparse.Namespace, run: str) -> tuple[Config, Trainer, dict[str, float], float]:
    """Train one preset from scratch; (config, trainer, final metrics, training seconds)."""
    sets = ["train.progress=false", "train.device=cpu", *args.overrides]
    if args.steps:
        sets.append(f"train.steps={args.steps}")
    cfg = load_config(preset, overrides=sets)
    trainer = Trainer(cfg, run_dir=run)
    start = time.perf_counter()
    result = trainer.train()
    return cfg, trainer, result, time.perf_counter() - start


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"256:64,512:128"`` -> [(256, 64), (512, 128)]: (sequence length, pairs)."""
    try:
        shapes = [(int(a), int(b)) for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise SystemExit(f"--shapes {text!r}: expected LENGTH:PAIRS[,LENGTH:PAIRS...], e.g. {HARD_SHAPES}") from None
    return shapes


def main_classic(args: argparse.Namespace) -> None:
    rows = []
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as run:
            cfg, trainer, result, seconds = train(preset, args, run)
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


def main_hard(args: argparse.Namespace) -> None:
    shapes = parse_shapes(args.shapes)
    rows = []
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as run:
            cfg, trainer, result, seconds = train(preset, args, run)
        d = cfg.data
        accs = [mqar_accuracy(trainer.model, length, pairs, args.eval_batches, args.eval_batch_size,
                              gaps=d.mqar_gaps, power_a=d.mqar_power_a, seed=VALIDATION_SEED)
                for length, pairs in shapes]
        rows.append((preset, cfg, accs, seconds, trainer.model.num_params()))
        print(f"{preset}: " + ", ".join(f"{length}/{pairs} {acc:.3f}" for (length, pairs), acc in zip(shapes, accs))
              + f" after {seconds:.0f} s of training", file=sys.stderr)
    m, d, t = cfg.model, cfg.data, cfg.train
    chance = 1 / (m.vocab_size // 2)
    gaps = f"power-law gaps (a = {d.mqar_power_a:g})" if d.mqar_gaps == "power" else "uniform gaps"
    print(f"\nHarder MQAR (Zoology): vocabulary {m.vocab_size} (chance 1/{m.vocab_size // 2} = {chance:.4f}), {gaps}; "
          f"trained at {t.seq_len} tokens / {d.mqar_pairs} pairs, batch {t.batch_size}; query accuracy over "
          f"{args.eval_batches} x {args.eval_batch_size} held-out sequences per column (length / pairs)\n")
    head = "| preset | window | " + " | ".join(f"{length} / {pairs}" for length, pairs in shapes)
    print(head + " | steps | train s | params |")
    print("|---|---:|" + "---:|" * (len(shapes) + 3))
    for name, c, accs, sec, params in rows:
        cells = " | ".join("n/a" if math.isnan(a) else f"{a:.3f}" for a in accs)
        window = c.model.window or "full"
        print(f"| {name} | {window} | {cells} | {c.train.steps} | {sec:.0f} | {params:,} |")
    print("\nn/a: full attention is scored only up to its context (the upper reference at the training length); "
          f"windowed models read longer sequences {t.seq_len} tokens a call with the state carried.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hard", action="store_true", help="Zoology's harder setting, scored at longer lengths too")
    ap.add_argument("--presets", default=None, help="comma-separated presets (default: the mode's own)")
    ap.add_argument("--steps", type=int, default=0, help="0 = the preset's train.steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=HARD_SHAPES, help="--hard: LENGTH:PAIRS columns of the table")
    ap.add_argument("--eval-batches", type=int, default=4, help="--hard: held-out batches per column")
    ap.add_argument("--eval-batch-size", type=int, default=32, help="--hard: sequences per held-out batch")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.presets is None:
        args.presets = HARD_PRESETS if args.hard else "mqar-attention,mqar-titans,mqar-atlas"
    (main_hard if args.hard else main_classic)(args)


if __name__ == "__main__":
    main()
