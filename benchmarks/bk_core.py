"""BK-Core benchmark: the exact O(N) backward against autograd, at N in {128, 512, 2048}, batch 8.

    .venv/bin/python benchmarks/bk_core.py [--threads 1] [--repeats 5] [--sizes 128,512,2048]

One table from one run. For every N and mode (full resolvent, causal):
  exact c128 / c64 / mixed   our op (recursive scans + hand-written O(N) backward) per precision
  autograd(loop)             autograd through the plain ratio-form Python loop over N (the baseline
                             of the >= 50x target); complex128
  autograd(fast fwd)         autograd through our own vectorised forward (no custom backward)
  autograd(inv)              autograd through dense torch.linalg.inv (full mode only); O(N^3), so
                             at N >= 2048 it runs at batch 1 (marked "b=1") instead of 8
  diag-only (blend=1)        the original project's diagonal-only gradient (grad_blend=1): same
                             cost as exact, shown for its gradient error only
Gradient error: max over v, b, c, z of ||g - g_ref|| / ||g_ref||, g_ref = autograd through the
loop in complex128 (itself checked against linalg.inv in tests); "cos" is the cosine of the v
gradient to g_ref. Times are medians in ms (forward includes building the autograd graph).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.ops.bk_resolvent import (bk_resolvent_diag, bk_resolvent_diag_reference, ratio_scan,  # noqa: E402
                                     ratio_scan_loop)

F64, C128 = torch.float64, torch.complex128


def fast_forward_autograd(v, b, c, z, causal):
    """Our vectorised forward written with plain differentiable ops (no custom backward)."""
    alpha = v.to(C128) - z.unsqueeze(-1)
    beta = (b * c).to(C128)
    if causal:
        return 1 / ratio_scan(alpha, beta)
    both = ratio_scan(torch.stack((alpha, alpha.flip(-1))), torch.stack((beta, beta.flip(-1))))
    return 1 / (both[0] + both[1].flip(-1) - alpha)


# ----------------------------------------------------------------------------- scan algorithms compared
# The op uses the odd-even recursion (neatlm.ops.bk_resolvent.ratio_scan). Two alternatives, kept
# here only to measure them against it: a blocked scan and a Hillis-Steele (doubling) scan of the
# same 2x2 Moebius maps x -> alpha_k - beta_{k-1} / x.

def ratio_scan_blocked(alpha, beta):
    """Blocks of L ~ sqrt(N): compose each block's maps (L steps, all blocks at once), carry the
    value across blocks (N/L steps), then rerun the ratio step inside every block (L steps)."""
    n = alpha.shape[-1]
    L = max(1, int(n ** 0.5))
    C = -(-n // L)
    pad = C * L - n
    a = torch.nn.functional.pad(alpha, (0, pad), value=1.0)
    q = torch.nn.functional.pad(torch.cat((torch.zeros_like(alpha[..., :1]), beta), -1), (0, pad))
    a = a.reshape(*a.shape[:-1], C, L).movedim(-1, 0)       # (L, ..., C)
    q = q.reshape(*q.shape[:-1], C, L).movedim(-1, 0)       # q_k = beta_{k-1}
    m00, m01 = torch.ones_like(a[0]), torch.zeros_like(a[0])
    m10, m11 = torch.zeros_like(a[0]), torch.ones_like(a[0])
    for l in range(L):                                       # block maps: [a -q; 1 0] @ M
        m00, m01, m10, m11 = a[l] * m00 - q[l] * m10, a[l] * m01 - q[l] * m11, m00, m01
        sc = torch.maximum(m00.abs(), m10.abs()).clamp_min(1e-300).reciprocal()
        m00, m01, m10, m11 = m00 * sc, m01 * sc, m10 * sc, m11 * sc
    # the value entering block c is the last value of block c-1; block 0 starts from q = 0
    x0 = torch.ones_like(a[0][..., 0])
    x1 = torch.zeros_like(x0)                               # the vector (1, 0) is "infinity"
    d_in = torch.empty_like(a[0])
    d_in[..., 0] = 1.0
    for c in range(C - 1):
        x0, x1 = m00[..., c] * x0 + m01[..., c] * x1, m10[..., c] * x0 + m11[..., c] * x1
        d_in[..., c + 1] = x0 / x1
    out = torch.empty_like(a)
    d = d_in
    for l in range(L):
        d = a[l] - q[l] / d
        out[l] = d
    return out.movedim(0, -1).reshape(*alpha.shape[:-1], C * L)[..., :n]


def ratio_scan_doubling(alpha, beta):
    """Hillis-Steele: log2 N rounds, each composing every prefix with the one 2^r to its left."""
    n = alpha.shape[-1]
    p = alpha.clone()
    q = torch.cat((torch.zeros_like(alpha[..., :1]), -beta), -1)
    r = torch.ones_like(alpha)
    s_ = torch.zeros_like(alpha)
    step = 1
    while step < n:
        P = p[..., step:] * p[..., :-step] + q[..., step:] * r[..., :-step]
        Q = p[..., step:] * q[..., :-step] + q[..., step:] * s_[..., :-step]
        R = r[..., step:] * p[..., :-step] + s_[..., step:] * r[..., :-step]
        S = r[..., step:] * q[..., :-step] + s_[..., step:] * s_[..., :-step]
        sc = torch.view_as_real(torch.stack((P, Q, R, S))).abs().amax((0, -1)).reciprocal()
        p = torch.cat((p[..., :step], P * sc), -1)
        q = torch.cat((q[..., :step], Q * sc), -1)
        r = torch.cat((r[..., :step], R * sc), -1)
        s_ = torch.cat((s_[..., :step], S * sc), -1)
        step *= 2
    return p / r


def scan_table(sizes, batch, repeats):
    print(f"\nratio scan d_k alone (the op's forward, both directions stacked: shape (2, {batch}, N)), complex128")
    hdr = f"{'N':>5} {'algorithm':<22} {'ms':>8} {'max rel diff to loop':>21}"
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        g = torch.Generator().manual_seed(1)
        alpha = torch.complex(torch.randn(2, batch, n, generator=g, dtype=F64) * 2,
                              -(torch.rand(2, batch, n, generator=g, dtype=F64) + 0.1))
        beta = (torch.rand(2, batch, n - 1, generator=g, dtype=F64) + 0.04).to(C128)
        ref = ratio_scan_loop(alpha, beta)
        for name, fn in [("loop", ratio_scan_loop), ("blocked (sqrt N)", ratio_scan_blocked),
                         ("Hillis-Steele", ratio_scan_doubling), ("odd-even (the op)", ratio_scan)]:
            fn(alpha, beta)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = fn(alpha, beta)
                ts.append(time.perf_counter() - t0)
            diff = ((out - ref).abs() / ref.abs()).max().item()
            print(f"{n:>5} {name:<22} {statistics.median(ts) * 1e3:8.2f} {diff:21.1e}", flush=True)


def inputs(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, n, generator=g, dtype=F64) * 2
    b = torch.rand(batch, n - 1, generator=g, dtype=F64) + 0.2
    c = torch.rand(batch, n - 1, generator=g, dtype=F64) + 0.2
    z = torch.complex(torch.randn(batch, generator=g, dtype=F64), torch.rand(batch, generator=g, dtype=F64) + 0.1)
    wr = torch.randn(batch, n, generator=g, dtype=F64)
    wi = torch.randn(batch, n, generator=g, dtype=F64)
    return [t.requires_grad_() for t in (v, b, c, z)], (wr, wi)


def measure(fn, args, w, repeats):
    """Median forward and backward times (ms) and the gradients of L = <Re G, wr> + <Im G, wi>."""
    fwd, bwd, grads = [], [], None
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        G = fn(*args)
        L = (G.real.double() * w[0] + G.imag.double() * w[1]).sum()
        t1 = time.perf_counter()
        grads = torch.autograd.grad(L, args)
        t2 = time.perf_counter()
        if i:  # the first run warms up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3, grads


def grad_err(g, ref):
    return max(((a.to(r.dtype) - r).norm() / r.norm()).item() for a, r in zip(g, ref))


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sizes", default="128,512,2048")
    ap.add_argument("--inv-max-batched", type=int, default=1024,
                    help="largest N at which autograd(inv) runs at the full batch; above, batch 1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"repeats {args.repeats}, load average at start {os.getloadavg()[0]:.2f}")
    hdr = (f"{'N':>5} {'mode':<7} {'method':<20} {'fwd ms':>9} {'bwd ms':>9} {'bwd speedup':>12} "
           f"{'grad err':>9} {'cos(v)':>7}")
    print(hdr)
    print("-" * len(hdr))
    for n in [int(s) for s in args.sizes.split(",")]:
        for causal in (False, True):
            mode = "causal" if causal else "full"
            (v, b, c, z), w = inputs(args.batch, n)
            xs = (v, b, c, z)
            def loop(v, b, c, z, causal=causal):
                return bk_resolvent_diag_reference(v, b, c, z, causal=causal, method="loop")

            reps_slow = max(1, min(args.repeats, 3))
            f_loop, b_loop, g_ref = measure(loop, xs, w, reps_slow)
            rows = []
            for prec in ("complex128", "complex64", "mixed"):
                f = lambda v, b, c, z, p=prec: bk_resolvent_diag(v, b, c, z, causal=causal, precision=p)  # noqa: E731
                rows.append((f"exact {prec.replace('complex', 'c')}",) + measure(f, xs, w, args.repeats))
            rows.append(("autograd(loop)", f_loop, b_loop, g_ref))
            fast = lambda v, b, c, z: fast_forward_autograd(v, b, c, z, causal)  # noqa: E731
            rows.append(("autograd(fast fwd)",) + measure(fast, xs, w, args.repeats))
            if not causal:
                if n <= args.inv_max_batched:
                    inv = lambda v, b, c, z: bk_resolvent_diag_reference(v, b, c, z, method="inv")  # noqa: E731
                    rows.append(("autograd(inv)",) + measure(inv, xs, w, reps_slow))
                else:
                    (v1, b1, c1, z1), w1 = inputs(1, n)
                    inv = lambda v, b, c, z: bk_resolvent_diag_reference(v, b, c, z, method="inv")  # noqa: E731
                    fi, bi, gi = measure(inv, (v1, b1, c1, z1), w1, 1)
                    _, _, g1 = measure(loop, (v1, b1, c1, z1), w1, 1)
                    rows.append(("autograd(inv) b=1", fi, bi, ("b=1", grad_err(gi, g1), cos(gi[0], g1[0]))))
                fb = lambda v, b, c, z: bk_resolvent_diag(v, b, c, z, causal=causal, grad_blend=1.0)  # noqa: E731
                _, _, gb = measure(fb, xs, w, 1)
                rows.append(("diag-only (blend=1)", float("nan"), float("nan"), gb))
            for name, fms, bms, g in rows:
                if isinstance(g, tuple) and g and g[0] == "b=1":
                    err, cv = g[1], g[2]
                else:
                    err, cv = grad_err(g, g_ref), cos(g[0], g_ref[0])
                speed = f"{b_loop / bms:10.1f}x" if bms == bms else f"{'-':>11}"
                ft = f"{fms:9.2f}" if fms == fms else f"{'-':>9}"
                bt = f"{bms:9.2f}" if bms == bms else f"{'-':>9}"
                print(f"{n:>5} {mode:<7} {name:<20} {ft} {bt} {speed:>12} {err:9.1e} {cv:7.4f}", flush=True)
    scan_table([int(s) for s in args.sizes.split(",")], args.batch, args.repeats)
    print(f"load average at end {os.getloadavg()[0]:.2f} (a shared machine: values above the thread count "
          f"mean other work competed for the cores)")


if __name__ == "__main__":
    main()
