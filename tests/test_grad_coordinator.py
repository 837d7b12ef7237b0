"""GradientCoordinator: isolation, unchanged optimizer behaviour, assignment errors, accumulation,
state round-trips, per-component freezing, config parsing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neatlm.grad.components import ComponentSpec, assign_parameters, parse_components
from neatlm.grad.coordinator import GradientCoordinator


pytestmark = pytest.mark.usefixtures("one_thread")


class Memory(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w1 = nn.Linear(d, 2 * d)
        self.w2 = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return self.w2(torch.tanh(self.w1(x)))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.memory = Memory(d)

    def forward(self, x):
        h = self.norm(x)
        return x + self.proj(h) + self.memory(h)


class Net(nn.Module):
    def __init__(self, d=8, n=2, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


SPECS = {
    "memory": {"patterns": ["*.memory.*"], "lr": 1e-2, "schedule": "constant", "weight_decay": 0.1},
    "trunk": {"patterns": ["*"], "exclude": ["*.memory.*"], "lr": 3e-3, "schedule": "constant",
              "weight_decay": 0.1},
}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw)


def data(seed=1, b=4, t=6, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def lm(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


# ----------------------------------------------------------------------------- assignment

def test_every_parameter_assigned_once_and_decay_rules():
    model = make()
    groups = assign_parameters(model, parse_components(SPECS))
    mem, trunk = groups["memory"], groups["trunk"]
    assert all(".memory." in n for n in mem.names)
    assert not any(".memory." in n for n in trunk.names)
    assert sorted(mem.names + trunk.names) == sorted(n for n, _ in model.named_parameters())
    decay = dict(zip(trunk.names + mem.names, trunk.decay + mem.decay))
    assert decay["blocks.0.proj.weight"] and decay["blocks.0.memory.w1.weight"] and decay["head.weight"]
    for n in ("embed.weight", "blocks.0.norm.weight", "blocks.0.norm.bias", "blocks.0.proj.bias"):
        assert not decay[n], n


def test_orphan_error_lists_names():
    model = make()
    with pytest.raises(ValueError, match=r"claimed by no component.*blocks\.0\.proj\.weight"):
        assign_parameters(model, [ComponentSpec("memory", patterns=("*.memory.*",)),
                                  ComponentSpec("rest", patterns=("embed.*", "head.*", "*.norm.*"))])


def test_double_claim_error_lists_names():
    model = make()
    with pytest.raises(ValueError, match=r"more than one component.*blocks\.0\.memory\.w1\.weight \(memory and all\)"):
        assign_parameters(model, [ComponentSpec("memory", patterns=("*.memory",)), ComponentSpec("all")])


def test_frozen_parameters_need_no_component():
    model = make()
    for p in model.embed.parameters():
        p.requires_grad_(False)
    groups = assign_parameters(model, [ComponentSpec("x", patterns=("blocks.*", "head.*"))])
    assert "embed.weight" not in groups["x"].names


@pytest.mark.parametrize("table, msg", [
    ({"a": {"optimizer": "adam"}}, r"components\.a\.optimizer = 'adam': allowed values are 'adamw', 'sgd', 'muon'"),
    ({"a": {"lr": "fast"}}, r"components\.a\.lr = 'fast': expected a number"),
    ({"a": {"lrr": 1.0}}, r"components\.a\.lrr: unknown key"),
    ({"a": {"lr": -1.0}}, r"components\.a\.lr = -1\.0: must be >= 0"),
    ({"a": {"schedule": "linear"}}, r"components\.a\.schedule = 'linear'"),
    ({"a": {"betas": [0.9]}}, r"components\.a\.betas"),
    ({"a": 3}, r"components\.a: expected a table"),
])
def test_parse_errors_name_the_key(table, msg):
    with pytest.raises(ValueError, match=msg):
        parse_components(table)


def test_parse_accepts_string_pattern_and_defaults():
    (s,) = parse_components({"m": {"patterns": "*.memory.*", "lr": 1}}, defaults={"warmup_steps": 5})
    assert s.patterns == ("*.memory.*",) and s.lr == 1.0 and s.warmup_steps == 5


# ----------------------------------------------------------------------------- isolation

def test_isolated_backward_matches_autograd_of_own_loss():
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS))
    x, y = data()
    logits = model(x)
    la = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    lb = (logits ** 2).mean() * 3.0  # shares the whole graph with la
    mem, trunk = coord.params("memory"), coord.params("trunk")
    ref_mem = torch.autograd.grad(lb, mem, retain_graph=True)
    ref_trunk = torch.autograd.grad(la, trunk, retain_graph=True)
    mixed_trunk = torch.autograd.grad(la + lb, trunk, retain_graph=True)
    coord.backward({"trunk": la, "memory": lb})
    for p, r in zip(mem, ref_mem):
        torch.testing.assert_close(p.grad, r, rtol=0, atol=0)
    for p, r, m in zip(trunk, ref_trunk, mixed_trunk):
        torch.testing.assert_close(p.grad, r, rtol=0, atol=0)
    # the other loss really would have contributed: its absence is observable
    assert any(not torch.allclose(p.grad, m) for p, m in zip(trunk, mixed_trunk))


def test_isolated_backward_handles_aliased_gradients():
    # d(a+b)/da and d(a+b)/db come back from autograd as one buffer; in-place clipping of one
    # component must not touch the other
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(3))
    holder = nn.Module()
    holder.a, holder.b = a, b
    coord = GradientCoordinator(holder, [ComponentSpec("a", patterns=("a",), clip=1e-3, lr=0.0),
                                         ComponentSpec("b", patterns=("b",), lr=0.0)])
    loss = ((a + b) * torch.tensor([1.0, 2.0, 3.0])).sum()
    coord.backward({"a": loss, "b": loss})
    coord.step()
    torch.testing.assert_close(b.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert a.grad.norm() <= 1e-3 * 1.0001


def test_isolated_backward_errors():
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS))
    x, y = data()
    with pytest.raises(ValueError, match="unknown component 'nope'"):
        coord.backward({"nope": lm(model, x, y)})
    with pytest.raises(ValueError, match="does not reach any of its parameters"):
        coord.backward({"memory": model.embed(x).sum()})


def test_only_freezes_others_and_restores_exactly():
    model = make()
    model.blocks[1].norm.weight.requires_grad_(False)  # a user-frozen parameter stays frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    coord = GradientCoordinator(model, parse_components(SPECS))
    x, y = data()
    trunk0 = [p.detach().clone() for p in coord.params("trunk")]
    mem0 = [p.detach().clone() for p in coord.params("memory")]
    with coord.only("memory"):
        assert all(p.requires_grad for p in coord.params("memory"))
        assert not any(p.requires_grad for p in coord.params("trunk"))
        coord.backward(lm(model, x, y))
        assert all(p.grad is None for p in coord.params("trunk"))
        coord.step()
        coord.zero_grad()
        with pytest.raises(ValueError, match="frozen inside only"):
            coord.backward({"trunk": lm(model, x, y)})
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(torch.equal(p, q) for p, q in zip(coord.params("trunk"), trunk0))
    assert any(not torch.equal(p, q) for p, q in zip(coord.params("memory"), mem0))


# ----------------------------------------------------------------------------- behaviour unaltered

@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "muon"])
def test_updates_bit_identical_to_hand_optimizer(optimizer):
    spec = {"patterns": ["*"], "optimizer": optimizer, "lr": 1e-2, "weight_decay": 0.1, "clip": 0.5,
            "schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.2}
    (s,) = parse_components({"all": spec})
    steps = 5
    m1, m2 = make(), make()
    coord = GradientCoordinator(m1, [s], total_steps=steps)
    # by hand, without neatlm's helpers: torch optimizers on groups written out here,
    # torch's clip_grad_norm_, and the schedule's lr
    named = dict(m2.named_parameters())
    matrices = [p for n, p in named.items() if p.ndim == 2 and not n.startswith("embed")]
    others = [p for n, p in named.items() if not (p.ndim == 2 and not n.startswith("embed"))]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    if optimizer == "adamw":
        opts = [torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)]
    elif optimizer == "sgd":
        opts = [torch.optim.SGD(groups, lr=1e-2, momentum=0.9)]
    else:
        opts = [torch.optim.Muon(matrices, lr=1e-2, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(others, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)]
    for t in range(steps):
        x, y = data(seed=t)
        coord.backward(lm(m1, x, y))
        coord.step()
        coord.zero_grad()
        lm(m2, x, y).backward()
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = 1e-2 * s.lr_factor(t, steps)
            o.step()
            o.zero_grad()
        for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
            assert torch.equal(p, q), (optimizer, t, n)


def test_plain_adamw_by_hand_matches_constant_schedule():
    # fully independent reference: torch.optim.AdamW built without any neatlm helper
    m1, m2 = make(), make()
    (s,) = parse_components({"all": {"lr": 2e-3, "schedule": "constant", "betas": [0.8, 0.9]}})
    coord = GradientCoordinator(m1, [s], total_steps=3)
    opt = torch.optim.AdamW(m2.parameters(), lr=2e-3, betas=(0.8, 0.9), weight_decay=0.0)
    for t in range(3):
        x, y = data(seed=t)
        coord.backward(lm(m1, x, y)); coord.step(); coord.zero_grad()
        lm(m2, x, y).backward(); opt.step(); opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_components_get_their_own_lr_and_clip():
    model = make()
    specs = parse_components({
        "memory": {"patterns": ["*.memory.*"], "optimizer": "sgd", "momentum": 0.0, "lr": 0.1,
                   "schedule": "constant", "clip": 1e-3},
        "trunk": {"patterns": ["*"], "exclude": ["*.memory.*"], "optimizer": "sgd", "momentum": 0.0,
                  "lr": 0.0, "schedule": "constant"},
    })
    coord = GradientCoordinator(model, specs)
    trunk0 = [p.detach().clone() for p in coord.params("trunk")]
    mem0 = [p.detach().clone() for p in coord.params("memory")]
    x, y = data()
    coord.backward(lm(model, x, y))
    stats = coord.step()
    assert stats["grad/memory/clipped"] == 1.0 and stats["grad/memory/norm"] > 1e-3
    assert all(torch.equal(p, q) for p, q in zip(coord.params("trunk"), trunk0))  # lr 0
    step = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(coord.params("memory"), mem0)))
    assert math.isclose(step.item(), 0.1 * 1e-3, rel_tol=1e-3)  # SGD step = lr * clipped norm


def test_cosine_schedule_with_warmup():
    s = ComponentSpec("a", lr=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    f = [s.lr_factor(t, 14) for t in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(f[4], 1.0) and math.isclose(f[9], 0.55) and math.isclose(f[14], 0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[15] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("isolated", [False, True])
def test_accumulation_equals_one_big_batch(isolated):
    # backward adds gradients unscaled: the caller weighs each micro-batch's loss (1/k for a mean)
    k = 4
    specs = parse_components(SPECS)
    m1, m2 = make(), make()
    c1 = GradientCoordinator(m1, specs)
    c2 = GradientCoordinator(m2, specs)
    x, y = data(b=8)
    for xm, ym in zip(x.chunk(k), y.chunk(k)):
        loss = lm(m1, xm, ym) / k
        c1.backward({"trunk": loss, "memory": loss} if isolated else loss)
    big = lm(m2, x, y)
    c2.backward({"trunk": big, "memory": big} if isolated else big)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    s1, s2 = c1.step(), c2.step()
    assert s1["grad/trunk/norm"] == pytest.approx(s2["grad/trunk/norm"], rel=1e-5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- state

def test_state_dict_round_trip_gives_identical_steps(tmp_path):
    specs = parse_components({
        "memory": {"patterns": ["*.memory.*"], "optimizer": "muon", "lr": 1e-2, "warmup_steps": 2},
        "trunk": {"patterns": ["*"], "exclude": ["*.memory.*"], "lr": 3e-3, "clip": 1.0},
    })
    model = make()
    coord = GradientCoordinator(model, specs, total_steps=8)
    for t in range(3):
        x, y = data(seed=t)
        coord.backward(lm(model, x, y)); coord.step(); coord.zero_grad()
    torch.save({"model": model.state_dict(), "coord": coord.state_dict()}, tmp_path / "ck.pt")

    def run(m, c):
        out = []
        for t in range(3, 6):
            x, y = data(seed=t)
            c.backward(lm(m, x, y)); c.step(); c.zero_grad()
            out.append([p.detach().clone() for p in m.parameters()])
        return out

    ref = run(model, coord)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    model2 = make(seed=123)
    model2.load_state_dict(ck["model"])
    coord2 = GradientCoordinator(model2, specs, total_steps=8)
    coord2.load_state_dict(ck["coord"])
    assert coord2.step_count == 3
    got = run(model2, coord2)
    for a, b in zip(ref, got):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_load_state_dict_rejects_other_components():
    model = make()
    sd = GradientCoordinator(model, parse_components(SPECS)).state_dict()
    other = GradientCoordinator(model, None)
    with pytest.raises(ValueError, match="components differ"):
        other.load_state_dict(sd)


# ----------------------------------------------------------------------------- monitors

def test_monitor_stats():
    model = make()
    coord = GradientCoordinator(model, parse_components(SPECS), monitor_every=2)
    x, y = data()
    seen = []
    for t in range(4):
        before = [p.detach().clone() for p in coord.params("trunk")]
        coord.backward(lm(model, x, y))
        g = torch.cat([p.grad.flatten() for p in coord.params("trunk")])
        stats = coord.step()
        seen.append(stats)
        if t == 2:
            cos = torch.dot(g, g_prev) / (g.norm() * g_prev.norm())
            assert stats["grad/trunk/cos_prev"] == pytest.approx(cos.item(), rel=1e-4)
            after = [p.detach() for p in coord.params("trunk")]
            ratio = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before))) / \
                torch.sqrt(sum((b ** 2).sum() for b in before))
            assert stats["grad/trunk/update_ratio"] == pytest.approx(ratio.item(), rel=1e-4)
        g_prev = g
        coord.zero_grad()
    assert "grad/trunk/update_ratio" in seen[0] and "grad/trunk/cos_prev" not in seen[0]
    assert "grad/trunk/update_ratio" not in seen[1] and "grad/trunk/update_ratio" in seen[2]
    for s in seen:
        assert s["grad/memory/lr"] == pytest.approx(1e-2) and s["grad/memory/skipped"] == 0.0
        assert s["grad/total_norm"] == pytest.approx(math.hypot(s["grad/trunk/norm"], s["grad/memory/norm"]))
    assert len(coord.monitor.angle_history["trunk"]) == 1
