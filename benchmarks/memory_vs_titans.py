"""neatlm NeuralMemory against titans-pytorch's NeuralMemory, at equal work, on CPU.

    .venv/bin/pip install titans-pytorch        # the peer, benchmark only
    .venv/bin/python benchmarks/memory_vs_titans.py [--repeats 3] [--rounds 2] [--threads 2] [--skip neatlm-func]

Workload (issue 3): dim 256, one head, depth-2 MLP memory with expansion 4 (LayerNorm on the branch and
a residual, the peer's default memory model), momentum and forgetting, chunk 64, re-linearising every
chunk (``batch_size=64`` on the peer's side), per-token inner gradient norm capped at 1 on both sides,
max inner lr 0.1, input 4 x 1024 x 256 of N(0, 1), ``torch.set_num_threads(2)`` (``--threads``).

Rows: neatlm (analytic inner gradients, chunk-parallel, fused chunk step with its hand-written
backward); neatlm-autograd (the same analytic forward, outer backward by autograd); neatlm-func (the
same layer and semantics with the inner gradients from ``vmap(grad(...))`` per token, as the peer
does them; each chunk's per-token gradients are recomputed in the backward, since keeping them all
needs ~21 GB); and
titans-pytorch. Each measurement runs in a fresh subprocess so that its peak RSS (above the RSS after
setup) is its own. Times are the minimum over ``--repeats`` runs in each of ``--rounds`` passes (the
first run includes warm-up); peaks the maximum.
The FLOP column is the matrix-multiply work the layer must do (counted below, the same for every
row: the peer's is at least this); GFLOP/s and "% of matmul" use our time and the fp32 matmul rate
measured in the same run. The machine may be shared: rerun when the load is high.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from neatlm.hw_profile import matmul_gflops

DIM, HEADS, CHUNK, DEPTH, EXPANSION = 256, 1, 64, 2, 4.0
BATCH, SEQ = 4, 1024
MAX_LR, MAX_GRAD_NORM = 0.1, 1.0


# ----------------------------------------------------------------------------- FLOP count

def count_flops(batch=BATCH, seq=SEQ, dim=DIM, chunk=CHUNK, expansion=EXPANSION) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward; backward ~= 2x forward."""
    dh, hid = dim // HEADS, int(dim * expansion)
    layers = [(dh, hid), (hid, dh)]                      # (in, out) of W1, W2
    n_chunks = seq // chunk
    per_chunk = 0.0
    for fan_in, fan_out in layers:
        per_chunk += 2 * (2 * chunk) * fan_in * fan_out  # forward of [keys; queries]
        per_chunk += 2 * chunk * fan_in * fan_out        # weight gradient sum (one GEMM)
    for fan_in, fan_out in layers[1:]:
        per_chunk += 2 * chunk * fan_in * fan_out        # backprop of the deltas into the layer below
    inner = per_chunk * n_chunks * batch * HEADS
    proj = 4 * 2 * batch * seq * dim * dim               # q, k, v, out
    fwd = inner + proj
    return {"inner": inner, "proj": proj, "fwd": fwd, "fwdbwd": 3 * fwd}


def matmul_rate(threads: int) -> float:
    """Best fp32 GFLOP/s of a 2048^3 matmul on this machine, now (as `neat hw` measures it)."""
    torch.set_num_threads(threads)
    return matmul_gflops(torch.device("cpu"), "fp32", 2048)


# ----------------------------------------------------------------------------- the implementations

def _func_inner_grads(weights, x, n_k, v, coef, norm, max_grad_norm):
    """Drop-in for neatlm.ops.memory.chunk.inner_grads using torch.func per-token gradients."""
    from torch.func import grad, vmap

    from neatlm.ops.memory import memory_forward
    y = memory_forward(weights, x[..., n_k:, :], norm)
    lead = weights[0].shape[:-2]
    ws = [w.reshape(-1, *w.shape[-2:]) for w in weights]
    k = x[..., :n_k, :].reshape(-1, n_k, x.shape[-1])
    vv = v.reshape(-1, n_k, v.shape[-1])
    c = coef.reshape(-1, n_k)

    def loss(ws_one, k_t, v_t):
        return ((memory_forward(ws_one, k_t.unsqueeze(0), norm)[0] - v_t) ** 2).sum()

    def summed(c, k, vv, *ws):
        per_token = vmap(vmap(grad(loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))(list(ws), k, vv)  # (N, R, o, i)
        if max_grad_norm > 0:
            gnorm = torch.sqrt(sum(g.pow(2).sum((-2, -1)) for g in per_token) + 1e-30)
            c = c * (max_grad_norm / torch.clamp(gnorm, min=max_grad_norm))
        return tuple(torch.einsum("nr,nroi->noi", c, g) for g in per_token)

    # the per-token gradients (a weight copy per token) would all be kept for the backward: 1.3 GB per
    # chunk here, 21 GB in all, more than this machine has; so each chunk's is recomputed (checkpoint)
    if torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint
        sums = checkpoint(summed, c, k, vv, *ws, use_reentrant=True)
    else:
        sums = summed(c, k, vv, *ws)
    return y, [g.reshape(*lead, *g.shape[-2:]) for g in sums]


def build(impl: str):
    torch.manual_seed(0)
    if impl == "titans":
        from titans_pytorch import NeuralMemory as TitansMemory
        mem = TitansMemory(dim=DIM, chunk_size=CHUNK, batch_size=CHUNK, heads=HEADS, dim_head=DIM // HEADS,
                           default_step_transform_max_lr=MAX_LR, max_grad_norm=MAX_GRAD_NORM,
                           default_model_kwargs=dict(depth=DEPTH, expansion_factor=EXPANSION))
        return lambda x: mem(x)[0], mem
    import neatlm.ops.memory.chunk as chunk
    from neatlm.nn.memory import NeuralMemory
    if impl == "neatlm-func":  # inner gradients by vmap(grad) instead of the analytic recursion
        chunk.inner_grads = _func_inner_grads
    mode = "chunk" if impl == "neatlm" else "autograd"   # autograd: no hand-written outer backward
    mem = NeuralMemory(DIM, heads=HEADS, dim_head=DIM // HEADS, chunk_size=CHUNK, depth=DEPTH, expansion=EXPANSION,
                       norm=True, residual=True, max_lr=MAX_LR, max_grad_norm=MAX_GRAD_NORM, mode=mode)
    return lambda x: mem(x)[0], mem


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, mode: str, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    fn, mem = build(impl)
    x = torch.randn(BATCH, SEQ, DIM)
    base = _rss_bytes()
    times = []
    for _ in range(repeats):
        mem.zero_grad(set_to_none=True)
        t = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                y = fn(x)
        else:
            y = fn(x)
            y.float().pow(2).mean().backward()
        times.append(time.perf_counter() - t)
        finite = bool(torch.isfinite(y).all())
        del y
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"impl": impl, "mode": mode, "time": min(times), "times": times, "peak": peak, "finite": finite}


def run_worker(impl, mode, repeats, threads) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, mode, "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"impl": impl, "mode": mode, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per subprocess (min is kept)")
    ap.add_argument("--rounds", type=int, default=2, help="passes over all implementations (min is kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"))
    ap.add_argument("--skip", default="", help="comma-separated implementations to leave out")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats, args.threads)))
        return
    flops = count_flops()
    rate = matmul_rate(args.threads)
    impls = [i for i in ("neatlm", "neatlm-autograd", "neatlm-func", "titans") if i not in args.skip.split(",")]
    res: dict = {}
    for _ in range(args.rounds):        # rounds interleave the implementations: a burst of load from
        for i in impls:                 # another process then hits one round, not one implementation
            for m in ("fwdbwd", "fwd"):
                r = run_worker(i, m, args.repeats, args.threads)
                old = res.get((i, m))
                if old is None or "error" in old or ("time" in r and r["time"] < old["time"]):
                    if old is not None and "peak" in old and "peak" in r:
                        r["peak"] = max(r["peak"], old["peak"])
                    res[(i, m)] = r
                elif "peak" in r and "peak" in old:
                    old["peak"] = max(r["peak"], old["peak"])
    rate_after = matmul_rate(args.threads)
    print(f"workload: dim {DIM}, heads {HEADS}, MLP depth {DEPTH} x{EXPANSION:g}, chunk {CHUNK}, input {BATCH}x{SEQ}, "
          f"{args.threads} threads, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}")
    print(f"matmul FLOPs: forward {flops['fwd'] / 1e9:.1f} GFLOP (inner memory {flops['inner'] / 1e9:.1f}, "
          f"projections {flops['proj'] / 1e9:.1f}); forward+backward {flops['fwdbwd'] / 1e9:.1f} GFLOP")
    print(f"fp32 matmul rate (2048^3): {rate:.1f} GFLOP/s before, {rate_after:.1f} after; "
          f"floor at that rate: fwd+bwd {flops['fwdbwd'] / 1e9 / max(rate, rate_after):.2f} s\n")
    hdr = f"| {'implementation':<22} | {'fwd+bwd s':>9} | {'fwd s':>7} | {'peak MB fwd+bwd':>15} | {'peak MB fwd':>11} | " \
          f"{'GFLOP/s fwd+bwd':>15} | {'% matmul':>8} | {'vs titans fwd+bwd / fwd':>23} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    tit = res.get(("titans", "fwdbwd")), res.get(("titans", "fwd"))
    for impl in impls:
        fb, f = res[(impl, "fwdbwd")], res[(impl, "fwd")]
        if "error" in fb or "error" in f:
            print(f"| {impl:<22} | error: {fb.get('error') or f.get('error')}")
            continue
        gfs = flops["fwdbwd"] / fb["time"] / 1e9
        speed = "-"
        if tit[0] and "time" in tit[0] and "time" in tit[1]:
            speed = f"{tit[0]['time'] / fb['time']:.1f}x / {tit[1]['time'] / f['time']:.1f}x"
        print(f"| {impl:<22} | {fb['time']:>9.2f} | {f['time']:>7.2f} | {fb['peak'] / 2**20:>15.0f} | "
              f"{f['peak'] / 2**20:>11.0f} | {gfs:>15.1f} | {100 * gfs / max(rate, rate_after):>7.0f}% | {speed:>23} |")
    bad = [k for k, v in res.items() if "finite" in v and not v["finite"]]
    if bad:
        print(f"\nnon-finite outputs: {bad}")


if __name__ == "__main__":
    main()
