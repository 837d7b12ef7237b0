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
