"""MQAR in the harder setting of Zoology/Based: the generator's sequences are right (every query
has exactly one answer, and it is the one scored), power-law gaps put queries near the context,
the settings refuse impossible shapes in user terms, and the accuracy at other lengths is scored
over calls with the state carried."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neatlm.config import Config, ConfigError, load_config
from neatlm.data.source import build_data
from neatlm.data.synthetic import MQARSampler, mqar_batch, power_law_weights
from neatlm.nn.loss import IGNORE_INDEX
from neatlm.nn.model import ModelOutput, NeatLM
from neatlm.train.evaluate import mqar_accuracy

torch.set_num_threads(1)


def check_sequence(x: torch.Tensor, y: torch.Tensor, pairs: int, queries: int, vocab: int) -> None:
    """Every property one MQAR sequence must have, asserted on one row."""
    context = 2 * pairs
    keys, values = x[0:context:2].tolist(), x[1:context:2].tolist()
    assert len(set(keys)) == pairs                                     # distinct keys: one answer each
    assert all(1 <= k < vocab // 2 for k in keys)
    assert all(vocab // 2 <= v < vocab for v in values)
    value_of = dict(zip(keys, values))
    scored = (y != IGNORE_INDEX).nonzero().flatten().tolist()
    assert len(scored) == queries
    asked = [int(x[t]) for t in scored]
    assert len(set(asked)) == queries                                  # each key asked at most once
    for t in scored:
        assert t >= context and (t - context) % 2 == 0                 # a query slot after the context
        assert keys.count(int(x[t])) == 1                              # its key is in the context once
        assert int(y[t]) == value_of[int(x[t])]                        # the target is that key's value
        assert int(x[t + 1]) == int(y[t])
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[:context] = False
    for t in scored:
        rest[t:t + 2] = False
    assert not x[rest].any()                                           # everything else is filler (0)


@pytest.mark.parametrize("gaps", ["uniform", "power"])
@pytest.mark.parametrize("seq_len, pairs, queries, vocab", [(256, 64, None, 8192), (512, 16, 8, 8192), (64, 8, 3, 64)])
def test_pairs_queries_and_targets_are_consistent(gaps, seq_len, pairs, queries, vocab):
    x, y = mqar_batch(6, seq_len, pairs, vocab, queries, seed=3, gaps=gaps)
    assert x.shape == y.shape == (6, seq_len)
    for b in range(6):
        check_sequence(x[b], y[b], pairs, queries or pairs, vocab)


def test_largest_pair_count_the_vocabulary_allows():
    x, y = mqar_batch(2, 64, pairs=15, vocab=32, seed=0, gaps="power")   # keys 1..15: all of them
    for b in range(2):
        check_sequence(x[b], y[b], 15, 15, 32)
    with pytest.raises(ValueError, match="pairs = 16 needs vocab >= 34"):
        mqar_batch(1, 64, pairs=16, vocab=32)


def _slots(y: torch.Tensor, pairs: int) -> torch.Tensor:
    """Query slot of every scored position (0 = right after the context)."""
    return ((y != IGNORE_INDEX).nonzero()[:, 1] - 2 * pairs) // 2


def test_power_law_gaps_cluster_near_the_context():
    # 496 slots, 16 queries each: uniform puts ~10% in the first 49 slots, power (a = 0.01) ~58%
    pairs, slots = 16, 496
    near = slots // 10
    power = _slots(mqar_batch(64, 1024, pairs, 8192, seed=7, gaps="power", power_a=0.01)[1], pairs)
    uniform = _slots(mqar_batch(64, 1024, pairs, 8192, seed=7, gaps="uniform")[1], pairs)
    assert power.numel() == uniform.numel() == 64 * pairs
    assert (power < near).float().mean() > 0.45
    assert (uniform < near).float().mean() < 0.15
    assert power.float().median() < 100 < 200 < uniform.float().median()
    assert power.max() > slots // 2                                    # but some queries are far
    # a larger exponent is closer to uniform
    flatter = _slots(mqar_batch(64, 1024, pairs, 8192, seed=7, gaps="power", power_a=0.5)[1], pairs)
    assert (power < near).float().mean() > (flatter < near).float().mean() + 0.1


def test_power_law_weights_follow_the_formula():
    w = power_law_weights(5, 0.01)
    expected = [0.01 * x ** (0.01 - 1) for x in range(1, 6)]
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(power_law_weights(4, 1.0), torch.ones(4, dtype=torch.float64))


def test_full_query_slots_hold_every_query_either_way():
    """With 2 * pairs + 2 * queries = seq_len (Zoology's 64 pairs in 256 tokens) every slot holds
    a query, so the gap law changes only which key sits where."""
    for gaps in ("uniform", "power"):
        y = mqar_batch(4, 256, 64, 8192, seed=1, gaps=gaps)[1]
        assert sorted(_slots(y[:1], 64).tolist()) == list(range(64))


def test_deterministic_per_seed_and_the_sampler_is_positioned():
    a = mqar_batch(4, 256, 16, 8192, seed=5, gaps="power")
    b = mqar_batch(4, 256, 16, 8192, seed=5, gaps="power")
    c = mqar_batch(4, 256, 16, 8192, seed=6, gaps="power")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    s = MQARSampler(4, 256, 16, 8192, None, seed=2, gaps="power", power_a=0.01)
    batches = [s.next() for _ in range(3)]
    again = MQARSampler(4, 256, 16, 8192, None, seed=2, position=2, gaps="power", power_a=0.01).next()
    assert torch.equal(again[0], batches[2][0])
    assert not torch.equal(batches[0][0], batches[1][0])


def test_the_config_reaches_the_sampler_and_validation():
    cfg = load_config("mqar-hard-swa", overrides=["train.batch_size=2"])
    assert (cfg.model.vocab_size, cfg.data.mqar_pairs, cfg.data.mqar_gaps) == (8192, 64, "power")
    data = build_data(cfg)
    assert (data.sampler.gaps, data.sampler.power_a, data.sampler.vocab) == ("power", 0.01, 8192)
    assert "power-law" in data.describe()
    x, y = next(data.validation(1))
    check_sequence(x[0], y[0], 64, 64, 8192)


@pytest.mark.parametrize("preset", ["mqar-hard-attention", "mqar-hard-swa", "mqar-hard-titans", "mqar-hard-atlas"])
def test_hard_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.data.task == "mqar" and cfg.data.mqar_gaps == "power" and cfg.model.vocab_size == 8192
    assert cfg.model.dim == 64 and cfg.train.seq_len == 256 and cfg.data.mqar_pairs == 64
    assert cfg.train.logits == "scored"


@pytest.mark.parametrize("overrides, fragment", [
    (["model.vocab_size=128"], "data.mqar_pairs = 64: must be <= model.vocab_size // 2 - 1 = 63"),
    (["data.mqar_power_a=0"], "data.mqar_power_a = 0.0: must be > 0.0"),
    (["data.mqar_power_a=-1"], "data.mqar_power_a = -1.0: must be > 0.0"),
    (["data.mqar_gaps=zipf"], "data.mqar_gaps = 'zipf': allowed values are 'uniform', 'power'"),
    (["data.mqar_queries=65"], "data.mqar_queries = 65: must be <= data.mqar_pairs = 64"),
    (["train.seq_len=200"], "2 * pairs + 2 * queries = 256 must fit in train.seq_len = 200"),
])
def test_impossible_settings_are_refused_in_user_terms(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("mqar-hard-swa", overrides=overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_error_says_how_large_the_vocabulary_must_be():
    with pytest.raises(ConfigError, match="raise model.vocab_size to at least 130"):
        load_config("mqar-hard-swa", overrides=["model.vocab_size=128"])
    assert load_config("mqar-hard-swa", overrides=["model.vocab_size=130"]).model.vocab_size == 130


# ----------------------------------------------------------------------------- accuracy at other lengths

def tiny(window: int) -> NeatLM:
    cfg = Config()
    cfg.model.vocab_size, cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads = 128, 16, 1, 2
    cfg.model.context, cfg.model.window, cfg.train.seq_len = 32, window, 32
    torch.manual_seed(0)
    return NeatLM(cfg)


class Recording(nn.Module):
    """A model passed through, its logits kept, to compare what the calls computed."""

    def __init__(self, inner: NeatLM):
        super().__init__()
        self.inner, self.cfg, self.logits = inner, inner.cfg, []

    def forward(self, idx: torch.Tensor, state=None) -> ModelOutput:
        out = self.inner(idx, state)
        self.logits.append(out.logits)
        return out


def test_untrained_swa_model_is_scored_at_a_longer_length():
    model = tiny(window=8)
    model.train()
    acc = mqar_accuracy(model, seq_len=96, pairs=24, batches=2, batch_size=3, gaps="power", seed=1)
    assert 0.0 <= acc <= 1.0
    assert model.training                                               # left as it was found
    # the sliding window carried across calls computes what one call over the whole sequence does
    whole, split = Recording(model), Recording(model)
    mqar_accuracy(whole, seq_len=96, pairs=24, batches=1, batch_size=3, seed=1, call_len=96)
    mqar_accuracy(split, seq_len=96, pairs=24, batches=1, batch_size=3, seed=1, call_len=20)
    assert [t.shape[1] for t in split.logits] == [20, 20, 20, 20, 16]
    assert torch.allclose(torch.cat(split.logits, 1), whole.logits[0], atol=1e-5)


def test_full_attention_is_scored_only_up_to_its_context():
    model = tiny(window=0)
    assert math.isnan(mqar_accuracy(model, seq_len=64, pairs=16, batches=1, batch_size=2))
    assert 0.0 <= mqar_accuracy(model, seq_len=32, pairs=8, batches=1, batch_size=2) <= 1.0
    with pytest.raises(ValueError, match="pairs = 64 needs vocab >= 130"):
        mqar_accuracy(model, seq_len=256, pairs=64, batches=1, batch_size=2)


class Recaller(nn.Module):
    """An exact associative memory over its calls: it records each key's value as it reads and
    answers a repeated key with it. It scores 1.0 only if the state really is carried across calls."""

    def __init__(self, window: int):
        super().__init__()
        self.cfg = Config()
        self.cfg.model.vocab_size, self.cfg.model.window, self.cfg.model.context = 64, window, 32
        self.cfg.train.seq_len = 32

    def forward(self, idx: torch.Tensor, state: dict | None = None) -> ModelOutput:
        B, T = idx.shape
        seen = [dict() for _ in range(B)] if state is None else state
        last = [None] * B if state is None else state_last(seen)
        logits = torch.zeros(B, T, self.cfg.model.vocab_size)
        for b in range(B):
            for t in range(T):
                tok = int(idx[b, t])
                if tok in seen[b] and tok < 32:
                    logits[b, t, seen[b][tok]] = 1.0
                if last[b] is not None and last[b] < 32 and tok >= 32:
                    seen[b].setdefault(last[b], tok)
                last[b] = tok
            seen[b]["last"] = last[b]
        return ModelOutput(logits, seen, None, {})


def state_last(seen: list[dict]) -> list[int | None]:
    return [s.get("last") for s in seen]


def test_a_perfect_recaller_scores_one_and_a_forgetful_one_does_not():
    model = Recaller(window=4)
    assert mqar_accuracy(model, seq_len=64, pairs=12, batches=2, batch_size=2, gaps="power", call_len=10) == 1.0

    class Forgetful(Recaller):
        def forward(self, idx, state=None):
            return super().forward(idx, None)

    assert mqar_accuracy(Forgetful(window=4), seq_len=64, pairs=12, batches=2, batch_size=2, call_len=10) < 0.5


# ----------------------------------------------------------------------------- the head at scored positions only

def test_the_head_at_scored_positions_is_the_full_heads_rows():
    model = tiny(window=8)
    x, y = mqar_batch(3, 32, 8, 128, seed=4, gaps="power")
    mask = y != IGNORE_INDEX
    with torch.no_grad():
        full, part = model(x).logits, model(x, scored=mask).logits
    assert part.shape == (int(mask.sum()), 128)
    assert torch.allclose(part, full[mask], atol=1e-6)


def test_training_on_scored_logits_takes_the_same_steps(tmp_path):
    """train.logits = 'scored' changes the cost, never the loss or the update."""
    from conftest import small_config
    from neatlm.train.trainer import Trainer

    def trained(logits: str) -> tuple[list[float], Trainer]:
        cfg = small_config(tmp_path, tmp_path / logits, steps=2, logits=logits)
        cfg.data.task, cfg.data.mqar_pairs, cfg.data.mqar_gaps = "mqar", 4, "power"
        cfg.model.window, cfg.eval.every = 8, 0
        torch.manual_seed(0)
        trainer = Trainer(cfg)
        return [trainer.train_step()[0].item() for _ in range(2)], trainer

    (all_losses, a), (scored_losses, s) = trained("all"), trained("scored")
    assert all_losses == pytest.approx(scored_losses, rel=1e-5)
    for p, q in zip(a.model.parameters(), s.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    shapes = []
    s.model.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    s.train_step()
    assert shapes == [(4 * 4, 256)]                                     # 4 rows x 4 queries, not 4 x 32
    with pytest.raises(ConfigError, match="train.logits = 'some'"):
        load_config("mqar-hard-swa", overrides=["train.logits=some"])
