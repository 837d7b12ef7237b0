import pytest
"""Segments, state carry and memory reset policies in the trainer; MQAR as a training task."""

import torch

from conftest import small_config
from neatlm.nn.loss import lm_loss
from neatlm.train.metrics import read_metrics
from neatlm.train.trainer import Trainer


def first_loss(trainer: Trainer) -> float:
    loss, _ = trainer.train_step()
    return loss.item()


def test_segments_with_carry_give_the_whole_window_loss(corpus_dir, tmp_path):
    """reset=sequence carries state between segments: the loss equals one pass over the window."""
    cfg = small_config(corpus_dir, tmp_path / "a", segments=2, seq_len=16)
    trainer = Trainer(cfg)
    x, y = trainer.data.sampler.next()
    trainer.data.sampler.position = 0
    with torch.no_grad():
        whole = lm_loss(trainer.model(x)[0], y).item()
    assert abs(first_loss(trainer) - whole) < 1e-5


def test_reset_batch_forgets_between_segments(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "b", segments=2, seq_len=16)
    cfg.memory.reset = "batch"
    trainer = Trainer(cfg)
    x, y = trainer.data.sampler.next()
    trainer.data.sampler.position = 0
    with torch.no_grad():
        parts = [lm_loss(trainer.model(xs)[0], ys).item() for xs, ys in zip(x.chunk(2, 1), y.chunk(2, 1))]
    assert abs(first_loss(trainer) - sum(parts) / 2) < 1e-5


def test_reset_never_carries_across_steps_and_resumes_exactly(corpus_dir, tmp_path):
    def cfg(run):
        c = small_config(corpus_dir, tmp_path / run, steps=6, save_every=3)
        c.memory.reset, c.model.window = "never", 8
        return c

    whole = Trainer(cfg("whole"))
    whole.train()
    assert whole.carry is not None and whole.carry[0].position == 6 * 32  # 6 steps of 32 tokens
    assert whole.carry[0].k.shape[2] == 7  # a window of 8 keeps 7 keys
    assert not whole.carry[0].k.requires_grad
    split = Trainer(cfg("split"))
    split.train(until_step=3)
    resumed = Trainer.resume(tmp_path / "split")
    assert resumed.carry is not None and resumed.carry[0].position == 3 * 32
    resumed.train()
    loss = lambda run: [r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r]
    assert loss("whole") == loss("split")


def test_mqar_task_trains_and_reports_accuracy(tmp_path):
    cfg = small_config(tmp_path, tmp_path / "m", steps=2)
    cfg.data.task, cfg.data.mqar_pairs = "mqar", 4
    cfg.eval.every = 2
    result = Trainer(cfg).train()
    assert 0.0 <= result["val_acc"] <= 1.0 and result["val_loss"] > 0


def test_metrics_lines_that_are_not_records_are_skipped_and_dropped_on_resume(tmp_path):
    from neatlm.errors import NeatError
    from neatlm.train.metrics import read_metrics, truncate_after

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n[1, 2]\n\xff\xfe\n{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 5]      # a killed run's cut line is skipped
    truncate_after(tmp_path, 5)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 5]
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 5, "loss": 1.0}\n'
    path.unlink()
    path.mkdir()
    with pytest.raises(NeatError, match="is a directory"):
        truncate_after(tmp_path, 5)


def test_a_rejected_step_does_not_carry_its_state_forward(corpus_dir, tmp_path):
    """A non-finite forward at one step (memory state carried across steps): the guard rejects the
    step, the carried state goes back to the one before it, and training recovers."""
    import math

    from conftest import small_config
    from neatlm.train.state_io import flatten_state
    from neatlm.train.trainer import Trainer

    cfg = small_config(corpus_dir, tmp_path / "r", steps=6, save_every=1, seq_len=16)
    cfg.memory.enabled, cfg.memory.chunk_size, cfg.memory.reset, cfg.model.window = True, 4, "never", 8
    trainer = Trainer(cfg)
    poison = {"step": 3}

    def hook(module, inputs, output):
        if trainer.step == poison["step"]:
            return output[0] * math.nan, output[1]

    trainer.model.blocks[0].mixer.register_forward_hook(hook)
    trainer.train()
    assert trainer.step == 6
    finite = lambda s: all(bool(t.isfinite().all()) for t in flatten_state(s)[1].values())  # noqa: E731
    assert finite(trainer.carried.value)
    assert all(bool(p.isfinite().all()) for p in trainer.model.parameters())
