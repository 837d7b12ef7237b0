"""NeuralMemory: the Titans / Atlas test-time memory layer.

    mem = NeuralMemory(dim=128, heads=2, chunk_size=64)
    y, state = mem(x)                 # x (B, T, dim) -> y (B, T, dim); memory learns while it reads
    y2, state = mem(x2, state)        # continue the same sequences exactly (any split, even 1 token)
    state = state.detach()            # truncated backprop between calls
    state = mem.initial_state(B)      # new sequences start from the learned initial weights
    y, state = mem(x, state, TTLControl(learn=False))   # read only (e.g. TTL warmup)

Per head: q_t = normalize(W_Q x_t), k_t = normalize(W_K x_t), v_t = W_V x_t; keys and queries go
through the feature map phi (identity or polynomial); the memory branch M_W is linear or a silu MLP
(see :mod:`neatlm.ops.memory`); the MLP memory reads y_t = q_t + M_W(phi(q_t)) and learns
||k_t + M_W(phi(k_t)) - v_t||^2 when ``residual``. Gates are linear maps of x followed by sigmoids:

* learning rate theta_t = max_lr * sigmoid(.) per token and head;
* momentum eta_n and forgetting alpha_n per chunk and head, from the chunk mean of x (the mean of
  the per-token logits), because the memory takes one optimiser step per chunk;
* Omega gates gamma_t per token (objective ``omega``).

Chunks sit on an absolute grid: chunk n holds positions [n b, (n+1) b) of the sequence, whatever
the split of the calls. Tokens of an unfinished chunk are kept in the state (their features, targets
and gate logits; plus the c - 1 tokens before the chunk for the Omega window) and are read with the
weights from the end of the last complete chunk; the chunk's step happens in the call that completes
it. Hence any split of a sequence, down to one token per call, gives the same outputs as one call.

Test-time learning does not depend on ``self.training`` nor on grad mode: it runs in eval() and
under torch.no_grad() alike (then it simply builds no graph). What it does in a call (learn or only
read, collect statistics) comes in with the call as a :class:`TTLControl`; the statistics come back
in the returned state. Nothing is set on the module between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.features import poly_feature_dim, poly_features, poly_features_reference, poly_init_coeffs
from ..ops.memory import memory_forward, memory_scan, memory_scan_reference
from ..ops.newton_schulz import newton_schulz
from ..settings import ConfigError, check_settings, setting


@dataclass
class MemorySettings:
    """The memory layer's own settings (the ``[memory]`` table holds these plus how the model
    assembles the layer). Checked on construction of the layer."""

    heads: int = setting(1, "memory heads", min=1)
    dim_head: int = setting(0, "width per memory head; 0 = dim // heads", min=0)
    chunk_size: int = setting(64, "tokens per memory step: one linearisation point and one optimiser step per "
                              "chunk of the absolute position grid (also the MAC segment)", min=1)
    function: str = setting("mlp", "memory function", choices=("linear", "mlp"))
    depth: int = setting(2, "layers of the MLP memory", min=2)
    expansion: float = setting(2.0, "hidden width of the MLP memory / dim_head", min=0.25)
    residual: bool = setting(True, "MLP memory computes k + branch(k)")
    norm: bool = setting(False, "LayerNorm (no affine) on the MLP memory branch output")
    objective: str = setting("titans", "inner objective: titans = one token, omega = window of omega_window "
                             "tokens", choices=("titans", "omega"))
    omega_window: int = setting(4, "Omega rule window c (tokens each token's inner objective covers)", min=1)
    features: str = setting("identity", "key/query feature map", choices=("identity", "poly"))
    poly_degree: int = setting(2, "degree of the polynomial feature map", min=2, max=4)
    optimizer: str = setting("momentum", "inner optimiser", choices=("momentum", "muon"))
    ns_steps: int = setting(5, "Newton-Schulz steps for the Muon inner optimiser", min=1)
    max_lr: float = setting(0.1, "cap of the data-dependent per-token inner learning rate", min=0.0)
    max_grad_norm: float = setting(1.0, "cap on each token's inner gradient norm (keeps the memory stable at "
                                   "init); 0 = off", min=0.0)
    learn_init: bool = setting(True, "meta-learn the initial memory weights in the outer loop")
    conv_size: int = setting(0, "short causal depthwise conv over q, k, v (Titans uses 4); starts as the "
                             "identity on q, v and as a token shift (mean of this and the previous token) on k; "
                             "0 = off", min=0)
    query_init_from_key: bool = setting(True, "initialise W_Q as a copy of W_K (then trained separately), so a "
                                        "read with a stored key returns its value from the first step")
    detach_output: bool = setting(False, "outer gradients reach the memory read only, not the fast-weight "
                                  "trajectory (k, v, gates, W0 get no outer gradient)")
    mode: str = setting("chunk", "chunk = the chunk-parallel fast path with its hand-written backward; "
                        "autograd = the same chunk maths differentiated by autograd; naive = the token-loop "
                        "reference (slow); the last two are for checking and measuring the first",
                        choices=("chunk", "autograd", "naive"))


@dataclass(frozen=True)
class MemoryShapes:
    """Sizes the layer derives from its settings and the model width (one place, so that the
    layer and :func:`training_footprint` cannot disagree)."""

    dim_head: int
    dim_key: int                          # width of phi(k): dim_head, or the polynomial feature width
    weights: tuple[tuple[int, int], ...]  # (out, in) of each fast-weight matrix, per head

    @property
    def hidden(self) -> tuple[int, ...]:
        """Widths of the MLP memory's hidden layers (none for the linear memory)."""
        return tuple(o for o, _ in self.weights[:-1])


def memory_shapes(settings: MemorySettings, dim: int) -> MemoryShapes:
    """dim_head (``dim // heads`` unless set), the key feature width and the fast-weight shapes."""
    dim_head = settings.dim_head or dim // settings.heads
    dk = poly_feature_dim(dim_head, settings.poly_degree) if settings.features == "poly" else dim_head
    if settings.function == "linear":
        return MemoryShapes(dim_head, dk, ((dim_head, dk),))
    hidden = max(1, int(round(settings.expansion * dim_head)))
    shapes = ((hidden, dk),) + ((hidden, hidden),) * (settings.depth - 2) + ((dim_head, hidden),)
    return MemoryShapes(dim_head, dk, shapes)


@dataclass(frozen=True)
class MemoryFootprint:
    """Estimated bytes one memory layer keeps for the backward of one training forward, by part.

    The layer's cost grows with the feature width and the fast-weight size in ways that are easy
    to miss (degree-2 features of a 128-wide head are 8,384 wide; every chunk keeps its own copy
    of W and S), so a config is checked against this before anything is allocated.
    """

    fast_weights: int   # W and S that every chunk step keeps (Muon: also its Newton-Schulz iterates)
    chunks: int         # each chunk's rows [keys; queries] through the memory and the inner-gradient terms
    features: int       # the polynomial feature map's intermediates for q and k
    tokens: int         # projections, conv, normalisation, gates and the read, per token

    @property
    def total(self) -> int:
        return self.fast_weights + self.chunks + self.features + self.tokens


def training_footprint(settings: MemorySettings, dim: int, batch: int, seq_len: int,
                       dtype_bytes: int = 4) -> MemoryFootprint:
    """Bytes one :class:`NeuralMemory` keeps for backward over one forward of ``seq_len`` tokens
    of ``batch`` rows (elements x ``dtype_bytes``; the layer computes in fp32 even under bf16
    autocast). Pure arithmetic, nothing is allocated.

    Counted per (batch row, head), following what the chunk-parallel scan saves
    (:mod:`neatlm.ops.memory.chunk`): per complete chunk of b tokens, with n_k = omega_window - 1 + b
    key rows and R = n_k + b rows [keys; queries]: the chunk's W and S; with Muon also ns_steps + 1
    weight-sized Newton-Schulz iterates (and their Gram matrices) for every chunk but the last,
    whose update only feeds the returned state, which training detaches, so its graph is freed;
    the memory's layer inputs (the first one dim_key wide), pre-activations and output on the R
    rows; the inner-gradient terms on the key rows (more without the fused backward: autograd keeps
    the temporaries of silu' and the row-weighted deltas). Then the trailing partial chunk's read, the
    polynomial feature map's factors (2 (degree - 1) feature-wide tensors, for q and k, and the
    degree + 1 selection matrices),
    and per token the layer input and about three inner-width tensors (q and k before their
    normalisation, the merged read; two more for poly features, three for the conv). Not counted:
    ``ttl.update_every`` (chunks that only read keep less), the backward's own temporaries, and
    ``mode = "naive"`` (the token-loop reference, for checking only, keeps far more).

    Checked against the bytes of the tensors saved for backward and still alive after the
    forward (``saved_tensors_hooks``, counted as :mod:`neatlm.grad.checkpointing.measure` counts
    them) in one fp32 forward of small layers (tests/test_memory_size_guard.py asserts 0.5x-3x):
    estimate / measured = 1.03 for an identity-feature Titans MLP (fused backward), 0.99 for a
    poly + Muon + Omega Atlas layer, 0.99-1.07 over Muon, linear, depth-3, LayerNorm, conv,
    degree-3, unclipped and unfused variants, and 1.03 at the tiny preset's width with poly
    features (dim_head 128, 8,384-wide keys, batch 1 x 256: 137 MB estimated, 133 MB measured). A whole training
    step peaks higher (the backward's gradients come on top): see
    :func:`neatlm.config.memory_training_bytes`.
    """
    layout = memory_shapes(settings, dim)
    dh, dk, heads = layout.dim_head, layout.dim_key, settings.heads
    b = settings.chunk_size
    e = settings.omega_window - 1 if settings.objective == "omega" else 0
    n_k, rows = e + b, e + 2 * b
    n_chunks, tail = divmod(seq_len, b)
    ins = [i for _, i in layout.weights]
    outs = [o for o, _ in layout.weights]
    hid = sum(layout.hidden)
    fused = settings.mode == "chunk"

    # all rows: every layer's input, the hidden pre-activations, the output; key rows: each
    # layer's delta, and silu'(z) and Delta W per hidden layer (plus a few per-row scalars)
    per_chunk = rows * (sum(ins) + hid + dh) + n_k * (sum(outs) + 2 * hid + 3)
    if settings.norm and settings.function == "mlp":
        per_chunk += rows + n_k
    if not fused:   # autograd keeps silu'(z)'s temporaries and the row-weighted deltas
        per_chunk += n_k * (3 * hid + sum(outs))
    n_w = sum(o * i for o, i in layout.weights)
    w_all = 2 * n_w * n_chunks
    if settings.optimizer == "muon" and n_chunks > 1:
        # the last chunk's update only feeds the returned state, which training detaches: its
        # Newton-Schulz graph is freed with it
        ns = settings.ns_steps
        w_all += (n_chunks - 1) * sum((ns + 1) * o * i + 2 * ns * min(o, i) ** 2 for o, i in layout.weights)
    tail_read = tail * (sum(ins) + hid) if tail else 0

    feat = feat_weights = 0
    if settings.features == "poly":   # q and k: each product of the selection GEMMs keeps both factors,
        feat = 2 * 2 * (settings.poly_degree - 1) * dk            # and the GEMMs their selections: one
        feat_weights = (settings.poly_degree + 1) * dh * dk         # with the coefficients per call, the rest shared
    inner = heads * dh
    per_token = dim + (3 + (2 if settings.features == "poly" else 0) + (3 if settings.conv_size else 0)) * inner \
        + 4 * heads

    rows_heads = batch * heads
    return MemoryFootprint(
        fast_weights=dtype_bytes * rows_heads * w_all,
        chunks=dtype_bytes * rows_heads * (n_chunks * per_chunk + tail_read),
        features=dtype_bytes * (rows_heads * seq_len * feat + feat_weights),
        tokens=dtype_bytes * batch * seq_len * per_token,
    )


@dataclass(frozen=True)
class TTLControl:
    """What test-time learning does in one call (the schedule a trainer varies from step to step).

    learn: False reads with the current fast weights and takes no inner step (TTL warmup).
    collect_stats: also return inner-loop statistics in the new state's ``stats`` (costs a few
        extra memory forwards; a trainer asks on the steps it logs).
    """

    learn: bool = True
    collect_stats: bool = False


@dataclass
class MemoryState:
    """Everything needed to continue a batch of sequences exactly.

    weights, momentum: fast weights W and momentum S, each a tuple of (B, H, out, in).
    buf_k (B, H, c-1+m, dk), buf_v (B, H, c-1+m, dv), buf_gamma (B, H, c-1+m) or None: the c-1
    tokens before the current chunk (zeros with gamma 0 at the start of a sequence) and the m tokens
    of the unfinished chunk. buf_lr, buf_mom, buf_decay (B, H, m): their learning rates and momentum
    and forgetting logits. position: tokens seen so far (m = position % chunk_size).
    """

    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]
    buf_k: torch.Tensor
    buf_v: torch.Tensor
    buf_gamma: torch.Tensor | None
    buf_lr: torch.Tensor
    buf_mom: torch.Tensor
    buf_decay: torch.Tensor
    position: int = 0
    conv: torch.Tensor | None = None   # (B, K-1, 3 inner): last q|k|v projections for the causal conv
    # statistics of the call that produced this state (TTLControl.collect_stats), not needed to
    # continue: inner loss before/after, update size, gate means; detached scalars
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def _map(self, fn) -> "MemoryState":
        out = {}
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, tuple):
                val = tuple(fn(t) for t in val)
            elif isinstance(val, torch.Tensor):
                val = fn(val)
            out[f.name] = val
        return replace(self, **out)

    def detach(self) -> "MemoryState":
        """Same values, cut from the autograd graph (truncated backprop through time)."""
        return self._map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> "MemoryState":
        return self._map(lambda t: t.to(*args, **kwargs))


def _after(buffer: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    """The buffered tokens of the chunk in progress, then the new ones, along ``dim``. A call that
    starts on a chunk boundary has an empty buffer: the new tensor as it is, not a copy (with
    polynomial features the keys are the widest tensor of the layer)."""
    return new if buffer.shape[dim] == 0 else torch.cat([buffer, new], dim=dim)


class NeuralMemory(nn.Module):
    """Test-time memory layer: ``y, state = mem(x, state=None)`` with x, y of shape (B, T, dim)."""

    def __init__(self, dim: int, settings: MemorySettings | None = None, *, update_every: int = 1,
                 **overrides) -> None:
        """``settings`` (default :class:`MemorySettings`) with any field overridden by keyword, e.g.
        ``NeuralMemory(256, chunk_size=32)``. ``update_every``: the inner step runs on every n-th chunk
        of the absolute grid only (the others are read, not learned from)."""
        super().__init__()
        cfg = replace(settings or MemorySettings(), **overrides)
        check_settings("memory", cfg)
        if update_every < 1:
            raise ConfigError(f"ttl.update_every = {update_every!r}: must be >= 1")
        layout = memory_shapes(cfg, dim)
        dim_head = layout.dim_head
        if not cfg.dim_head and dim % cfg.heads:
            raise ConfigError(f"memory.heads = {cfg.heads}: must divide the model width {dim} (or set memory.dim_head)")
        self.settings = cfg
        heads, function, conv_size = cfg.heads, cfg.function, cfg.conv_size
        self.dim, self.heads, self.dim_head, self.chunk_size = dim, heads, dim_head, cfg.chunk_size
        self.function, self.optimizer, self.ns_steps = function, cfg.optimizer, cfg.ns_steps
        self.max_lr, self.max_grad_norm, self.detach_output = cfg.max_lr, cfg.max_grad_norm, cfg.detach_output
        self.window = cfg.omega_window if cfg.objective == "omega" else 1
        self.residual = cfg.residual and function == "mlp"
        self.norm = cfg.norm and function == "mlp"
        self.naive, self.fused = cfg.mode == "naive", cfg.mode == "chunk"
        self.update_every = update_every
        inner = heads * dim_head

        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        if cfg.query_init_from_key:
            # W_Q starts equal to W_K: reading with the key a value was stored under returns that
            # value from the first step. With independent random W_Q, W_K the outer loop must first
            # align them, a saddle on recall tasks (benchmarks/mqar.py measures it).
            with torch.no_grad():
                self.to_q.weight.copy_(self.to_k.weight)
        # optional short causal depthwise conv over the q|k|v projections (Titans): lets a key
        # mix in earlier tokens, so the memory can store "what came before -> this token".
        # Init: q and v channels are the identity (last tap 1); k channels start as a token shift,
        # the mean of this and the previous token (RWKV's token-shift init), so a key already
        # names the token before its value. From the identity, the outer loop has to discover the
        # shift first, another saddle on recall tasks (benchmarks/mqar.py).
        self.conv_size = conv_size
        self.conv = nn.Conv1d(3 * inner, 3 * inner, conv_size, groups=3 * inner, bias=False) if conv_size else None
        if self.conv is not None:
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, 0, -1] = 1.0
                if conv_size > 1:
                    self.conv.weight[inner:2 * inner, 0, -2:] = 0.5
        # gate logits: learning rate, momentum, forgetting (and Omega gamma), one per head
        self.to_lr = nn.Linear(dim, heads)
        self.to_mom = nn.Linear(dim, heads)
        self.to_decay = nn.Linear(dim, heads)
        self.to_gamma = nn.Linear(dim, heads) if cfg.objective == "omega" else None
        for lin, bias in ((self.to_lr, 0.0), (self.to_mom, math.log(9.0)), (self.to_decay, -math.log(99.0)),
                          (self.to_gamma, 2.0)):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.constant_(lin.bias, bias)   # theta = max_lr / 2, eta = 0.9, alpha = 0.01

        self.poly_coeffs = nn.Parameter(poly_init_coeffs(cfg.poly_degree)) if cfg.features == "poly" else None
        self.dim_key = layout.dim_key
        shapes = list(layout.weights)
        init = [torch.randn(heads, o, i) / math.sqrt(i) for o, i in shapes]
        if function == "linear":
            init = [torch.zeros(heads, o, i) for o, i in shapes]
        self.n_weights = len(shapes)
        for j, w in enumerate(init):
            if cfg.learn_init:
                self.register_parameter(f"w0_{j}", nn.Parameter(w))
            else:
                self.register_buffer(f"w0_{j}", w)

    @property
    def learns_by_autograd(self) -> bool:
        """The inner step's gradients come from autograd (``mode = "naive"``, the reference) rather
        than the analytic formulas: the layer then needs autograd even where nothing else does,
        which ``torch.inference_mode`` forbids (``no_grad`` allows it)."""
        return self.naive

    # ------------------------------------------------------------------ state

    def initial_weights(self) -> list[torch.Tensor]:
        """The learned (or fixed) initial fast weights W0, each (H, out, in)."""
        return [getattr(self, f"w0_{j}") for j in range(self.n_weights)]

    def initial_state(self, batch: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> MemoryState:
        """A fresh state at position 0 whose weights are W0 (differentiable w.r.t. W0)."""
        w0 = self.initial_weights()
        device = device or w0[0].device
        dtype = dtype or w0[0].dtype
        weights = tuple(w.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, *w.shape) for w in w0)
        momentum = tuple(torch.zeros(batch, *w.shape, device=device, dtype=dtype) for w in w0)
        e = self.window - 1
        h = self.heads
        z = lambda *s: torch.zeros(batch, h, *s, device=device, dtype=dtype)  # noqa: E731
        return MemoryState(weights, momentum, buf_k=z(e, self.dim_key), buf_v=z(e, self.dim_head),
                           buf_gamma=z(e) if self.window > 1 else None, buf_lr=z(0), buf_mom=z(0),
                           buf_decay=z(0), position=0,
                           conv=None if self.conv is None else
                           torch.zeros(batch, self.conv_size - 1, 3 * h * self.dim_head, device=device, dtype=dtype))

    # ------------------------------------------------------------------ forward

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)          # (B, H, T, dh)

    def _phi(self, t: torch.Tensor) -> torch.Tensor:
        if self.poly_coeffs is None:
            return t
        fn = poly_features_reference if self.naive else poly_features
        return fn(t, self.poly_coeffs.to(t.dtype))

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        bsz, _, T, _ = y.shape
        return self.to_out(y.transpose(1, 2).reshape(bsz, T, self.heads * self.dim_head))

    def _project(self, x: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, ...]:
        """q, k, v projections (B, T, inner), through the causal conv when enabled, and the conv's
        new buffer (the last K-1 projections, so a split continues exactly)."""
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.conv is None:
            return q, k, v, None
        full = torch.cat([state.conv, torch.cat([q, k, v], dim=-1)], dim=1)     # (B, K-1+T, 3 inner)
        out = self.conv(full.transpose(1, 2)).transpose(1, 2)                    # (B, T, 3 inner)
        q, k, v = out.chunk(3, dim=-1)
        return q, k, v, full[:, full.shape[1] - (self.conv_size - 1):]

    def _chunk_updates(self, first_chunk: int, n_chunks: int, learn: bool) -> list[bool] | None:
        """Which complete chunks take an inner step (None = all): warmup and update frequency.

        Chunk indices are absolute (chunk j holds positions [j b, (j+1) b)), so the pattern does
        not depend on how a sequence is split into calls.
        """
        if learn and self.update_every == 1:
            return None
        return [learn and (first_chunk + i) % self.update_every == 0 for i in range(n_chunks)]

    @torch.no_grad()
    def _ttl_stats(self, state: MemoryState, w_new: list[torch.Tensor], s_new: list[torch.Tensor],
                   keys: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor, eta: torch.Tensor,
                   keep: torch.Tensor, gamma: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Inner loss on this call's complete chunks before and after the updates, and the size of
        what the inner optimiser did; scalars averaged over batch and heads."""
        def inner_loss(weights) -> torch.Tensor:
            return (memory_forward(list(weights), keys, self.norm) - targets).pow(2).sum(-1).mean()

        def fro(ts) -> torch.Tensor:  # per (batch, head) Frobenius norm over every weight matrix
            return torch.stack([t.pow(2).sum((-1, -2)) for t in ts]).sum(0).sqrt()

        w_old = state.weights
        stats = {
            "inner_loss_before": inner_loss(w_old),
            "inner_loss_after": inner_loss(w_new),
            "momentum_norm": fro(s_new).mean(),
            "update_ratio": (fro([a - b for a, b in zip(w_new, w_old)]) / fro(w_old).clamp_min(1e-12)).mean(),
            "lr_mean": lr.mean(),
            "momentum_gate_mean": eta.mean(),
            "forget_gate_mean": (1 - keep).mean(),
        }
        if gamma is not None:
            stats["omega_gate_mean"] = gamma.mean()
        if self.optimizer == "muon":  # how orthogonal NS makes the update: ||X X^T - I|| on the short side
            residual = []
            for m in s_new:
                x = newton_schulz(m, self.ns_steps)
                x = x if x.shape[-2] <= x.shape[-1] else x.transpose(-1, -2)
                eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
                residual.append((x @ x.transpose(-1, -2) - eye).pow(2).sum((-1, -2)).sqrt().mean())
            stats["ns_residual"] = torch.stack(residual).mean()
        return {k: v.detach() for k, v in stats.items()}

    def _read_within_chunk(self, state: MemoryState, qf: torch.Tensor, q: torch.Tensor, k_all: torch.Tensor,
                           v_all: torch.Tensor, gamma_all: torch.Tensor | None, lr_all: torch.Tensor,
                           mom_all: torch.Tensor, decay_all: torch.Tensor, conv_buf: torch.Tensor | None,
                           T: int) -> tuple[torch.Tensor, MemoryState]:
        """A call in which no chunk completes (generation and streaming, one token at a time):
        every new token reads the weights from the end of the last complete chunk, which is what
        the chunk scan computes for a trailing partial chunk, and the tokens join the buffers of
        the chunk in progress. The scan would read all the chunk's earlier tokens again (they pad
        the call up to the chunk boundary); this reads the T new ones only, so a token's cost does
        not grow with its place in the chunk."""
        weights = [w.detach() for w in state.weights] if self.detach_output else list(state.weights)
        y = memory_forward(weights, qf, self.norm)
        if self.residual:
            y = y + q
        momentum = tuple(t.detach() for t in state.momentum) if self.detach_output else state.momentum
        new_state = replace(state, weights=tuple(weights), momentum=momentum, buf_k=k_all, buf_v=v_all,
                            buf_gamma=gamma_all, buf_lr=lr_all, buf_mom=mom_all, buf_decay=decay_all,
                            position=state.position + T, conv=conv_buf, stats={})
        return self._merge(y), new_state

    def read(self, x: torch.Tensor, state: MemoryState | None = None) -> torch.Tensor:
        """Read only, no update: y_t = M_W(phi(q_t)) (+ q_t) with the state's current weights (those
        from the end of its last complete chunk). x: (B, T, dim) -> (B, T, dim)."""
        if self.conv is not None:
            raise ValueError("read() without an update does not support conv_size > 0 (MAC with a conv)")
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        with torch.autocast(x.device.type, enabled=False):   # in the fast weights' dtype, as forward
            x = x.to(state.weights[0].dtype)
            q = F.normalize(self._heads(self.to_q(x)), dim=-1)
            weights = [w.detach() if self.detach_output else w for w in state.weights]
            y = memory_forward(weights, self._phi(q), self.norm)
            return self._merge(y + q if self.residual else y)

    def forward(self, x: torch.Tensor, state: MemoryState | None = None,
                ttl: TTLControl = TTLControl()) -> tuple[torch.Tensor, MemoryState]:
        """x: (B, T, dim) -> y: (B, T, dim) and the state after these T tokens (with inner-loop
        statistics in ``state.stats`` when ``ttl.collect_stats`` and a chunk completed)."""
        bsz, T, _ = x.shape
        if state is None:
            state = self.initial_state(bsz, x.device)
        if T == 0:
            return x.new_zeros(bsz, 0, self.dim), state
        with torch.autocast(x.device.type, enabled=False):
            return self._forward(x, state, ttl)

    def _forward(self, x: torch.Tensor, state: MemoryState, ttl: TTLControl) -> tuple[torch.Tensor, MemoryState]:
        """The layer in the dtype of the state's fast weights (that of W0: fp32 for an fp32 model), with
        autocast off. Fast weights accumulate many small updates that bf16 would round away, and the
        fused chunk step's backward computes in the dtype of its saved tensors; the projections are
        cheap next to the inner loop."""
        x = x.to(state.weights[0].dtype)
        bsz, T, _ = x.shape
        b, e = self.chunk_size, self.window - 1
        m = state.position % b
        q, k, v, conv_buf = self._project(x, state)
        q, k, v = F.normalize(self._heads(q), dim=-1), F.normalize(self._heads(k), dim=-1), self._heads(v)
        target = v - k if self.residual else v
        lr = self.max_lr * torch.sigmoid(self.to_lr(x)).transpose(1, 2)   # (B, H, T)
        mom_logit = self.to_mom(x).transpose(1, 2)
        decay_logit = self.to_decay(x).transpose(1, 2)

        k_all = _after(state.buf_k, self._phi(k), dim=-2)
        v_all = _after(state.buf_v, target, dim=-2)
        gamma_all = None
        if self.to_gamma is not None:
            gamma_all = _after(state.buf_gamma, torch.sigmoid(self.to_gamma(x)).transpose(1, 2), dim=-1)
        lr_all = _after(state.buf_lr, lr, dim=-1)
        mom_all = _after(state.buf_mom, mom_logit, dim=-1)
        decay_all = _after(state.buf_decay, decay_logit, dim=-1)
        qf = self._phi(q)
        L = m + T
        n_done = (L // b) * b
        if n_done == 0 and not self.naive:
            return self._read_within_chunk(state, qf, q, k_all, v_all, gamma_all, lr_all, mom_all, decay_all,
                                           conv_buf, T)
        if m:
            qf = torch.cat([qf.new_zeros(bsz, self.heads, m, qf.shape[-1]), qf], dim=-2)
        eta = torch.sigmoid(mom_all[..., :n_done].unflatten(-1, (-1, b)).mean(-1))      # (B, H, N)
        keep = torch.sigmoid(-decay_all[..., :n_done].unflatten(-1, (-1, b)).mean(-1))  # 1 - alpha

        upd = [state.weights, state.momentum, k_all, v_all, lr_all, eta, keep, gamma_all]
        if self.detach_output:   # the outer loss sees the read only, not the fast-weight trajectory
            upd = [None if u is None else (tuple(t.detach() for t in u) if isinstance(u, tuple) else u.detach())
                   for u in upd]
        w, s, k_all, v_all, lr_all, eta, keep, gamma_all = upd
        args = (list(w), list(s), qf, k_all, v_all, lr_all, eta, keep, gamma_all)
        kw = dict(chunk_size=b, window=self.window, norm=self.norm, optimizer=self.optimizer,
                  ns_steps=self.ns_steps, max_grad_norm=self.max_grad_norm,
                  updates=self._chunk_updates(state.position // b, n_done // b, ttl.learn))
        if self.naive:
            y, w_new, s_new = memory_scan_reference(*args, **kw)
        else:
            y, w_new, s_new = memory_scan(*args, **kw, fused=self.fused)
        stats = {}
        if ttl.collect_stats and n_done:
            stats = self._ttl_stats(state, w_new, s_new, k_all[..., e:e + n_done, :],
                                    v_all[..., e:e + n_done, :], lr_all[..., :n_done], eta, keep,
                                    None if gamma_all is None else gamma_all[..., e:e + n_done])
        y = y[..., m:, :]
        if self.residual:
            y = y + q
        out = self._merge(y)
        new_state = MemoryState(
            tuple(w_new), tuple(s_new),
            buf_k=k_all[..., n_done:, :], buf_v=v_all[..., n_done:, :],
            buf_gamma=None if gamma_all is None else gamma_all[..., n_done:],
            buf_lr=lr_all[..., n_done:], buf_mom=mom_all[..., n_done:], buf_decay=decay_all[..., n_done:],
            position=state.position + T, conv=conv_buf, stats=stats)
        return out, new_state
