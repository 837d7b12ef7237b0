import numpy as np
import pytest
import torch

from neatlm.data.passkey import QUESTION, min_length, needle, passkey_accuracy, passkey_batch, passkey_example
from neatlm.errors import DataError
from neatlm.nn.loss import IGNORE_INDEX

HAY = np.frombuffer(b"".join(b"def f_%d(x):\n    return x + %d\n" % (i, i % 7) for i in range(400)), dtype=np.uint8)


@pytest.mark.parametrize("length", [96, 500, 2048])
def test_needle_before_question_and_only_digits_scored(length):
    for seed in range(20):
        x, y, depth = passkey_example(HAY, length, seed)
        seq = bytes(x.tolist()) + bytes([int(y[-1])])
        assert x.shape == y.shape == (length,)
        key = seq[-5:].decode()
        assert key.isdigit()
        q = seq.rindex(QUESTION)
        assert q == length + 1 - len(QUESTION) - 5
        assert seq.index(needle(key)) == depth and depth + len(needle(key)) <= q   # never inside the question
        scored = (y != IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored == list(range(length - 5, length))
        assert bytes(y[scored].tolist()).decode() == key


def test_deterministic_per_seed_and_depths_vary():
    a, b = passkey_batch(HAY, 4, 300, seed=3), passkey_batch(HAY, 4, 300, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], passkey_batch(HAY, 4, 300, seed=4)[0])
    depths = {passkey_example(HAY, 1000, s)[2] for s in range(30)}
    assert len(depths) > 20


def test_accuracy_needs_every_digit_and_bad_lengths_fail():
    x, y = passkey_batch(HAY, 2, 128, seed=0)
    logits = torch.full((2, 128, 256), -5.0)
    logits.scatter_(-1, y.clamp_min(0)[..., None], 5.0)
    assert passkey_accuracy(logits, y) == 1.0
    logits[0, -1] = 0.0
    logits[0, -1, (int(y[0, -1]) + 1) % 256] = 9.0
    assert passkey_accuracy(logits, y) == 0.5
    with pytest.raises(DataError, match="at least 79"):
        passkey_example(HAY, 20, 0)
    assert min_length() == 79
    with pytest.raises(DataError, match="haystack"):
        passkey_example(HAY[:50], 500, 0)


# ------------------------------------------------------------------ data.task = "passkey"

from pathlib import Path  # noqa: E402

from conftest import small_config  # noqa: E402

from neatlm.config import Config, ConfigError, validate  # noqa: E402
from neatlm.data.passkey import PasskeySampler, passkey_digit_accuracy  # noqa: E402
from neatlm.data.source import build_data  # noqa: E402

TRAIN_BYTES, VAL_BYTES = 40_000, 10_000


def split_corpus(tmp_path: Path) -> Path:
    """A single-file corpus split by bytes: the training part all 'a', the held-out tail all 'b'."""
    path = tmp_path / "ab.txt"
    path.write_bytes(b"a" * TRAIN_BYTES + b"b" * VAL_BYTES)
    return path


def passkey_config(corpus: Path, seq_len: int = 64, segments: int = 2, batch_size: int = 3) -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.task = str(corpus), "passkey"
    cfg.data.val_fraction = VAL_BYTES / (TRAIN_BYTES + VAL_BYTES)
    cfg.train.seq_len, cfg.train.segments, cfg.train.batch_size = seq_len, segments, batch_size
    validate(cfg)
    return cfg


def expected_row(inputs: torch.Tensor, targets: torch.Tensor, filler: bytes) -> None:
    """The row is filler, the whole needle, filler, then the question and the key: nothing else."""
    seq = bytes(inputs.tolist()) + bytes([int(targets[-1])])
    key = seq[-5:].decode()
    assert key.isdigit()
    hidden, tail = needle(key), QUESTION + key.encode()
    depth = seq.index(hidden)
    assert seq.endswith(tail) and depth + len(hidden) <= len(seq) - len(tail)  # never inside the question
    assert seq[:depth] + seq[depth + len(hidden):-len(tail)] == filler * (len(seq) - len(hidden) - len(tail))
    assert (targets != IGNORE_INDEX).nonzero().flatten().tolist() == list(range(len(inputs) - 5, len(inputs)))
    assert bytes(targets[-5:].tolist()).decode() == key


def test_training_examples_hide_the_needle_in_training_bytes_only(tmp_path):
    data = build_data(passkey_config(split_corpus(tmp_path)))
    assert data.task == "passkey" and data.scores_accuracy
    for _ in range(4):
        x, y = data.sampler.next()
        assert x.shape == y.shape == (3, 128)                   # one example per window of 64 x 2 bytes
        for row in range(3):
            expected_row(x[row], y[row], b"a")


def test_validation_examples_hide_the_needle_in_held_out_bytes_and_repeat(tmp_path):
    data = build_data(passkey_config(split_corpus(tmp_path)))
    first, again = list(data.validation(2)), list(data.validation(2))
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)        # the same examples at every evaluation
        for row in range(3):
            expected_row(x[row], y[row], b"b")
    assert not torch.equal(first[0][1], first[1][1])            # the batches differ from each other


def test_sampler_is_a_function_of_seed_and_position_and_resumes(tmp_path):
    hay = np.frombuffer(split_corpus(tmp_path).read_bytes()[:TRAIN_BYTES], dtype=np.uint8)
    a = PasskeySampler(hay, 4, 200, seed=7)
    batches = [a.next() for _ in range(3)]
    jumped = PasskeySampler(hay, 4, 200, seed=7, position=2)
    assert torch.equal(jumped.next()[1], batches[2][1])
    resumed = PasskeySampler(hay, 4, 200, seed=7)
    resumed.load_state_dict(PasskeySampler(hay, 4, 200, seed=7, position=1).state_dict())
    for x, y in batches[1:]:
        x2, y2 = resumed.next()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert resumed.state_dict() == a.state_dict() == {"position": 3}
    assert not torch.equal(PasskeySampler(hay, 4, 200, seed=8).next()[1], batches[0][1])
    assert not torch.equal(batches[0][1], batches[1][1])


def test_sampler_refuses_too_little_text(tmp_path):
    hay = np.zeros(100, dtype=np.uint8)
    with pytest.raises(DataError, match="fewer than one passkey example"):
        PasskeySampler(hay, 2, 200, seed=0)
    with pytest.raises(DataError, match="at least 79"):
        PasskeySampler(hay, 2, 50, seed=0)


def test_too_little_held_out_text_is_refused_when_the_data_is_built(tmp_path):
    cfg = passkey_config(split_corpus(tmp_path), seq_len=256, segments=64)   # 16,384 > 10,000 held out
    with pytest.raises(DataError, match="fewer than one passkey example"):
        build_data(cfg)


def test_config_refuses_a_short_window_and_stream_sampling(tmp_path):
    cfg = Config()
    cfg.data.task, cfg.train.seq_len, cfg.train.segments = "passkey", 32, 2
    with pytest.raises(ConfigError, match=r"train\.seq_len \* train\.segments = 32 \* 2 = 64: must be >= 79"):
        validate(cfg)
    cfg.train.segments = 3                                      # 96 bytes hold the needle and the question
    validate(cfg)
    cfg.data.sampling, cfg.memory.reset, cfg.model.window = "stream", "never", 64
    with pytest.raises(ConfigError, match="data.sampling = 'stream': only for data.task = 'text'"):
        validate(cfg)


def test_digit_accuracy_counts_digits_not_examples():
    _, y = passkey_batch(HAY, 2, 128, seed=0)
    logits = torch.zeros(2, 128, 256)
    logits.scatter_(-1, y.clamp_min(0)[..., None], 5.0)
    logits[0, -1] = 0.0
    logits[0, -1, (int(y[0, -1]) + 1) % 256] = 9.0
    assert passkey_digit_accuracy(logits, y) == 0.9             # 9 of 10 digits
    assert passkey_accuracy(logits, y) == 0.5                   # 1 of 2 examples


def test_two_training_steps_report_a_digit_accuracy(corpus_dir, tmp_path, one_thread, capsys):
    import json

    from neatlm.cli import main
    from neatlm.train.trainer import Trainer

    cfg = small_config(corpus_dir, tmp_path / "run", steps=2, seq_len=32, segments=3, batch_size=2)
    cfg.data.task, cfg.eval.every, cfg.eval.batches = "passkey", 0, 2
    validate(cfg)
    result = Trainer(cfg).train()
    assert 0.0 <= result["val_acc"] <= 1.0 and np.isfinite(result["val_loss"])
    # the run's passkey sweep reads its held-out text; the run's own evaluation reports val_acc too
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--task", "passkey", "--lengths", "96,128",
                 "--examples", "2"]) == 0
    assert set(json.loads(capsys.readouterr().out)["accuracy"]) == {"96", "128"}
    assert main(["eval", "--run", str(tmp_path / "run"), "--batches", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "passkey" and 0.0 <= out["val_acc"] <= 1.0


def test_presets_are_the_same_model_with_and_without_memory():
    from neatlm.config import load_config

    mem, att = load_config("passkey"), load_config("passkey-attention")
    for cfg in (mem, att):
        assert cfg.data.task == "passkey" and cfg.data.sampling == "random" and cfg.memory.reset == "sequence"
        assert min_length() <= cfg.train.seq_len * cfg.train.segments <= 2048
        assert cfg.model.window == 64 < cfg.train.seq_len * cfg.train.segments
    assert mem.memory.enabled and not att.memory.enabled
    assert mem.model == att.model and mem.data == att.data
    same = ("batch_size", "seq_len", "segments", "lr")
    assert all(getattr(mem.train, k) == getattr(att.train, k) for k in same)
