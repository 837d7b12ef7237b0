from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_corpus
from neatlm.config import DataConfig
from neatlm.data.corpus import BatchSampler, is_validation, list_files, load_corpus, stdlib_root
from neatlm.data.synthetic import mqar_batch
from neatlm.errors import DataError
from neatlm.nn.loss import IGNORE_INDEX, argmax_hits


def test_split_is_by_file_and_deterministic(tmp_path: Path):
    root = write_corpus(tmp_path / "c", n_files=40)
    cfg = DataConfig(path=str(root), val_fraction=0.25)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train_files + a.val_files == 40 and 0 < a.val_files < 40
    val_names = [p.name for p in list_files(root, (".py",)) if is_validation(p.name, 0.25)]
    assert len(val_names) == a.val_files
    # the split does not depend on file order: it is a function of the relative path alone
    assert is_validation("mod_03.py", 0.25) == is_validation("mod_03.py", 0.25)


def test_default_corpus_is_stdlib_without_site_packages():
    files = list_files(stdlib_root(), (".py",))
    assert len(files) > 100
    assert not any("site-packages" in p.parts for p in files)


def test_single_file_splits_by_bytes(tmp_path: Path):
    f = tmp_path / "one.txt"
    f.write_bytes(bytes(range(256)) * 4)
    c = load_corpus(DataConfig(path=str(f), val_fraction=0.25))
    assert c.train.size == 768 and c.val.size == 256


def test_bad_paths_give_clear_errors(tmp_path: Path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_corpus(DataConfig(path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files ending in .py"):
        load_corpus(DataConfig(path=str(tmp_path / "empty")))
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DataError, match="the file is empty"):
        load_corpus(DataConfig(path=str(tmp_path / "e.txt")))


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch):
    root = write_corpus(tmp_path / "c", n_files=3)
    original = Path.read_bytes

    def fail(self):
        if self.name == "mod_01.py":
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", fail)
    with pytest.raises(DataError, match="cannot read .*mod_01.py: Permission denied"):
        load_corpus(DataConfig(path=str(root)))


def test_sampler_is_a_function_of_seed_and_position():
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    s = BatchSampler(data, 4, 16, seed=3)
    batches = [s.next() for _ in range(5)]
    resumed = BatchSampler(data, 4, 16, seed=3, position=3)
    x, y = resumed.next()
    assert torch.equal(x, batches[3][0]) and torch.equal(y, batches[3][1])
    assert torch.equal(x[:, 1:], y[:, :-1])
    other = BatchSampler(data, 4, 16, seed=4).next()[0]
    assert not torch.equal(other, batches[0][0])


def test_mqar_layout_and_scoring():
    x, y = mqar_batch(8, 64, pairs=8, vocab=64, seed=1)
    assert x.shape == y.shape == (8, 64)
    for b in range(8):
        pairs = {int(x[b, i]): int(x[b, i + 1]) for i in range(0, 16, 2)}
        q = (y[b] != IGNORE_INDEX).nonzero().flatten()
        assert len(q) == 8
        for t in q.tolist():
            assert int(y[b, t]) == pairs[int(x[b, t])]  # the answer is the value of the queried key
    assert torch.equal(mqar_batch(8, 64, 8, 64, seed=1)[0], x)
    perfect = torch.nn.functional.one_hot(y.clamp(min=0), 64).float()
    assert argmax_hits(perfect, y) == (64, 64)  # every query right, nothing else scored
    assert argmax_hits(torch.zeros(8, 64, 64), y) == (0, 64)
    with pytest.raises(ValueError, match="exceeds seq_len"):
        mqar_batch(1, 10, pairs=8)


@pytest.mark.parametrize("task", ["text", "mqar"])
def test_validation_windows_are_as_long_as_training_windows(tmp_path: Path, task: str):
    from neatlm.config import load_config
    from neatlm.data.source import build_data

    root = write_corpus(tmp_path / "c", n_files=20)
    cfg = load_config(overrides=[f"data.path={root}", "data.val_fraction=0.3", "train.seq_len=64",
                                 "train.segments=3", f"data.task={task}", "data.mqar_pairs=8"])
    data = build_data(cfg)
    x_train, _ = data.sampler.next()
    x_val, y_val = next(iter(data.validation(1)))
    assert x_train.shape[1] == x_val.shape[1] == y_val.shape[1] == 192


def test_training_document_starts_come_from_training_files_only(tmp_path: Path):
    from neatlm.config import DataConfig
    from neatlm.data.corpus import held_out_documents, training_document_starts

    root = tmp_path / "c"
    root.mkdir()
    for i in range(20):
        (root / f"f{i:02d}.txt").write_bytes(bytes([65 + i]) * (50 if i % 4 == 0 else 200))
    cfg = DataConfig(path=str(root), extensions=".txt", val_fraction=0.3)
    starts = training_document_starts(cfg, 100)
    held_out = {d[:1] for d in held_out_documents(cfg)}
    assert starts and all(len(s) == 100 for s in starts)          # files shorter than 100 bytes are left out
    assert not {s[:1] for s in starts} & held_out                 # never a held-out file
    assert len(starts) == sum(1 for i in range(20) if i % 4 != 0) - sum(
        1 for d in held_out_documents(cfg) if len(d) >= 100)
