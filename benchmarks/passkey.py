"""Passkey retrieval: can test-time memory carry a five-digit key farther than attention can see?

    python benchmarks/passkey.py [--steps N] [--presets passkey,passkey-attention] [--threads 2]
                                 [--lengths 1024,2048,4096,8192,16384] [--examples 20] [--runs DIR]

Trains each preset from scratch on ``data.task = "passkey"`` (a key hidden at a random depth of
training text, asked at the end of each 1,024-byte example; only the answer digits are scored),
then hides keys in held-out text at each length and reads every example ``--call-len`` bytes at a
time with the state carried (``neat eval --task passkey``): lengths past the training length
measure whether the memory generalises in distance. The memory preset is scored with test-time
learning on and off (off: the memory reads its initial weights, never steps). One table, side by
side, from one run: the fraction of examples with all five digits right, then the fraction of
digits right.
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
from neatlm.data.passkey import min_length  # noqa: E402
from neatlm.train.stream import passkey_scores, streaming_model  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402

COMMON = ["train.progress=false", "train.device=cpu", "train.precision=fp32"]
DIGITS = 5


def lengths_arg(text: str) -> list[int]:
    """Comma-separated lengths, each long enough for the needle and the question."""
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not lengths or min(lengths) < min_length(DIGITS):
        raise argparse.ArgumentTypeError(f"{text!r}: every length must be >= {min_length(DIGITS)}")
    return lengths


def init_arg(text: str) -> dict[str, str]:
    """``PRESET=RUN_DIR,...``: the run whose weights each preset starts from (fine-tuning)."""
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if not all(len(p) == 2 and p[0] and p[1] for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected PRESET=RUN_DIR[,PRESET=RUN_DIR]")
    return dict(pairs)


def overrides(args: argparse.Namespace, preset: str, run_dir: Path) -> list[str]:
    """The preset as it is, or cut to ``--steps`` (warmup at most a tenth, one checkpoint at the end),
    started from ``--init``'s run for this preset if one is named."""
    sets = [*COMMON, f"train.threads={args.threads}", f"train.run_dir={run_dir}"]
    if preset in args.init:
        sets.append(f"train.init_from={args.init[preset]}")
    if args.steps:
        warmup = min(load_config(preset).train.warmup_steps, args.steps // 10)
        sets += [f"train.steps={args.steps}", f"train.warmup_steps={warmup}", f"train.save_every={args.steps}"]
    return [*sets, *args.overrides]


def train_and_score(args: argparse.Namespace, preset: str, runs: Path) -> tuple[list[tuple], str]:
    """Train ``preset``, then score it at every length: one row per TTL mode (on, and off for
    memory), and a line saying how it was trained."""
    cfg = load_config(preset, overrides=overrides(args, preset, runs / preset))
    trainer = Trainer(cfg, run_dir=runs / preset)
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start
    haystack = trainer.data.corpus.val            # the held-out text validation hid its needles in
    if haystack.size < max(args.lengths):
        sys.exit(f"--lengths {max(args.lengths)}: the held-out text of {trainer.data.corpus.source} has only "
                 f"{haystack.size} bytes to hide the needle in")
    val_acc = result.get("val_acc", float("nan"))
    print(f"{preset}: {cfg.train.steps} steps in {train_s:.0f} s, val_acc {val_acc:.3f}", file=sys.stderr)
    model = streaming_model(trainer.model)       # a bounded window even for a full-attention preset
    rows = []
    for learn in ((True, False) if cfg.memory.enabled else (True,)):
        start = time.perf_counter()
        scores = passkey_scores(model, haystack, args.lengths, examples=args.examples, call_len=args.call_len,
                                learn=learn, seed=args.seed)
        label = preset + ("" if not cfg.memory.enabled else (", TTL on" if learn else ", TTL off"))
        rows.append((label, cfg.train.steps, train_s, val_acc, scores, time.perf_counter() - start))
        print(f"{label}: " + ", ".join(f"{n}: {s.all_digits:.2f}" for n, s in scores.items()), file=sys.stderr)
    t = cfg.train
    trained = (f"{preset}: {t.steps} steps of {t.batch_size} x {t.seq_len * t.segments}-byte examples "
               f"({t.segments} x {t.seq_len}), attention window {cfg.model.window}"
               + (f", starting from {t.init_from}" if t.init_from else ", from scratch"))
    return rows, trained


def print_tables(rows: list[tuple], args: argparse.Namespace, trained: list[str], runs: str) -> None:
    print(f"\npasskey: a {DIGITS}-digit key at a random depth of held-out text, asked at the end; {args.examples} "
          f"examples per length, read {args.call_len} bytes per call with the state carried; "
          f"{args.threads} thread{'s' * (args.threads != 1)} (fp32)")
    for line in trained:
        print("  " + line)
    head = f"{'model':<28}{'steps':>6}{'train s':>8}{'val_acc':>8}" + "".join(f"{n:>7}" for n in args.lengths)
    for title, pick, chance in (("all five digits right", lambda s: s.all_digits, 10.0 ** -DIGITS),
                                ("digits right (per digit)", lambda s: s.per_digit, 0.1)):
        print(f"\n{title}, by length in bytes")
        print(head + f"{'eval s':>8}")
        for label, steps, train_s, val_acc, scores, eval_s in rows:
            cells = "".join(f"{pick(scores[n]):>7.2f}" for n in args.lengths)
            print(f"{label:<28}{steps:>6}{train_s:>8.0f}{val_acc:>8.3f}{cells}{eval_s:>8.0f}")
        cell = f"{chance:>7.0e}" if chance < 0.01 else f"{chance:>7.2f}"
        print(f"{'chance':<28}{'':>6}{'':>8}{0.1:>8.3f}" + cell * len(args.lengths))
    print("\nval_acc: the fraction of answer digits right on held-out examples of the training length after "
          f"training (chance 0.1); {runs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="passkey,passkey-attention")
    ap.add_argument("--steps", type=int, default=0, help="0 = each preset's train.steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=lengths_arg, default=lengths_arg("1024,2048,4096,8192,16384"))
    ap.add_argument("--examples", type=int, default=20, help="examples per length")
    ap.add_argument("--call-len", type=int, default=256, help="bytes per model call at evaluation")
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation examples")
    ap.add_argument("--init", type=init_arg, default={}, metavar="PRESET=RUN_DIR,...",
                    help="fine-tune: start each named preset from that run's weights (e.g. a long-context model "
                         "trained on text by benchmarks/long_context.py --runs)")
    ap.add_argument("--runs", default="", help="keep the trained runs here (default: a temporary directory)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value for every preset")
    args = ap.parse_args()
    if args.steps < 0 or args.examples < 1 or args.call_len < 1:
        ap.error("--steps must be >= 0, --examples and --call-len >= 1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="passkey_") as temporary:
        runs = Path(args.runs or temporary)
        rows, trained = [], []
        for preset in args.presets.split(","):
            preset_rows, line = train_and_score(args, preset, runs)
            rows += preset_rows
            trained.append(line)
    print_tables(rows, args, trained, f"runs in {runs}" if args.runs else "runs not kept (--runs DIR keeps them)")


if __name__ == "__main__":
    main()
