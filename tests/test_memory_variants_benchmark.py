"""benchmarks/memory_variants.py: its FLOP count matches a hand count and grows where the variants
add work (poly keys, Newton-Schulz, the Omega window's rows), and --quick runs and prints its table."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_variants as mv  # noqa: E402
from neatlm.config import load_config  # noqa: E402
from neatlm.nn.memory import memory_shapes  # noqa: E402

SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.window=8", "memory.enabled=true",
         "memory.heads=4", "memory.chunk_size=8", "train.batch_size=2", "train.seq_len=32"]


def cfg(*extra: str):
    return load_config("tiny", overrides=SMALL + list(extra))


def test_poly_degree_2_of_a_32_wide_head_is_560_wide_and_enlarges_the_first_layer():
    # phi_2(k) = [k, (k_i k_j)_{i<=j}]: 32 + 32 * 33 / 2 = 560 (no constant term: neatlm.ops.features)
    c = load_config("tiny", overrides=["memory.enabled=true", "memory.heads=4", "memory.features=poly"])
    shapes = memory_shapes(c.memory, c.model.dim)
    assert shapes.dim_head == 32 and shapes.dim_key == 32 + 32 * 33 // 2 == 560
    assert shapes.weights[0] == (64, 560)
    plain = mv.memory_chunk_flops(load_config("tiny", overrides=["memory.enabled=true", "memory.heads=4"]))
    poly = mv.memory_chunk_flops(c)
    # only the first layer's input grows (32 -> 560): its forward on 64 rows and weight sum on 32 keys
    b = c.memory.chunk_size
    assert poly["forward"] - plain["forward"] == 2 * (2 * b) * 64 * (560 - 32)
    assert poly["grad"] - plain["grad"] == 2 * b * 64 * (560 - 32)


def test_chunk_flops_match_a_hand_count():
    # dh = 32 / 4 = 8, hidden 16: W1 (16, 8), W2 (8, 16); chunk b = 8
    t = mv.memory_chunk_flops(cfg())
    assert t == {"forward": 2 * 16 * 128 * 2,                        # 16 rows [8 keys; 8 queries], 2 layers
                 "grad": 2 * 8 * 128 * 2 + 2 * 8 * 128 + 2 * 8 * 8,   # weight sums, delta into W1, band
                 "ns": 0}
    # Omega window 4: 3 more key rows
    o = mv.memory_chunk_flops(cfg("memory.objective=omega", "memory.omega_window=4"))
    assert o == {"forward": 2 * 19 * 128 * 2, "grad": 2 * 11 * 128 * 2 + 2 * 11 * 128 + 2 * 8 * 11, "ns": 0}
    # Muon: per matrix X (8, 16) (the short side first), 5 steps of X X^T, A A, (.) X
    m = mv.memory_chunk_flops(cfg("memory.optimizer=muon", "memory.ns_steps=5"))
    assert m["ns"] == 2 * 5 * (2 * 8 * 8 * 16 + 2 * 8 ** 3 + 2 * 8 * 8 * 16)
    assert m["forward"] == t["forward"] and m["grad"] == t["grad"]


def test_flop_floor_grows_with_each_variant():
    base = mv.count_flops(cfg(), 2, 32)
    attn = mv.count_flops(load_config("tiny", overrides=SMALL[:4]), 2, 32)
    assert attn["memory_inner"] == 0 and attn["trunk"] == base["trunk"] and attn["fwd"] < base["fwd"]
    omega = mv.count_flops(cfg("memory.objective=omega", "memory.omega_window=4"), 2, 32)
    # 4 complete chunks x 2 rows x 4 heads x 1 layer of the per-chunk difference
    per_t, per_o = mv.memory_chunk_flops(cfg()), mv.memory_chunk_flops(cfg("memory.objective=omega"))
    assert omega["memory_inner"] - base["memory_inner"] == 4 * 2 * 4 * (
        per_o["forward"] + per_o["grad"] - per_t["forward"] - per_t["grad"])
    ns = [mv.count_flops(cfg("memory.optimizer=muon", f"memory.ns_steps={k}"), 2, 32)["fwd"] for k in (1, 3, 5)]
    poly = mv.count_flops(cfg("memory.features=poly"), 2, 32)
    atlas = mv.count_flops(cfg("memory.objective=omega", "memory.features=poly", "memory.optimizer=muon"), 2, 32)
    assert base["fwd"] < ns[0] < ns[1] < ns[2] < atlas["fwd"]
    assert base["fwd"] < omega["fwd"] < atlas["fwd"] and base["fwd"] < poly["fwd"] < atlas["fwd"]
    assert all(f["fwdbwd"] == 3 * f["fwd"] for f in (base, omega, poly, atlas))


def test_quick_run_prints_the_table():
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        text = mv.main(["--quick", "--threads", "1", "--variants", "attention,titans,atlas,mac"])
    finally:
        torch.set_num_threads(threads)   # the benchmark sets the process's thread count
    assert time.perf_counter() - start < 20
    assert "GFLOP/s" in text and "% of floor" in text
    for name in ("attention", "titans", "atlas", "mac"):
        assert f"| {name}" in text
