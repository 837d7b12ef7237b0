"""The training loop: batches, optimizer steps, evaluation, metrics and checkpoints.

``Trainer(cfg).train()`` trains from scratch; ``Trainer.resume(run_dir).train()`` continues
from the latest checkpoint with the saved config. On CPU the losses after a resume equal those
of an uninterrupted run bit for bit, and so do the logged metric keys: every object that carries
state across steps saves itself (``state_dict()`` / ``load_state_dict()``) and :meth:`Trainer.save`
hands them to the checkpoint by name (see :meth:`Trainer.stateful`): the weights, the coordinator
(optimizers, guard, gradient monitor), the trainer's progress, the data sampler, the carried
model state and the RNG. Learning rates are functions of the step, and the precision that
``train.precision = "auto"`` measured is recorded and reused.

SIGINT (Ctrl-C) and SIGTERM stop training between steps: the current step finishes, a
checkpoint is written, and :class:`TrainingInterrupted` says how to resume. A second signal
gets the previous behaviour at once (Ctrl-C: KeyboardInterrupt; SIGTERM: exit); checkpoints
are written atomically, so that cannot corrupt one.

A step that runs out of memory (``torch.OutOfMemoryError``, ``MemoryError``, or the CPU
allocator's ``RuntimeError`` "can't allocate memory", which is what torch raises on the host) in its
forward or backward passes is run again with half the micro-batch and twice the accumulation: the
same windows, the same rows, the same global batch, split into pieces (see :meth:`Trainer.train_step`).

Two levels of optimisation: the inner loop (memory fast weights) runs inside the model's forward;
the outer loop is backprop through the :class:`~neatlm.grad.coordinator.GradientCoordinator`,
which owns every component's optimizer, schedule, clipping and NaN guard.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.distributed as tdist
from tqdm import tqdm

from ..autotune import Tuning, cache_key, cached_or_tuned
from ..config import Config, ConfigError, apply_overrides, from_dict, to_toml, validate
from ..data.source import build_data
from ..errors import CheckpointError, NeatError, TrainingDiverged
from ..grad.checkpointing import apply_checkpointing, choose_checkpointing, component_units
from ..grad.components import ComponentSpec, default_components, parse_components, train_defaults
from ..grad.coordinator import GradientCoordinator
from ..hardware import ProbeShape, detect
from ..hw_profile import device_memory
from ..nn.loss import IGNORE_INDEX, lm_loss, scored_count
from ..nn.memory import TTLControl
from ..nn.build import build_model
from ..nn.model import swiglu_hidden
from . import checkpoint as ckpt
from .blt_setup import read_entropy_run, start_blt
from .distributed import all_reduce_mean, barrier, init_distributed
from .evaluate import evaluate
from .metrics import MetricsWriter, bits_per_byte, truncate_after
from .objective import StepObjective
from .state_io import CarriedState, RNGState, cat_rows, detach_state, flatten_state, split_rows

log = logging.getLogger("neatlm.train")


class TrainingInterrupted(NeatError):
    """Training stopped on a signal after writing a checkpoint. ``exit_code`` is 128 + the signal
    number (130 for SIGINT, 143 for SIGTERM), what a shell reports for a process the signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class RunDirectoryInUse(NeatError):
    """A new run was pointed at a directory that already holds a run."""


@dataclass
class TrainProgress:
    """The trainer's own counters: completed steps, best validation loss, training time so far, and
    the micro-batch a memory budget or an out-of-memory fallback chose: at most this many of a
    process's rows of a drawn batch per forward (0 = all of them). It is progress, not config, so
    that a resumed run does not run out of memory again at its first step."""

    step: int = 0
    best_val: float = math.inf
    elapsed_s: float = 0.0
    micro_batch: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_val": self.best_val, "elapsed_s": self.elapsed_s,
                "micro_batch": self.micro_batch}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        step, best, elapsed = sd["step"], sd["best_val"], sd.get("elapsed_s", 0.0)
        micro = sd.get("micro_batch", 0)   # checkpoints written before the fallback existed have none
        for name, value in (("step", step), ("micro_batch", micro)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} {value!r} is not a count")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (best, elapsed)):
            raise ValueError("best_val and elapsed_s must be numbers")
        self.step, self.best_val, self.elapsed_s, self.micro_batch = step, float(best), float(elapsed), micro


class _StopRequests:
    """SIGINT/SIGTERM set ``signum`` (the loop checks it between steps); a second signal restores
    the handlers that were there before and is delivered to them. A signal the process ignores
    (e.g. SIGINT of a background job) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return
        for s in self.SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            os.write(2, f"neat: {signal.Signals(signum).name}: stopping after this step to write a checkpoint "
                        "(again to quit at once)\n".encode())
            return
        self.uninstall()
        signal.raise_signal(signum)

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def check_run_files(run_dir: Path) -> None:
    """The files a run writes must be writable files, checked before any work starts."""
    for name in ("config.toml", "metrics.jsonl"):
        if (run_dir / name).is_dir():
            raise NeatError(f"{run_dir / name}: is a directory; the run writes its {name} file there")


def refuse_existing_run(run_dir: Path) -> None:
    """A new run must not mix its metrics and checkpoints into an earlier run's."""
    if ckpt.list_checkpoints(run_dir):
        raise RunDirectoryInUse(f"{run_dir} already holds a run: continue it with `neat train --resume {run_dir}` "
                                "or choose another --run-dir")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        raise RunDirectoryInUse(f"{run_dir} already holds the metrics of a run that wrote no checkpoint: choose "
                                f"another --run-dir, or delete {run_dir} to start over")


def probe_shape(cfg: Config) -> ProbeShape:
    """The shapes of one micro-batch step of this model, which ``train.precision = "auto"`` times."""
    m, t = cfg.model, cfg.train
    return ProbeShape(batch=t.batch_size, seq=t.seq_len, dim=m.dim, heads=m.n_heads,
                      hidden=swiglu_hidden(m.dim, m.mlp_hidden), vocab=m.vocab_size)



def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports memory exhaustion: a device's ``torch.OutOfMemoryError``, Python's
    ``MemoryError``, or the ``RuntimeError`` torch's CPU allocator raises when it cannot allocate
    (torch has no dedicated type for that one)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)

class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, _resume_from: ckpt.Checkpoint | None = None):
        self.cfg = cfg
        t = cfg.train
        self.run_dir = Path(run_dir or t.run_dir)
        check_run_files(self.run_dir)
        if _resume_from is None:
            refuse_existing_run(self.run_dir)
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        # a resumed run keeps the device type and precision it resolved (and measured) before
        recorded = _resume_from.hardware if _resume_from is not None else None
        self.hw = detect(t.device, t.precision, recorded=recorded, probe=probe_shape(cfg))
        self.dist = init_distributed(self.hw.device.type)
        if self.dist.enabled and self.hw.device.type == "cuda":
            self.hw.device = torch.device("cuda", self.dist.local_rank)
        if self.dist.enabled and self.hw.timings:  # measured on every rank: all follow rank 0
            choice = [self.hw.precision]
            tdist.broadcast_object_list(choice, src=0)
            self.hw.precision = choice[0]
        self.rows = self.dist.rows(t.batch_size)
        self.row_count = self.rows.stop - self.rows.start   # this process's rows of a drawn batch
        self.data = build_data(cfg)
        self.loss_fn = self.data.loss   # the task's loss, chosen once (MVoT: modality mask + discrepancy)
        torch.manual_seed(t.seed)
        # a new BLT run reads its entropy model's shape and weights (a resumed one has them)
        new_blt = cfg.blt.enabled and _resume_from is None
        entropy = read_entropy_run(cfg) if new_blt and cfg.blt.patcher != "stride" else None
        self.model = build_model(cfg).to(self.hw.device)
        if new_blt:
            start_blt(cfg, self.model, entropy, self.data.corpus.train)
        if t.init_from and _resume_from is None:   # a resumed run has its own weights
            self._init_weights_from(t.init_from)
        self.sampler = self.data.sampler
        specs = component_specs(cfg)
        try:
            self.checkpointing, budget_micro_batch = self._apply_checkpointing(specs)
        except ValueError as exc:  # e.g. orphan parameters when units = "components"
            raise ConfigError(str(exc)) from None
        self.coord = GradientCoordinator(self.model, specs, total_steps=t.steps, guard=cfg.guard,
                                         monitor_every=t.log_every)
        self.progress = TrainProgress(micro_batch=budget_micro_batch)
        self.carried = CarriedState(self.hw.device)  # model state kept across steps when memory.reset = "never"
        if _resume_from is not None:
            self._restore(_resume_from)   # the progress may hold a fallback's micro-batch
        self.tuning = self._autotune(_resume_from.hardware if _resume_from is not None else None)
        # one backward per segment of every piece of every micro-batch, weighted by the step
        # objective (the coordinator adds gradients as given); under torchrun the coordinator
        # averages the gradients over processes once per step, in step()
        self.objective = self._step_objective()

    def _autotune(self, recorded: dict | None) -> Tuning | None:
        """With ``train.autotune``: the thread count and attention backend this run measured when it
        started (on resume), else the cached or newly measured choice for this machine and model
        (:mod:`neatlm.autotune`); applied now. None without it."""
        if not self.cfg.train.autotune:
            return None
        tuning = None
        if recorded and recorded.get("autotune"):
            try:
                tuning = Tuning.from_dict(recorded["autotune"])
            except (ValueError, KeyError, TypeError):
                tuning = None
        if tuning is None:
            x, y = copy.deepcopy(self.sampler).next()        # a real batch; the sampler does not move
            x, y = x[:self.micro_batch].to(self.hw.device), y[:self.micro_batch].to(self.hw.device)

            def step() -> None:
                with self.hw.autocast():
                    out = self.model(x, None, TTLControl(), carry=False)
                    loss = self.loss_fn(out.logits, y, x)       # the task's loss, as training runs it
                    if out.aux_loss is not None:
                        loss = loss + out.aux_loss
                loss.backward()
                self.model.zero_grad(set_to_none=True)

            sections = {k: v for k, v in self.cfg.to_dict().items()
                        if k in ("model", "memory", "bk", "moe", "blt", "checkpointing")}
            key = cache_key({**sections, "precision": self.hw.precision}, tuple(x.shape), self.cfg.train.threads == 0)
            tuning, cached = cached_or_tuned(step, self.hw.device, self.cfg.train.threads == 0, key)
            log.info("autotune: %s%s", tuning.describe(), " (cached)" if cached else "")
        tuning.apply()
        return tuning

    def kernels(self) -> ContextManager:
        """The context every forward runs in: the tuned attention backend, or nothing."""
        return self.tuning.kernels() if self.tuning is not None else nullcontext()

    def _init_weights_from(self, path: str) -> None:
        """Start from another run's model weights (fine-tuning), verified and shape-checked."""
        try:
            found = ckpt.read_checkpoint(path)
            ckpt.check_weights(self.model.state_dict(), found.states["model"], found.file_of("model"),
                               "the model this run's config builds")
        except CheckpointError as exc:
            raise CheckpointError(f"train.init_from = {path!r}: {exc}") from None
        self.model.load_state_dict(found.states["model"])

    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    @property
    def best_val(self) -> float:
        return self.progress.best_val

    @property
    def carry(self) -> Any:
        return self.carried.value

    @property
    def micro_batch(self) -> int:
        """Rows of this process's share of a drawn batch that one forward and backward take:
        all of them, unless an out-of-memory fallback lowered it."""
        cap = self.progress.micro_batch
        return min(cap, self.row_count) if cap else self.row_count

    def _pieces(self) -> list[slice]:
        """The rows of each forward of one drawn micro-batch (one piece, unless after a fallback)."""
        n, m = self.row_count, self.micro_batch
        return [slice(i, min(i + m, n)) for i in range(0, n, m)]

    def _step_objective(self) -> StepObjective:
        return StepObjective(self.cfg.train.accum_steps, self.cfg.train.segments, splits=len(self._pieces()))

    # ------------------------------------------------------------------ checkpoints

    def stateful(self) -> dict[str, ckpt.Stateful]:
        """Everything a checkpoint holds, by name; each object saves and restores itself."""
        return {
            "model": self.model,
            "optimizer": self.coord,
            "progress": self.progress,
            "sampler": self.sampler,
            "carry": self.carried,
            "rng": RNGState(),
        }

    @classmethod
    def resume(cls, path: str | Path, overrides: list[str] | None = None) -> "Trainer":
        """Continue the run in ``path`` (a run dir or one of its checkpoint dirs) with its saved config."""
        found = ckpt.read_checkpoint(path)  # verify everything before building anything
        cfg = from_dict(found.config, check_size=not overrides)   # with overrides: checked once they apply
        if overrides:
            apply_overrides(cfg, overrides)
            validate(cfg)
        return cls(cfg, run_dir=found.path.parent.parent, _resume_from=found)

    def _restore(self, found: ckpt.Checkpoint) -> None:
        found.restore(self.stateful())
        self._check_carried_fits(found.path / ckpt.EXTRA_FILE)
        if self.dist.is_main:
            truncate_after(self.run_dir, self.step)

    def _check_carried_fits(self, file: Path) -> None:
        """A carried state of another model (sizes, layers) would fail deep in the first forward:
        run one read-only token through the model with it now, and name the file if it does not fit."""
        state = self.carried.value
        if state is None:
            return
        batch = next(iter(flatten_state(state)[1].values())).shape[0]
        probe = torch.zeros(batch, 1, dtype=torch.long, device=self.hw.device)
        try:
            with torch.no_grad():
                self.model(probe, state, TTLControl(learn=False))
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{file}: the carried model state does not fit this model ({first[:200]})") from None

    def _check_finite(self, what: str, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged at step {self.step}: the {what} is {value}; the last good "
                                   f"checkpoint is in {ckpt.checkpoint_root(self.run_dir)} "
                                   "(try a lower train.lr or train.grad_clip)")

    def save(self) -> Path | None:
        """Checkpoint now (rank 0 writes, the others wait); never writes non-finite weights or
        carried state."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            self._check_finite("model weights", math.nan)
        if not all(bool(torch.isfinite(t).all()) for t in flatten_state(self.carried.value)[1].values()):
            self._check_finite("carried model state", math.nan)
        if not self.dist.is_main:
            barrier(self.dist)
            return None
        meta = {"config": self.cfg.to_dict(),
                "hardware": {"device": self.hw.device.type, "precision": self.hw.precision,
                             **({"autotune": self.tuning.to_dict()} if self.tuning is not None else {})}}
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.stateful(), keep_last=self.cfg.train.keep_last,
                                    meta=meta)
        barrier(self.dist)
        return path

    # ------------------------------------------------------------------ loop

    def _backward_window(self, x: torch.Tensor, y: torch.Tensor, ttl: TTLControl, state: Any,
                         scored: int) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        """Forward and backward the rows ``x``, ``y`` of one micro-batch window (all of them, or
        one piece after an out-of-memory fallback) as consecutive segments.

        ``state``: the model state the rows start from (None: new sequences); ``scored``: the
        scored tokens of the whole window, which its loss is divided by (:class:`StepObjective`).
        Memory state is carried between segments and detached (truncated backprop), so the graph
        never spans more than one segment. Returns (summed loss, the state at the end, the
        model's statistics from the last segment).
        """
        segments, reset = self.objective.segments, self.cfg.memory.reset
        carry = segments > 1 or reset == "never"   # whether a later forward continues from the state
        total = torch.zeros((), device=x.device)
        stats: dict[str, torch.Tensor] = {}
        for xs, ys in zip(x.chunk(segments, dim=1), y.chunk(segments, dim=1)):
            if reset == "batch":
                state = None
            mask = ys != IGNORE_INDEX if self.cfg.train.logits == "scored" else None
            with self.hw.autocast(), self.kernels():
                out = self.model(xs, state, ttl, scored=mask, carry=carry)
                sel = (lambda v: v) if mask is None else (lambda v: v[mask])  # noqa: E731
                loss_sum = self.loss_fn(out.logits, sel(ys), sel(xs))
                objective = self.objective.term(loss_sum, scored, out.aux_loss)
            self.coord.backward(objective)
            state = detach_state(out.state)
            stats = out.stats or stats
            total += loss_sum.detach()
        return total, state, stats

    def _run_window(self, x: torch.Tensor, y: torch.Tensor,
                    ttl: TTLControl) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """Forward and backward this process's rows of one drawn micro-batch (on the host), in
        pieces of at most :attr:`micro_batch` rows. With ``memory.reset = "never"`` each row
        continues its own carried state: the state is cut into the pieces' rows and joined again,
        so the pieces compute what the whole micro-batch would. Returns (summed loss, scored
        tokens, the model's statistics from the last segment)."""
        dev, never = self.hw.device, self.cfg.memory.reset == "never"
        scored, pieces = scored_count(y), self._pieces()
        carried = self.carried.value if never else None
        if carried is not None and len(pieces) > 1:
            starts = split_rows(carried, pieces, self.row_count)
        else:
            starts = [carried] * len(pieces)
        total: torch.Tensor | None = None
        ends: list[Any] = []
        stats: dict[str, torch.Tensor] = {}
        for rows, start in zip(pieces, starts):
            xs, ys = x[rows].to(dev, non_blocking=True), y[rows].to(dev, non_blocking=True)
            loss_sum, end, piece_stats = self._backward_window(xs, ys, ttl, start, scored)
            total = loss_sum if total is None else total + loss_sum
            ends.append(end)
            stats = piece_stats or stats
        if never:
            self.carried.value = ends[0] if len(ends) == 1 else cat_rows(ends)
        assert total is not None   # there is at least one piece
        return total, scored, stats

    def is_log_step(self) -> bool:
        """Whether the next step is logged (costlier monitors, a metrics record): the monitor's
        schedule (steps 1, 1 + log_every, ... and the last), the one place this is decided. A step
        the guard rejects is recorded as well, logged or not."""
        return self.coord.monitor.is_log_step(self.step)

    def train_step(self, log: bool | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimizer step over ``accum_steps`` micro-batches.

        Returns (mean loss, coordinator stats: per-component norms, learning rates, skips and,
        on logged steps, update ratios and gradient cosines; ``train/micro_batch``). ``log``
        overrides the schedule.

        Out of memory in a forward or backward pass, the step is run again from its start (its
        gradients dropped, the carried model state and the RNG put back) on the windows it drew,
        each cut into pieces of half the micro-batch (:meth:`_fall_back`): the same rows, the
        same global batch, so the same loss and, up to float summation order, the same gradients.
        Only the forward and backward passes are retried: the optimizer's memory does not shrink
        with the micro-batch. Under torchrun the processes agree (:meth:`_out_of_memory_anywhere`):
        all of them fall back together, or all stop with the same error.
        """
        log = self.is_log_step() if log is None else log
        # TTL warmup: the memories read their initial weights and learn nothing (evaluation always learns)
        ttl = TTLControl(learn=self.step >= self.cfg.ttl.warmup_steps, collect_stats=log)
        # the step's data is drawn first (on the host), so that a retry reruns the same windows
        if self.sampler.starts_fresh(self.sampler.position):
            self.carried.value = None   # new documents in every row: each starts from the initial state
        windows = [self.sampler.next() for _ in range(self.cfg.train.accum_steps)]
        carried_before, rng_before = self.carried.value, RNGState().state_dict()
        while True:
            done = self._accumulate(windows, ttl)
            if not self._out_of_memory_anywhere(done is None):
                break
            self._fall_back(carried_before, rng_before)
        assert done is not None
        total, scored, model_stats = done
        stats = self.coord.step(log=log)
        self.coord.zero_grad()
        if _guard_rejected(stats):
            # the state carried out of a rejected step was computed by it (possibly non-finite):
            # the next step continues from the state before it, as the weights do
            self.carried.value = carried_before
        stats.update({k: v.item() for k, v in model_stats.items()})  # from the last segment's forward
        stats["train/micro_batch"] = float(self.micro_batch)
        self.step += 1
        return all_reduce_mean(self.objective.mean_loss(total, scored), self.dist), stats

    def _accumulate(self, windows: list[tuple[torch.Tensor, torch.Tensor]],
                    ttl: TTLControl) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]] | None:
        """Forward and backward every window of the step: (summed loss, scored tokens, the
        model's statistics), or None if this process ran out of memory (what it accumulated is
        left for :meth:`_fall_back` to drop)."""
        total, scored = torch.zeros((), device=self.hw.device), 0
        model_stats: dict[str, torch.Tensor] = {}
        try:
            for x, y in windows:
                loss_sum, n, window_stats = self._run_window(x[self.rows], y[self.rows], ttl)
                total += loss_sum
                scored += n
                model_stats = window_stats or model_stats
        except (RuntimeError, MemoryError) as exc:   # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
            # returning from the handler drops the traceback, and with it the failed graph's
            # tensors, before anything is run again
            return None
        return total, scored, model_stats

    def _out_of_memory_anywhere(self, here: bool) -> bool:
        """Whether this process, or under torchrun any process, ran out of memory in this step.

        The forward and backward passes hold no collective, so a process could retry alone; but
        then the processes would run different micro-batches (rank 0's alone is logged and saved),
        and one that cannot go below a row would stop while the others wait in the gradient
        all-reduce. Agreeing costs one scalar all-reduce a step, only under torchrun."""
        if not self.dist.enabled:
            return here
        flag = torch.tensor(float(here), device=self.hw.device)
        return bool(all_reduce_mean(flag, self.dist) > 0)

    def _fall_back(self, carried_before: Any, rng_before: dict[str, Any]) -> None:
        """After running out of memory: drop the step's gradients, put back the carried model state
        and the RNG of the step's start, and halve the micro-batch for the rest of the run (kept
        in the progress, so a resume keeps it too). A micro-batch of one row cannot be halved:
        then the model does not fit, which is the user's to change."""
        self.coord.zero_grad()
        self.carried.value = carried_before
        RNGState().load_state_dict(rng_before)
        t, step, old = self.cfg.train, self.step + 1, self.micro_batch
        if old == 1:
            raise NeatError(f"step {step}: out of memory with a micro-batch of one sequence of train.seq_len = "
                            f"{t.seq_len} bytes: the model does not fit on {self.hw.device.type}; lower "
                            "train.seq_len or the model's size (model.dim, model.n_layers), or set "
                            "checkpointing.memory_budget_mb to recompute activations in backward")
        before = self.objective.micro_batches * self.objective.splits
        self.progress.micro_batch = (old + 1) // 2
        self.objective = self._step_objective()
        after = self.objective.micro_batches * self.objective.splits
        log.warning("neat: step %d ran out of memory at micro-batch %d x %d accumulation; running it again at "
                    "micro-batch %d x %d (the same global batch and data), kept for the rest of the run",
                    step, old, before, self.micro_batch, after)

    def _apply_checkpointing(self, specs: list[ComponentSpec]) -> tuple[str, int]:
        """Apply ``[checkpointing]`` to the model. Returns a one-line report for ``neat train`` and
        the micro-batch a memory budget calls for (0: the whole batch).

        Under ``checkpointing.memory_budget_mb`` the planner first looks for policies that fit at
        the whole batch; when even everything fully checkpointed does not fit, the micro-batch is
        halved (the global batch kept by splitting each drawn batch, as after an out-of-memory
        fallback) and the policies are chosen again, down to one row."""
        c, t = self.cfg.checkpointing, self.cfg.train
        units = component_units(self.model, specs) if c.units == "components" else None
        budget_mb, source = c.memory_budget_mb, ""
        if c.memory_budget_free > 0:
            free = device_memory(self.hw.device)[1]
            if free is None:
                raise NeatError(f"checkpointing.memory_budget_free = {c.memory_budget_free:g}: the free memory of "
                                f"{self.hw.device} cannot be read here; set checkpointing.memory_budget_mb instead")
            budget_mb = c.memory_budget_free * free / 2**20
            source = f" ({c.memory_budget_free:g} of {free / 2**30:.1f} GiB free)"
        if budget_mb > 0:
            # the probe needs only the shape of a training segment: a validation batch cut to it,
            # so the training stream is never read
            x, y = next(self.data.validation(1))
            x, y = x[self.rows, :t.seq_len].to(self.hw.device), y[self.rows, :t.seq_len].to(self.hw.device)
            budget, rows, why = int(budget_mb * 2**20), x.shape[0], ""
            while True:
                def probe(model: torch.nn.Module, n: int = rows) -> torch.Tensor:
                    with self.hw.autocast():
                        return lm_loss(model(x[:n])[0], y[:n])

                plan = choose_checkpointing(self.model, probe, budget, units=units)
                if plan.fits or rows == 1:
                    break
                why = (f"; micro-batch {(rows + 1) // 2} of {x.shape[0]} rows: everything fully checkpointed "
                       f"at {rows} rows saved {plan.measured_bytes / 2**20:.1f} MiB")
                rows = (rows + 1) // 2
            plan.apply(self.model)
            return plan.summary() + source + why, (rows if rows < x.shape[0] else 0)
        if c.policy == "none":
            return "checkpointing: none", 0
        applied = apply_checkpointing(self.model, c.policy, module_filter=list(units) if units else None)
        return f"checkpointing: {c.policy} on {len(applied)} {c.units}", 0

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data.validation(self.cfg.eval.batches), self.cfg.train.segments,
                        self.hw.device, self.hw.autocast(), accuracy=self.data.scores_accuracy, mask=self.data.mask)

    def _stop_requested(self, stop: _StopRequests) -> bool:
        """Whether a signal asked to stop; under torchrun, whether any process got one (all stop together)."""
        flag = stop.signum is not None
        if self.dist.enabled:
            flag = bool(all_reduce_mean(torch.tensor(float(flag), device=self.hw.device), self.dist) > 0)
        return flag

    def train(self, until_step: int | None = None) -> dict[str, float]:
        """Train to ``train.steps`` (or stop early at ``until_step``, saving a checkpoint there).

        Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM, once a checkpoint is written.
        """
        t, e = self.cfg.train, self.cfg.eval
        end = t.steps if until_step is None else min(until_step, t.steps)
        main = self.dist.is_main  # only rank 0 writes files and shows progress
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.cfg), encoding="utf-8")
        metrics = MetricsWriter(self.run_dir) if main else None
        tokens_per_step = t.batch_size * t.seq_len * t.segments * t.accum_steps  # a window is segments * seq_len
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and main), unit="step",
                   dynamic_ncols=True)
        last: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        started = window_start - self.progress.elapsed_s  # training time carries over a resume
        stop = _StopRequests()
        try:
            stop.install()
            while self.step < end:
                log = self.is_log_step()
                loss, stats = self.train_step(log=log)
                window_steps += 1
                if log or _guard_rejected(stats):
                    elapsed = time.perf_counter() - window_start
                    loss_value = loss.item()
                    last = {"loss": loss_value, "bpb": bits_per_byte(loss_value),
                            "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
                            "elapsed_s": time.perf_counter() - started, **stats}
                    if metrics:
                        metrics.write(self.step, last)
                    bar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{last['bpb']:.3f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                    window_steps = 0
                    window_start = time.perf_counter()
                if self.data.has_validation and ((e.every and self.step % e.every == 0) or self.step == t.steps):
                    val = {**self.evaluate(), "elapsed_s": time.perf_counter() - started}
                    self._check_finite("validation loss", val["val_loss"])
                    self.progress.best_val = min(self.best_val, val["val_loss"])
                    last.update(val)
                    if metrics:
                        metrics.write(self.step, val)
                        accuracy = f", val_acc {val['val_acc']:.4f}" if "val_acc" in val else ""
                        bar.write(f"step {self.step}: val_loss {val['val_loss']:.4f}, "
                                  f"val_bpb {val['val_bpb']:.4f}{accuracy}")
                    window_start = time.perf_counter()  # do not charge evaluation to tokens/s
                stopping = self._stop_requested(stop) and self.step < end  # at the end: just finish
                if self.step % t.save_every == 0 or self.step == end or stopping:
                    self.progress.elapsed_s = time.perf_counter() - started
                    path = self.save()
                    window_start = time.perf_counter()
                bar.update(1)
                if stopping:
                    name = signal.Signals(stop.signum or signal.SIGTERM).name
                    where = f"checkpoint {path} written" if path else "checkpoint written"
                    raise TrainingInterrupted(f"training stopped by {name} after step {self.step}; {where}; "
                                              f"continue with `neat train --resume {self.run_dir}`",
                                              stop.signum or signal.SIGTERM)
        finally:
            stop.uninstall()
            bar.close()
            if metrics:
                metrics.close()
        return last


def _guard_rejected(stats: dict[str, float]) -> bool:
    """Whether the guard rejected the step of some component (``grad/<c>/rejected`` in its stats)."""
    return any(k.endswith("/rejected") for k in stats)


def component_specs(cfg: Config) -> list[ComponentSpec]:
    """``[components.*]`` tables, with unset keys from ``[train]``; none = one component "all"."""
    defaults = train_defaults(cfg.train)
    if not cfg.components:
        return default_components(**defaults)
    return parse_components(cfg.components, defaults=defaults)  # raises ConfigError naming the key
