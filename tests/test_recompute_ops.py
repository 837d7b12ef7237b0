"""Fused ops that recompute pointwise intermediates in backward (the "selective" policy's path)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from neatlm.config import load_config
from neatlm.grad.checkpointing import apply_checkpointing, current_policies, measure_activations, remove_checkpointing
from neatlm.grad.checkpointing.fused import FusedBlock, FusedSwiGLU
from neatlm.nn.model import Block, SwiGLU
from neatlm.nn.model import NeatLM
from neatlm.ops.recompute import rms_norm, rms_norm_reference, rms_norm_swiglu, rms_norm_swiglu_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed: int, dtype=torch.float64, weight: bool = True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    x, wgu, wd = r(2, 5, 8), r(12, 8), r(7, 6)
    nw = (torch.rand(8, generator=g, dtype=dtype) + 0.5).requires_grad_() if weight else None
    return x, nw, wgu, wd


@pytest.mark.parametrize("eps,weight", [(1e-6, True), (1e-6, False), (None, False)])
def test_rms_norm_swiglu_gradcheck_and_reference(eps, weight):
    seed = int(torch.randint(0, 2**31, ()).item())   # fresh random inputs every run
    x, nw, wgu, wd = _inputs(seed, weight=weight)
    args = (x, nw, wgu, wd, eps)
    assert torch.autograd.gradcheck(rms_norm_swiglu, args), f"seed {seed}"
    out, ref = rms_norm_swiglu(*args), rms_norm_swiglu_reference(*args)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    leaves = [t for t in args[:4] if t is not None]
    go = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go),
                               rtol=1e-10, atol=1e-12)


def test_norm_weight_without_norm_is_refused():
    x, nw, wgu, wd = _inputs(0)
    with pytest.raises(ValueError, match="eps=None"):
        rms_norm_swiglu(x, nw, wgu, wd, None)


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_gradcheck_and_reference(weight):
    seed = int(torch.randint(0, 2**31, ()).item())
    x, nw, _, _ = _inputs(seed, weight=weight)
    assert torch.autograd.gradcheck(rms_norm, (x, nw, 1e-5)), f"seed {seed}"
    torch.testing.assert_close(rms_norm(x, nw, 1e-5), rms_norm_reference(x, nw, 1e-5))
    torch.testing.assert_close(rms_norm(x, nw, 1e-5), F.rms_norm(x, (8,), nw, 1e-5))


def test_fused_ops_keep_fewer_bytes():
    x, nw, wgu, wd = _inputs(0, torch.float32)
    x = torch.randn(64, 32, 8, requires_grad=True)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, nw, wgu, wd, 1e-5)
        return sum(seen.values())

    assert saved_bytes(rms_norm_swiglu) < 0.7 * saved_bytes(rms_norm_swiglu_reference)


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _model_and_step(*overrides: str):
    cfg = load_config("tiny", overrides=["model.n_layers=2", *overrides])
    torch.manual_seed(0)
    model = NeatLM(cfg)
    idx = torch.randint(0, 256, (2, 33))

    def step(m):
        logits, _, _, _ = m(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))

    return model, step


@pytest.mark.parametrize("overrides", [(), ("memory.enabled=true", "model.window=8", "memory.chunk_size=8")],
                         ids=["attention", "memory"])
def test_selective_block_uses_fused_path_with_identical_gradients(overrides):
    model, step = _model_and_step(*overrides)
    fused = copy.deepcopy(model)
    apply_checkpointing(fused, "selective")
    step(model).backward()
    loss = step(fused)
    assert {"_RMSNormSwiGLUBackward", "_RMSNormBackward"} <= _graph_names(loss)
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(isinstance(b, FusedBlock) for b in fused.blocks)
    none, sel = measure_activations(model, step, "none"), measure_activations(model, step, "selective")
    # with memory, the memory mixer (the bulk of the activations) keeps its own: a smaller saving
    assert sel.total < (0.97 if overrides else 0.8) * none.total


def test_selective_swaps_modules_keeping_parameters_names_and_state_dicts():
    model, step = _model_and_step()
    blocks = list(model.blocks)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_checkpointing(model, "selective")
    assert [type(b) for b in model.blocks] == [FusedBlock, FusedBlock]
    assert current_policies(model) == {"blocks.0": "selective", "blocks.1": "selective"}
    assert dict(model.named_parameters()) == params               # the same Parameter objects
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state)                                  # a checkpoint of the plain model loads
    model.eval()
    assert not any(m.training for m in model.modules()) and not any(b.original.training for b in model.blocks)
    model.train()
    clone = copy.deepcopy(model)
    assert isinstance(clone.blocks[0], FusedBlock) and clone.blocks[0].original.mixer is clone.blocks[0].mixer
    remove_checkpointing(model)
    assert list(model.blocks) == blocks and all(type(b) is Block for b in model.blocks)
    assert current_policies(model) == {} and model.blocks[0].training
    # a bare SwiGLU unit gets its own fused counterpart
    apply_checkpointing(model, "selective", module_filter=["blocks.*.mlp"])
    assert [type(b.mlp) for b in model.blocks] == [FusedSwiGLU, FusedSwiGLU]
    assert "_RMSNormSwiGLUBackward" in _graph_names(step(model))
    remove_checkpointing(model)
    assert all(type(b.mlp) is SwiGLU for b in model.blocks)


def test_selective_under_autocast_falls_back_to_torch_selective_checkpointing():
    model, step = _model_and_step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        none, sel = measure_activations(model, step, "none"), measure_activations(model, step, "selective")
        apply_checkpointing(model, "selective")
        assert "_RMSNormSwiGLUBackward" not in _graph_names(step(model))
        assert measure_activations(model, step).total == sel.total   # as applied: the fallback saves
    assert sel.total < 0.8 * none.total
    assert "_RMSNormSwiGLUBackward" in _graph_names(step(model))     # the same modules, fused in fp32


def test_fused_output_is_not_a_view_and_double_backward_raises():
    x, nw, wgu, wd = _inputs(0)
    out = rms_norm_swiglu(x, nw, wgu, wd, 1e-6)
    out.mul_(2.0)          # in place on the output, as on the plain path
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("overrides", [
    ("memory.enabled=true", "model.window=8", "memory.chunk_size=8", "memory.conv_size=4"),
    ("memory.enabled=true", "model.window=8", "memory.chunk_size=8", "memory.combine=mal", "memory.heads=2",
     "memory.optimizer=muon", "memory.objective=omega", "memory.features=poly"),
    ("model.mixer=bk",),
    ("model.mlp=moe",),
], ids=["titans", "atlas-mal", "bk", "moe"])
@pytest.mark.parametrize("policy", ["selective", "full"])
def test_every_component_gets_the_same_gradients_under_checkpointing(overrides, policy):
    """Each kind of mixer and channel mixer, checkpointed, gives the gradients of no checkpointing.
    (Torch's selective path replays ops on cached GEMM outputs, so a component that updates one in
    place in its forward would get wrong gradients there, e.g. for the memory gates.)"""
    model, step = _model_and_step(*overrides)
    ckpt = copy.deepcopy(model)
    apply_checkpointing(ckpt, policy)
    assert measure_activations(ckpt, step).total < measure_activations(model, step).total   # in effect
    step(model).backward()
    step(ckpt).backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
