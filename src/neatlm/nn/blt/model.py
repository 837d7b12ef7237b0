"""Byte Latent Transformer (Pagnoni et al. 2024), small: a global model that runs once per patch.

    bytes ─► entropy model (frozen NeatLM) ─► H(x_i) ─► patch starts          (patching.py)
    bytes ─► hash n-gram embeddings ─► encoder byte blocks ─► h                (hashing.py)
    h ─► pool each complete patch (cross-attention) ─► z_j                     (local.py)
    [bos, z_0, z_1, ...] ─► global blocks ([model], [memory]) ─► g_0, g_1, ... (causal over patches)
    h + cross-attention to g_c(t) ─► decoder byte blocks ─► next-byte logits

``g_0`` is the global model's output for the stream-start patch ``bos``; ``g_{j+1}`` has read
patches 0..j. Byte t reads ``g_c(t)``, where c(t) counts the patches complete at t (ending at or
before t): every byte a prediction reads is at or before t, and where a patch closes, the next
byte, the one the entropy model found hard to predict, is predicted with the global model's view
of everything so far.

The call follows the model protocol, ``out = model(idx, state, ttl, scored=None)`` with
:class:`~neatlm.nn.model.ModelOutput`; :class:`BLTState` carries everything a stream needs (the
entropy model's and byte blocks' caches, the hash history, the open patch's bytes, the global
state and its last output), so splitting a stream anywhere and continuing equals reading it whole.

Rows of a batch complete different numbers of patches in a call. When nothing continues from the
returned state (``carry=False``: a training window that starts fresh), the global model runs all
rows together, padded at the end (causal: padding changes no real output). Otherwise each row
keeps its own global state, and rows whose histories and new patch counts agree run together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import Config
from ..memory import TTLControl
from ..model import Block, ModelOutput, NeatLM, residual_scale, run_blocks, swiglu_hidden
from ..state_tree import map_tensors, merge_tensors
from .hashing import HashNgramEmbedding
from .local import PatchPooler, PatchReader
from .patching import PatchCursor, entropy_of, patch_starts
from .settings import BLTSettings


@dataclass
class BLTState:
    """The state of a BLT stream between calls (tensors batch-first). ``open_bytes`` (B,
    max_patch - 1, local_dim) holds, right-aligned, the encoder outputs of the open patch's
    ``cursor.run`` bytes; ``global_state`` holds one global-model state per row (batch 1 each:
    rows complete different numbers of patches, so their caches differ in length and position),
    ``patches_seen`` (B,) how many global inputs each row has read; ``last_patch`` (B, dim) is the
    global output the next byte reads unless a patch completes first."""

    entropy: list | None
    cursor: PatchCursor
    tail: Tensor
    encoder: list
    open_bytes: Tensor
    global_state: list
    patches_seen: Tensor
    last_patch: Tensor
    decoder: list


def entropy_config(blt: BLTSettings) -> Config:
    """The entropy model's config: a plain attention byte model with a sliding window."""
    cfg = Config()
    m = cfg.model
    m.dim, m.n_layers, m.n_heads, m.window = blt.entropy_dim, blt.entropy_layers, blt.entropy_heads, blt.entropy_window
    m.context = max(m.context, blt.entropy_window)
    return cfg


def local_config(cfg: Config) -> Config:
    """The config of the byte blocks: attention only, the local width and window."""
    b = cfg.blt
    local = Config()
    m = local.model
    m.dim, m.n_heads, m.window = b.local_dim, b.local_heads, b.local_window
    m.n_layers = b.encoder_layers + b.decoder_layers
    m.norm_eps, m.init_std, m.rope_base = cfg.model.norm_eps, cfg.model.init_std, cfg.model.rope_base
    return local


class BLTModel(nn.Module):
    """``out = model(idx, state=None, ttl=TTLControl(), scored=None, carry=True)`` for bytes
    ``idx`` (B, T); see the module docstring. ``carry=False`` says the caller will not continue
    from ``out.state`` (a training window that starts fresh each step): the state is then not
    built, and the global model runs every row in one padded batch."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        b, m = cfg.blt, cfg.model
        self.settings = b
        local = local_config(cfg)
        # the stride patcher needs no entropies, so a stride run has no entropy model
        self.entropy = NeatLM(entropy_config(b)).requires_grad_(False) if b.patcher != "stride" else None
        self.embed = HashNgramEmbedding(b.local_dim, b.hash_buckets, b.hash_min_n, b.hash_max_n, m.init_std)
        self.encoder = nn.ModuleList(Block(local) for _ in range(b.encoder_layers))
        self.pool = PatchPooler(b.local_dim, m.dim, b.patch_queries, b.local_heads, m.norm_eps, m.init_std)
        self.bos = nn.Parameter(torch.randn(m.dim) * m.init_std)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.n_layers))
        self.global_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.unpatch = nn.Linear(m.dim, b.patch_queries * b.local_dim, bias=False)
        nn.init.normal_(self.unpatch.weight, std=m.init_std)
        self.readers = nn.ModuleList(PatchReader(b.local_dim, b.local_heads, m.norm_eps, m.init_std,
                                                 residual_scale(local)) for _ in range(b.decoder_layers))
        self.decoder = nn.ModuleList(Block(local) for _ in range(b.decoder_layers))
        self.norm = nn.RMSNorm(b.local_dim, eps=m.norm_eps)
        self.head = nn.Linear(b.local_dim, 256, bias=False)
        nn.init.normal_(self.head.weight, std=m.init_std)

    def train(self, mode: bool = True) -> "BLTModel":
        super().train(mode)
        if self.entropy is not None:
            self.entropy.eval()  # frozen: it decides the patches, it does not learn
        return self

    # ------------------------------------------------------------------ one call

    def forward(self, idx: Tensor, state: BLTState | None = None, ttl: TTLControl = TTLControl(),
                scored: Tensor | None = None, carry: bool = True) -> ModelOutput:
        b = self.settings
        B, T = idx.shape
        cursor = None if state is None else state.cursor
        starts, ends, next_cursor, entropy_state = self.patches(idx, state)

        h, tail = self.embed(idx, None if state is None else state.tail)
        encoder_states = []
        for block, s in zip(self.encoder, [None] * len(self.encoder) if state is None else state.encoder):
            h, s, _ = block(h, s, ttl)
            encoder_states.append(s)

        run = torch.zeros(B, dtype=torch.long, device=idx.device) if cursor is None else cursor.run
        open_bytes = (h.new_zeros(B, b.max_patch - 1, b.local_dim) if state is None else state.open_bytes)
        patches, done = self._complete_patches(h, open_bytes, run, starts, ends)
        patches = patches.to(self.bos.dtype)   # the global residual stream in the weights' dtype, as NeatLM's

        g, global_state, seen, aux, stats = self._global(
            patches, done, None if state is None else state.global_state,
            None if state is None else state.patches_seen, ttl, carry)
        if state is None:   # g_0 is bos's output
            last_patch, g = g[:, 0], g[:, 1:]
        else:
            last_patch = state.last_patch
        table = torch.cat((last_patch[:, None], g), dim=1)                   # (B, 1 + P, dim)
        complete = ends.long().cumsum(dim=1)                                  # patches complete at t
        keys = self.unpatch(table)                                            # (B, 1 + P, queries * local_dim)
        read = keys.gather(1, complete[..., None].expand(-1, -1, keys.shape[-1]))
        read = read.view(B, T, b.patch_queries, b.local_dim)

        y = h
        decoder_states = []
        for reader, block, s in zip(self.readers, self.decoder,
                                    [None] * len(self.decoder) if state is None else state.decoder):
            y = y + reader(y, read)
            y, s, _ = block(y, s, ttl)
            decoder_states.append(s)
        y = self.norm(y)
        if scored is not None:
            y = y[scored]
        logits = self.head(y)
        new_state = None
        if carry:
            tail_bytes = torch.cat((open_bytes, h), dim=1)[:, -(b.max_patch - 1):] if b.max_patch > 1 else open_bytes
            last = table.gather(1, done[:, None, None].expand(-1, 1, table.shape[-1]))[:, 0]
            new_state = BLTState(entropy_state, next_cursor, tail, encoder_states, tail_bytes, global_state, seen,
                                 last, decoder_states)
        return ModelOutput(logits, new_state, aux, stats)

    def patches(self, idx: Tensor, state: BLTState | None = None) -> tuple[Tensor, Tensor, PatchCursor, list]:
        """Where this call's patches start and end: (starts (B, T), ends (B, T), the patch cursor
        and the entropy model's state after the call). Byte t ends a patch iff byte t + 1 starts one,
        which the entropy of byte t + 1 (predicted from bytes up to t) decides."""
        b = self.settings
        cursor, entropy_state = (None, None) if state is None else (state.cursor, state.entropy)
        if self.entropy is None:
            after, entropy_state = torch.zeros(idx.shape, device=idx.device), None
        else:
            with torch.no_grad():
                e_out = self.entropy(idx, entropy_state)
            after, entropy_state = entropy_of(e_out.logits), e_out.state   # (B, T): H of bytes t + 1
        # at a stream start the first byte has no prediction; it starts a patch whatever its entropy,
        # and the monotonic rule compares byte 1 with itself
        first = after[:, :1] if cursor is None else cursor.next_entropy[:, None]
        starts, ends, next_cursor = patch_starts(torch.cat((first, after), dim=1), cursor, b.patcher,
                                                 b.threshold, b.stride, b.max_patch)
        return starts, ends, next_cursor, entropy_state

    def _complete_patches(self, h: Tensor, open_bytes: Tensor, run: Tensor, starts: Tensor,
                          ends: Tensor) -> tuple[Tensor, Tensor]:
        """The patch vectors (B, P, dim) of the patches that complete in this call, padded to the
        most any row completes, and how many each row completes (B,)."""
        b = self.settings
        B, T, d = h.shape
        done = ends.sum(dim=1)
        P = int(done.max()) if B else 0
        if P == 0:      # most one-byte calls of generation: nothing to pool
            return h.new_zeros(B, 0, self.cfg.model.dim), done
        C = open_bytes.shape[1]
        dev = h.device
        slot = torch.arange(C, device=dev)
        open_start = (slot == C - run[:, None]) & (run[:, None] > 0)
        ext = torch.cat((open_bytes, h), dim=1)                              # (B, C + T, d)
        valid = torch.cat((slot >= C - run[:, None], torch.ones_like(starts)), dim=1)
        start = torch.cat((open_start, starts), dim=1)
        patch_id = start.long().cumsum(dim=1) - 1
        index = torch.arange(C + T, device=dev).expand(B, -1)
        offset = index - torch.where(start, index, torch.zeros_like(index)).cummax(dim=1).values
        rows, cols = (valid & (patch_id < done[:, None]) & (patch_id >= 0)).nonzero(as_tuple=True)
        pid, off = patch_id[rows, cols], offset[rows, cols]
        grid = h.new_zeros(B, P, b.max_patch, d)
        mask = torch.zeros(B, P, b.max_patch, dtype=torch.bool, device=dev)
        grid = grid.index_put((rows, pid, off), ext[rows, cols])
        mask[rows, pid, off] = True
        mask[..., 0] |= ~mask.any(dim=-1)                                   # padding patches: one zero byte
        pooled = self.pool(grid.view(B * P, b.max_patch, d), mask.view(B * P, b.max_patch))
        return pooled.view(B, P, self.cfg.model.dim), done

    def _global(self, patches: Tensor, done: Tensor, rows_state: list | None, seen: Tensor | None,
                ttl: TTLControl, carry: bool) -> tuple[Tensor, list | None, Tensor, Tensor | None, dict[str, Tensor]]:
        """The global model over this call's complete patches (after ``bos`` at a stream start).

        Returns (outputs (B, [1 +] P, dim), the global state of each row, how many global inputs
        each row has read, auxiliary loss, statistics). A row's global state is its own: rows
        complete different numbers of patches, so their caches differ in length and position.
        Rows with the same history length and the same number of new patches run as one batch."""
        B = patches.shape[0]
        lead = 1 if rows_state is None else 0
        if rows_state is None:
            patches = torch.cat((self.bos.to(patches.dtype).expand(B, 1, -1), patches), dim=1)
        seen = torch.zeros_like(done) if seen is None else seen
        if not carry and rows_state is None:      # padded batches: padding at the end changes no output
            if patches.shape[1] == 0:
                return patches, None, seen, None, {}
            groups = padding_groups((lead + done).tolist(), overhead=float(done.float().mean()) + lead)
            if len(groups) == 1:
                out, _, aux, stats = self._run_global(patches, None, ttl)
                return out, None, seen + lead + done, aux, stats
            outputs = patches.new_zeros(B, patches.shape[1], self.cfg.model.dim)
            aux_terms, stats = [], {}
            for group in groups:
                rows = torch.tensor(group, device=patches.device)
                n = lead + int(done[rows].max())
                out, _, aux, st = self._run_global(patches[rows, :n], None, ttl)
                outputs = outputs.index_put((rows,), nn.functional.pad(out, (0, 0, 0, patches.shape[1] - n)))
                stats = st or stats
                if aux is not None:
                    aux_terms.append(aux * rows.numel() / B)
            return outputs, None, seen + lead + done, torch.stack(aux_terms).sum() if aux_terms else None, stats
        outputs = patches.new_zeros(B, patches.shape[1], self.cfg.model.dim)
        new_rows: list = [None] * B if rows_state is None else list(rows_state)
        aux_terms, stats = [], {}
        keys = seen * (patches.shape[1] + 1) + done
        for key in torch.unique(keys).tolist():
            rows = (keys == key).nonzero(as_tuple=True)[0]
            n = lead + int(done[rows[0]])
            if n == 0:
                continue
            sub = None if rows_state is None else merge_tensors([rows_state[r] for r in rows.tolist()],
                                                                lambda ts: torch.cat(ts, dim=0))
            out, s, aux, st = self._run_global(patches[rows, :n], sub, ttl)
            outputs = outputs.index_put((rows,), nn.functional.pad(out, (0, 0, 0, patches.shape[1] - n)))
            for i, r in enumerate(rows.tolist()):
                new_rows[r] = map_tensors(s, lambda t, i=i: t[i:i + 1])
            stats = st or stats
            if aux is not None:
                aux_terms.append(aux * rows.numel() / B)
        aux = torch.stack(aux_terms).sum() if aux_terms else None
        return outputs, new_rows, seen + lead + done, aux, stats

    def _run_global(self, x: Tensor, state: list | None, ttl: TTLControl
                    ) -> tuple[Tensor, list, Tensor | None, dict[str, Tensor]]:
        x, new_states, aux_loss, stats = run_blocks(self.blocks, x, state, ttl)
        return self.global_norm(x), new_states, aux_loss, stats

    # ------------------------------------------------------------------ accounting

    def num_params(self) -> int:
        """Trainable parameters (the frozen entropy model is not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def padding_groups(lengths: list[int], overhead: float) -> list[list[int]]:
    """Rows (indices into ``lengths``) grouped so that padding each group to its longest row wastes
    little: the rows sorted by length, cut where it pays, by dynamic programming over the cost
    ``sum(rows in group * longest in group) + overhead * groups``. ``overhead`` is what one more
    call of the global model costs, in padded patch-rows. Entropy patches make the rows' patch
    counts differ widely (the longest row of a 16 x 256-byte batch had 1.7 times the mean
    patches on the default corpus), and padding every row to the longest wasted that much."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    best = [0.0] + [math.inf] * n          # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):                 # the last group is sorted rows i..j-1, padded to sizes[j-1]
            cost = best[i] + (j - i) * sizes[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def matmul_flops_per_byte(cfg: Config, patch_size: float) -> dict[str, float]:
    """Forward matmul FLOPs per byte (2 per multiply-add; attention scores and the entropy model
    left out): the global blocks once per patch, the byte layers once per byte."""
    m, b = cfg.model, cfg.blt
    glob = m.n_layers * (4 * m.dim * m.dim + 3 * m.dim * swiglu_hidden(m.dim, m.mlp_hidden))
    d = b.local_dim
    layer = 4 * d * d + 3 * d * swiglu_hidden(d, 0)
    local = (b.encoder_layers + b.decoder_layers) * layer + b.decoder_layers * 4 * d * d + 256 * d
    pool = 3 * d * d + b.patch_queries * d * d * 2 + b.patch_queries * d * m.dim
    per_patch = glob + pool + m.dim * b.patch_queries * d
    return {"global": 2 * glob / patch_size, "total": 2 * (local + per_patch / patch_size)}
