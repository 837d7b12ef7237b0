"""The training loop: batches, optimizer steps, evaluation, metrics and checkpoints.

``Trainer(cfg).train()`` trains from scratch; ``Trainer.resume(run_dir).train()`` continues
from the latest checkpoint with the saved config. On CPU the losses after a resume equal those
of an uninterrupted run bit for bit: weights, optimizer state, RNG states and the sampler
position are restored, and the learning rate is a pure function of the step.
"""

from __future__ import annotations

import base64
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..config import Config, from_dict, to_toml
from ..data.source import build_data
from ..data.synthetic import IGNORE
from ..errors import CheckpointError, TrainingDiverged
from ..hardware import detect
from ..nn.model import NeatLM, lm_loss
from . import checkpoint as ckpt
from .distributed import all_reduce_mean, barrier, init_distributed
from .evaluate import evaluate
from .metrics import MetricsWriter, bits_per_byte, truncate_after
from .state_io import detach_state, flatten_state, unflatten_state


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases, embeddings (and any 1-D parameter) are not decayed."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, _resume_from: Path | None = None):
        self.cfg = cfg
        t = cfg.train
        self.run_dir = Path(run_dir or t.run_dir)
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.hw = detect(t.device, t.precision, probe_size=cfg.model.dim * 2)
        self.dist = init_distributed(self.hw.device.type)
        if self.dist.enabled and self.hw.device.type == "cuda":
            self.hw.device = torch.device("cuda", self.dist.local_rank)
        self.rows = self.dist.rows(t.batch_size)
        self.data = build_data(cfg)
        torch.manual_seed(t.seed)
        self.model = NeatLM(cfg).to(self.hw.device)
        # DDP averages gradients over ranks; the plain model is kept for eval and checkpoints
        self.ddp_model = DDP(self.model, device_ids=[self.dist.local_rank] if self.hw.device.type == "cuda" else None) \
            if self.dist.enabled else self.model
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
            fused=self.hw.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.hw.device.type, enabled=self.hw.precision == "fp16")
        self.sampler = self.data.sampler
        self.carry = None  # model state kept across steps when memory.reset = "never"
        self.step = 0
        self.best_val = float("inf")
        if _resume_from is not None:
            self._restore(_resume_from)

    # ------------------------------------------------------------------ resume

    @classmethod
    def resume(cls, path: str | Path, overrides: list[str] | None = None) -> "Trainer":
        """Continue the run in ``path`` (a run dir or one of its checkpoint dirs) with its saved config."""
        from ..config import apply_overrides, validate

        ckpt_dir = ckpt.resolve(path)
        _, _, state, _ = ckpt.load_checkpoint(ckpt_dir)  # verify before building anything
        cfg = from_dict(state["config"])
        if overrides:
            apply_overrides(cfg, overrides)
            validate(cfg)
        return cls(cfg, run_dir=ckpt_dir.parent.parent, _resume_from=ckpt_dir)

    def _restore(self, ckpt_dir: Path) -> None:
        model_tensors, optim_state, state, extra = ckpt.load_checkpoint(ckpt_dir)
        missing, unexpected = self.model.load_state_dict(model_tensors, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{ckpt_dir}/model.safetensors does not match the config "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.optimizer.load_state_dict(optim_state["optimizer"])
        if "scaler" in optim_state:
            self.scaler.load_state_dict(optim_state["scaler"])
        self.step = state["step"]
        self.best_val = state.get("best_val", float("inf"))
        self.sampler.position = state["sampler_position"]
        if state.get("carry") is not None:
            self.carry = unflatten_state(state["carry"], extra, self.hw.device)
        torch.set_rng_state(_decode_rng(state["rng"]["torch"]))
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all([_decode_rng(s) for s in state["rng"]["cuda"]])
        if self.dist.is_main:
            truncate_after(self.run_dir, self.step)

    def _check_finite(self, what: str, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged at step {self.step}: the {what} is {value}; the last good "
                                   f"checkpoint is in {ckpt.checkpoint_root(self.run_dir)} "
                                   "(try a lower train.lr or train.grad_clip)")

    def save(self) -> Path | None:
        """Checkpoint now (rank 0 writes, the others wait); never writes non-finite weights."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            self._check_finite("model weights", math.nan)
        if not self.dist.is_main:
            barrier(self.dist)
            return None
        rng = {"torch": _encode_rng(torch.get_rng_state())}
        if torch.cuda.is_available():
            rng["cuda"] = [_encode_rng(s) for s in torch.cuda.get_rng_state_all()]
        state = {"config": self.cfg.to_dict(), "sampler_position": self.sampler.position, "rng": rng,
                 "best_val": self.best_val, "device": str(self.hw.device), "precision": self.hw.precision}
        optim = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        extra: dict[str, torch.Tensor] = {}
        if self.carry is not None:  # memory that persists across batches is part of the run's state
            state["carry"], extra = flatten_state(self.carry)
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model.state_dict(), optim, state,
                                    keep_last=self.cfg.train.keep_last, extra_tensors=extra)
        barrier(self.dist)
        return path

    # ------------------------------------------------------------------ loop

    def _backward_window(self, x: torch.Tensor, y: torch.Tensor, last_window: bool) -> tuple[torch.Tensor, int]:
        """Forward and backward one micro-batch window as consecutive segments.

        Memory state is carried between segments and detached (truncated backprop), so the graph
        never spans more than one segment. Returns (summed loss, scored tokens).
        """
        t, reset = self.cfg.train, self.cfg.memory.reset
        scored = int((y != IGNORE).sum())
        state = self.carry if reset == "never" else None
        total = torch.zeros((), device=x.device)
        for i, (xs, ys) in enumerate(zip(x.chunk(t.segments, dim=1), y.chunk(t.segments, dim=1))):
            if reset == "batch":
                state = None
            last = last_window and i == t.segments - 1
            # DDP all-reduces gradients once per optimizer step, on the last backward
            sync = nullcontext() if last or not self.dist.enabled else self.ddp_model.no_sync()
            with sync:
                with self.hw.autocast():
                    logits, state = self.ddp_model(xs, state)
                    loss_sum = lm_loss(logits, ys, reduction="sum")
                    objective = loss_sum / max(scored, 1)
                    aux = self.model.aux_loss()
                    if aux is not None:
                        objective = objective + aux / t.segments
                self.scaler.scale(objective / t.accum_steps).backward()
            state = detach_state(state)
            total += loss_sum.detach()
        if reset == "never":
            self.carry = state
        return total, scored

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``accum_steps`` micro-batches; returns (mean loss, grad norm)."""
        t, dev = self.cfg.train, self.hw.device
        lr = lr_at(self.step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, scored = torch.zeros((), device=dev), 0
        for micro in range(t.accum_steps):
            x, y = self.sampler.next()
            x, y = x[self.rows].to(dev, non_blocking=True), y[self.rows].to(dev, non_blocking=True)
            loss_sum, n = self._backward_window(x, y, last_window=micro == t.accum_steps - 1)
            total += loss_sum
            scored += n
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if t.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return all_reduce_mean(total / max(scored, 1), self.dist), norm

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data.validation(self.cfg.eval.batches), self.cfg.train.segments,
                        self.hw.device, self.hw.autocast(), accuracy=self.data.task == "mqar")

    def train(self, until_step: int | None = None) -> dict[str, float]:
        """Train to ``train.steps`` (or stop early at ``until_step``, saving a checkpoint there)."""
        t, e = self.cfg.train, self.cfg.eval
        end = t.steps if until_step is None else min(until_step, t.steps)
        main = self.dist.is_main  # only rank 0 writes files and shows progress
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.cfg))
        metrics = MetricsWriter(self.run_dir) if main else None
        tokens_per_step = t.batch_size * t.seq_len * t.accum_steps
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and main), unit="step",
                   dynamic_ncols=True)
        last: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        try:
            while self.step < end:
                loss, norm = self.train_step()
                self._check_finite("training loss", loss.item())
                self._check_finite("gradient norm", norm.item())
                window_steps += 1
                if self.step % t.log_every == 0 or self.step == end:
                    elapsed = time.perf_counter() - window_start
                    loss_value = loss.item()
                    last = {"loss": loss_value, "bpb": bits_per_byte(loss_value), "grad_norm": norm.item(),
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9)}
                    if metrics:
                        metrics.write(self.step, last)
                    bar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{last['bpb']:.3f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                    window_steps = 0
                    window_start = time.perf_counter()
                if (e.every and self.step % e.every == 0) or self.step == t.steps:
                    val = self.evaluate()
                    self._check_finite("validation loss", val["val_loss"])
                    self.best_val = min(self.best_val, val["val_loss"])
                    last.update(val)
                    if metrics:
                        metrics.write(self.step, val)
                        bar.write(f"step {self.step}: val_loss {val['val_loss']:.4f}, val_bpb {val['val_bpb']:.4f}")
                    window_start = time.perf_counter()  # do not charge evaluation to tokens/s
                if self.step % t.save_every == 0 or self.step == end:
                    self.save()
                    window_start = time.perf_counter()
                bar.update(1)
        finally:
            bar.close()
            if metrics:
                metrics.close()
        return last
