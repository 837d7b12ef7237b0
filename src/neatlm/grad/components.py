"""Learning components: named groups of parameters, each with its own optimizer and schedule.

A component is declared by name and a list of fnmatch patterns. A pattern claims a parameter
when it matches the parameter's name (``blocks.0.mixer.memory.w1``) or the path of any module
that contains it (``blocks.0.mixer.memory``), so ``"*.memory"`` and ``"*.memory.*"`` both claim
every parameter under a module called ``memory``. ``exclude`` patterns remove parameters again,
which makes a catch-all trunk easy to write::

    specs = parse_components({
        "memory": {"patterns": ["*.memory.*"], "lr": 1e-3, "importance": 0.5},
        "trunk":  {"patterns": ["*"], "exclude": ["*.memory.*"], "optimizer": "muon"},
    })
    groups = assign_parameters(model, specs)   # every trainable parameter exactly once

Every trainable parameter must belong to exactly one component: :func:`assign_parameters`
raises a ``ValueError`` naming the orphans or the doubly claimed parameters.

Weight decay applies to matrices only: never to norms, biases, embeddings or any parameter with
fewer than two dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd", "muon")
SCHEDULES = ("constant", "cosine")


@dataclass
class ComponentSpec:
    """How one component learns. Defaults give AdamW at 3e-3 with a cosine schedule."""

    name: str
    patterns: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    optimizer: str = "adamw"          # adamw | sgd | muon (Muon on 2-D weights, AdamW on the rest)
    lr: float = 3e-3
    schedule: str = "cosine"          # constant | cosine
    warmup_steps: int = 0             # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1         # cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0         # matrices only
    clip: float = 0.0                 # max gradient norm of this component; 0 = off
    importance: float = 1.0           # low importance is checkpointed first under a memory budget
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.9             # SGD momentum; Muon uses muon_momentum
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"  # so one lr serves the Muon and AdamW halves

    def __post_init__(self) -> None:
        self.patterns = tuple(self.patterns)
        self.exclude = tuple(self.exclude)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.validate()

    def validate(self) -> None:
        key = f"components.{self.name}"
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"components: name {self.name!r} must be a non-empty string")
        if not self.patterns:
            raise ValueError(f"{key}.patterns: at least one pattern is required")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{key}.optimizer = {self.optimizer!r}: allowed {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{key}.schedule = {self.schedule!r}: allowed {', '.join(SCHEDULES)}")
        for attr, lo, hi in (("lr", 0.0, None), ("warmup_steps", 0, None), ("min_lr_ratio", 0.0, 1.0),
                             ("weight_decay", 0.0, None), ("clip", 0.0, None), ("importance", 0.0, None),
                             ("eps", 0.0, None), ("momentum", 0.0, 1.0), ("muon_momentum", 0.0, 1.0)):
            v = getattr(self, attr)
            if not math.isfinite(v) or v < lo or (hi is not None and v > hi):
                allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"{key}.{attr} = {v!r}: must be {allowed}")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{key}.betas = {list(self.betas)!r}: each must be in [0, 1)")
        if self.muon_adjust_lr not in ("original", "match_rms_adamw"):
            raise ValueError(f"{key}.muon_adjust_lr = {self.muon_adjust_lr!r}: allowed original, match_rms_adamw")

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_FIELDS = {f.name: f for f in dataclasses.fields(ComponentSpec)}


def _check_type(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        if ok and key.endswith(("patterns", "exclude")):
            ok = all(isinstance(v, str) for v in value)
        if ok and key.endswith("betas"):
            ok = len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - every field has one of the types above
        ok = True
    if not ok:
        want = type(default).__name__ if not isinstance(default, tuple) else "a list"
        raise ValueError(f"{key} = {value!r}: expected {want}")
    return value


def parse_components(table: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[ComponentSpec]:
    """Build specs from a plain dict such as a TOML ``[components.<name>]`` table.

    ``defaults`` (e.g. the trainer's lr, warmup and decay) fill keys a component leaves out.
    A string in ``patterns`` / ``exclude`` is accepted as a one-element list.
    """
    if not isinstance(table, Mapping):
        raise ValueError(f"components: expected a table of named components, got {type(table).__name__}")
    specs = []
    for name, body in table.items():
        if not isinstance(body, Mapping):
            raise ValueError(f"components.{name}: expected a table, got {body!r}")
        merged = {**(defaults or {}), **body}
        kwargs: dict[str, Any] = {}
        for k, v in merged.items():
            key = f"components.{name}.{k}"
            if k == "name" or k not in _FIELDS:
                allowed = ", ".join(f for f in _FIELDS if f != "name")
                raise ValueError(f"{key}: unknown key; allowed {allowed}")
            if k in ("patterns", "exclude") and isinstance(v, str):
                v = [v]
            default = _FIELDS[k].default
            kwargs[k] = _check_type(key, v, default)
        specs.append(ComponentSpec(name=str(name), **kwargs))
    if not specs:
        raise ValueError("components: at least one component is required")
    return specs


def train_defaults(train: Any) -> dict[str, Any]:
    """Spec defaults from a trainer config section (``neatlm.config.TrainConfig``, duck-typed):
    lr, warmup_steps, min_lr_ratio, weight_decay, betas and clip (from grad_clip)."""
    out: dict[str, Any] = {}
    for src, dst in (("lr", "lr"), ("warmup_steps", "warmup_steps"), ("min_lr_ratio", "min_lr_ratio"),
                     ("weight_decay", "weight_decay"), ("grad_clip", "clip")):
        if hasattr(train, src):
            out[dst] = getattr(train, src)
    if hasattr(train, "beta1") and hasattr(train, "beta2"):
        out["betas"] = (train.beta1, train.beta2)
    return out


def default_components(model: nn.Module | None = None, **overrides: Any) -> list[ComponentSpec]:
    """One component ``all`` claiming every parameter (AdamW unless overridden)."""
    return [ComponentSpec(name="all", patterns=("*",), **overrides)]


# ----------------------------------------------------------------------------- assignment

def _claims(patterns: Iterable[str], name: str) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that never get weight decay: <2-D, biases, and anything in a norm or embedding."""
    out: set[str] = set()
    for mod_name, mod in model.named_modules():
        cls = type(mod).__name__.lower()
        special = isinstance(mod, (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm,
                                   nn.modules.batchnorm._NormBase, nn.RMSNorm)) \
            or "norm" in cls or "embed" in cls
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if special or p.ndim < 2 or p_name.endswith("bias"):
                out.add(full)
    return out


def _embedding_names(model: nn.Module) -> set[str]:
    out: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) or "embed" in type(mod).__name__.lower():
            for p_name, _ in mod.named_parameters(recurse=False):
                out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


def _list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@dataclass
class ComponentParams:
    """The parameters of one component, split the way its optimizers need them."""

    spec: ComponentSpec
    names: list[str] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    decay: list[bool] = field(default_factory=list)       # weight decay applies
    matrix: list[bool] = field(default_factory=list)      # 2-D and not an embedding (Muon-eligible)

    @property
    def name(self) -> str:
        return self.spec.name


def assign_parameters(model: nn.Module, specs: list[ComponentSpec]) -> dict[str, ComponentParams]:
    """Map every trainable parameter of ``model`` to exactly one component (in spec order).

    Raises ``ValueError`` listing orphans (claimed by no component) or double claims.
    Frozen parameters (``requires_grad=False``) are ignored.
    """
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"components: duplicate component names {dup}")
    no_decay = _no_decay_names(model)
    embeds = _embedding_names(model)
    groups = {s.name: ComponentParams(s) for s in specs}
    orphans: list[str] = []
    doubles: list[str] = []
    for p_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owners = [s.name for s in specs if _claims(s.patterns, p_name) and not _claims(s.exclude, p_name)]
        if not owners:
            orphans.append(p_name)
        elif len(owners) > 1:
            doubles.append(f"{p_name} ({' and '.join(owners)})")
        else:
            g = groups[owners[0]]
            g.names.append(p_name)
            g.params.append(p)
            g.decay.append(p_name not in no_decay)
            g.matrix.append(p.ndim == 2 and p_name not in embeds)
    if orphans:
        raise ValueError(f"components: {len(orphans)} trainable parameter(s) claimed by no component: "
                         f"{_list(orphans)}")
    if doubles:
        raise ValueError(f"components: {len(doubles)} parameter(s) claimed by more than one component: "
                         f"{_list(doubles)}")
    empty = [n for n, g in groups.items() if not g.params]
    if empty:
        raise ValueError(f"components: {', '.join(empty)} matched no trainable parameter "
                         f"(patterns {[list(groups[n].spec.patterns) for n in empty]})")
    return groups


def build_optimizers(group: ComponentParams) -> list[torch.optim.Optimizer]:
    """The optimizer(s) of one component; every param group remembers its peak lr as ``base_lr``."""
    s = group.spec
    decay = [p for p, d in zip(group.params, group.decay) if d]
    plain = [p for p, d in zip(group.params, group.decay) if not d]

    def split(ps_decay: list, ps_plain: list) -> list[dict]:
        out = []
        if ps_decay:
            out.append({"params": ps_decay, "weight_decay": s.weight_decay})
        if ps_plain:
            out.append({"params": ps_plain, "weight_decay": 0.0})
        return out

    opts: list[torch.optim.Optimizer] = []
    if s.optimizer == "adamw":
        opts.append(torch.optim.AdamW(split(decay, plain), lr=s.lr, betas=s.betas, eps=s.eps))
    elif s.optimizer == "sgd":
        opts.append(torch.optim.SGD(split(decay, plain), lr=s.lr, momentum=s.momentum))
    else:  # muon
        mat = [p for p, m in zip(group.params, group.matrix) if m]
        mat_ids = {id(p) for p in mat}
        decay_ids = {id(p) for p in decay}
        if mat:
            mat_decay = [p for p in mat if id(p) in decay_ids]
            mat_plain = [p for p in mat if id(p) not in decay_ids]
            opts.append(torch.optim.Muon(split(mat_decay, mat_plain), lr=s.lr, momentum=s.muon_momentum,
                                         adjust_lr_fn=s.muon_adjust_lr))
        rest_decay = [p for p in decay if id(p) not in mat_ids]
        rest_plain = [p for p in plain if id(p) not in mat_ids]
        if rest_decay or rest_plain:
            opts.append(torch.optim.AdamW(split(rest_decay, rest_plain), lr=s.lr, betas=s.betas, eps=s.eps))
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = s.lr
    return opts
