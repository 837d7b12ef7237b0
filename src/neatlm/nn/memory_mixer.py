"""Test-time memory combined with (sliding-window) attention: MAG, MAL and MAC.

Every combination follows the mixer protocol ``y, state = mixer(x, state, ttl)`` (x, y: (B, T, dim);
state=None starts a sequence; the returned :class:`MemoryMixerState` continues it exactly, for any
split of the sequence). ``attention`` is any module with the same protocol (normally
:class:`neatlm.nn.attention.CausalSelfAttention` with a window).

* MAG, memory as gate (default):  y = SWA(x) * sigmoid(M(x)); attention and memory run side by side.
* MAL, memory as layer:           y = SWA(M(x)).
* MAC, memory as context, segment by segment, a segment being the tokens of one memory chunk
  (or the part of it inside this call):
      h = read(x_seg)                    memory read with the weights from the end of the last
                                         complete chunk, no update
      a = SWA(x_seg + h)                 attention over the segment with its memory context added
                                         token by token (the simple form: no persistent tokens, the
                                         read is summed into each token rather than prepended)
      y_seg = a * sigmoid(M(a))          the memory learns from (and is read at) the attention output
  Causal and split-exact like the others: every segment lies inside one chunk of the absolute grid,
  so its read uses the same weights whatever the split. Segments are sequential (one attention call
  per chunk), which is what makes MAC slower than MAG and MAL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .memory import MemorySettings, MemoryState, NeuralMemory, TTLControl


@dataclass
class MemoryMixerState:
    """The attention state (e.g. KV cache and position) and the memory state of one mixer."""

    attention: Any
    memory: MemoryState

    def detach(self) -> "MemoryMixerState":
        att = self.attention.detach() if hasattr(self.attention, "detach") else self.attention
        return MemoryMixerState(att, self.memory.detach())


class _MemoryMixer(nn.Module):
    def __init__(self, memory: NeuralMemory, attention: nn.Module) -> None:
        super().__init__()
        self.memory = memory
        self.attention = attention

    @staticmethod
    def _split(state: MemoryMixerState | None) -> tuple[Any, MemoryState | None]:
        return (None, None) if state is None else (state.attention, state.memory)


class MemoryAsGate(_MemoryMixer):
    """MAG: y = SWA(x) * sigmoid(M(x))."""

    def forward(self, x: torch.Tensor, state: MemoryMixerState | None = None, ttl: TTLControl = TTLControl()):
        sa, sm = self._split(state)
        a, sa = self.attention(x, sa)
        m, sm = self.memory(x, sm, ttl)
        return a * torch.sigmoid(m), MemoryMixerState(sa, sm)


class MemoryAsLayer(_MemoryMixer):
    """MAL: y = SWA(M(x))."""

    def forward(self, x: torch.Tensor, state: MemoryMixerState | None = None, ttl: TTLControl = TTLControl()):
        sa, sm = self._split(state)
        m, sm = self.memory(x, sm, ttl)
        a, sa = self.attention(m, sa)
        return a, MemoryMixerState(sa, sm)


class MemoryAsContext(_MemoryMixer):
    """MAC (simple form): per chunk-aligned segment, attend over x + read(x), then learn from it."""

    def forward(self, x: torch.Tensor, state: MemoryMixerState | None = None, ttl: TTLControl = TTLControl()):
        sa, sm = self._split(state)
        if sm is None:
            sm = self.memory.initial_state(x.shape[0], x.device)
        b = self.memory.chunk_size
        outs = []
        stats: dict[str, torch.Tensor] = {}
        i, T = 0, x.shape[1]
        while i < T:
            n = min(T - i, b - sm.position % b)
            seg = x[:, i:i + n]
            a, sa = self.attention(seg + self.memory.read(seg, sm), sa)
            m, sm = self.memory(a, sm, ttl)
            stats = sm.stats or stats   # the last segment that completed a chunk
            outs.append(a * torch.sigmoid(m))
            i += n
        y = torch.cat(outs, dim=1) if outs else x.new_zeros(x.shape)
        sm.stats = stats
        return y, MemoryMixerState(sa, sm)


COMBINATIONS = {"mag": MemoryAsGate, "mal": MemoryAsLayer, "mac": MemoryAsContext}


def build_memory_mixer(dim: int, settings: MemorySettings, attention: nn.Module, combine: str = "mag",
                       update_every: int = 1) -> nn.Module:
    """The memory/attention combination ``combine`` around a fresh NeuralMemory with ``settings``."""
    if combine not in COMBINATIONS:
        raise ValueError(f"memory.combine = {combine!r}: allowed {', '.join(COMBINATIONS)}")
    return COMBINATIONS[combine](NeuralMemory(dim, settings, update_every=update_every), attention)
