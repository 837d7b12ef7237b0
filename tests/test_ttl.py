"""Test-time-learning schedule (warmup, update frequency), TTL metrics, and memory in the full model."""

import pytest
import torch

from conftest import naive_twin, small_config
from neatlm.config import Config
from neatlm.nn.memory import NeuralMemory, TTLControl
from neatlm.nn.model import NeatLM
from neatlm.train.metrics import read_metrics
from neatlm.train.trainer import Trainer


def memory(update_every: int = 1, **kw) -> NeuralMemory:
    torch.manual_seed(0)
    return NeuralMemory(16, heads=2, chunk_size=4, max_grad_norm=1.0, update_every=update_every, **kw).double()


@pytest.mark.parametrize("optimizer", ["momentum", "muon"])
def test_update_every_holds_memory_still_on_skipped_chunks(optimizer):
    mem = memory(optimizer=optimizer, update_every=2)
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    states = []
    state = None
    for c in range(4):  # one chunk per call
        _, state = mem(x[:, 4 * c:4 * c + 4], state)
        states.append(state)
    w = lambda s: torch.cat([t.flatten() for t in s.weights])  # noqa: E731
    assert not torch.equal(w(states[0]), w(mem.initial_state(2)))  # chunk 0 learns
    assert torch.equal(w(states[1]), w(states[0]))                  # chunk 1 is held still
    assert not torch.equal(w(states[2]), w(states[1]))              # chunk 2 learns
    assert torch.equal(w(states[3]), w(states[2]))
    y_whole, s_whole = mem(x)  # the pattern is on the absolute grid: any split gives the same
    assert torch.allclose(w(s_whole), w(states[3]), atol=1e-12)
    y_ref, s_ref = naive_twin(mem)(x)
    assert torch.allclose(y_ref, y_whole, atol=1e-10) and torch.allclose(w(s_ref), w(s_whole), atol=1e-10)


def test_learning_off_reads_initial_weights():
    mem = memory()
    read_only = TTLControl(learn=False)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    y, state = mem(x, None, read_only)
    w0 = mem.initial_state(2)
    assert all(torch.equal(a, b) for a, b in zip(state.weights, w0.weights))
    y_first, _ = mem(x[:, :4])
    assert torch.allclose(y[:, 4:8], mem(x[:, 4:8])[0])  # every chunk reads W0
    assert not torch.allclose(y[:, 4:8], mem(x[:, :8])[0][:, 4:])  # while learning, chunk 1 does not
    assert torch.allclose(y[:, :4], y_first)


def test_full_model_with_memory_is_causal():
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.window = 32, 2, 2, 8
    cfg.memory.enabled, cfg.memory.chunk_size = True, 4
    torch.manual_seed(0)
    model = NeatLM(cfg).double()
    x = torch.randint(0, 256, (2, 40))
    t = int(torch.randint(1, 39, ()))
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 7) % 256
    a, b = model(x)[0], model(x2)[0]
    assert torch.equal(a[:, :t], b[:, :t]) and not torch.allclose(a[:, t:], b[:, t:])


def test_trainer_warmup_metrics_and_segments(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "t", steps=4, log_every=1, segments=2, seq_len=16)
    cfg.memory.enabled, cfg.memory.chunk_size, cfg.model.window = True, 4, 8
    cfg.memory.optimizer = "muon"
    cfg.ttl.warmup_steps = 2
    trainer = Trainer(cfg)
    trainer.train()
    recs = [r for r in read_metrics(tmp_path / "t") if "loss" in r]
    keys = {"inner_loss_before", "inner_loss_after", "momentum_norm", "update_ratio", "lr_mean",
            "momentum_gate_mean", "forget_gate_mean", "ns_residual"}
    for layer in (0, 1):
        assert all(keys <= {k.split("/")[-1] for k in r if k.startswith(f"ttl/layer{layer}/")} for r in recs)
    ratio = [r["ttl/layer0/update_ratio"] for r in recs]
    assert ratio[0] == 0.0 and ratio[1] == 0.0 and ratio[2] > 0 and ratio[3] > 0  # warmup holds memory still


def test_carried_memory_state_has_no_graph(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "n", steps=3, segments=4, seq_len=8)
    cfg.memory.enabled, cfg.memory.chunk_size, cfg.model.window = True, 4, 4
    cfg.memory.reset = "never"
    trainer = Trainer(cfg)
    trainer.train()
    mem_state = trainer.carry[0].memory
    assert mem_state.position == 3 * 4 * 8
    assert all(t.grad_fn is None for t in mem_state.weights + mem_state.momentum)


def test_causal_conv_is_causal_split_exact_and_gradchecked():
    mem = memory(conv_size=4)
    with torch.no_grad():  # move away from the identity init so the conv really mixes tokens
        mem.conv.weight.normal_(0, 0.5)
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    y, s_whole = mem(x)
    state, parts = None, []
    for a, b in [(0, 3), (3, 4), (4, 11), (11, 19)]:
        out, state = mem(x[:, a:b], state)
        parts.append(out)
    assert torch.allclose(torch.cat(parts, 1), y, atol=1e-12)
    x2 = x.clone()
    x2[:, 9] += 1.0
    assert torch.equal(mem(x2)[0][:, :9], y[:, :9])
    assert not torch.allclose(mem(x2)[0][:, 9:], y[:, 9:])
    assert torch.allclose(naive_twin(mem)(x)[0], y, atol=1e-10)
    small = memory(conv_size=3)
    xs = torch.randn(1, 9, 16, dtype=torch.float64, requires_grad=True)
    params = [small.conv.weight, small.to_k.weight]
    assert torch.autograd.gradcheck(lambda inp, *ps: small(inp)[0], (xs, *params))


def test_conv_init_identity_on_q_v_token_shift_on_k_and_mac_is_refused():
    from neatlm.config import ConfigError, load_config

    a, b = memory(), memory(conv_size=4)
    b.load_state_dict({k: v for k, v in a.state_dict().items()}, strict=False)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    q, k, v, _ = b._project(x, b.initial_state(2))
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    assert torch.allclose(q, a.to_q(x), atol=1e-12) and torch.allclose(v, a.to_v(x), atol=1e-12)
    assert torch.allclose(k, 0.5 * (a.to_k(x) + a.to_k(prev)), atol=1e-12)
    with pytest.raises(ConfigError, match="memory.conv_size"):
        load_config(overrides=["memory.enabled=true", "memory.conv_size=4", "memory.combine=mac"])


@pytest.mark.parametrize("from_key", [True, False])
def test_query_init_from_key_reads_back_stored_values(from_key):
    """With W_Q = W_K at init, reading the tokens of an earlier chunk returns their values."""
    torch.manual_seed(1)
    dim = 32
    mem = NeuralMemory(dim, heads=1, chunk_size=4, function="linear", max_lr=1.0, max_grad_norm=0.0,
                       query_init_from_key=from_key).double()
    with torch.no_grad():
        mem.to_out.weight.copy_(torch.eye(dim))
        mem.to_lr.bias.fill_(10.0)          # theta ~ max_lr: one clean write per token
        mem.to_decay.bias.fill_(-10.0)      # no forgetting
    assert torch.equal(mem.to_q.weight, mem.to_k.weight) == from_key
    tokens = torch.randn(1, 4, dim, dtype=torch.float64)
    y, _ = mem(torch.cat([tokens, tokens], dim=1))       # chunk 0 writes, chunk 1 reads
    values = mem.to_v(tokens)
    cos = torch.nn.functional.cosine_similarity(y[:, 4:], values, dim=-1).mean()
    assert (cos > 0.8) if from_key else (cos < 0.6), float(cos)


def test_memory_learns_recall_beyond_the_attention_window(tmp_path, one_thread):
    """Regression test for the memory's learnability (token-shift keys, W_Q from W_K): a small
    MQAR whose pairs lie beyond the 8-token attention window is solved in 120 steps (~20 s).
    Chance is 1/32; attention alone cannot see the pairs."""
    from neatlm.config import load_config

    cfg = load_config("mqar-titans", overrides=[
        "model.vocab_size=64", "data.mqar_pairs=8", "train.seq_len=64", "model.context=64", "model.window=8",
        "memory.chunk_size=8", "memory.function=linear", "train.lr=1e-2", "train.batch_size=32",
        "train.steps=120", "eval.every=0", "eval.batches=4", "train.progress=false", "train.device=cpu",
        "train.precision=fp32", f"train.run_dir={tmp_path}", "train.save_every=1000"])
    result = Trainer(cfg).train()
    assert result["val_acc"] > 0.6, result
