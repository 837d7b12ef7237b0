"""Trainer overhead: tokens/s of ``Trainer.train`` against a bare PyTorch loop, same model and batches.

    python benchmarks/trainer_overhead.py [--steps 40] [--rounds 3]

Both sides train the tiny preset's model from the same init on the same sampler batches with
the same AdamW groups, schedule and clipping. The trainer side includes everything it does per
step (metrics records, progress bar, the final checkpoint); the bare side is the loop a person
would write by hand. Rounds alternate (bare, trainer, bare, ...) so drift in machine load hits
both; the table reports the median of each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import load_config  # noqa: E402
from neatlm.data.corpus import BatchSampler  # noqa: E402
from neatlm.nn.loss import lm_loss  # noqa: E402
from neatlm.nn.model import NeatLM  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402


def bare_loop(trainer: Trainer, steps: int) -> float:
    """A hand-written loop: AdamW (decay on matrices only), warmup + cosine, clipping; returns seconds."""
    cfg = trainer.cfg
    t = cfg.train
    torch.manual_seed(t.seed)
    model = NeatLM(cfg)
    matrices = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("embed")]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.startswith("embed"))]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": t.weight_decay},
                             {"params": others, "weight_decay": 0.0}], lr=t.lr, betas=(t.beta1, t.beta2))

    def lr_factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    sampler = BatchSampler(trainer.data.corpus.train, t.batch_size, t.seq_len, cfg.data.seed)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = sampler.next()
        logits, _, _, _ = model(x)
        loss = lm_loss(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - start


def trainer_loop(cfg, steps: int, run_dir: Path) -> float:
    trainer = Trainer(cfg, run_dir=run_dir)
    start = time.perf_counter()
    trainer.train(until_step=steps)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=["eval.every=0", "train.save_every=100000", "train.device=cpu",
                                          "train.precision=fp32", "train.progress=true"])
    tokens = args.steps * cfg.train.batch_size * cfg.train.seq_len
    probe = Trainer(cfg, run_dir=tempfile.mkdtemp())  # loads the corpus once for the bare loop
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_loop(probe, args.steps))
        with tempfile.TemporaryDirectory() as d:
            ours.append(trainer_loop(cfg, args.steps, Path(d)))
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"\ntiny preset, {args.steps} steps x {args.rounds} rounds, {args.threads} threads, "
          f"{cfg.train.batch_size}x{cfg.train.seq_len} tokens/step")
    print(f"{'loop':<10}{'median s':>10}{'tokens/s':>12}{'vs bare':>10}")
    print(f"{'bare':<10}{b:>10.2f}{tokens / b:>12.0f}{1.0:>10.3f}")
    print(f"{'trainer':<10}{o:>10.2f}{tokens / o:>12.0f}{b / o:>10.3f}")
    print(f"target: trainer >= 0.95 of bare -> {'met' if b / o >= 0.95 else 'NOT met'}")


if __name__ == "__main__":
    main()
