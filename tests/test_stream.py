"""Streaming evaluation: whole files, state carried, bounded memory, buckets by position."""

import math

import pytest
import torch

from neatlm.config import Config
from neatlm.nn.loss import lm_loss
from neatlm.nn.memory import TTLControl
from neatlm.nn.model import NeatLM
from neatlm.train.state_io import flatten_state
from neatlm.train.stream import BUCKET_NAMES, compressor_bits_per_byte, stream_eval, streaming_model


def memory_model(window: int = 16) -> NeatLM:
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.window = 32, 2, 2, window
    cfg.memory.enabled, cfg.memory.chunk_size = True, 8
    torch.manual_seed(0)
    return NeatLM(cfg).double()


def text(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(97, 123, (n,), generator=g).tolist())


def test_streaming_equals_one_call_and_buckets_count_every_byte():
    model = memory_model()
    data = text(300)
    got = stream_eval(model, [data], call_len=37)
    ids = torch.tensor(list(data))[None]
    whole = lm_loss(model(ids[:, :-1]).logits, ids[:, 1:], reduction="sum").item()
    assert math.isclose(sum(got.nats), whole, rel_tol=1e-9)
    assert sum(got.count) == len(data) - 1
    assert got.count[0] == 255 and got.count[1] == 44       # targets at positions 1..255, 256..299
    bpb = got.bits_per_byte()
    assert set(bpb) == {"all", *BUCKET_NAMES} and math.isnan(bpb["16K+"])


def test_learning_off_differs_and_state_stays_bounded():
    model = memory_model()
    data = text(200)
    on, off = stream_eval(model, [data], 32), stream_eval(model, [data], 32, learn=False)
    assert on.nats[0] != off.nats[0]          # test-time learning changed the predictions
    sizes = []
    state = None
    ids = torch.tensor(list(text(1024, 1)))[None]
    for start in range(0, 1024, 64):
        state = model(ids[:, start:start + 64], state).state
        sizes.append(sum(t.numel() for t in flatten_state(state)[1].values()))
    assert len(set(sizes[1:])) == 1           # the carried state does not grow with the file


def test_full_attention_model_streams_with_its_context_as_window():
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.context = 32, 1, 2, 24
    model = NeatLM(cfg)
    windowed = streaming_model(model)
    assert windowed is not model and windowed.cfg.model.window == 24 and model.cfg.model.window == 0
    ids = torch.randint(0, 256, (1, 24))
    torch.testing.assert_close(windowed(ids).logits, model(ids).logits)   # same weights, same first window
    assert streaming_model(windowed) is windowed


def test_compressors_report_bits_per_byte():
    files = [b"abc" * 200, text(500)]
    bpb = compressor_bits_per_byte(files)
    assert set(bpb) == {"zlib", "bz2", "xz"}
    assert all(0 < v < 8 for v in bpb.values())
    with pytest.raises(ValueError, match="call_len"):
        stream_eval(memory_model(), files, call_len=0)


def test_neat_eval_stream_reports_buckets_and_compressors(corpus_dir, tmp_path, capsys):
    import json

    from conftest import small_config
    from neatlm.cli import main
    from neatlm.train.trainer import Trainer

    cfg = small_config(corpus_dir, tmp_path / "run", steps=2)
    cfg.model.window, cfg.memory.enabled, cfg.memory.chunk_size = 16, True, 8
    Trainer(cfg).train()
    capsys.readouterr()
    results = {}
    for flag in ([], ["--no-ttl"]):
        assert main(["eval", "--run", str(tmp_path / "run"), "--stream", "--max-files", "2", *flag]) == 0
        results[bool(flag)] = json.loads(capsys.readouterr().out)
    on, off = results[False], results[True]
    assert on["ttl"] and not off["ttl"] and on["documents"] == 2
    assert on["bpb"]["all"] != off["bpb"]["all"] and on["bpb"]["16K+"] is None
    assert set(on["compressors_bpb"]) == {"zlib", "bz2", "xz"}
    assert on["memory_by_position"]["inner_loss_before"]["0-256"] > 0 and "memory_by_position" not in off
    assert main(["eval", "--run", str(tmp_path / "run"), "--task", "passkey", "--lengths", "96,160",
                 "--examples", "2"]) == 0
    passkey = json.loads(capsys.readouterr().out)
    assert set(passkey["accuracy"]) == {"96", "160"}
    assert main(["eval", "--run", str(tmp_path / "run"), "--task", "passkey", "--lengths", "9999999"]) == 2
    assert "held-out text has only" in capsys.readouterr().err


def test_passkey_eval_streams_each_length_and_scores_only_the_answer():
    from types import SimpleNamespace

    import numpy as np

    from neatlm.data.passkey import passkey_batch
    from neatlm.train.stream import passkey_eval

    model = memory_model()
    hay = np.frombuffer(text(5000), dtype=np.uint8)
    acc = passkey_eval(model, hay, [100, 300], examples=3, call_len=64)
    assert set(acc) == {100, 300} and all(0.0 <= a <= 1.0 for a in acc.values())
    _, y = passkey_batch(hay, 3, 300, seed=300)

    class Oracle(torch.nn.Module):
        """Right at every scored position, whatever it predicts elsewhere; its state is the position."""

        def forward(self, idx, state=None, ttl=None):
            start = state or 0
            logits = torch.zeros(idx.shape[0], idx.shape[1], 256)
            logits.scatter_(-1, y[:, start:start + idx.shape[1]].clamp_min(0)[..., None], 1.0)
            return SimpleNamespace(logits=logits, state=start + idx.shape[1])

    assert passkey_eval(Oracle(), hay, [300], examples=3, call_len=64) == {300: 1.0}
    assert passkey_eval(Oracle(), hay, [300], examples=3, call_len=3) == {300: 1.0}   # answer split over calls


def test_no_ttl_leaves_every_memory_at_its_initial_weights():
    model = memory_model()
    ids = torch.tensor(list(text(200)))[None]
    state = None
    for start in range(0, 200, 48):
        state = model(ids[:, start:start + 48], state, TTLControl(learn=False)).state
    for layer, s in zip(model.blocks, state):
        memory = layer.mixer.memory
        for w, w0 in zip(s.memory.weights, memory.initial_weights()):
            assert torch.equal(w[0], w0.expand_as(w[0]))


def test_stream_statistics_follow_the_file_without_changing_the_loss():
    model = memory_model()
    data = text(600, 2)
    plain = stream_eval(model, [data], call_len=64)
    with_stats = stream_eval(model, [data], call_len=64, collect_stats=True)
    assert with_stats.nats == plain.nats
    stats = with_stats.memory_stats()
    assert {"inner_loss_before", "inner_loss_after", "forget_gate_mean"} <= set(stats)
    before = stats["inner_loss_before"]
    assert before["0-256"] > 0 and before["256-1K"] > 0 and math.isnan(before["1K-4K"])


def test_empty_and_one_byte_files_are_skipped():
    model = memory_model()
    data = text(100)
    assert stream_eval(model, [b"", data, b"x"], call_len=32).nats == stream_eval(model, [data], call_len=32).nats
