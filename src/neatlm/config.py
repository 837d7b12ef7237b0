"""Configuration as data: one dataclass per section, TOML presets, ``--set a.b=c`` overrides.

Every field may carry validation metadata (``choices``, ``min``, ``max``, ``above``, ``below``);
:func:`validate` checks the whole tree before any work starts, and every failure is a :class:`ConfigError`
whose message is one line naming the key, the value and what is allowed.

Defaults equal the ``tiny`` preset, so ``Config()`` is the model ``neat train`` trains.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .data.gridworld import GridSettings, max_tokens
from .data.passkey import min_length
from .grad.components import parse_components
from .grad.guard import GuardConfig
from .nn.blt.settings import BLTSettings
from .nn.memory import MemorySettings, memory_shapes, training_footprint
from .nn.vq import VQSettings
from .settings import ConfigError, check_settings, coerce, field_type, setting, type_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


_f = setting
log = logging.getLogger("neatlm.config")


@dataclass
class ModelConfig:
    vocab_size: int = _f(256, "bytes: always 256", min=2)
    dim: int = _f(128, "model width", min=8)
    n_layers: int = _f(4, "number of blocks", min=1)
    n_heads: int = _f(4, "attention heads; must divide dim", min=1)
    mlp_hidden: int = _f(0, "SwiGLU hidden width; 0 = 8/3 * dim rounded to 16", min=0)
    context: int = _f(256, "longest sequence the model is trained on (tokens)", min=2)
    window: int = _f(0, "sliding attention window in tokens; 0 = full causal", min=0)
    rope_base: float = _f(10000.0, "RoPE frequency base", min=1.0)
    mixer: str = _f("attention", "sequence mixer of each block", choices=("attention", "bk"))
    mlp: str = _f("swiglu", "channel mixer of each block", choices=("swiglu", "moe"))
    norm_eps: float = _f(1e-5, "RMSNorm epsilon", min=0.0)
    init_std: float = _f(0.02, "std of the normal init of weights", min=0.0)


@dataclass
class MemoryConfig(MemorySettings):
    """[memory]: the layer's own settings (:class:`neatlm.nn.memory.MemorySettings`) plus how the
    model assembles it and when the trainer resets its state."""

    enabled: bool = _f(False, "add a test-time memory branch to every block")
    combine: str = _f("mag", "how memory joins attention: mag = SWA(x)*sigmoid(M(x)), mal = SWA(M(x)), "
                      "mac = per chunk SWA(x + read(x)) then learn from it", choices=("mag", "mal", "mac"))
    reset: str = _f("sequence", "when memory returns to its initial state",
                    choices=("sequence", "batch", "never"))


@dataclass
class BKConfig:
    causal: bool = _f(True, "leading-submatrix resolvent (no future leak); false sees the whole sequence")
    heads: int = _f(0, "independent resolvent chains per mixer; 0 = dim // 16", min=0)
    v_max: float = _f(3.0, "bound of the input-dependent potential |v - h0|", min=0.0)
    min_imag: float = _f(0.05, "floor on Im z (|G| <= 1 / Im z)", min=1e-4)
    grad_blend: float = _f(0.0, "ablation: blend of the old diagonal-only gradient", min=0.0, max=1.0)
    precision: str = _f("complex128", "scan precision; mixed = forward complex128, backward complex64",
                        choices=("complex128", "complex64", "mixed"))


@dataclass
class MoEConfig:
    experts: int = _f(4, "number of experts", min=1)
    top_k: int = _f(2, "experts per token", min=1, max=2)
    capacity_factor: float = _f(0.0, "drop tokens above this load factor; 0 = no cap", min=0.0)
    aux_loss_weight: float = _f(0.01, "weight of the load-balancing loss", min=0.0)


@dataclass
class DataConfig:
    path: str = _f("", "file or directory of training text; empty = Python's stdlib sources")
    val_fraction: float = _f(0.05, "fraction of files held out for validation", min=0.0, max=0.5)
    extensions: str = _f(".py", "comma-separated file suffixes read from a directory")
    seed: int = _f(1337, "seed of the batch sampler", min=0)
    sampling: str = _f("random", "text windows: random = a fresh random window per row and step; stream = each row "
                       "continues where its previous window ended (with memory.reset = 'never': truncated backprop "
                       "through one unbroken stream per row); documents = each row reads a random document from its "
                       "first byte for data.episode_windows windows, the model state reset where each such episode "
                       "starts (as streaming evaluation reads a file)", choices=("random", "stream", "documents"))
    episode_windows: int = _f(16, "data.sampling = 'documents': windows of train.seq_len bytes read from each "
                              "document before every row starts a new one", min=1)
    task: str = _f("text", "text = next byte of the corpus; mqar = multi-query associative recall; passkey = "
                   "recall a 5-digit key hidden at a random depth of corpus text (one example per training window "
                   "of train.seq_len * train.segments bytes; only the answer digits are scored); mvot = grid-world "
                   "questions answered with or without visual thoughts (see [mvot]); mvot-vq = train the visual "
                   "codebook (a VQ-VAE, see [vq]) on the grid renderings",
                   choices=("text", "mqar", "passkey", "mvot", "mvot-vq"))
    passkey_depth: str = _f("uniform", "where a training or validation passkey needle sits: uniform = any depth "
                            "(RULER); log = its distance to the question log-uniform, so some examples fall within a "
                            "short attention window (a curriculum from copying to remembering); the benchmark and "
                            "`neat eval --task passkey` always draw uniform depths", choices=("uniform", "log"))
    passkey_questions: int = _f(1, "training passkey examples: the question (and its scored answer) asked this many "
                                "times between the needle and the end, the last at the end: more answers to learn "
                                "from per example; evaluation always asks once", min=1)
    mqar_pairs: int = _f(32, "MQAR key-value pairs per sequence", min=1)
    mqar_queries: int = _f(0, "MQAR queries per sequence; 0 = one per pair", min=0)
    mqar_gaps: str = _f("uniform", "where MQAR queries sit after the pairs: uniform = any slot alike; power = slot x "
                        "with weight power_a * x^(power_a - 1), most near the pairs, a few far (Zoology)",
                        choices=("uniform", "power"))
    mqar_power_a: float = _f(0.01, "exponent of data.mqar_gaps = 'power' (Zoology: 0.01; 1 = uniform)", above=0.0)


@dataclass
class TrainConfig:
    steps: int = _f(1200, "optimizer steps", min=1)
    batch_size: int = _f(16, "sequences per micro-batch", min=1)
    seq_len: int = _f(256, "tokens per sequence (<= model.context)", min=2)
    accum_steps: int = _f(1, "micro-batches per optimizer step", min=1)
    segments: int = _f(1, "consecutive seq_len segments per sampled window; memory state is carried and "
                       "detached between them (truncated backprop through long documents)", min=1)
    logits: str = _f("all", "where training computes the output head: all positions, or only the scored ones "
                     "(MQAR: the queries; same loss and gradients, a fraction of the head's cost at a large vocabulary)",
                     choices=("all", "scored"))
    lr: float = _f(3e-3, "peak learning rate", min=0.0)
    min_lr_ratio: float = _f(0.1, "final learning rate / peak", min=0.0, max=1.0)
    warmup_steps: int = _f(100, "linear warmup steps", min=0)
    weight_decay: float = _f(0.1, "AdamW decay on matrices (never norms, biases, embeddings)", min=0.0)
    beta1: float = _f(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = _f(0.95, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "clip the global gradient norm; 0 = off", min=0.0)
    seed: int = _f(0, "seed of the model init", min=0)
    init_from: str = _f("", "a run or checkpoint directory whose model weights start this run (fine-tuning: the "
                        "optimizer, schedule, step and data start fresh); empty = random init")
    device: str = _f("auto", "auto = cuda, then mps, then cpu", choices=("auto", "cpu", "cuda", "mps"))
    precision: str = _f("auto", "auto = bf16 autocast only where a measurement shows it faster",
                        choices=("auto", "fp32", "bf16"))
    threads: int = _f(0, "CPU threads; 0 = torch default", min=0)
    autotune: bool = _f(False, "measure, on this run's model and batch, the thread count (when train.threads = 0) and "
                        "attention backend that run a step fastest, and use them (cached per machine and model; "
                        "nothing that changes the model's outputs is tuned)")
    log_every: int = _f(10, "steps between metric records", min=1)
    save_every: int = _f(300, "steps between checkpoints (and one at the end)", min=1)
    keep_last: int = _f(2, "checkpoints kept", min=1)
    run_dir: str = _f("runs/default", "where checkpoints, config and metrics go")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class TTLConfig:
    warmup_steps: int = _f(0, "outer steps during which memory reads its initial weights without learning", min=0)
    update_every: int = _f(1, "memory takes its inner step on every n-th chunk only", min=1)


@dataclass
class CheckpointingConfig:
    policy: str = _f("none", "activation checkpointing of every unit", choices=("none", "full", "selective"))
    memory_budget_mb: float = _f(0.0, "> 0: choose the cheapest policies whose measured saved activations "
                                 "fit this many MiB (overrides policy); if even full checkpointing does not "
                                 "fit, halve the micro-batch (the global batch kept) until it does", min=0.0)
    memory_budget_free: float = _f(0.0, "> 0: the activation budget is this fraction of the memory free on the "
                                   "training device when the run starts (host memory on a CPU; overrides "
                                   "memory_budget_mb)", min=0.0, max=1.0)
    units: str = _f("blocks", "what a policy applies to: whole blocks, or each component inside a block",
                    choices=("blocks", "components"))


@dataclass
class EvalConfig:
    every: int = _f(300, "steps between validation runs; 0 = only at the end", min=0)
    batches: int = _f(20, "validation batches per evaluation", min=1)


@dataclass
class AdaptConfig:
    """``neat adapt`` and the adapted evaluation (Transformer² SVF experts, see neatlm.adapt)."""

    patterns: str = _f("*.mlp.gate_up,*.mlp.down", "comma-separated fnmatch paths of the linear layers whose "
                       "singular values an expert rescales (default: every MLP weight)")
    steps: int = _f(200, "optimizer steps of one expert (or of the classifier)", min=1)
    batch_size: int = _f(16, "windows per step", min=1)
    seq_len: int = _f(256, "bytes per window", min=2)
    lr: float = _f(5e-3, "peak AdamW learning rate of the z vectors", above=0.0)
    warmup_steps: int = _f(10, "linear warmup steps", min=0)
    prefix: int = _f(512, "bytes of a document's start that the first pass reads to choose the mixture of "
                     "experts (CEM search, classifier); the adapted model is scored on the rest", min=2)
    cem_population: int = _f(16, "CEM candidates per generation", min=2)
    cem_generations: int = _f(6, "CEM generations", min=1)
    cem_elite: float = _f(0.25, "fraction of each generation that sets the next one's mean and spread",
                          above=0.0, max=1.0)
    ttl_chunk: int = _f(256, "coordinated test-time learning: bytes per step (each chunk is scored, then "
                        "learned from)", min=2)
    ttl_lr: float = _f(3e-2, "coordinated test-time learning: Adam learning rate of the z vectors (a document "
                       "gives only a few steps; 3e-2 measured best of 1e-3..1e-1 on held-out documents outside "
                       "benchmarks/svf.py's)", above=0.0)


@dataclass
class MVoTConfig(GridSettings):
    """[mvot]: the grid-world task (:class:`neatlm.data.gridworld.GridSettings`) plus how an MVoT
    run uses images (docs/mvot.md)."""

    thoughts: bool = _f(True, "interleave visual thoughts: after each move the model writes the image tokens "
                        "of the state it leads to, then the answer; false = the answer right after the question")
    discrepancy_weight: float = _f(1.0, "weight of the token-discrepancy loss at image-token targets (0 = "
                                   "cross-entropy only)", min=0.0)
    vq_run: str = _f("", "run directory of the trained visual codebook (`neat train --preset mvot-vq`); "
                     "needed with thoughts = true")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    bk: BKConfig = field(default_factory=BKConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ttl: TTLConfig = field(default_factory=TTLConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    blt: BLTSettings = field(default_factory=BLTSettings)
    vq: VQSettings = field(default_factory=VQSettings)
    mvot: MVoTConfig = field(default_factory=MVoTConfig)
    # [components.<name>] tables for neatlm.grad.components.parse_components; empty = one
    # AdamW component "all" configured from [train]
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "components")


# ----------------------------------------------------------------------------- parsing

def _parse_cli_value(key: str, text: str, tp: type) -> Any:
    """Parse the right-hand side of ``--set key=value`` into the field's type."""
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"{key} = {text!r}: expected {type_name(tp)}") from None


def _known_keys(section: str) -> str:
    obj = getattr(Config(), section)
    return ", ".join(f.name for f in dataclasses.fields(obj))


def _locate(cfg: Config, key: str) -> tuple[Any, str]:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{key!r}: keys have the form section.name (sections: {', '.join(SECTIONS)})")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"{key}: unknown section {section!r} (allowed: {', '.join(SECTIONS)})")
    obj = getattr(cfg, section)
    if name not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"{key}: unknown key (allowed in [{section}]: {_known_keys(section)})")
    return obj, name


def apply_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> Config:
    """Overlay a nested ``{section: {key: value}}`` mapping (as read from TOML) onto ``cfg``."""
    for section, values in data.items():
        if section == "components":
            if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
                raise ConfigError(f"{source}: [components.<name>] must be tables of key = value pairs")
            for name, body in values.items():
                cfg.components.setdefault(name, {}).update(body)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] (allowed: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value pairs")
        for name, value in values.items():
            key = f"{section}.{name}"
            obj, name = _locate(cfg, key)
            setattr(obj, name, coerce(key, value, field_type(obj, name)))
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("components."):
            _set_component(cfg, key, text)
            continue
        obj, name = _locate(cfg, key)
        setattr(obj, name, _parse_cli_value(key, text, field_type(obj, name)))
    return cfg


def _set_component(cfg: Config, key: str, text: str) -> None:
    """``components.<name>.<key>=<TOML value>``; a bare word is taken as a string."""
    parts = key.split(".")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"--set {key}: component keys have the form components.<name>.<key>")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    cfg.components.setdefault(parts[1], {})[parts[2]] = value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("neatlm.presets").iterdir() if p.name.endswith(".toml"))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory (expected a .toml file)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults, then a preset, then a TOML file, then ``--set`` overrides; then validation."""
    cfg = Config()
    if preset is not None:
        if preset not in preset_names():
            raise ConfigError(f"--preset {preset!r}: unknown preset (allowed: {', '.join(preset_names())})")
        text = resources.files("neatlm.presets").joinpath(f"{preset}.toml").read_text(encoding="utf-8")
        apply_dict(cfg, tomllib.loads(text), source=f"preset {preset}")
    if config_file is not None:
        apply_dict(cfg, read_toml(config_file), source=str(config_file))
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

GB = 1e9
# what one micro-batch's memory layers may take where the free memory cannot be read (not Linux)
DEFAULT_MEMORY_LIMIT = 16 * GB


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux ``MemAvailable``); None
    where that cannot be read. Module level so that tests replace it (never this host's RAM)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_limit(device: str) -> tuple[float, str] | None:
    """(bytes, where the number comes from) that the memory layers of one micro-batch must fit
    in, or None where nothing is checked: on a GPU the activations live in device memory, which
    is not read here (``train.device = "auto"`` counts as a GPU when torch sees one)."""
    if device in ("cuda", "mps"):
        return None
    if device == "auto":
        if torch.cuda.is_available() or torch.backends.mps.is_available():
            return None
    free = available_memory()
    if free is None:
        return DEFAULT_MEMORY_LIMIT, "the default limit (free memory unreadable)"
    return float(free), "available memory"


def memory_training_bytes(cfg: Config) -> float:
    """Estimated peak bytes of the memory layers in one training micro-batch: what every layer
    keeps for backward (:func:`neatlm.nn.memory.training_footprint` at train.batch_size x
    train.seq_len, a segment, since the graph is cut between segments), plus one layer's worth for
    the gradients its backward builds while the others' saved tensors are still alive. With full
    activation checkpointing one layer's saved tensors are live at a time; with a checkpointing
    budget, at most the budget and the layer the backward recomputes.

    Against the growth of resident memory over one forward + backward of the whole model (fp32,
    one thread), estimate / measured = 1.04 for the tiny model with poly features at batch 2
    (1.41 GB estimated, 1.35 GB measured) and 0.81 for mqar-atlas at batch 4 (0.25 GB, 0.31 GB:
    there attention and the output head weigh more); hence the warning from half the limit.
    """
    m, t, ck = cfg.model, cfg.train, cfg.checkpointing
    per_layer = training_footprint(cfg.memory, m.dim, t.batch_size, t.seq_len).total
    kept = per_layer * m.n_layers
    if ck.memory_budget_mb > 0:
        kept = min(kept, ck.memory_budget_mb * 2**20 + per_layer)
    elif ck.policy == "full":
        kept = per_layer
    return kept + per_layer


def _check_memory_size(cfg: Config) -> None:
    """Refuse a memory config whose training step cannot fit in memory, before a step runs out of it.

    Polynomial features grow with dim_head squared (degree 2) and every chunk keeps its own copy
    of the fast weights, so a setting that looks small (the default width with poly features) can
    ask for more memory than the host has, and the kernel then kills the run without a word.
    One line: the estimate, the limit, and the keys that shrink it. Above half the limit: a
    warning (the estimate is of the memory layers alone; the rest of the model, the allocator and
    other processes want room too).
    """
    mem = cfg.memory
    if not mem.enabled:
        return
    limit = memory_limit(cfg.train.device)
    if limit is None:
        return
    cap, source = limit
    need = memory_training_bytes(cfg)
    if need <= cap / 2:
        return
    m, t = cfg.model, cfg.train
    shapes = memory_shapes(mem, m.dim)
    widths = f"memory.dim_head = {mem.dim_head}"
    if not mem.dim_head:
        widths = f"{shapes.dim_head}-wide heads (model.dim / heads)"
    if mem.features == "poly":
        widths += f" with degree-{mem.poly_degree} features: {shapes.dim_key}-wide keys"
    what = (f"memory: one training micro-batch needs about {need / GB:.1f} GB for its memory layers "
            f"(model.n_layers = {m.n_layers}, memory.heads = {mem.heads}, {widths}, memory.chunk_size = "
            f"{mem.chunk_size}, train.batch_size = {t.batch_size}, train.seq_len = {t.seq_len})")
    knobs = ("lower memory.dim_head (or raise memory.heads, which shrinks dim_head = model.dim / heads), "
             "memory.poly_degree (or memory.features = 'identity') or train.batch_size, or raise "
             "memory.chunk_size (fewer fast-weight copies)")
    if need > cap:
        raise ConfigError(f"{what}, more than the {cap / GB:.1f} GB limit ({source}); {knobs}")
    log.warning("warning: %s, more than half of the %.1f GB limit (%s); %s", what, cap / GB, source, knobs)


def _check_mvot(cfg: Config) -> None:
    """An MVoT run: the vocabulary holds the codebook, the window holds the longest example."""
    mv, m, t = cfg.mvot, cfg.model, cfg.train
    if mv.min_size > mv.max_size:
        raise ConfigError(f"mvot.min_size = {mv.min_size}: must be <= mvot.max_size = {mv.max_size}")
    if mv.min_moves > mv.max_moves:
        raise ConfigError(f"mvot.min_moves = {mv.min_moves}: must be <= mvot.max_moves = {mv.max_moves}")
    if mv.thoughts:
        want = 256 + cfg.vq.codebook + 2
        if m.vocab_size != want:
            raise ConfigError(f"model.vocab_size = {m.vocab_size}: must be 256 + vq.codebook + 2 = {want} with "
                              "mvot.thoughts = true (bytes, image tokens, <boi>, <eoi>)")
        if not mv.vq_run:
            raise ConfigError("mvot.vq_run: name the run directory of the visual codebook (`neat train --preset "
                              "mvot-vq --run-dir DIR`) with mvot.thoughts = true")
    elif m.vocab_size < 256:
        raise ConfigError(f"model.vocab_size = {m.vocab_size}: must be >= 256 (bytes) with data.task = 'mvot'")
    need = max_tokens(mv, mv.thoughts)
    if t.seq_len * t.segments < need:
        raise ConfigError(f"train.seq_len * train.segments = {t.seq_len * t.segments}: must be >= {need} with "
                          f"data.task = 'mvot' (the longest example: a {mv.max_size}x{mv.max_size} map, "
                          f"{mv.max_moves} moves{', with an image after each' if mv.thoughts else ''})")


def validate(cfg: Config, *, check_size: bool = True) -> None:
    """Raise :class:`ConfigError` on the first invalid value (types, ranges, cross-field rules).

    ``check_size``: also refuse a memory layer too large for this host's free memory (training
    configs). False for configs read back from a checkpoint to evaluate or generate: what fitted
    the training host says nothing about this one, and reading needs no training step.
    """
    for section in SECTIONS:
        check_settings(section, getattr(cfg, section))
    if cfg.components:
        parse_components(cfg.components)
    m, t = cfg.model, cfg.train
    if m.dim % m.n_heads:
        raise ConfigError(f"model.n_heads = {m.n_heads}: must divide model.dim = {m.dim}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.n_heads = {m.n_heads}: dim / n_heads must be even for RoPE")
    if t.seq_len > m.context:
        raise ConfigError(f"train.seq_len = {t.seq_len}: must be <= model.context = {m.context}")
    if cfg.memory.enabled and cfg.memory.dim_head == 0 and m.dim % cfg.memory.heads:
        raise ConfigError(f"memory.heads = {cfg.memory.heads}: must divide model.dim = {m.dim}")
    if cfg.memory.conv_size > 0 and cfg.memory.combine == "mac":
        raise ConfigError("memory.conv_size: the causal conv is not supported with memory.combine = 'mac' "
                          "(use mag or mal)")
    if cfg.memory.reset == "never" and m.window == 0:
        raise ConfigError("memory.reset = 'never': needs model.window > 0 (state carried forever would keep an "
                          "ever-growing full-attention cache)")
    mem = cfg.memory
    if mem.enabled and mem.reset in ("sequence", "batch"):
        # the memory steps at the end of each chunk and only later tokens read the result: a training
        # window (the tokens a state lives for) no longer than a chunk never reads an update, so the
        # memory never learns (with reset = "never" the state, and its updates, carry across steps)
        if mem.reset == "sequence" and t.seq_len * t.segments <= mem.chunk_size:
            raise ConfigError(f"memory.chunk_size = {mem.chunk_size}: must be < train.seq_len * train.segments = "
                              f"{t.seq_len} * {t.segments} = {t.seq_len * t.segments} with memory.reset = 'sequence' "
                              "(no memory update is read inside a training window, so the memory never learns); "
                              "shorten the chunk, lengthen the window or set memory.reset = 'never'")
        if mem.reset == "batch" and t.seq_len <= mem.chunk_size:
            raise ConfigError(f"memory.chunk_size = {mem.chunk_size}: must be < train.seq_len = {t.seq_len} with "
                              "memory.reset = 'batch', which restarts the memory at every segment (no memory update "
                              "is read inside a segment, so the memory never learns); shorten the chunk, lengthen "
                              "train.seq_len or set memory.reset = 'sequence'")
    if mem.enabled and not mem.detach_output and mem.chunk_size % t.seq_len == 0:
        # truncated backprop detaches the state between forwards; when every chunk ends exactly at
        # the end of a forward, its update is first read in a later forward, so no outer gradient
        # ever reaches what wrote it (to_k, to_v and the gates would never learn)
        raise ConfigError(f"memory.chunk_size = {mem.chunk_size}: a multiple of train.seq_len = {t.seq_len}, so "
                          "every memory update falls at the end of a forward, where truncated backprop detaches "
                          "the state, and the memory's keys, values and gates never get a gradient; use a seq_len "
                          "longer than the chunk or one that does not divide it (memory.detach_output = true "
                          "trains the read path only, by design)")
    d = cfg.data
    if d.sampling in ("stream", "documents"):
        if d.task != "text":
            raise ConfigError(f"data.sampling = {d.sampling!r}: only for data.task = 'text' (got {d.task!r})")
        if mem.reset != "never":
            raise ConfigError(f"data.sampling = {d.sampling!r}: needs memory.reset = 'never' (got {mem.reset!r}); a "
                              "state reset at every step makes it no different from random windows")
        if t.accum_steps != 1:
            raise ConfigError(f"train.accum_steps = {t.accum_steps}: must be 1 with data.sampling = {d.sampling!r} "
                              "(the carried state continues one micro-batch's rows); raise train.batch_size instead")
    if d.task == "mqar":
        queries = d.mqar_queries or d.mqar_pairs
        if queries > d.mqar_pairs:
            raise ConfigError(f"data.mqar_queries = {d.mqar_queries}: must be <= data.mqar_pairs = {d.mqar_pairs}")
        if 2 * d.mqar_pairs + 2 * queries > t.seq_len:
            raise ConfigError(f"data.mqar_pairs = {d.mqar_pairs}: 2 * pairs + 2 * queries = "
                              f"{2 * d.mqar_pairs + 2 * queries} must fit in train.seq_len = {t.seq_len}")
        if d.mqar_pairs > m.vocab_size // 2 - 1:
            raise ConfigError(f"data.mqar_pairs = {d.mqar_pairs}: must be <= model.vocab_size // 2 - 1 = "
                              f"{m.vocab_size // 2 - 1} (distinct keys come from [1, vocab_size / 2)); raise "
                              f"model.vocab_size to at least {2 * d.mqar_pairs + 2}")
    if d.task == "passkey":
        window = t.seq_len * t.segments
        if window < min_length(questions=d.passkey_questions):
            raise ConfigError(f"train.seq_len * train.segments = {t.seq_len} * {t.segments} = {window}: must be >= "
                              f"{min_length(questions=d.passkey_questions)} with data.task = 'passkey' (each "
                              "training window is one example: the needle, the questions and the five-digit answers)")
    if d.task == "mvot":
        _check_mvot(cfg)
    if not [p for p in cfg.adapt.patterns.split(",") if p.strip()]:
        raise ConfigError(f"adapt.patterns = {cfg.adapt.patterns!r}: name at least one linear layer pattern, "
                          "e.g. '*.mlp.down'")
    if cfg.blt.enabled:
        _check_blt(cfg)
    if cfg.moe.top_k > cfg.moe.experts:
        raise ConfigError(f"moe.top_k = {cfg.moe.top_k}: must be <= moe.experts = {cfg.moe.experts}")
    if check_size:
        _check_memory_size(cfg)


def _check_blt(cfg: Config) -> None:
    """The BLT rules that span keys (each key's own range is checked with its section)."""
    b, mem = cfg.blt, cfg.memory
    for width, heads, what in ((b.local_dim, b.local_heads, "blt.local_dim"),
                               (b.entropy_dim, b.entropy_heads, "blt.entropy_dim")):
        key = "blt.local_heads" if what == "blt.local_dim" else "blt.entropy_heads"
        if width % heads or (width // heads) % 2:
            raise ConfigError(f"{key} = {heads}: must divide {what} = {width} into heads of even width (RoPE)")
    if mem.reset == "never":
        raise ConfigError("memory.reset = 'never': not with blt.enabled (rows of a batch complete different numbers "
                          "of patches, so each row's global state is its own and is not carried from step to step); "
                          "use memory.reset = 'sequence' and train.segments for longer windows")
    if b.target_patch_size > b.max_patch:
        raise ConfigError(f"blt.target_patch_size = {b.target_patch_size:g}: must be <= blt.max_patch = "
                          f"{b.max_patch} (no patch is longer)")
    if cfg.data.task != "text":
        raise ConfigError(f"blt.enabled: BLT patches text; data.task must be 'text' (got {cfg.data.task!r})")
    if mem.enabled:
        patch = b.target_patch_size or (b.stride if b.patcher == "stride" else 4.0)
        patches = cfg.train.seq_len * cfg.train.segments / patch
        if mem.reset == "sequence" and mem.chunk_size >= patches:
            raise ConfigError(f"memory.chunk_size = {mem.chunk_size}: the global model's memory steps once per "
                              f"chunk of patches, and a training window of {cfg.train.seq_len * cfg.train.segments} "
                              f"bytes holds about {patches:.0f} patches of {patch:g} bytes, so the memory would "
                              "never learn; shorten memory.chunk_size")


# ----------------------------------------------------------------------------- writing

def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: Config) -> str:
    """The full resolved config as TOML (readable back with ``--config``)."""
    lines: list[str] = []
    data = cfg.to_dict()
    components = data.pop("components")
    tables = [(section, values) for section, values in data.items()]
    tables += [(f"components.{name}", body) for name, body in components.items()]
    for section, values in tables:
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def from_dict(data: dict[str, Any], check_size: bool = False) -> Config:
    """Rebuild a validated config from :meth:`Config.to_dict` output (e.g. from a checkpoint).
    ``check_size`` as in :func:`validate`: off by default, since a saved config is mostly read back
    to evaluate, generate or check a checkpoint's shapes; a resumed training run turns it on."""
    cfg = apply_dict(Config(), data, source="saved config")
    validate(cfg, check_size=check_size)
    return cfg
