"""Stream sampling: each batch row continues its own stream, and the trainer carries state along it.
Document episodes: each row reads a document from its first byte, and the state restarts with it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_config
from neatlm.config import load_config
from neatlm.data.corpus import DocumentSampler, StreamSampler, load_corpus
from neatlm.errors import DataError
from neatlm.settings import ConfigError
from neatlm.train.trainer import Trainer


def test_rows_continue_where_the_previous_batch_ended():
    data = (np.arange(5000) % 251).astype(np.uint8)
    s = StreamSampler(data, batch_size=3, seq_len=16, seed=7)
    (x0, y0), (x1, y1) = s.next(), s.next()
    assert torch.equal(x0[:, 1:], y0[:, :-1])
    assert torch.equal(x1[:, 0], y0[:, -1])          # the next window starts with the last target
    offsets = [int(x0[b, 0]) for b in range(3)]
    assert len(set(offsets)) > 1                      # rows are different streams


def test_stream_sampler_resumes_from_its_position():
    data = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint8)
    s = StreamSampler(data, batch_size=2, seq_len=32, seed=1)
    batches = [s.next() for _ in range(4)]
    resumed = StreamSampler(data, batch_size=2, seq_len=32, seed=1)
    resumed.load_state_dict(s.state_dict() | {"position": 2})
    assert torch.equal(resumed.next()[0], batches[2][0])


def test_stream_wraps_and_every_window_is_whole():
    data = np.arange(100).astype(np.uint8)
    s = StreamSampler(data, batch_size=4, seq_len=16, seed=0)
    for _ in range(30):
        x, y = s.next()
        assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("sets, match", [
    (["data.sampling=stream"], "needs memory.reset = 'never'"),
    (["data.sampling=documents"], "needs memory.reset = 'never'"),
    (["data.sampling=documents", "memory.reset=never", "model.window=64", "train.accum_steps=2"],
     "train.accum_steps = 2: must be 1"),
    (["data.sampling=documents", "data.episode_windows=0"], "data.episode_windows = 0"),
    (["data.sampling=stream", "memory.reset=never", "model.window=64", "train.accum_steps=2"],
     "train.accum_steps = 2: must be 1"),
    (["data.sampling=stream", "memory.reset=never", "model.window=64", "data.task=mqar"], "only for data.task"),
])
def test_stream_sampling_refuses_settings_that_break_the_stream(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=sets)


def test_trainer_carries_state_along_the_stream(corpus_dir: Path, tmp_path: Path):
    cfg = small_config(corpus_dir, tmp_path / "run", steps=3)
    cfg.model.window, cfg.memory.reset, cfg.data.sampling = 16, "never", "stream"
    cfg.memory.enabled, cfg.memory.chunk_size = True, 8
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    assert isinstance(trainer.sampler, StreamSampler)
    trainer.train_step()
    first = trainer.carried.value
    assert first is not None
    trainer.train_step()
    assert trainer.carried.value is not first


def test_init_from_starts_from_another_runs_weights(corpus_dir: Path, tmp_path: Path):
    from neatlm.errors import CheckpointError

    base = Trainer(small_config(corpus_dir, tmp_path / "base", steps=2))
    base.train()
    cfg = small_config(corpus_dir, tmp_path / "tuned", steps=2)
    cfg.train.init_from, cfg.train.seed = str(tmp_path / "base"), 123
    tuned = Trainer(cfg, run_dir=tmp_path / "tuned")
    for name, w in base.model.state_dict().items():
        assert torch.equal(tuned.model.state_dict()[name], w), name
    assert tuned.step == 0 and tuned.sampler.position == 0       # only the weights come along
    wider = small_config(corpus_dir, tmp_path / "wider", steps=2)
    wider.model.dim, wider.train.init_from = 64, str(tmp_path / "base")
    with pytest.raises(CheckpointError, match="train.init_from = .*base.*does not match the model this run's config"):
        Trainer(wider, run_dir=tmp_path / "wider")


def _documents(root: Path, lengths: list[int]) -> Path:
    """Files whose every byte names its document (a letter) and its offset in it (mod 10)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        (root / f"doc_{i:02d}.py").write_bytes(bytes(65 + i if j % 10 else 48 + (j // 10) % 10 for j in range(n)))
    return root


def test_document_episodes_read_each_document_from_its_first_byte(tmp_path: Path):
    corpus = load_corpus(load_config(overrides=[f"data.path={_documents(tmp_path / 'c', [100, 400, 700, 1000, 120])}",
                                                "data.val_fraction=0"]).data)
    assert corpus.train_starts.tolist() == [0, 100, 500, 1200, 2200]
    s = DocumentSampler(corpus.train, corpus.train_starts, batch_size=6, seq_len=32, episode=4, seed=3)
    assert [s.starts_fresh(i) for i in range(9)] == [True, False, False, False, True, False, False, False, True]
    batches = [s.next() for _ in range(8)]
    for e in range(2):
        x0 = batches[4 * e][0]
        letters = {chr(int(b)) for b in x0[:, 1]}
        assert letters <= {"B", "C", "D"}                  # 100 and 120 bytes: too short for 4 x 32 + 1
        assert (x0[:, 0] == ord("0")).all()                  # every row starts at its document's first byte
        for k in range(1, 4):
            prev, cur = batches[4 * e + k - 1], batches[4 * e + k]
            assert torch.equal(cur[0][:, 0], prev[1][:, -1])   # the next window continues the document
            assert torch.equal(cur[0][:, 1], x0[:, 1])         # in the same document
    resumed = DocumentSampler(corpus.train, corpus.train_starts, batch_size=6, seq_len=32, episode=4, seed=3)
    resumed.load_state_dict({"position": 5})
    assert torch.equal(resumed.next()[0], batches[5][0])
    with pytest.raises(DataError, match="data.episode_windows"):
        DocumentSampler(corpus.train, corpus.train_starts, batch_size=2, seq_len=32, episode=40, seed=3)


def test_trainer_restarts_the_state_where_an_episode_starts(corpus_dir: Path, tmp_path: Path):
    cfg = small_config(corpus_dir, tmp_path / "run", steps=4, seq_len=16)
    cfg.model.window, cfg.memory.reset, cfg.data.sampling, cfg.data.episode_windows = 16, "never", "documents", 2
    cfg.memory.enabled, cfg.memory.chunk_size = True, 8
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    assert isinstance(trainer.sampler, DocumentSampler)
    starts = []
    forward = trainer.model.forward

    def spy(idx, state=None, *args, **kwargs):
        if trainer.model.training:
            starts.append(state is None)
        return forward(idx, state, *args, **kwargs)

    trainer.model.forward = spy
    for _ in range(4):
        trainer.train_step()
    assert starts == [True, False, True, False]
