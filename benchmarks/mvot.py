"""MVoT on grid worlds: do visual thoughts help the answer, and does the discrepancy loss help the images?

    python benchmarks/mvot.py [--seconds 480] [--examples 200] [--out DIR] [--threads 1]

One run: trains the visual codebook (the mvot-vq preset), then three arms of the same model for
the same training time (CPU seconds) on the same examples (steps = seconds / the arm's measured
step time):

- text only (mvot-text): the answer right after the question;
- MVoT, cross-entropy only (mvot, mvot.discrepancy_weight = 0): an image after every move;
- MVoT with the token-discrepancy loss (mvot, weight 1).

Each arm then answers ``--examples`` held-out test maps, writing its own thoughts greedily
(neatlm.train.mvot): answer accuracy (overall, and for walks of 2-3 and 4-5 moves), the image
tokens it wrote at the right place, images written exactly; and with the true earlier tokens given
(teacher forcing): the answer after the true thoughts, every image token, and the tokens of the
cells that change from one state to the next (where the agent left and arrived). Prints one
table; writes the thoughts of the discrepancy arm on the first test maps
beside the truth as a PNG (``--figure``).
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

from neatlm.config import load_config  # noqa: E402
from neatlm.data.mvot import load_task  # noqa: E402
from neatlm.train.mvot import mvot_eval, thought_grid  # noqa: E402
from neatlm.train.png import write_png  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402
from neatlm.train.vq import train_vq  # noqa: E402

ARMS = {
    "text only (mvot-text)": ("mvot-text", []),
    "MVoT, CE only": ("mvot", ["mvot.discrepancy_weight=0"]),
    "MVoT, CE + discrepancy": ("mvot", ["mvot.discrepancy_weight=1"]),
}

KEYS = dict(zip(ARMS, ("text", "ce", "discrepancy")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=480.0,
                    help="training time of each arm, in CPU seconds of this process (steps = seconds / the step "
                         "time measured on a few steps), so that other work on the host does not skew the arms")
    ap.add_argument("--examples", type=int, default=200, help="held-out test maps each arm answers")
    ap.add_argument("--probe-steps", type=int, default=5)
    ap.add_argument("--vq-steps", type=int, default=0, help="0 = the mvot-vq preset's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="an empty or new directory for the runs (default: a new temporary one)")
    ap.add_argument("--figure", default=str(Path(__file__).resolve().parents[1] / "docs" / "mvot_thoughts.png"))
    ap.add_argument("--figure-examples", type=int, default=6)
    ap.add_argument("--arms", default="text,ce,discrepancy",
                    help="which arms to run, comma-separated (text, ce, discrepancy)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="an override for every arm's training (e.g. train.seed=1 data.seed=1 for another seed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mvot-bench-"))
    if out.exists() and any(out.iterdir()):   # checked now, not when the third arm meets an old run
        sys.exit(f"--out {out}: not empty; the benchmark writes fresh runs")
    common = ["train.progress=false", "train.device=cpu", "train.precision=fp32", f"train.threads={args.threads}"]

    start = time.perf_counter()
    vq_dir = out / "vq"
    vq_cfg = load_config("mvot-vq", overrides=common + ([f"train.steps={args.vq_steps}"] if args.vq_steps else []))
    vq_stats = train_vq(vq_cfg, vq_dir)
    vq_seconds = time.perf_counter() - start
    print(f"codebook: {vq_seconds:.0f} s, {vq_stats}", file=sys.stderr)

    rows = []
    figure_task = figure_thoughts = None
    wanted = {w.strip() for w in args.arms.split(",") if w.strip()}
    if not wanted <= set(KEYS.values()):
        sys.exit(f"--arms {args.arms}: choose from {', '.join(KEYS.values())}")
    for name, (preset, extra) in ARMS.items():
        if KEYS[name] not in wanted:
            continue
        over = [*common, "eval.every=0", f"mvot.vq_run={vq_dir}", *extra, *args.overrides]
        if preset == "mvot-text":
            over.remove(f"mvot.vq_run={vq_dir}")
        probe = Trainer(load_config(preset, overrides=over + ["train.steps=1000"]), run_dir=out / f"probe-{len(rows)}")
        probe.train_step()   # warm up
        t0 = time.process_time()
        for _ in range(args.probe_steps):
            probe.train_step()
        per_step = (time.process_time() - t0) / args.probe_steps
        steps = max(20, int(args.seconds / per_step))
        cfg = load_config(preset, overrides=over + [f"train.steps={steps}", f"train.save_every={steps}",
                                                    f"train.warmup_steps={min(40, steps // 10)}"])
        trainer = Trainer(cfg, run_dir=out / f"arm-{len(rows)}")
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.train()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        task = load_task(cfg.mvot, cfg.vq, cfg.train.seq_len)
        t0 = time.perf_counter()
        scores, thoughts = mvot_eval(trainer.model, task, args.examples, split="test")
        eval_seconds = time.perf_counter() - t0
        short = [t.correct for t in thoughts if len(t.example.moves) <= 3]
        long = [t.correct for t in thoughts if len(t.example.moves) >= 4]
        scores["acc_short"] = sum(short) / max(len(short), 1)
        scores["acc_long"] = sum(long) / max(len(long), 1)
        rows.append((name, steps, cpu, result.get("val_loss", math.nan), scores))
        print(f"{name}: {steps} steps in {seconds:.0f} s ({cpu:.0f} s CPU), eval {eval_seconds:.0f} s, {scores}",
              file=sys.stderr)
        if task.layout is not None and "discrepancy" in name:
            figure_task, figure_thoughts = task, thoughts[:args.figure_examples]

    n = args.examples
    print(f"\nMVoT on held-out grid-world maps (4x4 and 5x5, 2-5 moves): {n} test examples per arm, "
          f"~{args.seconds:.0f} CPU seconds of training each on {args.threads} thread(s)")
    print(f"codebook (VQ-VAE, {vq_cfg.vq.codebook} codes, {vq_cfg.train.steps} steps, {vq_seconds:.0f} s): "
          f"validation MSE {vq_stats['val_mse']:.5f} (PSNR {vq_stats['val_psnr']:.1f} dB), largest pixel error "
          f"{vq_stats['val_max_err']:.2f}, {vq_stats['codes_used']:.0f} codes used (perplexity "
          f"{vq_stats['code_perplexity']:.2f})")
    se = 0.5 / math.sqrt(n)
    print(f"answer accuracy: chance 0.50, standard error at most {se:.3f}")
    cols = ["arm", "steps", "train CPU s", "val loss", "answer acc", "2-3 moves", "4-5 moves",
            "answer acc, true thoughts given", "image tokens (written)", "images exact", "image tokens (forced)",
            "changed cells (forced)"]
    print("| " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * (len(cols) - 1))
    for name, steps, seconds, val, s in rows:
        f = lambda k: f"{s[k]:.3f}" if k in s and not math.isnan(s[k]) else "-"  # noqa: E731
        cells = [name, str(steps), f"{seconds:.0f}", f"{val:.3f}", f("answer_acc"), f("acc_short"), f("acc_long"),
                 f("forced_answer_acc"), f("image_token_acc"), f("image_exact"), f("forced_image_acc"),
                 f("forced_changed_acc")]
        print("| " + " | ".join(cells) + " |")
    if figure_task is not None and figure_thoughts:
        path = write_png(args.figure, thought_grid(figure_task, figure_thoughts))
        print(f"\nvisual thoughts of 'MVoT, CE + discrepancy' on test maps 0-{len(figure_thoughts) - 1}: {path}")


if __name__ == "__main__":
    main()
