"""NeatLM: a byte-level language model assembled from config.

    embedding -> [Block] * n_layers -> RMSNorm -> tied head

    Block(x, state, ttl):
        y, state = mixer(norm1(x), state, ttl)   # attention | BK mixer, optionally with memory (MAG/MAL/MAC)
        x = x + y
        y, aux = channel_mixer(norm2(x))         # SwiGLU | sparse MoE (aux: its auxiliary loss or None)
        x = x + y

The block never changes when a component is added: :func:`build_mixer` and
:func:`build_channel_mixer` pick the parts from config. Every mixer follows one protocol,
``y, state = mixer(x, state, ttl)``, so the whole model carries state exactly:
``model(idx[:, :a])`` then ``model(idx[:, a:], out.state)`` equals ``model(idx)``.

Everything a call needs comes in as an argument (tokens, carried state, the test-time-learning
control) and everything it produces comes back in :class:`ModelOutput` (logits, new state,
auxiliary loss to add to the objective, statistics to log). Nothing is set on a module before a
call or read from it afterwards.
"""

from __future__ import annotations

import math
from typing import Any, ContextManager, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from .attention import CausalSelfAttention
from .bk import BKMixer
from .memory import NeuralMemory, TTLControl
from .memory_mixer import MemoryMixerState, build_memory_mixer
from .moe import MoE

ModelState = list  # one mixer state per block


class ModelOutput(NamedTuple):
    """What one call of :class:`NeatLM` returns.

    logits: (B, T, vocab); (N, vocab) when the call passed ``scored`` (one row per True position,
        in row-major order).
    state: one mixer state per block; pass it back to continue the sequences exactly.
    aux_loss: the sum of the components' auxiliary losses (MoE load balance), in the graph and
        already weighted: add it to the training objective. None when no component has one.
    stats: detached scalars for the metrics stream, e.g. ``ttl/layer0/inner_loss_after``
        (filled when the call asked for test-time-learning statistics).
    """

    logits: Tensor
    state: ModelState
    aux_loss: Tensor | None
    stats: dict[str, Tensor]


class Features(NamedTuple):
    """:meth:`NeatLM.features`: ``hidden`` (B, T, dim) where :class:`ModelOutput` has logits; the
    other fields as there."""

    hidden: Tensor
    state: ModelState
    aux_loss: Tensor | None
    stats: dict[str, Tensor]


def swiglu_hidden(dim: int, requested: int) -> int:
    """8/3 * dim rounded up to a multiple of 16 keeps the SwiGLU cost equal to a 4x GELU MLP."""
    return requested if requested > 0 else 16 * math.ceil(8 * dim / 3 / 16)


class SwiGLU(nn.Module):
    """``y, aux = mlp(x)``: down(silu(gate) * up), no auxiliary loss (None).

    The "selective" checkpoint policy swaps in :class:`neatlm.grad.checkpointing.fused.FusedSwiGLU`
    (the same computation as one fused op that keeps fewer activations)."""

    def __init__(self, dim: int, hidden: int, init_std: float = 0.02, out_scale: float = 1.0):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.gate_up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=init_std * out_scale)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up), None


def residual_scale(cfg: Config) -> float:
    """GPT-2 style: output projections of residual branches start at std / sqrt(2 n_layers)."""
    return 1 / math.sqrt(2 * cfg.model.n_layers)


def build_mixer(cfg: Config) -> nn.Module:
    """The sequence mixer of one block, following the ``y, state = mixer(x, state, ttl)`` protocol.

    Each component initialises its own parameters (memory gates, BK potentials need their own
    schemes); nothing re-initialises them afterwards.
    """
    m = cfg.model
    if m.mixer == "attention":
        mixer: nn.Module = CausalSelfAttention(m.dim, m.n_heads, window=m.window, rope_base=m.rope_base,
                                               init_std=m.init_std, out_scale=residual_scale(cfg))
    elif m.mixer == "bk":
        mixer = BKMixer.from_config(m.dim, cfg.bk, init_std=m.init_std, out_scale=residual_scale(cfg))
    else:  # validated in config
        raise AssertionError(m.mixer)
    if cfg.memory.enabled:
        mixer = build_memory_mixer(m.dim, cfg.memory, mixer, cfg.memory.combine, cfg.ttl.update_every)
    return mixer


def build_channel_mixer(cfg: Config) -> nn.Module:
    """The channel mixer of one block: ``y, aux_loss = mlp(x)``."""
    m = cfg.model
    hidden = swiglu_hidden(m.dim, m.mlp_hidden)
    if m.mlp == "swiglu":
        return SwiGLU(m.dim, hidden, m.init_std, residual_scale(cfg))
    if m.mlp == "moe":
        return MoE.from_config(m.dim, hidden, cfg.moe, init_std=m.init_std, out_scale=residual_scale(cfg))
    raise AssertionError(m.mlp)


class Block(nn.Module):
    """``x, state, aux = block(x, state, ttl)``: mixer and channel mixer as residual branches.

    With a SwiGLU MLP, the "selective" checkpoint policy swaps in
    :class:`neatlm.grad.checkpointing.fused.FusedBlock` (the same computation as fused ops that
    keep fewer activations)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.model.dim, eps=cfg.model.norm_eps)
        self.mixer = build_mixer(cfg)
        self.norm2 = nn.RMSNorm(cfg.model.dim, eps=cfg.model.norm_eps)
        self.mlp = build_channel_mixer(cfg)

    def forward(self, x: Tensor, state: Any = None, ttl: TTLControl = TTLControl()) -> tuple[Tensor, Any, Tensor | None]:
        """(x, state, aux_loss) after this block."""
        y, state = self.mixer(self.norm1(x), state, ttl)
        x = x + y
        y, aux = self.mlp(self.norm2(x))
        return x + y, state, aux


def run_blocks(blocks: nn.ModuleList, x: Tensor, state: ModelState | None,
               ttl: TTLControl) -> tuple[Tensor, ModelState, Tensor | None, dict[str, Tensor]]:
    """``x`` through ``blocks`` in order, each with its carried state: (x, the new states, the summed
    auxiliary losses or None, the memories' statistics keyed ``ttl/layer<i>/<name>``)."""
    states = state if state is not None else [None] * len(blocks)
    new_states: ModelState = []
    aux_terms: list[Tensor] = []
    stats: dict[str, Tensor] = {}
    for i, (block, s) in enumerate(zip(blocks, states)):
        x, s, aux = block(x, s, ttl)
        new_states.append(s)
        if aux is not None:
            aux_terms.append(aux)
        if isinstance(s, MemoryMixerState):
            stats.update({f"ttl/layer{i}/{k}": v for k, v in s.memory.stats.items()})
    return x, new_states, torch.stack(aux_terms).sum() if aux_terms else None, stats


class NeatLM(nn.Module):
    """``out = model(idx, state=None, ttl=TTLControl())`` for byte ids ``idx`` of shape (batch, time);
    ``out`` is a :class:`ModelOutput` (logits, state, aux_loss, stats).

    ``scored``, a boolean (batch, time) mask, runs the output head only where it is True: a loss
    that scores few positions (MQAR scores only its queries) needs no other logits, and at a large
    vocabulary the head is most of a small model's step."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.embed = nn.Embedding(m.vocab_size, m.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.n_layers))
        self.norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        nn.init.normal_(self.embed.weight, std=m.init_std)  # also the tied output head

    def forward(self, idx: Tensor, state: ModelState | None = None, ttl: TTLControl = TTLControl(),
                scored: Tensor | None = None, carry: bool = True) -> ModelOutput:
        """``carry``: whether the caller continues from ``out.state``; a model whose exact state
        costs extra work may skip it when not (BLT); this one's state is free and always returned."""
        hidden, new_state, aux_loss, stats = self.features(idx, state, ttl)
        if scored is not None:
            hidden = hidden[scored]                           # (N, dim): only the positions scored
        logits = F.linear(hidden, self.embed.weight)          # (B, T, vocab) or (N, vocab), tied head
        return ModelOutput(logits, new_state, aux_loss, stats)

    def features(self, idx: Tensor, state: ModelState | None = None, ttl: TTLControl = TTLControl()) -> Features:
        """The model without its output head: the normalised final hidden states, which a head
        other than next-byte prediction reads (the classifier of two-pass adaptation pools them)."""
        x, new_states, aux_loss, stats = run_blocks(self.blocks, self.embed(idx), state, ttl)
        return Features(self.norm(x), new_states, aux_loss, stats)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def decoding_mode(model: nn.Module) -> ContextManager:
    """``torch.inference_mode()`` for sampling: no graph and no version counters, measured about 15%
    faster per byte than ``no_grad`` on one CPU thread (tiny preset 1.40 against 1.69 ms, with MAG
    memory 2.59 against 3.06 ms; the same bytes). The memories keep learning under it, their inner
    step being analytic; a memory whose inner gradients come from autograd (the naive reference
    mode) needs grad mode inside the call, which inference mode forbids, so such a model decodes
    under ``no_grad``."""
    if any(isinstance(m, NeuralMemory) and m.learns_by_autograd for m in model.modules()):
        return torch.no_grad()
    return torch.inference_mode()


def generate(model: NeatLM, prompt: Tensor, max_new: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> Tensor:
    """Sample ``max_new`` bytes after ``prompt`` (1-D) carrying the model state (KV cache, memory):
    the prompt is read once, then each call reads only the byte sampled last.

    temperature 0 means greedy decoding; top_k 0 means no filtering.
    """
    if max_new < 0:
        raise ValueError(f"max_new = {max_new!r}: must be >= 0")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature = {temperature!r}: must be a finite number >= 0")
    if top_k < 0:
        raise ValueError(f"top_k = {top_k!r}: must be >= 0 (0 = no filtering)")
    was_training = model.training
    model.eval()
    try:
        with decoding_mode(model):
            out = _sample(model, prompt, max_new, temperature, top_k, generator)
    finally:
        model.train(was_training)
    return out.clone()   # an ordinary tensor: an inference tensor refuses in-place ops outside the mode


def _sample(model: NeatLM, prompt: Tensor, max_new: int, temperature: float, top_k: int,
            generator: torch.Generator | None) -> Tensor:
    logits, state, _, _ = model(prompt[None])
    out = []
    for _ in range(max_new):
        last = logits[0, -1].float()
        if temperature <= 0:
            nxt = last.argmax()
        else:
            last = last / temperature
            if top_k > 0:
                kth = torch.topk(last, min(top_k, last.numel())).values[-1]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(last, dim=-1), 1, generator=generator)[0]
        out.append(nxt)
        if len(out) < max_new:   # the last byte's logits would never be read
            logits, state, _, _ = model(nxt.view(1, 1), state)
    return torch.stack(out) if out else prompt.new_empty(0)
