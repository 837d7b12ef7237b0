"""Shared fixtures: a small text corpus made on the fly and a config small enough for CPU tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import neatlm.config
from neatlm.config import Config, validate


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where torch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_free_memory(monkeypatch):
    """validate() compares a memory config's estimated size with the host's free memory: tests see
    a fixed 64 GB, so that no outcome depends on what else runs on the host."""
    monkeypatch.setattr(neatlm.config, "available_memory", lambda: 64 * 10**9)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors or a sequential chunk loop: one intra-op thread is faster and steadier."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


def write_corpus(root: Path, n_files: int = 12, seed: int = 0) -> Path:
    """Python-looking files with enough structure for a tiny model to learn something."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "value", "index", "total", "result"]
    for i in range(n_files):
        lines = []
        for j in range(60):
            a, b = rng.choice(words), rng.choice(words)
            lines.append(f"def {a}_{j}({b}):\n    return {b} + {rng.randint(0, 9)}\n")
        (root / f"mod_{i:02d}.py").write_text("".join(lines))
    return root


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def small_config(corpus: Path, run_dir: Path, **train) -> Config:
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.context = 32, 2, 2, 64
    cfg.data.path = str(corpus)
    cfg.data.val_fraction = 0.2
    t = cfg.train
    t.steps, t.batch_size, t.seq_len, t.warmup_steps = 8, 4, 32, 2
    t.log_every, t.save_every, t.run_dir, t.progress = 1, 4, str(run_dir), False
    t.device, t.precision = "cpu", "fp32"
    cfg.eval.every, cfg.eval.batches = 4, 2
    for k, v in train.items():
        setattr(t, k, v)
    validate(cfg)
    return cfg


def naive_twin(mem):
    """The same memory layer (same weights, dtype, settings) running the token-loop reference."""
    from dataclasses import replace

    from neatlm.nn.memory import NeuralMemory

    p = next(mem.parameters())
    twin = NeuralMemory(mem.dim, replace(mem.settings, mode="naive"), update_every=mem.update_every)
    twin.to(dtype=p.dtype, device=p.device).load_state_dict(mem.state_dict())
    return twin
