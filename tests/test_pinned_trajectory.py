"""Pinned loss trajectories (in the manner of llm.c's test_gpt2): a tiny model, a fixed seed and
fixed data, and the first 10 training losses written down. A refactor that should not change the
numbers (module swaps, new state plumbing, moved ops) must reproduce them; silent numeric drift
fails here even when resume stays bit-exact with itself.

The tolerance allows for float32 summation order differing between CPUs (vector widths, thread
counts); a real change of the computation moves a loss by far more than that.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import small_config, write_corpus
from neatlm.train.trainer import Trainer

TOLERANCE = 1e-4  # nats, absolute

PINNED = {
    "attention": [5.493247, 5.430485, 5.249274, 5.080091, 4.948427,
                  4.834723, 4.760012, 4.749104, 4.672093, 4.598569],
    "memory": [5.507885, 5.454371, 5.321178, 5.182661, 5.008111,
               4.918477, 4.826534, 4.804801, 4.744661, 4.668377],
}


def _config(kind: str, tmp_path: Path):
    cfg = small_config(write_corpus(tmp_path / "corpus", seed=7), tmp_path / "run", steps=10, log_every=1)
    if kind == "memory":
        cfg.model.window = 16
        m = cfg.memory
        m.enabled, m.combine, m.heads, m.chunk_size, m.conv_size = True, "mag", 2, 8, 4
    return cfg


def trajectory(kind: str, tmp_path: Path) -> list[float]:
    trainer = Trainer(_config(kind, tmp_path))
    # logging every step also runs the test-time-learning statistics path, which must not
    # change the numbers
    return [trainer.train_step(log=True)[0].item() for _ in range(10)]


@pytest.mark.parametrize("kind", sorted(PINNED))
def test_first_ten_losses_are_pinned(kind, tmp_path):
    got = trajectory(kind, tmp_path)
    for step, (a, b) in enumerate(zip(got, PINNED[kind]), start=1):
        assert abs(a - b) <= TOLERANCE, f"{kind} step {step}: loss {a:.6f}, pinned {b:.6f}"
    assert len(got) == len(PINNED[kind])
