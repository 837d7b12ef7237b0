"""Activation checkpointing policies: identical gradients, measured savings, budget choice."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neatlm.grad.checkpointing import (
    SelectiveBackwardError,
    apply_checkpointing,
    choose_checkpointing,
    component_units,
    current_policies,
    measure_activations,
    remove_checkpointing,
)
from neatlm.grad.components import parse_components
from neatlm.grad.coordinator import GradientCoordinator


pytestmark = pytest.mark.usefixtures("one_thread")

D, H, T, V = 32, 4, 16, 17


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D // H).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, D))


class Memory(nn.Module):
    """A tiny recurrent branch: the state is passed in and out as a value."""

    def __init__(self):
        super().__init__()
        self.key = nn.Linear(D, D, bias=False)
        self.gate = nn.Parameter(torch.zeros(D))

    def forward(self, x, state=None):
        k = torch.tanh(self.key(x))
        new_state = k.mean(1) if state is None else 0.5 * state + 0.5 * k.mean(1)
        return torch.sigmoid(self.gate) * (k + new_state[:, None]), new_state


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.RMSNorm(D)
        self.attn = Attention()
        self.memory = Memory()
        self.norm2 = nn.RMSNorm(D)
        self.up = nn.Linear(D, 4 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, state=None, *, scale=1.0):
        h = self.norm1(x)
        m, state = self.memory(h, state)
        x = x + self.attn(h) + m
        g, u = self.up(self.norm2(x)).chunk(2, -1)
        x = x + scale * self.drop(self.down(F.silu(g) * u))
        return x, state


class Net(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.norm = nn.RMSNorm(D)

    def forward(self, idx, state=None):
        x = self.embed(idx)
        state = state or [None] * len(self.blocks)
        new = []
        for blk, s in zip(self.blocks, state):
            x, s = blk(x, s, scale=0.5)
            new.append(s)
        return F.linear(self.norm(x), self.embed.weight), new


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


IDX = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(0))


def step_fn(model):
    """Two chunks, the second carrying the first's per-block state (tensors through checkpoint)."""
    logits1, state = model(IDX[:, :7])
    logits2, state = model(IDX[:, 7:-1], state)
    logits = torch.cat([logits1, logits2], 1)
    return F.cross_entropy(logits.flatten(0, 1), IDX[:, 1:].flatten()) + sum(s.square().mean() for s in state)


def grads_under(policy):
    model = make()
    if policy is not None:
        apply_checkpointing(model, policy)
    torch.manual_seed(42)  # dropout
    step_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


MIXED = {"blocks.0": "full", "blocks.1": "selective", "blocks.2.memory": "full", "blocks.2.attn": "selective"}


def assert_in_effect(model, units):
    """Each unit keeps other bytes than under "none", and the model keeps fewer in all: what a
    test of equal gradients cannot see if a policy silently did nothing."""
    now = measure_activations(model, step_fn, units=units)
    none = measure_activations(model, step_fn, "none", units=units)
    assert all(now.per_unit[u] != none.per_unit[u] for u in units), (now.per_unit, none.per_unit)
    assert now.total < none.total


@pytest.mark.parametrize("policy", ["full", "selective", MIXED])
def test_policies_give_identical_gradients(policy):
    ref = grads_under(None)
    got = grads_under(policy)
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)
    model = make()
    applied = apply_checkpointing(model, policy)
    assert current_policies(model) == applied
    assert_in_effect(model, list(applied))


def test_wrapping_keeps_names_deepcopy_and_no_grad():
    model = make()
    keys = list(model.state_dict())
    applied = apply_checkpointing(model, {"blocks.0": "full", "blocks.*": "selective"})
    assert applied == {"blocks.0": "full", "blocks.1": "selective", "blocks.2": "selective", "blocks.3": "selective"}
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.blocks[0].up.weight.zero_()
        a, _ = model(IDX)
        b, _ = clone(IDX)
    assert not torch.equal(a, b)  # the copy's wrapper runs the copy's parameters
    assert current_policies(clone) == applied
    remove_checkpointing(model)
    assert current_policies(model) == {} and "forward" not in model.blocks[0].__dict__


def test_bad_policy_and_pattern_errors():
    model = make()
    with pytest.raises(ValueError, match="policy 'most'"):
        apply_checkpointing(model, "most")
    with pytest.raises(ValueError, match=r"match no module"):
        apply_checkpointing(model, {"decoder.*": "full"})
    with pytest.raises(ValueError, match="no `blocks`"):
        apply_checkpointing(nn.Sequential(nn.Linear(2, 2)), "full")


def test_measured_saved_bytes_order():
    model = make()
    m = {p: measure_activations(model, step_fn, p) for p in ("none", "selective", "full")}
    assert 0 < m["full"].total < m["selective"].total < m["none"].total
    for u in m["none"].per_unit:
        assert m["full"].per_unit[u] < m["selective"].per_unit[u] < m["none"].per_unit[u]
    assert current_policies(model) == {}  # probing leaves the model as it was
    # "full" keeps a block's inputs: the residual stream of both chunks (3 x 7 and 3 x 8 tokens of
    # 32 fp32) and, in the second call, the block's state from the first (3 x 32 fp32)
    assert m["full"].per_unit["blocks.1"] == 3 * 15 * D * 4 + 3 * D * 4


def test_measured_bytes_match_a_hand_count():
    lin = nn.Linear(8, 8)
    x = torch.randn(5, 8, requires_grad=True)
    # relu(lin(x)).sum(): addmm saves x (input); relu saves its output (5x8 fp32)
    probe = measure_activations(lin, lambda m: torch.relu(m(x)).sum(), policy={}, units=[])
    assert probe.total == 2 * 5 * 8 * 4


def test_tensors_saved_into_a_graph_the_forward_frees_are_not_counted():
    """A memory layer's inner gradient step builds and frees a graph inside the forward: what it
    saved is gone by backward (and its storage may be handed to a later tensor)."""
    lin = nn.Linear(8, 8)
    x = torch.randn(5, 8, requires_grad=True)

    def step(m):
        inner = torch.randn(7, 8, requires_grad=True)
        torch.autograd.grad(torch.tanh(inner).sum(), inner)   # tanh saved its output; freed here
        return torch.relu(m(x)).sum()

    assert measure_activations(lin, step, policy={}, units=[]).total == 2 * 5 * 8 * 4


def test_budget_picks_cheapest_fitting_plan_low_importance_first():
    model = make()
    none = measure_activations(model, step_fn, "none")
    everything = choose_checkpointing(model, step_fn, memory_budget=none.total)
    assert set(everything.policies.values()) == {"none"} and everything.fits

    units = {"blocks.0": 1.0, "blocks.1": 0.2, "blocks.2": 1.0, "blocks.3": 0.5}
    level = {"none": 0, "selective": 1, "full": 2}

    def low_importance_first(policies):
        return all(level[policies[u]] >= level[policies[v]] for u in units for v in units if units[u] < units[v])

    sel = measure_activations(model, step_fn, "selective")
    budget = (none.total + sel.total) // 2  # the two low-importance blocks can cover this alone
    plan = choose_checkpointing(model, step_fn, budget, units=units)
    assert plan.fits and plan.measured_bytes <= budget
    assert plan.policies["blocks.1"] != "none" and low_importance_first(plan.policies)
    assert plan.policies["blocks.0"] == plan.policies["blocks.2"] == "none"
    assert measure_activations(model, step_fn, plan.policies).total == plan.measured_bytes

    full = measure_activations(model, step_fn, "full")
    tight = (sel.total + full.total) // 2  # needs full somewhere and something on every block
    plan = choose_checkpointing(model, step_fn, tight, units=units)
    assert plan.fits and plan.measured_bytes <= tight and low_importance_first(plan.policies)
    assert plan.policies["blocks.1"] == "full" and "none" not in plan.policies.values()

    equal = choose_checkpointing(model, step_fn, budget)  # equal importance: selective before full
    assert equal.fits and "full" not in equal.policies.values() and "selective" in equal.policies.values()

    impossible = choose_checkpointing(model, step_fn, memory_budget=0, units=units)
    assert not impossible.fits and set(impossible.policies.values()) == {"full"}
    assert "DOES NOT FIT" in impossible.summary()


def test_component_units_and_per_component_budget():
    model = make()
    specs = parse_components({
        "memory": {"patterns": ["*.memory.*"], "importance": 0.1},
        "trunk": {"patterns": ["*"], "exclude": ["*.memory.*"]},
    })
    coord = GradientCoordinator(model, specs)
    units = component_units(model, coord)
    assert units["blocks.0.memory"] == 0.1 and units["blocks.0.attn"] == 1.0
    assert "blocks.0" not in units and set(units) == set(component_units(model, specs))
    none = measure_activations(model, step_fn, "none", units=list(units))
    mem_only = {u: ("full" if u.endswith("memory") else "none") for u in units}
    target = measure_activations(model, step_fn, mem_only, units=list(units)).total
    plan = choose_checkpointing(model, step_fn, target, units=units)
    assert plan.fits and none.total > plan.measured_bytes
    # the low-importance memory units are checkpointed before any trunk unit
    assert all(pol == "none" for u, pol in plan.policies.items() if not u.endswith("memory"))
    plan.apply(model)
    assert measure_activations(model, step_fn, units=list(units)).total == plan.measured_bytes  # as applied
    torch.manual_seed(42)
    step_fn(model).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    ref = grads_under(None)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("policy", ["full", "selective", {"blocks.*.norm2": "selective"}],
                         ids=["full", "selective", "selective-norms"])
def test_isolated_backward_through_checkpointed_units(policy):
    """Per-component losses run one backward each through the units they share. "full" replays a
    unit once per loss, gradients exact. Torch's selective checkpointing hands its cached outputs
    to one backward only: the second is refused with the fix, naming the unit. A unit where it
    cached nothing (a norm has no matmul) is replayed per loss like "full"."""
    specs = parse_components({
        "memory": {"patterns": ["*.memory.*"], "importance": 0.1},
        "trunk": {"patterns": ["*"], "exclude": ["*.memory.*"]},
    })

    def isolated_grads(policy):
        model = make()
        model.eval()  # no dropout: the two losses below reuse one forward
        if policy is not None:
            apply_checkpointing(model, policy)
        runs = []
        model.blocks[0].attn.register_forward_hook(lambda *_: runs.append(1))
        coord = GradientCoordinator(model, specs)
        logits, state = model(IDX[:, :-1])
        la = F.cross_entropy(logits.flatten(0, 1), IDX[:, 1:].flatten())
        lb = sum(s.square().mean() for s in state) + logits.square().mean()
        coord.backward({"trunk": la, "memory": lb})
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(runs), model

    if policy == "selective":
        with pytest.raises(SelectiveBackwardError, match=r"reached blocks\.\d .* use the 'full' or 'none' policy"):
            isolated_grads(policy)
        return
    (ref, ref_runs, _), (got, runs, model) = isolated_grads(None), isolated_grads(policy)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)
    # the policy took effect: fewer bytes kept, and under "full" blocks.0 ran again for each loss
    assert measure_activations(model, step_fn).total < measure_activations(model, step_fn, "none").total
    assert (ref_runs, runs) == (1, 3 if policy == "full" else 1)


def test_custom_save_ops_are_kept_measured_and_exact():
    from neatlm.grad.checkpointing import SAVE_OPS

    more = SAVE_OPS | {torch.ops.aten.silu.default}
    model = make()
    default = measure_activations(model, step_fn, "selective")
    apply_checkpointing(model, "selective", save_ops=more)
    wider = measure_activations(model, step_fn)  # measured as wrapped, custom ops included
    torch.manual_seed(42)
    step_fn(model).backward()
    # each block also keeps silu's output: (3 x 15 tokens) x 64 fp32 per block
    assert wider.total - default.total == len(model.blocks) * 3 * 15 * 2 * D * 4
    ref = grads_under(None)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=0, atol=0, msg=n)
