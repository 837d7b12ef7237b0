"""Byte Latent Transformer: patching invariants, hashing, causality, state carry, gradients, the
entropy run, and the CLI on a BLT run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_config
from neatlm.cli import main
from neatlm.config import Config, validate
from neatlm.grad.check import check_gradients
from neatlm.nn.blt.hashing import ngram_hashes
from neatlm.nn.blt.model import BLTModel
from neatlm.nn.blt.patching import PatchCursor, average_patch, entropy_of, measured_threshold, patch_starts
from neatlm.nn.build import build_model
from neatlm.nn.memory import TTLControl
from neatlm.settings import ConfigError
from neatlm.train.state_io import flatten_state, unflatten_state
from neatlm.train.trainer import Trainer


def starts_of(entropies: torch.Tensor, splits: list[int], **rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch starts and ends of a stream read in calls cut at ``splits``: entropies (B, T + 1)."""
    cursor, starts, ends = None, [], []
    bounds = [0, *splits, entropies.shape[1] - 1]
    for a, b in zip(bounds[:-1], bounds[1:]):
        s, e, cursor = patch_starts(entropies[:, a:b + 1], cursor, **rule)
        starts.append(s)
        ends.append(e)
    return torch.cat(starts, dim=1), torch.cat(ends, dim=1)


RULES = [dict(patcher="entropy", threshold=1.0, stride=4, max_patch=6),
         dict(patcher="monotonic", threshold=0.2, stride=4, max_patch=5),
         dict(patcher="stride", threshold=0.0, stride=3, max_patch=8)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r["patcher"])
def test_patches_cover_the_sequence_and_split_anywhere(rule):
    g = torch.Generator().manual_seed(0)
    H = torch.rand(3, 101, generator=g) * 2.5
    starts, ends = starts_of(H, [], **rule)
    assert starts[:, 0].all()                                   # a stream starts a patch
    assert torch.equal(ends[:, :-1], starts[:, 1:])             # byte t ends a patch iff t + 1 starts one
    for row in starts:                                          # lengths sum to the sequence, none too long
        first = row.nonzero().flatten().tolist() + [row.numel()]
        lengths = [b - a for a, b in zip(first[:-1], first[1:])]
        assert sum(lengths) == row.numel() and max(lengths) <= rule["max_patch"]
    for splits in ([1], [37], [5, 6, 60], list(range(1, 100, 7))):
        s, e = starts_of(H, splits, **rule)
        assert torch.equal(s, starts) and torch.equal(e, ends), splits
    for k in (1, 20, 64):                                       # a prefix's boundaries are a prefix
        s, _ = starts_of(H[:, :k + 1], [], **rule)
        assert torch.equal(s, starts[:, :k])


def test_infinite_thresholds():
    H = torch.rand(2, 41) * 3
    never, _ = starts_of(H, [13], patcher="entropy", threshold=math.inf, stride=1, max_patch=7)
    assert never.nonzero()[:, 1].unique().tolist() == list(range(0, 40, 7))   # one patch per max length
    for patcher in ("entropy", "monotonic"):
        always, _ = starts_of(H, [13], patcher=patcher, threshold=-math.inf, stride=1, max_patch=7)
        assert always.all()                                                   # one byte per patch


def test_stride_counts_from_the_stream_start():
    s, _ = starts_of(torch.zeros(1, 30), [4, 11], patcher="stride", threshold=0.0, stride=5, max_patch=9)
    assert s[0].nonzero().flatten().tolist() == [0, 5, 10, 15, 20, 25]


def test_entropy_patches_start_where_entropy_is_high():
    H = torch.tensor([[0.1, 0.1, 3.0, 0.2, 0.2, 0.2, 2.9, 0.1, 0.1]])
    s, _ = starts_of(H, [], patcher="entropy", threshold=1.0, stride=1, max_patch=16)
    assert s[0].nonzero().flatten().tolist() == [0, 2, 6]


@pytest.mark.parametrize("patcher", ["entropy", "monotonic"])
def test_measured_threshold_hits_the_target_patch_size(patcher):
    H = torch.rand(8, 501, generator=torch.Generator().manual_seed(1)) * 4
    for target in (2.0, 4.0, 5.5):
        theta = measured_threshold(H, patcher, target, max_patch=8)
        assert abs(average_patch(H, patcher, theta, 8) - target) < 0.05 * target


def test_hashes_are_the_same_in_another_process():
    history = torch.tensor([[256, 256, 100, 101, 102, 103, 104, 0, 255]])
    here = ngram_hashes(history, 3, 4096).tolist()
    code = ("import torch; from neatlm.nn.blt.hashing import ngram_hashes; "
            "print(ngram_hashes(torch.tensor([[256, 256, 100, 101, 102, 103, 104, 0, 255]]), 3, 4096).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert json.loads(out.stdout) == here
    assert len(set(here[0])) == len(here[0])                   # distinct trigrams, distinct buckets here


def tiny_blt(**blt) -> BLTModel:
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 2
    b = cfg.blt
    b.enabled, b.entropy_dim, b.entropy_layers, b.entropy_heads, b.entropy_window = True, 16, 1, 2, 8
    b.local_dim, b.local_heads, b.local_window, b.max_patch, b.hash_buckets = 16, 2, 8, 5, 64
    b.threshold = 5.545  # about half the bytes of an untrained entropy model (H near log 256)
    for k, v in blt.items():
        setattr(b, k, v)
    validate(cfg)
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("patcher", ["entropy", "monotonic", "stride"])
def test_split_anywhere_equals_whole(patcher):
    model = tiny_blt(patcher=patcher, threshold={"entropy": 5.545, "monotonic": 0.0, "stride": 0.0}[patcher])
    model.eval()
    x = torch.randint(0, 256, (3, 47), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(x).logits
        for cuts in ([1], [20], [3, 4, 30], list(range(5, 47, 6))):
            state, pieces = None, []
            for a, b in zip([0, *cuts], [*cuts, 47]):
                out = model(x[:, a:b], state)
                state, _ = out.state, pieces.append(out.logits)
            assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-5), cuts


def test_one_byte_at_a_time_equals_whole():
    model = tiny_blt()
    model.eval()
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, state, steps = model(x).logits, None, []
        for t in range(30):
            out = model(x[:, t:t + 1], state)
            state, _ = out.state, steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5)


def test_changing_a_byte_changes_no_earlier_prediction():
    model = tiny_blt()
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(x).logits
        for t in (0, 9, 23, 39):
            y = x.clone()
            y[:, t] = (y[:, t] + 77) % 256
            diff = (model(y).logits - base).abs().amax(dim=-1)
            assert t == 0 or diff[:, :t].max() == 0, t
            assert diff[:, t].max() > 0


def test_without_carry_the_outputs_are_the_same():
    model = tiny_blt()
    x = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        carried = model(x)
        free = model(x, carry=False)
    assert free.state is None
    assert torch.allclose(carried.logits, free.logits, atol=1e-6)


def test_every_trainable_parameter_learns_and_the_entropy_model_is_frozen():
    model = tiny_blt()
    x = torch.randint(0, 256, (3, 41), generator=torch.Generator().manual_seed(6))
    out = model(x[:, :-1], carry=False)
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if name.startswith("entropy."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_match_central_differences():
    model = tiny_blt(hash_max_n=3)
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(7))
    report = check_gradients(model, x[:, :-1], x[:, 1:], samples=2, tolerance=1e-5, seed=0)
    assert report.ok, report.table()


def test_state_survives_a_checkpoint_round_trip():
    model = tiny_blt()
    model.eval()
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        first = model(x[:, :13])
        structure, tensors = flatten_state(first.state)
        state = unflatten_state(json.loads(json.dumps(structure)), tensors)
        assert isinstance(state.cursor, PatchCursor)
        assert torch.allclose(model(x[:, 13:], state).logits, model(x).logits[:, 13:], atol=1e-5)


def test_bad_blt_values_are_one_line_errors():
    for key, value, words in (("threshold", math.nan, "blt.threshold"), ("local_heads", 3, "blt.local_heads"),
                              ("max_patch", 0, "blt.max_patch"), ("target_patch_size", 20.0, "blt.target_patch_size")):
        cfg = Config()
        cfg.blt.enabled = True
        setattr(cfg.blt, key, value)
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            validate(cfg)


# ---------------------------------------------------------------------- runs and the CLI

def blt_overrides(entropy_run: Path) -> list[str]:
    return ["--set", "blt.enabled=true", "--set", f"blt.entropy_run={entropy_run}", "--set", "blt.local_dim=16",
            "--set", "blt.local_heads=2", "--set", "blt.local_window=16", "--set", "blt.hash_buckets=64",
            "--set", "blt.target_patch_size=3", "--set", "blt.max_patch=6"]


@pytest.fixture(scope="module")
def entropy_run(tmp_path_factory) -> Path:
    from conftest import write_corpus
    root = tmp_path_factory.mktemp("blt")
    corpus = write_corpus(root / "corpus")
    cfg = small_config(corpus, root / "entropy", steps=6)
    cfg.model.window = 16
    Trainer(cfg).train()
    return root / "entropy"


def test_missing_entropy_run_says_how_to_make_it(tmp_path, corpus_dir, capsys):
    code = main(["train", "--set", "blt.enabled=true", "--set", f"blt.entropy_run={tmp_path / 'nope'}",
                 "--set", f"data.path={corpus_dir}", "--set", f"train.run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "blt.entropy_run" in err and "neat train --preset blt-entropy" in err


def test_entropy_run_must_be_a_windowed_byte_model(tmp_path, corpus_dir, capsys):
    full = small_config(corpus_dir, tmp_path / "full", steps=1)
    Trainer(full).train()
    code = main(["train", "--set", "blt.enabled=true", "--set", f"blt.entropy_run={tmp_path / 'full'}",
                 "--set", f"data.path={corpus_dir}", "--set", f"train.run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.window = 0" in err and len(err.splitlines()) == 1


def test_a_blt_run_trains_resumes_generates_and_evaluates(entropy_run, tmp_path, capsys):
    corpus = entropy_run.parent / "corpus"
    run = tmp_path / "blt"
    common = ["--set", f"data.path={corpus}", "--set", "model.dim=32", "--set", "model.n_layers=2",
              "--set", "model.n_heads=2", "--set", "model.context=64", "--set", "train.seq_len=32",
              "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.precision=fp32",
              "--set", "eval.batches=2", *blt_overrides(entropy_run)]
    assert main(["train", *common, "--set", f"train.run_dir={run}", "--set", "train.steps=4",
                 "--set", "train.save_every=2"]) == 0
    saved = (run / "config.toml").read_text()
    cfg_threshold = [line for line in saved.splitlines() if line.startswith("threshold")][0]
    assert float(cfg_threshold.split("=")[1]) != 2.0              # measured from the target patch size
    assert "entropy_window = 16" in saved                          # the entropy model's shape recorded
    assert main(["train", "--resume", str(run), "--set", "train.steps=6"]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--prompt", "def ", "--max-bytes", "20"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", "--run", str(run)]) == 0


def test_trains_under_bf16_autocast_with_and_without_carry():
    model = tiny_blt()
    x = torch.randint(0, 256, (3, 41), generator=torch.Generator().manual_seed(9))
    for carry in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[:, :-1], carry=carry)
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        assert math.isfinite(loss.item())
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for n, p in model.named_parameters() if p.requires_grad)


def test_generation_steps_the_global_model_once_per_patch():
    from neatlm.nn.model import generate
    model = tiny_blt()
    prompt = torch.tensor(list(b"def f(x):"))
    out = generate(model, prompt, 25, temperature=1.0, generator=torch.Generator().manual_seed(0))
    text = torch.cat((prompt, out))[None]
    with torch.no_grad():
        _, ends, _, _ = model.patches(text)
        state, seen = None, []
        for t in range(text.shape[1]):            # as generation reads: one byte per call
            state = model(text[:, t:t + 1], state).state
            seen.append(int(state.patches_seen))
    # bos at the first byte, then one global step exactly where a patch completes
    steps = torch.diff(torch.tensor([0, *seen]))
    assert steps[0] == 1 + int(ends[0, 0])
    assert torch.equal(steps[1:], ends[0, 1:].long())


def test_padding_groups_cover_every_row_once_and_cut_where_it_pays():
    from neatlm.nn.blt.model import padding_groups
    lengths = [55, 43, 70, 57, 54, 63, 66, 53, 68, 50, 83, 92, 52, 62, 65, 61]
    groups = padding_groups(lengths, overhead=60.0)
    assert sorted(i for g in groups for i in g) == list(range(16))
    cost = sum(len(g) * max(lengths[i] for i in g) for g in groups) + 60.0 * len(groups)
    assert 1 < len(groups) < 16 and cost < 16 * 92 + 60.0
    assert padding_groups([5, 5, 5], overhead=1.0) == [[0, 1, 2]]          # equal rows: one call
    assert len(padding_groups(lengths, overhead=1e9)) == 1                 # calls too dear: one call


def test_grouped_global_batches_equal_one_padded_batch():
    from neatlm.nn.blt.model import padding_groups
    model = tiny_blt()
    x = torch.randint(0, 256, (8, 60), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        model.settings.threshold = float(torch.quantile(entropy_of(model.entropy(x).logits), 0.7))
        done = model.patches(x)[1].sum(1)
        assert len(padding_groups((1 + done).tolist(), float(done.float().mean()) + 1)) > 1
        grouped = model(x, carry=False).logits
        carried = model(x).logits                 # rows apart, each with its own global state
    assert torch.allclose(grouped, carried, atol=1e-5)


def test_a_global_model_with_test_time_memory_carries_state_exactly():
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.window = 32, 1, 2, 8
    cfg.memory.enabled, cfg.memory.heads, cfg.memory.chunk_size = True, 2, 4
    b = cfg.blt
    b.enabled, b.entropy_dim, b.entropy_layers, b.entropy_heads, b.entropy_window = True, 16, 1, 2, 8
    b.local_dim, b.local_heads, b.local_window, b.max_patch, b.hash_buckets = 16, 2, 8, 3, 64
    b.patcher, b.stride = "stride", 2
    validate(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        whole = model(x)
        state, pieces = None, []
        for a, c in ((0, 7), (7, 8), (8, 30), (30, 41)):
            out = model(x[:, a:c], state)
            state, _ = out.state, pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, dim=1), whole.logits, atol=1e-5)
    assert any(k.startswith("ttl/") for k in model(x, ttl=TTLControl(collect_stats=True)).stats)
