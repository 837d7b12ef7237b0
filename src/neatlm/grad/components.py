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
raises a :class:`~neatlm.settings.ConfigError` naming the orphans or the doubly claimed parameters.

Weight decay applies to matrices only: never to norms, biases, embeddings or any parameter with
fewer than two dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..settings import ConfigError, check_settings, setting, setting_names

OPTIMIZERS = ("adamw", "sgd", "muon")
SCHEDULES = ("constant", "cosine")


@dataclass
class ComponentSpec:
    """How one component learns (a ``[components.<name>]`` table). Defaults give AdamW at 3e-3
    with a cosine schedule. Checked on construction with the same rules as every other setting."""

    name: str
    patterns: tuple[str, ...] = setting(("*",), "fnmatch patterns of parameter or module paths it claims")
    exclude: tuple[str, ...] = setting((), "patterns removed again from what ``patterns`` claims")
    optimizer: str = setting("adamw", "muon = Muon on 2-D weights, AdamW on the rest", choices=OPTIMIZERS)
    lr: float = setting(3e-3, "peak learning rate", min=0.0)
    schedule: str = setting("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup_steps: int = setting(0, "linear warmup from lr / warmup_steps to lr", min=0)
    min_lr_ratio: float = setting(0.1, "cosine ends at lr * min_lr_ratio", min=0.0, max=1.0)
    weight_decay: float = setting(0.0, "decoupled decay, matrices only", min=0.0)
    clip: float = setting(0.0, "max gradient norm of this component; 0 = off", min=0.0)
    importance: float = setting(1.0, "low importance is checkpointed first under a memory budget", min=0.0)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas, each in [0, 1)", min=0.0, below=1.0)
    eps: float = setting(1e-8, "AdamW epsilon", min=0.0)
    momentum: float = setting(0.9, "SGD momentum (Muon uses muon_momentum)", min=0.0, max=1.0)
    muon_momentum: float = setting(0.95, "Muon momentum", min=0.0, max=1.0)
    muon_adjust_lr: str = setting("match_rms_adamw", "match_rms_adamw lets one lr serve the Muon and AdamW "
                                  "halves", choices=("original", "match_rms_adamw"))

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"components: name {self.name!r} must be a non-empty string")
        check_settings(f"components.{self.name}", self)
        if not self.patterns:
            raise ConfigError(f"components.{self.name}.patterns: at least one pattern is required")

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_components(table: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[ComponentSpec]:
    """Build specs from a plain dict such as a TOML ``[components.<name>]`` table.

    ``defaults`` (e.g. the trainer's lr, warmup and decay) fill keys a component leaves out.
    A string in ``patterns`` / ``exclude`` is accepted as a one-element list.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"components: expected a table of named components, got {type(table).__name__}")
    specs = []
    for name, body in table.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"components.{name}: expected a table, got {body!r}")
        merged = {**(defaults or {}), **body}
        allowed = [k for k in setting_names(ComponentSpec) if k != "name"]
        for k in merged:
            if k not in allowed:
                raise ConfigError(f"components.{name}.{k}: unknown key; allowed {', '.join(allowed)}")
        specs.append(ComponentSpec(name=str(name), **merged))
    if not specs:
        raise ConfigError("components: at least one component is required")
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


def default_components(**overrides: Any) -> list[ComponentSpec]:
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

    Raises :class:`ConfigError` listing orphans (claimed by no component) or double claims.
    Frozen parameters (``requires_grad=False``) are ignored.
    """
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"components: duplicate component names {dup}")
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
        raise ConfigError(f"components: {len(orphans)} trainable parameter(s) claimed by no component: "
                         f"{_list(orphans)}")
    if doubles:
        raise ConfigError(f"components: {len(doubles)} parameter(s) claimed by more than one component: "
                         f"{_list(doubles)}")
    empty = [n for n, g in groups.items() if not g.params]
    if empty:
        raise ConfigError("components: " + "; ".join(f"{n} (patterns {', '.join(groups[n].spec.patterns)})"
                                                     for n in empty) + " matched no trainable parameter")
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
