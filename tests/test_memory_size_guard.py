"""The memory size guard: :func:`neatlm.nn.memory.training_footprint` estimates what one memory
layer keeps for backward, and :func:`neatlm.config.validate` refuses a config whose memory layers
cannot fit (one line naming the keys that shrink it) instead of letting a training step exhaust RAM.

Every limit here is injected (and conftest fixes the free memory every test sees); nothing
depends on this host's free memory."""

from __future__ import annotations

import logging

import pytest
import torch

import neatlm.config as config_mod
from neatlm.cli import main
from neatlm.config import (DEFAULT_MEMORY_LIMIT, GB, ConfigError, from_dict, load_config, memory_limit,
                           memory_training_bytes, preset_names, validate)
from neatlm.config import available_memory as read_free_memory   # conftest replaces the module's
from neatlm.grad.checkpointing.measure import measure_activations
from neatlm.nn.memory import MemorySettings, NeuralMemory, memory_shapes, training_footprint

POLY_TINY = ["memory.enabled=true", "memory.features=poly"]   # default width: one 128-wide head


@pytest.fixture
def limit(monkeypatch):
    """Set the limit the guard compares with (bytes), whatever the host and device."""
    def set_limit(gb: float) -> None:
        monkeypatch.setattr(config_mod, "memory_limit", lambda device: (gb * GB, "test limit"))
    return set_limit


def total(dim: int = 64, batch: int = 2, seq_len: int = 64, **settings) -> int:
    return training_footprint(MemorySettings(**settings), dim, batch, seq_len).total


# ----------------------------------------------------------------------------- the estimate

def test_estimate_grows_with_degree_head_width_and_batch():
    assert total(features="poly", poly_degree=3) > 5 * total(features="poly", poly_degree=2)
    assert total(features="poly") > 5 * total()
    # degree-2 keys grow with dim_head squared and the first fast weight with dim_head cubed
    assert total(features="poly", dim_head=64) > 4 * total(features="poly", dim_head=32)
    assert total(dim_head=64) > 2 * total(dim_head=32)
    # every part is per batch row, but the poly feature map's selection matrices (one set per layer)
    assert total(batch=4) == 2 * total(batch=2)
    atlas = dict(features="poly", optimizer="muon")
    per_row = (total(**atlas, batch=4) - total(**atlas, batch=2)) // 2
    selections = 4 * (2 + 1) * 64 * (64 + 64 * 65 // 2)     # fp32, degree + 1 of (dim_head, dim_key)
    assert total(**atlas, batch=8) == 8 * per_row + selections == total(**atlas, batch=2) + 6 * per_row
    # Muon keeps its Newton-Schulz iterates: more than momentum, more with more steps
    # (in every chunk but the last, whose update only feeds the detached state)
    muon = dict(optimizer="muon", chunk_size=16)
    assert total(**muon) > total(chunk_size=16) and total(**muon, ns_steps=8) > total(**muon)


def test_shapes_are_the_layers_own():
    """The estimate reads the same sizes the layer builds."""
    for kw in (dict(), dict(features="poly", heads=4), dict(function="linear", dim_head=24), dict(depth=3)):
        mem = NeuralMemory(64, **kw)
        shapes = memory_shapes(mem.settings, 64)
        assert (shapes.dim_head, shapes.dim_key) == (mem.dim_head, mem.dim_key)
        assert list(shapes.weights) == [tuple(w.shape[1:]) for w in mem.initial_weights()]
    assert memory_shapes(MemorySettings(features="poly"), 128).dim_key == 128 * 129 // 2 + 128


@pytest.mark.parametrize("kw", [
    dict(heads=2, chunk_size=16),                                               # Titans: identity, fused momentum
    dict(heads=2, chunk_size=16, features="poly", optimizer="muon", objective="omega", omega_window=4,
         conv_size=4),                                                          # Atlas: poly + Muon + Omega
], ids=["titans", "atlas"])
def test_estimate_is_near_the_measured_saved_tensors(kw, one_thread):
    """Within 0.5x-3x of the bytes autograd keeps for backward in one fp32 forward (measured: 1.03
    and 0.99; the factor leaves room for torch versions that save a little more or less)."""
    torch.manual_seed(0)
    dim, batch, seq_len = 32, 2, 64
    mem = NeuralMemory(dim, **kw)
    x = torch.randn(batch, seq_len, dim)
    measured = measure_activations(mem, lambda m: m(x)[0].sum(), units=[]).total
    estimate = training_footprint(mem.settings, dim, batch, seq_len).total
    assert 0.5 <= estimate / measured <= 3.0, (estimate, measured)


# ----------------------------------------------------------------------------- the guard in validate()

def test_poly_features_at_the_default_head_width_are_refused(limit):
    """Degree-2 features of one 128-wide head are 8,384 wide: about 10 GB for the tiny model's
    memory layers at batch 16, refused on an 8 GB host in one line naming the knobs."""
    limit(8)
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=POLY_TINY)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("GB", "8.0 GB limit", "8384-wide keys", "memory.dim_head", "memory.heads", "memory.poly_degree",
                 "memory.chunk_size", "train.batch_size"):
        assert part in msg, (part, msg)
    limit(1000)
    assert 9 * GB < memory_training_bytes(load_config("tiny", overrides=POLY_TINY)) < 14 * GB


def test_a_smaller_config_fits_and_half_the_limit_warns(limit, caplog):
    limit(8)
    load_config("tiny", overrides=POLY_TINY + ["train.batch_size=4"])   # about 2.8 GB: fits
    load_config("tiny", overrides=POLY_TINY + ["memory.heads=4"])        # 32-wide heads, 560-wide keys
    limit(16)
    with caplog.at_level(logging.WARNING, logger="neatlm.config"):
        load_config("tiny", overrides=POLY_TINY)                          # about 10 GB of 16: a warning
    assert len(caplog.records) == 1 and "half of the 16.0 GB limit" in caplog.records[0].getMessage()
    caplog.clear()
    limit(24)
    with caplog.at_level(logging.WARNING, logger="neatlm.config"):
        load_config("tiny", overrides=POLY_TINY)
    assert not caplog.records


@pytest.mark.parametrize("preset", preset_names())
def test_presets_fit_a_host_with_a_few_gb_free(preset, limit):
    """Including the Atlas presets (poly features, four 16-wide heads, Muon): about 2 GB."""
    limit(3)
    load_config(preset)


def test_atlas_presets_need_a_sane_amount():
    for preset in ("mqar-atlas", "mqar-hard-atlas"):
        assert 0.5 * GB < memory_training_bytes(load_config(preset)) < 3 * GB


def test_checkpointing_lowers_the_estimate(limit):
    limit(1000)
    cfg = load_config("tiny", overrides=POLY_TINY)
    none = memory_training_bytes(cfg)
    cfg.checkpointing.policy = "full"
    full = memory_training_bytes(cfg)
    assert full == pytest.approx(none * 2 / 5)           # one layer's saved tensors + one layer's backward
    cfg.checkpointing.memory_budget_mb = 1024.0
    assert full < memory_training_bytes(cfg) < none


def test_the_guard_is_off_without_memory_or_when_asked(limit):
    limit(0.001)
    load_config("tiny")                                   # memory off: nothing to estimate
    cfg = load_config("tiny", overrides=["memory.enabled=false", *POLY_TINY[1:]])
    cfg.memory.enabled = True
    with pytest.raises(ConfigError, match="memory.poly_degree"):
        validate(cfg)
    validate(cfg, check_size=False)
    from_dict(cfg.to_dict())                              # a saved config read back to evaluate is not refused
    with pytest.raises(ConfigError, match="memory.dim_head"):
        from_dict(cfg.to_dict(), check_size=True)         # ... but a resumed training run is


def test_the_limit_is_free_memory_or_a_stated_default(monkeypatch):
    monkeypatch.setattr(config_mod, "available_memory", lambda: int(5 * GB))
    assert memory_limit("cpu") == (5 * GB, "available memory")
    monkeypatch.setattr(config_mod, "available_memory", lambda: None)
    assert memory_limit("cpu")[0] == DEFAULT_MEMORY_LIMIT
    assert memory_limit("cuda") is None and memory_limit("mps") is None   # device memory: not read here


def test_available_memory_reads_meminfo_or_says_none():
    free = read_free_memory()
    assert free is None or free > 0


def test_cli_refuses_in_one_line(limit, capsys):
    limit(8)
    assert main(["config", "--preset", "tiny", *[a for kv in POLY_TINY for a in ("--set", kv)]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("neat: error: memory:") and "memory.dim_head" in err
