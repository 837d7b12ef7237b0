"""Out-of-memory fallback: a step that runs out of memory is run again with half the micro-batch.

The out-of-memory error is injected (a forward pre-hook on the model raises it while a forward
has more rows than a limit), so these tests run on CPU. The reference for "the same training" is
the same config with the smaller micro-batch from the first step: the sampler draws the same
batches (a config with half of train.batch_size would draw other rows), so every step's loss
must agree with it up to float summation order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import small_config, write_corpus
from spawn_ranks import run_ranks
from neatlm.config import Config, from_dict, validate
from neatlm.errors import NeatError
from neatlm.train import checkpoint as ckpt
from neatlm.train.metrics import read_metrics
from neatlm.train.state_io import cat_rows, flatten_state, split_rows
from neatlm.train.trainer import TrainProgress, Trainer

TOL = 1e-6


def inject_oom(trainer: Trainer, step: int, above: int, exc: type[BaseException] = torch.OutOfMemoryError,
               after_calls: int = 0) -> dict[str, int]:
    """From the ``after_calls``-th forward of ``step`` (1-based) on, a forward of more than
    ``above`` rows raises ``exc``: a device that cannot hold more than ``above`` rows. Returns
    the counts of forwards and failures."""
    seen = {"step": -1, "calls": 0, "raised": 0}

    def hook(module, args):
        if trainer.step != seen["step"]:
            seen["step"], seen["calls"] = trainer.step, 0
        seen["calls"] += 1
        if trainer.step + 1 == step and seen["calls"] > after_calls and args[0].shape[0] > above:
            seen["raised"] += 1
            raise exc("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    trainer.model.register_forward_pre_hook(hook)
    return seen


def config(corpus: Path, run_dir: Path, case: str, **train) -> Config:
    """b = 4 rows, 2 micro-batches of 2 segments; ``case`` picks how model state is carried."""
    if case == "stream":
        train.setdefault("accum_steps", 1)
    cfg = small_config(corpus, run_dir, **{"steps": 6, "seq_len": 16, "segments": 2, "accum_steps": 2,
                                           "save_every": 3, **train})
    if case in ("never", "stream"):   # memory state carried across steps, one per row
        cfg.model.window, cfg.memory.reset = 8, "never"
        cfg.memory.enabled, cfg.memory.chunk_size = True, 4
    if case == "stream":
        cfg.data.sampling = "stream"
    validate(cfg)
    return cfg


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def close(a: dict[int, float], b: dict[int, float], tol: float = TOL) -> bool:
    return list(a) == list(b) and all(abs(a[k] - b[k]) <= tol for k in a)


def reference(corpus: Path, run_dir: Path, case: str, micro_batch: int, **train) -> Trainer:
    """The same run with at most ``micro_batch`` rows per forward from its first step."""
    trainer = Trainer(config(corpus, run_dir, case, **train))
    trainer.progress.micro_batch = micro_batch
    trainer.objective = trainer._step_objective()
    trainer.train()
    return trainer


@pytest.mark.parametrize("case", ["sequence", "never", "stream"])
def test_after_a_fallback_the_run_trains_as_one_with_the_smaller_micro_batch(corpus_dir, tmp_path, case, caplog,
                                                                              one_thread):
    trainer = Trainer(config(corpus_dir, tmp_path / "oom", case))
    # the failure comes after the first window's backward (and carried state) of step 3
    seen = inject_oom(trainer, step=3, above=2, after_calls=2 if case != "stream" else 1)
    with caplog.at_level(logging.WARNING, logger="neatlm.train"):
        trainer.train()
    assert seen["raised"] == 1 and trainer.step == 6 and trainer.micro_batch == 2
    assert trainer.objective.micro_batches * trainer.objective.splits == 2 * trainer.cfg.train.accum_steps
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    accum = trainer.cfg.train.accum_steps
    assert len(warnings) == 1 and "step 3 ran out of memory" in warnings[0]
    assert f"micro-batch 4 x {accum} accumulation" in warnings[0] and f"micro-batch 2 x {2 * accum}" in warnings[0]
    records = [r for r in read_metrics(tmp_path / "oom") if "loss" in r]
    assert [r["train/micro_batch"] for r in records] == [4, 4, 2, 2, 2, 2]

    smaller = reference(corpus_dir, tmp_path / "ref", case, micro_batch=2)
    assert close(losses(tmp_path / "oom"), losses(tmp_path / "ref"))
    whole = Trainer(config(corpus_dir, tmp_path / "whole", case))
    whole.train()   # no fallback at all: the split changes float summation order only
    assert close(losses(tmp_path / "oom"), losses(tmp_path / "whole"))
    for (name, p), q in zip(trainer.model.named_parameters(), smaller.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    if case != "sequence":   # the carried state: every row continued its own
        # (statistics of the last call, scalars, are no part of what continues a row)
        a, b = ({k: v for k, v in flatten_state(t.carry)[1].items() if ".stats." not in k} for t in (trainer, smaller))
        assert a.keys() == b.keys() and all(a[k].shape[0] == 4 for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_retry_reads_the_same_batches(corpus_dir, tmp_path):
    """The sampler is not advanced by the retry: a run with a fallback ends where a plain run ends."""
    trainer = Trainer(config(corpus_dir, tmp_path / "oom", "sequence", steps=3))
    inject_oom(trainer, step=2, above=2)
    drawn = []
    next_batch = trainer.sampler.next

    def recording():
        batch = next_batch()
        drawn.append(batch[0])
        return batch

    trainer.sampler.next = recording
    trainer.train()
    assert trainer.sampler.position == 3 * trainer.cfg.train.accum_steps == len(drawn)


def test_the_fallback_survives_a_resume(corpus_dir, tmp_path, one_thread):
    trainer = Trainer(config(corpus_dir, tmp_path / "oom", "never"))
    inject_oom(trainer, step=2, above=2)
    trainer.train(until_step=3)       # stops with a checkpoint at step 3, micro-batch 2 since step 2
    assert trainer.micro_batch == 2
    state = json.loads((ckpt.list_checkpoints(tmp_path / "oom")[-1] / "state.json").read_text())
    assert state["states"]["progress"]["micro_batch"] == 2
    del trainer
    resumed = Trainer.resume(tmp_path / "oom")
    assert resumed.step == 3 and resumed.micro_batch == 2 and resumed.objective.splits == 2
    inject_oom(resumed, step=4, above=2)   # a resume that went back to 4 rows would fail here
    resumed.train()
    assert resumed.micro_batch == 2
    reference(corpus_dir, tmp_path / "ref", "never", micro_batch=2)
    assert close(losses(tmp_path / "oom"), losses(tmp_path / "ref"))


def test_a_checkpoint_without_the_micro_batch_loads_as_no_fallback(corpus_dir, tmp_path):
    Trainer(config(corpus_dir, tmp_path / "old", "sequence", steps=1, accum_steps=1, segments=1)).train()
    path = ckpt.list_checkpoints(tmp_path / "old")[-1] / "state.json"
    doc = json.loads(path.read_text())
    del doc["states"]["progress"]["micro_batch"]     # as written before the fallback existed
    path.write_text(json.dumps(doc))
    resumed = Trainer.resume(tmp_path / "old")
    assert resumed.progress.micro_batch == 0 and resumed.micro_batch == 4
    progress = TrainProgress()
    with pytest.raises(ValueError, match="micro_batch -1 is not a count"):
        progress.load_state_dict({"step": 1, "best_val": 1.0, "micro_batch": -1})


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError, MemoryError])
def test_a_micro_batch_of_one_that_does_not_fit_is_a_clean_error(corpus_dir, tmp_path, exc, caplog):
    trainer = Trainer(config(corpus_dir, tmp_path / "r", "sequence", steps=3))
    seen = inject_oom(trainer, step=2, above=0, exc=exc)
    with caplog.at_level(logging.WARNING, logger="neatlm.train"):
        with pytest.raises(NeatError) as info:
            trainer.train()
    message = str(info.value)
    assert "\n" not in message and message.startswith("step 2: out of memory with a micro-batch of one sequence")
    for knob in ("train.seq_len", "model.dim", "checkpointing.memory_budget_mb"):
        assert knob in message
    assert info.value.__context__ is None   # not chained to the out-of-memory traceback
    assert seen["raised"] == 3          # 4 rows, then 2, then 1
    assert len([r for r in caplog.records if "ran out of memory" in r.getMessage()]) == 2
    assert trainer.step == 1


def test_other_errors_are_not_taken_for_out_of_memory(corpus_dir, tmp_path):
    trainer = Trainer(config(corpus_dir, tmp_path / "r", "sequence", steps=3))
    inject_oom(trainer, step=2, above=2, exc=RuntimeError)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.train()
    assert trainer.micro_batch == 4 and trainer.progress.micro_batch == 0


def test_an_odd_micro_batch_is_cut_into_unequal_pieces(corpus_dir, tmp_path):
    """6 rows: 3 + 3, then 2 + 2 + 2; the loss still weighs every token as in the whole batch."""
    trainer = Trainer(config(corpus_dir, tmp_path / "r", "sequence", steps=3, batch_size=6, accum_steps=1))
    inject_oom(trainer, step=2, above=2)
    trainer.train()
    assert trainer.micro_batch == 2 and trainer._pieces() == [slice(0, 2), slice(2, 4), slice(4, 6)]
    whole = Trainer(config(corpus_dir, tmp_path / "whole", "sequence", steps=3, batch_size=6, accum_steps=1))
    whole.train()
    assert close(losses(tmp_path / "r"), losses(tmp_path / "whole"))


def test_state_rows_split_and_join_back():
    from neatlm.nn.attention import AttentionState

    state = [AttentionState(torch.arange(12.).view(4, 3), torch.zeros(4, 1), 7), None]
    parts = split_rows(state, [slice(0, 1), slice(1, 4)], 4)
    assert parts[1][0].k.shape == (3, 3) and parts[1][0].position == 7 and parts[1][1] is None
    joined = cat_rows(parts)
    assert torch.equal(joined[0].k, state[0].k) and joined[0].position == 7
    with pytest.raises(ValueError, match="cannot split a state tensor of shape"):
        split_rows(state, [slice(0, 2), slice(2, 5)], 5)


# ----------------------------------------------------------------------------- torchrun

def _worker(rank: int, world: int, cfg: dict, out: str) -> None:
    """One of 2 processes: only rank 1 runs out of memory, at step 2; both must fall back."""
    torch.set_num_threads(1)
    trainer = Trainer(from_dict(cfg), run_dir=Path(out))
    if rank == 1:
        inject_oom(trainer, step=2, above=1)
    trainer.train()
    torch.save({"micro_batch": trainer.micro_batch,
                "params": {n: p.detach() for n, p in trainer.model.named_parameters()}},
               Path(out) / f"rank{rank}.pt")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_under_torchrun_every_process_falls_back_together(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = config(corpus, tmp_path / "two", "sequence", steps=3, save_every=100)
    cfg.eval.every = 0
    # a hang here: one process retried alone while the other waits in the gradient all-reduce
    two = run_ranks(_worker, lambda out: (cfg.to_dict(), str(out / "two")), tmp_path / "ranks", seconds=240) / "two"
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["micro_batch"] for r in ranks] == [1, 1]     # 2 rows per process, halved on both
    one = Trainer(cfg, run_dir=tmp_path / "one")
    one.train()
    assert close(losses(two), losses(tmp_path / "one"), tol=1e-5)
    for n, p in one.model.named_parameters():
        assert torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]), n
        torch.testing.assert_close(ranks[0]["params"][n], p, rtol=1e-4, atol=1e-5, msg=n)


def test_the_failed_attempt_is_freed_before_the_retry(corpus_dir, tmp_path):
    """On a GPU the retry only fits if the failed attempt's activations are gone: they are, by
    reference counting alone (no garbage collection), when the first forward of the retry starts."""
    import gc
    import weakref

    trainer = Trainer(config(corpus_dir, tmp_path / "r", "sequence", steps=2, accum_steps=1, segments=1))
    blocks = trainer.model.blocks
    kept: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def remember(module, args, output):
        if trainer.step == 1 and args[0].shape[0] > 2:
            kept.append(weakref.ref(output[0]))

    def fail(module, args):
        if trainer.step == 1 and args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    def at_retry(module, args):
        if trainer.step == 1 and args[0].shape[0] <= 2 and not alive_at_retry:
            alive_at_retry.append(any(r() is not None for r in kept))

    blocks[0].register_forward_hook(remember)
    blocks[1].register_forward_pre_hook(fail)
    trainer.model.register_forward_pre_hook(at_retry)
    gc.disable()
    try:
        trainer.train()
    finally:
        gc.enable()
    assert kept and alive_at_retry == [False] and trainer.micro_batch == 2


def test_the_cpu_allocators_runtime_error_counts_as_out_of_memory():
    from neatlm.train.trainer import is_out_of_memory

    real = None
    try:
        torch.empty(2**62, dtype=torch.uint8)          # far beyond any host: the CPU allocator refuses
    except RuntimeError as exc:
        real = exc
    assert real is not None and is_out_of_memory(real)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("expected scalar type Float but found BFloat16"))


def test_a_memory_budget_that_full_checkpointing_cannot_meet_lowers_the_micro_batch(corpus_dir, tmp_path, one_thread):
    """A budget below what the whole batch needs even fully checkpointed: the planner halves the
    micro-batch until it fits, the run trains as one with that micro-batch, and says why."""
    whole = Trainer(config(corpus_dir, tmp_path / "whole", "sequence"))
    whole.train()
    cfg = config(corpus_dir, tmp_path / "budget", "sequence")
    full_at_4 = Trainer(config(corpus_dir, tmp_path / "probe", "sequence", steps=1))
    cfg.checkpointing.memory_budget_mb = 0.01                     # 10 KiB: far below one batch's activations
    budgeted = Trainer(cfg)
    assert 1 <= budgeted.micro_batch < 4 and budgeted.progress.micro_batch == budgeted.micro_batch
    assert f"micro-batch {budgeted.micro_batch} of 4 rows" in budgeted.checkpointing
    budgeted.train()
    assert close(losses(tmp_path / "budget"), losses(tmp_path / "whole"))
    assert full_at_4.micro_batch == 4                             # no budget: the whole batch


def test_a_budget_the_whole_batch_meets_keeps_it(corpus_dir, tmp_path, one_thread):
    cfg = config(corpus_dir, tmp_path / "roomy", "sequence")
    cfg.checkpointing.memory_budget_mb = 1024.0
    trainer = Trainer(cfg)
    assert trainer.micro_batch == 4 and trainer.progress.micro_batch == 0 and "micro-batch" not in trainer.checkpointing


def test_a_budget_from_free_memory_plans_like_the_same_size_in_mib(corpus_dir, tmp_path, one_thread, monkeypatch):
    import neatlm.train.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "device_memory", lambda device: (2**30, 2**20))   # 1 MiB free
    cfg = config(corpus_dir, tmp_path / "free", "sequence")
    cfg.checkpointing.memory_budget_free = 0.5
    by_fraction = Trainer(cfg)
    same = config(corpus_dir, tmp_path / "mib", "sequence")
    same.checkpointing.memory_budget_mb = 0.5
    by_size = Trainer(same)
    assert by_fraction.micro_batch == by_size.micro_batch
    assert by_fraction.checkpointing.startswith(by_size.checkpointing.split(";")[0])
    assert "(0.5 of 0.0 GiB free)" in by_fraction.checkpointing
    monkeypatch.setattr(trainer_module, "device_memory", lambda device: (None, None))
    unknown = config(corpus_dir, tmp_path / "unknown", "sequence")
    unknown.checkpointing.memory_budget_free = 0.5
    with pytest.raises(NeatError, match="checkpointing.memory_budget_free"):
        Trainer(unknown)
