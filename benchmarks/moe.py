"""Sparse MoE benchmark: time and saved-activation bytes of the MoE layer, forward + backward.

    .venv/bin/python benchmarks/moe.py [--threads 1] [--repeats 5] [--tokens 2048] [--dim 128]

Variants (same weights, same routing, float32):
  sparse autograd      tokens sorted by expert once, one SwiGLU per expert on its slice, autograd
  sparse + checkpoint  sparse autograd inside torch.utils.checkpoint (stock recompute)
  dense all experts    every expert on every token, unselected experts masked (the reference)
Saved bytes: every tensor autograd saves for backward during the forward, counted once per
storage through torch.autograd.graph.saved_tensors_hooks, parameters excluded. For the checkpoint
variant the hooks see only what checkpoint itself keeps outside its recomputed region.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.nn.moe import MoE  # noqa: E402


class SavedBytes:
    """Context manager: bytes of the distinct storages autograd saves, parameters excluded."""

    def __init__(self, exclude):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude:
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def run(variant: str, m: MoE, x: torch.Tensor, g: torch.Tensor, repeats: int):
    params = list(m.parameters())
    if variant == "sparse autograd":
        f = m
    elif variant == "sparse + checkpoint":
        f = lambda x: checkpoint(m, x, use_reentrant=False)  # noqa: E731
    else:
        f = m.dense_reference
    fwd, bwd = [], []
    for i in range(repeats + 1):
        xx = x.detach().requires_grad_()
        with SavedBytes(params) as sb:
            t0 = time.perf_counter()
            y = f(xx)
            t1 = time.perf_counter()
        grads = torch.autograd.grad((y * g).sum(), [xx, *params], allow_unused=True)
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3, sb.total, y.detach(), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048, help="batch x time")
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hidden = 16 * round(8 / 3 * args.dim / 16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.tokens} tokens, dim {args.dim}, "
          f"expert hidden {hidden}, float32, load average at start {os.getloadavg()[0]:.2f}")
    hdr = (f"{'E':>3} {'k':>2} {'cap':>4} {'variant':<20} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} "
           f"{'saved MiB':>10} {'max|dy|':>8} {'grad err':>9}")
    print(hdr)
    print("-" * len(hdr))
    for experts, k, cap in [(4, 1, 0.0), (4, 2, 0.0), (8, 2, 0.0), (8, 2, 1.25)]:
        torch.manual_seed(0)
        m = MoE(args.dim, hidden, experts=experts, top_k=k, capacity_factor=cap)
        x = torch.randn(args.tokens // 256, 256, args.dim)
        g = torch.randn_like(x)
        ref = None
        for variant in ("sparse autograd", "sparse + checkpoint", "dense all experts"):
            fms, bms, nbytes, y, grads = run(variant, m, x, g, args.repeats)
            if ref is None:
                ref = (y, grads)
            dy = (y - ref[0]).abs().max().item()
            err = max(((a - r).norm() / r.norm()).item() for a, r in zip(grads, ref[1]) if r is not None)
            print(f"{experts:>3} {k:>2} {cap:>4} {variant:<20} {fms:8.2f} {bms:8.2f} {fms + bms:9.2f} "
                  f"{nbytes / 2**20:10.2f} {dy:8.1e} {err:9.1e}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f} (a shared machine: values above the thread count "
          f"mean other work competed for the cores)")


if __name__ == "__main__":
    main()
