"""Activation memory vs step time for the checkpointing policies, measured in one run.

    python benchmarks/activation_memory.py                 # default model (Config() = tiny preset)
    python benchmarks/activation_memory.py --batch 8 --rounds 5 --budgets 0.7,0.4

Rows: none, selective, full, and one budget-chosen plan per fraction in --budgets (the budget is
that fraction of the measured "none" bytes; the plan comes from choose_checkpointing's probes).
Columns:

- saved MiB: bytes autograd keeps for backward after the forward + loss, measured with
  saved_tensors_hooks (plus the selective cache), parameters excluded
- peak RSS: VmHWM of a fresh subprocess that builds the model and runs --rss-steps steps of
  that policy (so rows do not share an allocator high-water mark); "+steps" is the growth over
  the same process's RSS just before its first step
- step ms: forward + backward + AdamW step, per step, over --rounds interleaved rounds
  (policies alternate within a round, so background load hits all rows alike). "cpu ms" is
  the process CPU time (time.process_time: all threads' work, barely moved by other processes
  on a shared machine), fastest round; "wall ms" is the median wall-clock time. "vs none"
  compares cpu ms (wall ms with --wall)

The last lines say which rows meet each of TARGETS (a fraction of activation memory saved at
no more than a fraction of step time added) on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from neatlm.config import Config
from neatlm.grad.checkpointing import apply_checkpointing, choose_checkpointing, measure_activations, remove_checkpointing
from neatlm.nn.model import NeatLM


# ----------------------------------------------------------------------------- model

#: (activation memory saved, at most this much step time added), as fractions of "none"
TARGETS = ((0.30, 0.10), (0.60, 0.25))


def build_model(args):
    """The project's default model (``Config()``), resized by --dim / --layers / --memory."""
    cfg = Config()
    if args.layers:
        cfg.model.n_layers = args.layers
    if args.dim:
        cfg.model.dim = args.dim
    if args.memory:
        cfg.memory.enabled = True
    torch.manual_seed(0)
    return NeatLM(cfg), f"NeatLM(Config()) dim={cfg.model.dim} layers={cfg.model.n_layers}" + \
        (" +memory" if args.memory else "")


# ----------------------------------------------------------------------------- measurement

def make_step_fn(args):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)

    def step_fn(model):
        logits, _, _, _ = model(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx[:, 1:].reshape(-1))

    return step_fn


def train_step(model, opt, step_fn):
    step_fn(model).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def peak_rss_kib() -> int:
    """High-water RSS of this process image (VmHWM; ru_maxrss would carry the parent's over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes, others: KiB


def rss_child(args, plan):
    """Run in a subprocess: build, apply the plan, report RSS before and after some steps."""
    torch.set_num_threads(args.threads)
    model, _ = build_model(args)
    step_fn = make_step_fn(args)
    apply_checkpointing(model, plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    base = peak_rss_kib()
    for _ in range(args.rss_steps):
        train_step(model, opt, step_fn)
    print(json.dumps({"base_kib": base, "peak_kib": peak_rss_kib()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dim", type=int, default=0, help="0 = the config default")
    ap.add_argument("--layers", type=int, default=0, help="0 = the config default")
    ap.add_argument("--memory", action="store_true", help="enable the memory branch in every block")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per policy per round")
    ap.add_argument("--rss-steps", type=int, default=3)
    ap.add_argument("--budgets", default="0.7,0.4", help="budget fractions of the 'none' bytes")
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--no-rss", action="store_true", help="skip the per-policy RSS subprocesses")
    ap.add_argument("--wall", action="store_true", help="compare median wall time instead of CPU time")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return rss_child(args, json.loads(args._child))

    torch.set_num_threads(args.threads)
    model, desc = build_model(args)
    step_fn = make_step_fn(args)
    n = len(model.blocks)
    blocks = [f"blocks.{i}" for i in range(n)]
    plans: dict[str, dict[str, str]] = {p: {b: p for b in blocks} for p in ("none", "selective", "full")}
    none_bytes = measure_activations(model, step_fn, "none").total
    for frac in [float(f) for f in args.budgets.split(",") if f]:
        plan = choose_checkpointing(model, step_fn, int(frac * none_bytes))
        counts = "/".join(str(sum(v == p for v in plan.policies.values())) for p in ("none", "selective", "full"))
        plans[f"budget {frac:.0%} ({counts} n/s/f)"] = plan.policies
    saved = {name: measure_activations(model, step_fn, plan).total for name, plan in plans.items()}

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in plans}
    cpu: dict[str, list[float]] = {name: [] for name in plans}
    for name, plan in plans.items():  # warm-up, one step each
        apply_checkpointing(model, plan)
        train_step(model, opt, step_fn)
    for _ in range(args.rounds):
        for name, plan in plans.items():
            apply_checkpointing(model, plan)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                train_step(model, opt, step_fn)
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
    remove_checkpointing(model)

    rss = {}
    if not args.no_rss:
        for name, plan in plans.items():
            cmd = [sys.executable, __file__, "--_child", json.dumps(plan)] + [
                a for a in sys.argv[1:] if a != "--no-rss"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rss[name] = json.loads(out)

    print(f"model: {desc}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; batch {args.batch} x "
          f"{args.seq} tokens; torch {torch.__version__}, {args.threads} threads; "
          f"{args.rounds} interleaved rounds x {args.steps} steps")
    def key_time(name):
        return statistics.median(times[name]) if args.wall else min(cpu[name])

    base_t = key_time("none")
    hdr = (f"| {'policy':<28} | {'saved MiB':>9} | {'vs none':>7} | {'peak RSS MiB':>12} | {'+steps MiB':>10} | "
           f"{'cpu ms':>7} | {'wall ms':>7} | {'vs none':>7} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    rows = []
    for name in plans:
        t = key_time(name)
        less = 1 - saved[name] / saved["none"]
        more = t / base_t - 1
        rows.append((name, less, more))
        r = rss.get(name)
        peak = f"{r['peak_kib'] / 1024:.0f}" if r else "-"
        grow = f"{(r['peak_kib'] - r['base_kib']) / 1024:.0f}" if r else "-"
        print(f"| {name:<28} | {saved[name] / 2**20:>9.1f} | {-less:>+7.0%} | {peak:>12} | {grow:>10} | "
              f"{min(cpu[name]) * 1e3:>7.0f} | {statistics.median(times[name]) * 1e3:>7.0f} | {more:>+7.0%} |")
    for need, allow in TARGETS:
        ok = [f"{name} ({-less:+.0%} memory, {more:+.0%} time)" for name, less, more in rows
              if less >= need and more <= allow]
        print(f"target >= {need:.0%} less at <= {allow:.0%} more time: " + ("; ".join(ok) if ok else "not met"))


if __name__ == "__main__":
    main()
