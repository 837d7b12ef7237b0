"""Each memory variant's training step against its own FLOP floor (issue 16, item 1), one run, CPU.

    OMP_NUM_THREADS=2 python benchmarks/memory_variants.py --threads 2 [--rounds 5] [--warmup 3]
        [--batch 16] [--seq 256] [--chunk 32] [--variants titans,omega,...] [--quick]

Model: the tiny preset (dim 128, 4 layers, 4 attention heads), fp32, train.batch_size x seq_len =
--batch x --seq; every memory variant is MAG beside 64-token sliding-window attention with 4 memory
heads (dim_head 32) and chunk --chunk (32, as benchmarks/ttl_ablation.py). Variants (config keys):

- attention:   the tiny preset as it is (full causal attention, no memory): the "vs attention" base
- swa-64:      model.window = 64, no memory
- titans:      memory.enabled (MLP depth 2 x2, momentum SGD, one-token objective)
- omega:       + memory.objective = omega, memory.omega_window = 4
- poly:        + memory.features = poly, memory.poly_degree = 2
- muon:        + memory.optimizer = muon (memory.ns_steps = 5)
- atlas:       omega + poly + muon (as the mqar-atlas preset)
- atlas-16:    atlas with 8 memory heads of 16 (the same inner width, degree-2 keys of 152)
- linear:      memory.function = linear (one fast-weight matrix)
- mac:         memory.combine = mac

Columns: fwd+bwd ms (model forward + lm_loss + backward, fastest of --rounds interleaved rounds
after --warmup untimed steps per variant; gradients set to None between steps, no optimiser);
saved MB (bytes autograd keeps for backward after forward + loss, parameters excluded, measured
with saved_tensors_hooks by neatlm.grad.checkpointing.measure_activations); the FLOP floor (the
matrix-multiply work the step must do, :func:`count_flops`); the time that work takes at the fp32
matmul rate measured in this run (best 2048^3 GEMM, before and after the rounds); "% of floor" =
floor ms / measured ms (100% = every FLOP at GEMM speed); "vs attention" = measured ms / the
attention row's; "memory % of floor" = the same for the memory's own part: (floor ms - swa-64's) /
(measured ms - swa-64's), swa-64 being the same trunk without the memory. A variant the memory
size guard refuses is retried with a smaller memory.dim_head (printed in its config column).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.hw_profile import matmul_gflops  # noqa: E402
from neatlm.config import Config, ConfigError, load_config  # noqa: E402
from neatlm.grad.checkpointing import measure_activations  # noqa: E402
from neatlm.nn.loss import lm_loss  # noqa: E402
from neatlm.nn.memory import memory_shapes  # noqa: E402
from neatlm.nn.model import NeatLM, swiglu_hidden  # noqa: E402

MEMORY = ["memory.enabled=true", "model.window=64", "memory.heads=4"]
VARIANTS: dict[str, list[str]] = {
    "attention": [],
    "swa-64": ["model.window=64"],
    "titans": MEMORY,
    "omega": MEMORY + ["memory.objective=omega", "memory.omega_window=4"],
    "poly": MEMORY + ["memory.features=poly", "memory.poly_degree=2"],
    "muon": MEMORY + ["memory.optimizer=muon", "memory.ns_steps=5"],
    "atlas": MEMORY + ["memory.objective=omega", "memory.omega_window=4", "memory.features=poly",
                       "memory.poly_degree=2", "memory.optimizer=muon", "memory.ns_steps=5"],
    # the same Atlas at half the head width (8 heads of 16: degree-2 keys of 152 instead of 560)
    "atlas-16": MEMORY + ["memory.heads=8", "memory.dim_head=16", "memory.objective=omega", "memory.omega_window=4",
                          "memory.features=poly", "memory.poly_degree=2", "memory.optimizer=muon", "memory.ns_steps=5"],
    "linear": MEMORY + ["memory.function=linear"],
    "mac": MEMORY + ["memory.combine=mac"],
}
BASE = ["train.device=cpu", "train.precision=fp32", "train.progress=false", "eval.every=0"]


# ----------------------------------------------------------------------------- FLOP count

def _attention_pairs(seq: int, window: int) -> int:
    """(query, key) pairs causal attention must score: query t sees min(t + 1, window) keys."""
    w = window if window > 0 else seq
    return sum(min(t + 1, w) for t in range(seq))


def _ns_flops(o: int, i: int, steps: int) -> int:
    """Quintic Newton-Schulz on one (o, i) matrix: per step A = X X^T, A @ A, (b A + c A^2) @ X
    with X (m, n), m = min(o, i): 2 m^2 n + 2 m^3 + 2 m^2 n."""
    m, n = min(o, i), max(o, i)
    return steps * (4 * m * m * n + 2 * m ** 3)


def memory_chunk_flops(cfg: Config) -> dict[str, int]:
    """Matmul FLOPs of one complete chunk of one memory head for one batch row (2 per multiply-add),
    following :func:`neatlm.ops.memory.chunk.memory_scan`: rows = [e + b keys; b queries] with
    e = omega_window - 1 (the Omega window's extra rows), b = chunk_size.

    forward: every layer on all rows. grad: the per-key deltas back through layers 2..D and one
    weighted GEMM per weight matrix (sum_i coef_i grad_W l_i), on the e + b key rows; plus the
    (b, e + b) band product that forms the row weights. ns: Newton-Schulz on every weight matrix
    (Muon). The first layer's input width is dim_key (the polynomial feature width with poly).
    """
    mem = cfg.memory
    shapes = memory_shapes(mem, cfg.model.dim).weights     # (out, in)
    b = mem.chunk_size
    e = mem.omega_window - 1 if mem.objective == "omega" else 0
    n_k, rows = e + b, e + 2 * b
    fwd = sum(2 * rows * o * i for o, i in shapes)
    grad = sum(2 * n_k * o * i for o, i in shapes)                 # weighted gradient sums
    grad += sum(2 * n_k * o * i for o, i in shapes[1:])            # deltas into the layer below
    grad += 2 * b * n_k                                            # coef = theta @ band
    ns = sum(_ns_flops(o, i, mem.ns_steps) for o, i in shapes) if mem.optimizer == "muon" else 0
    return {"forward": fwd, "grad": grad, "ns": ns}


def count_flops(cfg: Config, batch: int, seq: int) -> dict[str, float]:
    """Matmul FLOPs of one training forward of the whole model on ``batch`` x ``seq`` tokens, by part,
    and ``fwdbwd`` = 3 x forward: the backward of every GEMM is two GEMMs of the same size (the
    memory's inner-gradient GEMMs and Newton-Schulz included, since the outer backward goes through
    them). Elementwise work (norms, silu, softmax, the polynomial monomials, the depthwise conv,
    the gradient clip) is not counted: the floor is what the matmul units must do.

    Parts: trunk = attention projections and scores ((query, key) pairs inside the causal window),
    SwiGLU and the tied output head; memory_proj = q, k, v, out and the gate projections of every
    memory layer (MAC also the read's q and out projections); memory_inner = the chunk forward and
    inner gradients (MAC also the read of each segment before attention); memory_ns = Muon's
    Newton-Schulz GEMMs.
    """
    m = cfg.model
    tokens = batch * seq
    d, hid = m.dim, swiglu_hidden(m.dim, m.mlp_hidden)
    attn = 2 * tokens * d * 3 * d + 2 * tokens * d * d + batch * 4 * d * _attention_pairs(seq, m.window)
    mlp = 2 * tokens * d * 2 * hid + 2 * tokens * hid * d
    trunk = m.n_layers * (attn + mlp) + 2 * tokens * d * m.vocab_size
    out = {"trunk": float(trunk), "memory_proj": 0.0, "memory_inner": 0.0, "memory_ns": 0.0}
    mem = cfg.memory
    if mem.enabled:
        shapes = memory_shapes(mem, d)
        inner = mem.heads * shapes.dim_head
        gates = 4 if mem.objective == "omega" else 3
        proj = 4 * 2 * tokens * d * inner + gates * 2 * tokens * d * mem.heads
        n_chunks, tail = divmod(seq, mem.chunk_size)
        per = memory_chunk_flops(cfg)
        read_row = sum(2 * o * i for o, i in shapes.weights)          # one row through the memory
        inner_f = n_chunks * (per["forward"] + per["grad"]) + tail * read_row
        if mem.combine == "mac":                                         # read(seg) before attention
            proj += 2 * 2 * tokens * d * inner
            inner_f += seq * read_row
        rows_heads = batch * mem.heads
        out["memory_proj"] = float(m.n_layers * proj)
        out["memory_inner"] = float(m.n_layers * rows_heads * inner_f)
        out["memory_ns"] = float(m.n_layers * rows_heads * n_chunks * per["ns"])
    out["fwd"] = sum(out.values())
    out["fwdbwd"] = 3 * out["fwd"]
    return out


def matmul_rate(threads: int) -> float:
    """Best fp32 GFLOP/s of a 2048^3 matmul on this machine, now (as `neat hw` measures it)."""
    torch.set_num_threads(threads)
    return matmul_gflops(torch.device("cpu"), "fp32", 2048)


# ----------------------------------------------------------------------------- configs and timing

def make_config(name: str, args) -> tuple[Config, str]:
    """The variant's config and a short description; a memory config the size guard refuses is
    retried with memory.dim_head halved until it is accepted."""
    over = BASE + [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
                   f"model.context={max(256, args.seq)}"] + VARIANTS[name]
    if "memory.enabled=true" in over:
        over.append(f"memory.chunk_size={args.chunk}")
    if args.quick:
        over += ["model.dim=32", "model.n_layers=1", "model.n_heads=2"]
        if "model.window=64" in over:
            over += ["model.window=8"]
    extra: list[str] = []
    while True:
        try:
            cfg = load_config("tiny", overrides=over + extra)
            break
        except ConfigError as err:
            if "memory" not in str(err) or "GB" not in str(err):
                raise
            dh = int(extra[-1].split("=")[1]) if extra else (32 if args.quick else 128) // 4
            if dh <= 4:
                raise
            extra = [f"memory.dim_head={dh // 2}"]
    mem = cfg.memory
    if not mem.enabled:
        desc = f"window {cfg.model.window or 'full'}"
    else:
        sh = memory_shapes(mem, cfg.model.dim)
        desc = f"{mem.combine} {mem.function}"
        if mem.function == "mlp":
            desc += f" d{mem.depth}"
        desc += f" h{mem.heads}x{sh.dim_head}"
        if sh.dim_key != sh.dim_head:
            desc += f" key {sh.dim_key}"
        if mem.objective == "omega":
            desc += f" omega {mem.omega_window}"
        if mem.optimizer == "muon":
            desc += f" muon ns{mem.ns_steps}"
        if extra:
            desc += " (guard: " + extra[0] + ")"
    return cfg, desc


def make_batch(args):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)


def loss_fn(idx):
    def step(model):
        return lm_loss(model(idx[:, :-1]).logits, idx[:, 1:])
    return step


def timed_step(model, step) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    step(model).backward()
    return time.perf_counter() - t


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    idx = make_batch(args)
    step = loss_fn(idx)
    rows = []
    for name in args.variants:
        cfg, desc = make_config(name, args)
        torch.manual_seed(0)
        model = NeatLM(cfg)
        saved = measure_activations(model, step, "none").total
        rows.append({"name": name, "desc": desc, "cfg": cfg, "model": model, "saved": saved, "times": [],
                     "flops": count_flops(cfg, args.batch, args.seq)})
    rate = matmul_rate(args.threads)
    for r in rows:                      # warm-up
        for _ in range(args.warmup):
            timed_step(r["model"], step)
    for _ in range(args.rounds):        # interleaved: a burst of load hits one round, not one variant
        for r in rows:
            r["times"].append(timed_step(r["model"], step))
    rate = max(rate, matmul_rate(args.threads))
    for r in rows:
        r["ms"] = 1e3 * min(r["times"])
        r["floor_ms"] = 1e3 * r["flops"]["fwdbwd"] / (rate * 1e9)
        r["rate"] = rate
        del r["model"]
    return rows


def report(rows: list[dict], args) -> str:
    rate = rows[0]["rate"]
    base = next((r["ms"] for r in rows if r["name"] == "attention"), None)
    swa = next((r for r in rows if r["name"] == "swa-64"), None)
    lines = [f"tiny preset, batch {args.batch} x {args.seq}, fp32, {args.threads} threads, torch {torch.__version__}, "
             f"memory chunk {args.chunk}, fastest of {args.rounds} interleaved rounds after {args.warmup} warm-up, "
             f"load avg {os.getloadavg()[0]:.1f}",
             f"fp32 matmul rate (2048^3, best before/after the rounds): {rate:.1f} GFLOP/s; "
             "FLOP floor = matmul FLOPs of forward x 3 (backward = 2 GEMMs per forward GEMM)", ""]
    hdr = (f"| {'variant':<9} | {'config':<42} | {'fwd+bwd ms':>10} | {'saved MB':>8} | {'floor GFLOP':>11} | "
           f"{'mem. share':>10} | {'floor ms':>8} | {'% of floor':>10} | {'memory % of floor':>17} | "
           f"{'vs attention':>12} |")
    lines.append(hdr)
    lines.append("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        f = r["flops"]
        share = 1 - f["trunk"] / f["fwd"]
        vs = f"{r['ms'] / base:.2f}x" if base else "-"
        marginal = "-"   # the memory's own part: over swa-64, the same trunk without memory
        if swa is not None and r["flops"]["memory_inner"] and r["ms"] > swa["ms"]:
            marginal = f"{(r['floor_ms'] - swa['floor_ms']) / (r['ms'] - swa['ms']):.1%}"
        lines.append(f"| {r['name']:<9} | {r['desc']:<42} | {r['ms']:>10.0f} | {r['saved'] / 2**20:>8.0f} | "
                     f"{f['fwdbwd'] / 1e9:>11.2f} | {share:>10.0%} | {r['floor_ms']:>8.1f} | "
                     f"{r['floor_ms'] / r['ms']:>10.1%} | {marginal:>17} | {vs:>12} |")
    lines.append("")
    lines.append("forward GFLOP by part (trunk / memory projections / memory inner loop / Newton-Schulz):")
    for r in rows:
        f = r["flops"]
        lines.append(f"  {r['name']:<9} {f['trunk'] / 1e9:.3f} / {f['memory_proj'] / 1e9:.3f} / "
                     f"{f['memory_inner'] / 1e9:.3f} / {f['memory_ns'] / 1e9:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=32, help="memory.chunk_size")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a test): dim 32, 1 layer, batch 2 x 32")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.chunk, args.rounds, args.warmup = 2, 32, 8, 1, 1
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}: allowed {', '.join(VARIANTS)}")
    text = report(run(args), args)
    print(text)
    return text


if __name__ == "__main__":
    main()
