"""Long context: does test-time memory pay when a whole file is read as one stream?

    python benchmarks/long_context.py [--seconds 600] [--variants default,long,...] [--max-files N]
                                      [--runs DIR] [--stats]

Each variant is trained for the same wall time (a few timed steps first, then as many steps as fit
in ``--seconds``; the cosine schedule ends there), then every held-out file of the default corpus
(the Python standard library) is read whole, in order, with the model state carried from call to
call (``neat eval --stream``): bits per byte overall and by position in the file, with test-time
learning on and, for the memory variants, off (the memory reads its initial weights only). The
same files compressed one by one with zlib -9, bz2 -9 and xz -9e give the reference row.

Variants: ``default`` (the tiny preset, full attention over 256 bytes, streamed with a 256-byte
window); ``long`` (the long preset: 64-byte window plus memory, random 4 x 256-byte windows, state
reset per window), ``long-2k`` (8 x 256-byte windows), ``long-stream`` (carried streams,
``data.sampling = "stream"``) and ``long-docs`` (carried state over episodes of 16 windows from a
document's first byte, ``data.sampling = "documents"``; ``long-docs-16k``: 64 windows); ``long-attention`` and
``long-attention-stream``, the same without memory. Run the variants one process at a time or give each process one thread: two processes of
two threads each on two cores slow each other down many times over.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import from_dict, load_config  # noqa: E402
from neatlm.nn.model import NeatLM  # noqa: E402
from neatlm.train.checkpoint import list_checkpoints, read_checkpoint  # noqa: E402
from neatlm.data.corpus import held_out_documents  # noqa: E402
from neatlm.train.stream import BUCKET_NAMES, compressor_bits_per_byte, stream_eval, streaming_model  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402

VARIANTS = {
    "default": ("tiny", []),
    "long-stream": ("long", ["data.sampling=stream", "memory.reset=never", "train.segments=1",
                             "train.batch_size=16"]),
    # carried state as long-stream, but each row reads a document from its first byte, 16 windows
    # (4 KB), and the state restarts with every new document: the regime streaming evaluation reads in
    "long-docs": ("long", ["data.sampling=documents", "memory.reset=never", "train.segments=1",
                           "train.batch_size=16"]),
    "long-docs-16k": ("long", ["data.sampling=documents", "data.episode_windows=64", "memory.reset=never",
                               "train.segments=1", "train.batch_size=16"]),
    "long": ("long", []),
    "long-2k": ("long", ["train.segments=8", "train.batch_size=2"]),
    # the same 1,024-byte windows as `long`, as one segment: the loss of a byte reaches the memory's
    # writes anywhere earlier in the window, which detached segments cut
    "long-1seg": ("long", ["train.segments=1", "train.seq_len=1024", "model.context=1024"]),
    "long-attention-stream": ("long-attention", ["data.sampling=stream", "memory.reset=never", "train.segments=1",
                                                 "train.batch_size=16"]),
    "long-attention": ("long-attention", []),
}
COMMON = ["train.progress=false", "train.device=cpu", "train.precision=fp32", "eval.every=0", "eval.batches=8"]


def seconds_per_step(preset: str, sets: list[str], probe_steps: int) -> float:
    probe = Trainer(load_config(preset, overrides=sets + ["train.steps=1000"]), run_dir=tempfile.mkdtemp())
    probe.train_step()  # warm up
    start = time.perf_counter()
    for _ in range(probe_steps):
        probe.train_step()
    return (time.perf_counter() - start) / probe_steps


def finished_run(run_dir: Path, steps: int) -> tuple[NeatLM, float, float] | None:
    """(model, training seconds, final val bpb) of a run already trained to ``steps`` in ``run_dir``
    (a rerun after a failed evaluation reuses it), else None."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    ckpt = read_checkpoint(found[-1])
    if ckpt.step != steps:
        return None
    model = NeatLM(from_dict(ckpt.config))
    model.load_state_dict(ckpt.states["model"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = max(r.get("elapsed_s", 0.0) for r in records)
    val = [r["val_bpb"] for r in records if "val_bpb" in r]
    return model, elapsed, val[-1] if val else math.nan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600.0, help="training wall time of each variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--probe-steps", type=int, default=5)
    ap.add_argument("--max-files", type=int, default=0, help="0 = every held-out file")
    ap.add_argument("--call-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stats", action="store_true", help="also gather the memories' inner loss along the files "
                    "(slower)")
    ap.add_argument("--runs", default="", help="keep the trained runs here (default: a temporary directory); "
                    "a rerun with the same --runs reuses its step plan and the runs it finished")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (allowed: {', '.join(VARIANTS)})")
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="long_context_"))

    # every step count is fixed from a probe before any training, so the probes run on a quiet
    # machine; the plan is kept with the runs, so a rerun reuses it and the runs it finished
    plan_file = runs / "plan.json"
    plans = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    for name in names:
        if name in plans:
            continue
        preset, extra = VARIANTS[name]
        per_step = seconds_per_step(preset, COMMON + extra, args.probe_steps)
        plans[name] = max(20, int(args.seconds / per_step))
        print(f"{name}: {per_step:.2f} s/step -> {plans[name]} steps", file=sys.stderr)
    runs.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(plans))

    docs = held_out_documents(load_config("tiny").data)
    if args.max_files:
        docs = docs[:args.max_files]
    rows, inner = [], {}
    for name in names:
        preset, extra = VARIANTS[name]
        steps = plans[name]
        cfg = load_config(preset, overrides=COMMON + extra + [
            f"train.steps={steps}", f"train.save_every={steps}", f"train.warmup_steps={min(100, steps // 10)}",
            f"train.run_dir={runs / name}"])
        done = finished_run(runs / name, steps)
        if done is None:
            trainer = Trainer(cfg, run_dir=runs / name)
            start = time.perf_counter()
            val_bpb = trainer.train()["val_bpb"]
            train_s, model = time.perf_counter() - start, trainer.model
        else:
            model, train_s, val_bpb = done
            print(f"{name}: reusing the finished run in {runs / name}", file=sys.stderr)
        model = streaming_model(model)
        tokens = steps * cfg.train.batch_size * cfg.train.seq_len * cfg.train.segments
        modes = (True, False) if cfg.memory.enabled else (True,)
        for learn in modes:
            start = time.perf_counter()
            result = stream_eval(model, docs, call_len=args.call_len, learn=learn,
                                 collect_stats=args.stats and cfg.memory.enabled and learn)
            bpb = result.bits_per_byte()
            label = name + ("" if not cfg.memory.enabled else (", TTL on" if learn else ", TTL off"))
            if result.stat_sums:
                inner[label] = result.memory_stats()
            rows.append((label, steps, tokens, train_s, val_bpb, bpb, time.perf_counter() - start))
            print(f"{label}: {steps} steps in {train_s:.0f} s, stream bpb {bpb['all']:.3f}", file=sys.stderr)

    total = sum(len(d) for d in docs)
    print(f"\nstreamed: {len(docs)} held-out stdlib files, {total:,} bytes, {args.call_len} bytes per call, state "
          f"carried; each variant trained ~{args.seconds:.0f} s on {args.threads} threads (fp32)")
    cols = ["all", *BUCKET_NAMES]
    print(f"{'model':<28}{'steps':>6}{'Mtok':>6}{'train s':>8}{'val':>7}" + "".join(f"{c:>8}" for c in cols)
          + f"{'eval s':>8}")
    for label, steps, tokens, train_s, val, bpb, eval_s in rows:
        cells = "".join(f"{bpb[c]:>8.3f}" if not math.isnan(bpb[c]) else f"{'-':>8}" for c in cols)
        print(f"{label:<28}{steps:>6}{tokens / 1e6:>6.1f}{train_s:>8.0f}{val:>7.3f}{cells}{eval_s:>8.0f}")
    for name, value in compressor_bits_per_byte(docs).items():
        print(f"{name + ' (per file)':<28}{'':>6}{'':>6}{'':>8}{'':>7}{value:>8.3f}")
    print(f"\nbits per byte; 'val' = validation windows after training; runs in {runs}")
    if inner:
        print("\nthe memories along a file (TTL on; mean over layers and the calls starting in each bucket): "
              "inner_loss_before = the loss on a chunk before the memory learns from it; forget = the "
              "forgetting gate")
        print(f"{'model':<28}{'statistic':<20}" + "".join(f"{c:>8}" for c in BUCKET_NAMES))
        for label, stats in inner.items():
            for stat, short in (("inner_loss_before", "inner_loss_before"), ("inner_loss_after", "inner_loss_after"),
                                ("forget_gate_mean", "forget")):
                cells = "".join(f"{v:>8.3f}" if not math.isnan(v) else f"{'-':>8}" for v in stats[stat].values())
                print(f"{label:<28}{short:<20}{cells}")


if __name__ == "__main__":
    main()
