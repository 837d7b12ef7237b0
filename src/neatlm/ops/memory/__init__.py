"""Test-time memory ops (Titans / Atlas), laid out like flash-linear-attention's op folders:
:mod:`.chunk` is the chunk-parallel fast path, :mod:`.naive` the token-loop references it is
tested against. The maths is in ``docs/memory.md``."""

from .chunk import chunk_step, chunk_step_bwd, chunk_step_fwd, memory_forward, memory_scan
from .common import LN_EPS
from .naive import memory_forward_reference, memory_scan_reference, token_grad_reference

__all__ = [
    "LN_EPS",
    "chunk_step",
    "chunk_step_bwd",
    "chunk_step_fwd",
    "memory_forward",
    "memory_forward_reference",
    "memory_scan",
    "memory_scan_reference",
    "token_grad_reference",
]
