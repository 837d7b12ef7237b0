"""The model a config describes: :class:`~neatlm.nn.model.NeatLM`, or the Byte Latent
Transformer when ``[blt] enabled``. Both follow the model protocol (``out = model(idx, state,
ttl, scored=None)``), so the trainer, evaluation and generation never ask which one they have."""

from __future__ import annotations

from torch import nn

from ..config import Config
from .blt.model import BLTModel
from .model import NeatLM


def build_model(cfg: Config) -> nn.Module:
    return BLTModel(cfg) if cfg.blt.enabled else NeatLM(cfg)
