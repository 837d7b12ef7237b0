"""A small VQ-VAE: the visual codebook that turns a rendered grid state into a few tokens.

    image (B, 3, H, W) -> encoder (stride 4) -> z (B, D, H/4, W/4) -> nearest code -> decoder -> image

As in VQ-VAE (van den Oord et al. 2017) with the codebook learned by exponential moving averages
(Razavi et al. 2019, VQ-VAE-2) rather than by a codebook loss: each code moves towards the mean of
the encoder outputs assigned to it. The encoder gets the decoder's gradient through the
quantisation by the straight-through estimator (``z + (q - z).detach()``) and is held near its
code by the commitment loss ``beta * ||z - sg(q)||^2``.

Dead codes: the codebook starts from encoder outputs of the first batch (a data-dependent init,
one k-means++-free step of k-means), and any code whose moving-average count falls below
``dead_threshold`` is restarted at the encoder outputs of the current batch that are farthest from
their code (the worst-served data, as k-means++ seeds), so every code is somewhere the data is
and rare cells get codes of their own. Renderings have few distinct cell kinds, so codebook usage is reported,
not assumed (:func:`codebook_usage`).

The stride of 4 matches the 4-pixel cells of :mod:`neatlm.data.gridworld`: one code per cell of
the map, in raster order, so an image of an ``n x n`` map is ``n * n`` tokens. Every convolution
has kernel = stride (or 1), so a code sees exactly its own cell: with 3 x 3 and 4 x 4 kernels
(a first version) the codes also encoded the neighbours, the same ice cell took 17 different
codes by context, and the rare "agent on the goal" cell shared its codes with the bare goal (the
agent vanished in reconstruction); per-cell codes name what is in the cell and nothing else.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CheckpointError
from ..settings import check_settings, setting


@dataclass
class VQSettings:
    """[vq]: the visual codebook's shape and how it learns."""

    codebook: int = setting(32, "codes in the codebook (the image tokens of the MVoT vocabulary)", min=2, max=4096)
    code_dim: int = setting(16, "width of a code vector", min=1)
    channels: int = setting(32, "channels of the encoder and decoder convolutions", min=4)
    commitment: float = setting(0.25, "weight beta of the commitment loss ||z - sg(code)||^2", min=0.0)
    ema_decay: float = setting(0.95, "decay of the codebook's moving averages", above=0.0, below=1.0)
    dead_threshold: float = setting(0.03, "a code whose moving-average count (assignments per step) falls "
                                    "below this is restarted at a random encoder output of the batch", min=0.0)


class VQOutput(NamedTuple):
    """recon (B, 3, H, W) in [0, 1] units; codes (B, H/4, W/4) ids; commitment loss (a scalar,
    weighted); z the encoder output (B, D, H/4, W/4)."""

    recon: Tensor
    codes: Tensor
    commitment: Tensor
    z: Tensor


class VQVAE(nn.Module):
    """``out = vq(images)`` for float images (B, 3, H, W) in [0, 1], H and W multiples of 4.

    ``vq.encode(images)`` gives the code ids (B, H/4, W/4), ``vq.decode(codes)`` the images. In
    training mode a call also moves the codebook (EMA) and restarts dead codes; in eval mode it
    changes nothing.
    """

    def __init__(self, settings: VQSettings | None = None, **overrides: object):
        super().__init__()
        s = settings or VQSettings()
        if overrides:
            s = VQSettings(**{**{f.name: getattr(s, f.name) for f in fields(s)}, **overrides})
        check_settings("vq", s)
        self.settings = s
        c, d, k = s.channels, s.code_dim, s.codebook
        # kernel = stride: the receptive field of a code is exactly its 4 x 4 cell (see the module doc)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 2, stride=2), nn.ReLU(),                     # (B, c, H/2, W/2)
            nn.Conv2d(c, c, 2, stride=2), nn.ReLU(),                     # (B, c, H/4, W/4)
            nn.Conv2d(c, c, 1), nn.ReLU(),
            nn.Conv2d(c, d, 1))                                          # (B, d, H/4, W/4)
        self.decoder = nn.Sequential(
            nn.Conv2d(d, c, 1), nn.ReLU(),
            nn.ConvTranspose2d(c, c, 2, stride=2), nn.ReLU(),            # (B, c, H/2, W/2)
            nn.ConvTranspose2d(c, c, 2, stride=2), nn.ReLU(),            # (B, c, H, W)
            nn.Conv2d(c, 3, 1))                                          # (B, 3, H, W)
        # the codebook and its moving averages are buffers: they learn by EMA, not by gradient
        self.register_buffer("codebook", torch.randn(k, d) / math.sqrt(d))
        self.register_buffer("ema_count", torch.ones(k))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    def _distances(self, flat: Tensor) -> Tensor:
        """(N, K) squared distance of each row of ``flat`` (N, D) to each code."""
        return (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                + self.codebook.pow(2).sum(1)[None])

    def _nearest(self, flat: Tensor) -> Tensor:
        """Code id of each row of ``flat`` (N, D): the nearest code in squared distance."""
        return self._distances(flat).argmin(1)

    def encode(self, images: Tensor) -> Tensor:
        """Code ids (B, H/4, W/4) of ``images`` (B, 3, H, W) in [0, 1]."""
        z = self.encoder(images)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return self._nearest(flat).view(b, h, w)

    def decode(self, codes: Tensor) -> Tensor:
        """Images (B, 3, 4h, 4w) in [0, 1] units (not clamped) of code ids (B, h, w)."""
        q = self.codebook[codes].permute(0, 3, 1, 2)                    # (B, D, h, w)
        return self.decoder(q)

    def forward(self, images: Tensor) -> VQOutput:
        z = self.encoder(images)                                          # (B, D, h, w)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)                       # (N, D)
        if self.training:
            self._update_codebook(flat.detach())
        codes = self._nearest(flat)
        q = self.codebook[codes].view(b, h, w, d).permute(0, 3, 1, 2)     # (B, D, h, w)
        commitment = self.settings.commitment * F.mse_loss(z, q.detach())
        q_st = z + (q - z).detach()                                       # straight-through
        return VQOutput(self.decoder(q_st), codes.view(b, h, w), commitment, z)

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor) -> None:
        """One EMA step of the codebook towards the mean of its assigned encoder outputs, after a
        data-dependent init on the first batch, and restarts of dead codes."""
        s, k = self.settings, self.size
        if not bool(self.initialised):
            pick = torch.randint(0, flat.shape[0], (k,), device=flat.device)
            self.codebook.copy_(flat[pick])
            self.ema_sum.copy_(flat[pick])
            self.ema_count.fill_(1.0)
            self.initialised.fill_(True)
        dist = self._distances(flat)
        codes = dist.argmin(1)
        onehot = F.one_hot(codes, k).type_as(flat)                        # (N, K)
        self.ema_count.mul_(s.ema_decay).add_(onehot.sum(0), alpha=1 - s.ema_decay)
        self.ema_sum.mul_(s.ema_decay).add_(onehot.t() @ flat, alpha=1 - s.ema_decay)
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + k * 1e-5) * n               # Laplace smoothing
        self.codebook.copy_(self.ema_sum / count[:, None])
        dead = self.ema_count < s.dead_threshold
        if bool(dead.any()):
            # restart at the encoder outputs the codebook serves worst (farthest from their code):
            # the rare cells (the agent in a hole, on the goal) rather than more copies of ice
            worst = dist.min(1).values
            pick = worst.topk(min(int(dead.sum()), flat.shape[0])).indices
            dead = dead.nonzero().flatten()[:pick.numel()]
            self.codebook[dead] = flat[pick]
            self.ema_sum[dead] = flat[pick]
            self.ema_count[dead] = 1.0

    def distances(self) -> Tensor:
        """(K, K) mean squared distance between every pair of code vectors: what the
        token-discrepancy loss charges for predicting code j where code i is due."""
        e = self.codebook
        return (e[:, None, :] - e[None, :, :]).pow(2).mean(-1)


def codebook_usage(codes: Tensor, size: int) -> tuple[int, float]:
    """(distinct codes used, perplexity of their frequencies) over a set of code ids."""
    counts = torch.bincount(codes.flatten(), minlength=size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return int((counts > 0).sum()), float(entropy.exp())


def images_to_tensor(images: list) -> Tensor:
    """uint8 (H, W, 3) numpy images of one size -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def tensor_to_images(x: Tensor) -> Tensor:
    """float (B, 3, H, W) in [0, 1] units -> uint8 (B, H, W, 3), clamped."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


WEIGHTS_FILE, META_FILE = "vq.safetensors", "vq.json"


def save_vq(vq: VQVAE, run_dir: str | Path, meta: dict) -> Path:
    """Write the codebook model to ``run_dir/vq.safetensors`` and its settings and ``meta`` (step,
    measured reconstruction error, usage) to ``run_dir/vq.json``; each written aside and renamed,
    so a crash leaves the old pair or the new one."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in vq.state_dict().items()}, str(tmp))
    os.replace(tmp, run_dir / WEIGHTS_FILE)
    doc = {"settings": asdict(vq.settings), **meta}
    tmp = run_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, run_dir / META_FILE)
    return run_dir / WEIGHTS_FILE


def load_vq(run_dir: str | Path, what: str = "the VQ-VAE run") -> VQVAE:
    """The trained codebook model of a ``neat train --preset mvot-vq`` run directory, in eval mode.
    Every problem is one :class:`CheckpointError` line naming ``what`` and the file."""
    run_dir = Path(run_dir)
    meta, weights = run_dir / META_FILE, run_dir / WEIGHTS_FILE
    for f in (meta, weights):
        if not f.is_file():
            raise CheckpointError(f"{what} {run_dir}: no {f.name} (train one with `neat train --preset mvot-vq "
                                  f"--run-dir {run_dir}`)")
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
        vq = VQVAE(VQSettings(**doc["settings"]))
        vq.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # noqa: BLE001 - whatever the reader raises (SafetensorError too), it is no codebook
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{what} {run_dir}: cannot be read ({first})") from None
    return vq.eval()
