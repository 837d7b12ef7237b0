"""[blt]: the settings of the Byte Latent Transformer (see :mod:`neatlm.nn.blt.model`).

The global model over patches is configured by ``[model]`` and ``[memory]``, exactly like the byte
model (every mixer option, memory included); ``[blt]`` holds what is BLT's own: the entropy model
that decides where patches start, the patcher, and the small byte-level encoder and decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...settings import setting

_f = setting


@dataclass
class BLTSettings:
    enabled: bool = _f(False, "the model is a Byte Latent Transformer: a byte encoder pools patches, [model] runs "
                       "once per patch, a byte decoder predicts the next byte")
    entropy_run: str = _f("", "run directory of the entropy model (`neat train --preset blt-entropy`), read when a "
                          "BLT run starts; its weights are then part of the BLT run")
    entropy_dim: int = _f(64, "entropy model width (recorded from blt.entropy_run when a run starts)", min=8)
    entropy_layers: int = _f(2, "entropy model blocks (recorded from blt.entropy_run)", min=1)
    entropy_heads: int = _f(2, "entropy model attention heads (recorded from blt.entropy_run)", min=1)
    entropy_window: int = _f(128, "entropy model attention window in bytes (recorded from blt.entropy_run)", min=1)
    patcher: str = _f("entropy", "where patches start: entropy = H(x_i) > blt.threshold; monotonic = H(x_i) - "
                      "H(x_i-1) > blt.threshold; stride = every blt.stride bytes", choices=("entropy", "monotonic", "stride"))
    threshold: float = _f(2.0, "entropy threshold in nats (global for 'entropy', relative for 'monotonic'); above "
                          "ln 256 = 5.55 only blt.max_patch ends a patch, below -5.55 every byte is a patch")
    target_patch_size: float = _f(0.0, "> 0: when a run starts, set blt.threshold (entropy, monotonic) or "
                                  "blt.stride from this average patch size, measured on training text", min=0.0)
    stride: int = _f(4, "bytes per patch of the 'stride' patcher", min=1)
    max_patch: int = _f(12, "longest patch in bytes: a patch this long ends whatever the entropy", min=1)
    local_dim: int = _f(64, "width of the byte encoder and decoder", min=8)
    local_heads: int = _f(2, "attention heads of the byte layers and of the cross-attentions", min=1)
    local_window: int = _f(64, "sliding attention window of the byte layers, in bytes", min=1)
    encoder_layers: int = _f(1, "byte transformer blocks before patch pooling", min=0)
    decoder_layers: int = _f(2, "byte transformer blocks after the global model (each after a cross-attention)",
                             min=1)
    patch_queries: int = _f(2, "query vectors per patch in the pooling cross-attention (their outputs are "
                            "concatenated) and key vectors a patch offers the decoder", min=1)
    hash_buckets: int = _f(4096, "buckets of each hash n-gram embedding table", min=1)
    hash_min_n: int = _f(3, "shortest hashed byte n-gram", min=2)
    hash_max_n: int = _f(8, "longest hashed byte n-gram (0 embeddings when below blt.hash_min_n)", min=0)
