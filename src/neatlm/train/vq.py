"""``neat train --preset mvot-vq``: train the visual codebook on grid-world renderings.

The VQ-VAE (:mod:`neatlm.nn.vq`) is a separate, small model with its own loop: Adam on the
reconstruction error plus the commitment loss, the codebook moving by EMA inside the forward.
Each step draws ``train.batch_size`` renderings of random training-split maps with the agent on a
random cell (any cell: ice, hole or goal, every state a walk can show), all of one map size
(sizes take turns). Validation renders every state of the first validation-split examples and
reports the reconstruction error (mean squared, in [0, 1] pixel units, and PSNR), the largest
pixel error, and the codebook usage (distinct codes and the perplexity of their frequencies).

The run directory gets ``config.toml``, ``metrics.jsonl`` and ``vq.safetensors`` + ``vq.json``
(the settings and the final validation figures), which an MVoT run names in ``mvot.vq_run``.
Training is short (a minute or two on one CPU thread), so there are no intermediate checkpoints
to resume from.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import Config, to_toml
from ..data.gridworld import GridSettings, random_map, make_example, render, renderings, split_of
from ..errors import NeatError
from ..nn.vq import META_FILE, VQVAE, codebook_usage, images_to_tensor, save_vq, tensor_to_images
from .metrics import MetricsWriter

VALIDATION_EXAMPLES = 64


def training_renders(rng: np.random.Generator, size: int, count: int) -> torch.Tensor:
    """``count`` renderings (B, 3, 4 size, 4 size) of training-split maps of side ``size``, the
    agent on a random cell of each."""
    images = []
    while len(images) < count:
        grid, _ = random_map(rng, size)
        if split_of(grid) != "train":
            continue
        images.append(render(grid, (int(rng.integers(0, size)), int(rng.integers(0, size)))))
    return images_to_tensor(images)


def validation_renders(settings: GridSettings, examples: int = VALIDATION_EXAMPLES) -> list[torch.Tensor]:
    """Every state of the first ``examples`` validation examples, one tensor per map size."""
    by_size: dict[int, list[np.ndarray]] = {}
    for i in range(examples):
        ex = make_example("validation", i, settings)
        by_size.setdefault(ex.size, []).extend(renderings(ex))
    return [images_to_tensor(v) for _, v in sorted(by_size.items())]


@torch.no_grad()
def evaluate_vq(vq: VQVAE, batches: list[torch.Tensor]) -> dict[str, float]:
    """Reconstruction error and codebook usage of ``vq`` (eval mode: the codebook does not move)."""
    was = vq.training
    vq.eval()
    se, n, worst, codes = 0.0, 0, 0.0, []
    for x in batches:
        out = vq(x)
        recon = tensor_to_images(out.recon).permute(0, 3, 1, 2).float() / 255.0   # what a PNG would show
        se += F.mse_loss(out.recon.clamp(0, 1), x, reduction="sum").item()
        n += x.numel()
        worst = max(worst, (recon - x).abs().max().item())
        codes.append(out.codes.flatten())
    vq.train(was)
    mse = se / n
    used, perplexity = codebook_usage(torch.cat(codes), vq.size)
    return {"val_mse": mse, "val_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "val_max_err": worst,
            "codes_used": float(used), "code_perplexity": perplexity}


def train_vq(cfg: Config, run_dir: str | Path | None = None) -> dict[str, float]:
    """Train the VQ-VAE of ``cfg`` (``[vq]``, ``[mvot]`` sizes, ``train.steps``, ``batch_size``,
    ``lr``, ``warmup_steps``, ``seed``, ``threads``) and write it to the run directory."""
    t = cfg.train
    run_dir = Path(run_dir or t.run_dir)
    if (run_dir / META_FILE).exists():
        raise NeatError(f"{run_dir} already holds a trained codebook ({META_FILE}): choose another --run-dir")
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    vq = VQVAE(cfg.vq)
    opt = torch.optim.Adam(vq.parameters(), lr=t.lr)

    def lr_scale(s: int) -> float:   # linear warmup, then cosine to a tenth
        return min(1.0, (s + 1) / max(t.warmup_steps, 1)) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / t.steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    rng = np.random.default_rng([cfg.data.seed, 0x76711])
    sizes = list(range(cfg.mvot.min_size, cfg.mvot.max_size + 1))
    val = validation_renders(cfg.mvot)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    metrics = MetricsWriter(run_dir, tensorboard=False)
    bar = tqdm(total=t.steps, disable=not t.progress, unit="step", dynamic_ncols=True)
    start, last = time.perf_counter(), {}
    try:
        for step in range(1, t.steps + 1):
            x = training_renders(rng, sizes[step % len(sizes)], t.batch_size)
            out = vq(x)
            recon = F.mse_loss(out.recon, x)
            loss = recon + out.commitment
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            if step % t.log_every == 0 or step == t.steps:
                last = {"loss": loss.item(), "recon_mse": recon.item(), "commitment": out.commitment.item(),
                        "elapsed_s": time.perf_counter() - start}
                if (cfg.eval.every and step % cfg.eval.every == 0) or step == t.steps:
                    last.update(evaluate_vq(vq, val))
                metrics.write(step, last)
                bar.set_postfix(mse=f"{recon.item():.5f}")
            bar.update(1)
    finally:
        bar.close()
        metrics.close()
    save_vq(vq, run_dir, {"step": t.steps, **{k: round(v, 6) for k, v in last.items()}})
    return last
