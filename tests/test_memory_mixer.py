"""Memory + sliding-window attention (MAG, MAL, MAC): protocol, causality, exact split carry, gradients."""

import random

import pytest
import torch

from neatlm.config import MemoryConfig
from neatlm.nn import MemoryMixerState, build_memory_mixer
from neatlm.nn.attention import CausalSelfAttention
from neatlm.nn.memory_mixer import MemoryAsContext, MemoryAsGate, MemoryAsLayer

DIM = 8


def _mixer(combine, **kw):
    torch.manual_seed(0)
    cfg = MemoryConfig(enabled=True, combine=combine, heads=2, chunk_size=4, expansion=1.5, max_lr=0.5, **kw)
    mixer = build_memory_mixer(DIM, cfg, CausalSelfAttention(DIM, 2, window=5), combine).double()
    with torch.no_grad():
        mixer.memory.to_lr.bias.fill_(1.0)
    return mixer


def _x(T, seed=1):
    return torch.randn(2, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


COMBINES = ["mag", "mal", "mac"]


@pytest.mark.parametrize("combine,cls", [("mag", MemoryAsGate), ("mal", MemoryAsLayer), ("mac", MemoryAsContext)])
def test_build_from_config(combine, cls):
    mixer = _mixer(combine)
    assert isinstance(mixer, cls)
    y, state = mixer(_x(9))
    assert y.shape == (2, 9, DIM) and isinstance(state, MemoryMixerState)
    assert state.memory.position == 9 and state.attention.position == 9


@pytest.mark.parametrize("combine", COMBINES)
def test_causality(combine):
    mixer = _mixer(combine)
    x = _x(15)
    y, _ = mixer(x)
    for t in random.Random(0).sample(range(1, 15), 4):
        x2 = x.clone()
        x2[:, t] += 1.0
        y2, _ = mixer(x2)
        assert (y2[:, :t] - y[:, :t]).abs().max() == 0
        assert (y2[:, t] - y[:, t]).abs().max() > 1e-8


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("kw", [dict(), dict(objective="omega", features="poly", optimizer="muon")])
def test_split_carry(combine, kw):
    mixer = _mixer(combine, **kw)
    T = 17
    x = _x(T)
    y, s = mixer(x)
    rng = random.Random(0)
    for cuts in ([4, 8], [3, 10], sorted(rng.sample(range(1, T), 4)), list(range(1, T))):
        ys, st, prev = [], None, 0
        for c in cuts + [T]:
            yy, st = mixer(x[:, prev:c], st)
            ys.append(yy)
            prev = c
        assert (torch.cat(ys, 1) - y).abs().max() < 1e-12
        for a, b in zip(st.memory.weights, s.memory.weights):
            assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("combine", COMBINES)
def test_every_parameter_gets_a_gradient_and_memory_matters(combine):
    mixer = _mixer(combine)
    x = _x(13)
    y, s = mixer(x)
    y.pow(2).sum().backward()
    for n, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, n
    # the memory state learned, and a different memory state changes the output after chunk 1
    d = s.detach()
    assert all(not w.requires_grad for w in d.memory.weights)
    with torch.no_grad():
        y_again, _ = mixer(x, None)
        fresh = mixer.memory.initial_state(2, dtype=torch.float64)
        y_cont, _ = mixer(x, MemoryMixerState(None, d.memory))
    assert torch.allclose(y_again, y)
    assert not torch.allclose(y_cont, y)
    assert all((w - w0).abs().max() > 1e-3 for w, w0 in zip(d.memory.weights, fresh.weights))


@pytest.mark.parametrize("combine", COMBINES)
def test_eval_no_grad_still_learns(combine):
    mixer = _mixer(combine).eval()
    with torch.no_grad():
        _, s = mixer(_x(9))
    w0 = mixer.memory.initial_weights()
    assert all((w - w_0).abs().max() > 1e-3 for w, w_0 in zip(s.memory.weights, w0))


@pytest.mark.parametrize("combine", COMBINES)
def test_bf16_autocast_keeps_the_inner_loop_in_fp32(combine):
    torch.manual_seed(0)
    cfg = MemoryConfig(enabled=True, combine=combine, heads=2, chunk_size=4)
    mixer = build_memory_mixer(DIM, cfg, CausalSelfAttention(DIM, 2, window=5), combine)
    x = torch.randn(2, 11, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = mixer(x)
    assert state.memory.weights[0].dtype == torch.float32        # fast weights never round to bf16
    y.float().square().mean().backward()
    assert all(p.grad is not None for p in mixer.memory.parameters())
    with torch.no_grad():
        y32, _ = mixer(x)
    assert (y.float() - y32).abs().max() < 0.05                  # bf16 attention and projections only
