"""Starting a BLT run: the entropy model is read from its own run, and a target patch size becomes
a threshold measured on the training text. Both are recorded in the new run (the entropy model's
shape and the resolved threshold in its config, its weights in the model), so the BLT run never
needs the entropy run again: resuming, evaluating and generating read the BLT run alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..config import Config, from_dict
from ..data.corpus import validation_batches
from ..errors import CheckpointError
from ..nn.blt.model import BLTModel
from ..nn.blt.patching import entropy_of, measured_threshold
from ..settings import ConfigError
from . import checkpoint as ckpt

log = logging.getLogger("neatlm.train")

ENTROPY_HINT = "train it first: neat train --preset blt-entropy --set train.run_dir={run}"


def read_entropy_run(cfg: Config) -> dict[str, torch.Tensor]:
    """The entropy model's weights from ``blt.entropy_run``; its shape is written into ``cfg.blt``.
    Every problem is one line naming blt.entropy_run."""
    b = cfg.blt
    run = b.entropy_run or "runs/blt-entropy"
    key = f"blt.entropy_run = {b.entropy_run!r}"
    if not b.entropy_run:
        raise ConfigError(f"{key}: a BLT run needs the run directory of its entropy model; "
                          + ENTROPY_HINT.format(run=run) + f" and --set blt.entropy_run={run}")
    if not Path(b.entropy_run).exists():
        raise ConfigError(f"{key}: no such directory; " + ENTROPY_HINT.format(run=run))
    try:
        found = ckpt.read_checkpoint(b.entropy_run)
    except CheckpointError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    entropy = from_dict(found.config)
    m = entropy.model
    problems = [what for what, bad in (
        ("a BLT model", entropy.blt.enabled), ("a memory", entropy.memory.enabled),
        (f"mixer {m.mixer!r}", m.mixer != "attention"), (f"mlp {m.mlp!r}", m.mlp != "swiglu"),
        (f"mlp_hidden {m.mlp_hidden}", m.mlp_hidden != 0), (f"vocab_size {m.vocab_size}", m.vocab_size != 256),
        ("full attention (model.window = 0)", m.window == 0)) if bad]
    if problems:
        raise ConfigError(f"{key}: the entropy model must be a byte model with sliding-window attention and a "
                          f"SwiGLU MLP (preset blt-entropy); this one has {', '.join(problems)}")
    b.entropy_dim, b.entropy_layers, b.entropy_heads, b.entropy_window = m.dim, m.n_layers, m.n_heads, m.window
    return found.states["model"]


def describe_blt(cfg: Config) -> str:
    """One line: how this BLT run patches, and where its entropy model came from."""
    b = cfg.blt
    if b.patcher == "stride":
        source = f" (from blt.target_patch_size = {b.target_patch_size:g})" if b.target_patch_size > 0 else ""
        return f"BLT: a patch every {b.stride} bytes{source}, no entropy model"
    what = "H(x_i)" if b.patcher == "entropy" else "H(x_i) - H(x_i-1)"
    rule = f"{b.patcher} patches where {what} > {b.threshold:.4g} nats"
    source = f" (set from blt.target_patch_size = {b.target_patch_size:g})" if b.target_patch_size > 0 else ""
    return (f"BLT: {rule}{source}, at most {b.max_patch} bytes; entropy model {b.entropy_dim} wide, "
            f"{b.entropy_layers} blocks, window {b.entropy_window} (from {b.entropy_run or 'the run'})")


def start_blt(cfg: Config, model: BLTModel, weights: dict[str, torch.Tensor] | None, text: np.ndarray) -> None:
    """Load the entropy model (none for the stride patcher) and, with ``blt.target_patch_size``,
    resolve the threshold (or stride) from the entropies of evenly spaced windows of the training
    ``text``."""
    if model.entropy is not None and weights is not None:
        model.entropy.load_state_dict(weights)
    b = cfg.blt
    if b.target_patch_size <= 0:
        return
    if b.patcher == "stride":
        b.stride = max(1, round(b.target_patch_size))
        log.info("blt.stride = %d from blt.target_patch_size = %g", b.stride, b.target_patch_size)
        return
    seq = min(cfg.train.seq_len, max(text.size - 1, 2))
    x, _ = next(validation_batches(text, 64, seq, 1))
    with torch.no_grad():
        after = entropy_of(model.entropy(x.to(next(model.parameters()).device)).logits)
    entropies = torch.cat((after[:, :1], after), dim=1)   # as the model patches a stream from its start
    b.threshold = measured_threshold(entropies, b.patcher, b.target_patch_size, b.max_patch)
    log.info("blt.threshold = %.4f nats from blt.target_patch_size = %g (the %s patcher's average patch on 64 "
             "windows of %d training bytes)", b.threshold, b.target_patch_size, b.patcher, seq)
