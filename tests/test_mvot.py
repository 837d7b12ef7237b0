"""MVoT: the grid-world task, the visual codebook, the modality mask, the token-discrepancy loss,
causality over image spans, and the commands (train the codebook, train, eval, generate PNGs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neatlm.cli import main
from neatlm.config import ConfigError, load_config
from neatlm.data.gridworld import (AGENT, CELL_PX, GridSettings, make_example, render, renderings, split_of,
                                   walk)
from neatlm.data.mvot import MVoTTask, encode_states, example_tokens
from neatlm.data.source import build_data
from neatlm.errors import CheckpointError
from neatlm.nn.loss import IGNORE_INDEX, lm_loss
from neatlm.nn.model import NeatLM
from neatlm.nn.mvot import (BYTES, MVoTLoss, TokenLayout, allowed_next, discrepancy, discrepancy_costs,
                            generate_masked, mask_logits)
from neatlm.nn.vq import VQVAE, images_to_tensor, load_vq, save_vq, tensor_to_images
from neatlm.train.png import read_png, write_png
from neatlm.train.vq import training_renders

SETTINGS = GridSettings()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the task


def test_examples_are_deterministic_per_seed_and_split_by_map():
    for split in ("train", "validation", "test"):
        a = [make_example(split, i, SETTINGS) for i in range(30)]
        assert a == [make_example(split, i, SETTINGS) for i in range(30)]     # a function of (split, i)
        assert all(split_of(e.grid) == split for e in a)                        # held-out maps stay held out
        assert len({e.grid for e in a}) > 25                                    # and they differ
    train = {make_example("train", i, SETTINGS).grid for i in range(300)}
    test = {make_example("test", i, SETTINGS).grid for i in range(100)}
    assert not train & test
    assert make_example("train", 0, GridSettings(max_moves=4)) != make_example("train", 0, SETTINGS)


def test_walks_are_faithful_and_answers_balanced():
    examples = [make_example("train", i, SETTINGS) for i in range(200)]
    for e in examples:
        path, outcome = walk(e.grid, e.start, e.moves)
        assert tuple(path) == e.path and outcome == e.outcome                   # the walk ends where it is told
        assert SETTINGS.min_moves <= len(e.moves) <= SETTINGS.max_moves
        assert e.grid[e.path[-1][0]][e.path[-1][1]] == ("G" if e.outcome == "goal" else "H")
    goals = sum(e.outcome == "goal" for e in examples)
    assert 70 < goals < 130                                                     # about half
    assert {len(e.moves) for e in examples} == set(range(SETTINGS.min_moves, SETTINGS.max_moves + 1))


def test_rendering_shows_the_agent_where_it_is():
    e = make_example("train", 3, SETTINGS)
    images = renderings(e)
    assert len(images) == len(e.moves) + 1
    for img, (r, c) in zip(images, e.states()):
        assert img.shape == (e.size * CELL_PX, e.size * CELL_PX, 3) and img.dtype == np.uint8
        red = np.all(img == AGENT, axis=-1)
        assert red.sum() == 4 and red[r * CELL_PX + 1, c * CELL_PX + 1]
    assert not np.all(render(e.grid, None) == AGENT, axis=-1).any()


# ----------------------------------------------------------------------------- the codebook


@pytest.fixture(scope="module")
def trained_vq() -> VQVAE:
    """A codebook trained for a few seconds: enough for every cell kind to get its own code."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    vq = VQVAE(codebook=16, code_dim=8, channels=16)
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for step in range(600):                    # the agent's cell is drawn right from about step 500
        x = training_renders(rng, 4 + step % 2, 16)
        out = vq(x)
        loss = F.mse_loss(out.recon, x) + out.commitment
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vq.eval()


def test_vq_round_trip_on_a_rendering(trained_vq: VQVAE, tmp_path: Path):
    e = make_example("validation", 0, SETTINGS)
    x = images_to_tensor(renderings(e))
    with torch.no_grad():
        codes = trained_vq.encode(x)
        recon = trained_vq.decode(codes)
    assert codes.shape == (x.shape[0], e.size, e.size)                          # one code per cell
    assert F.mse_loss(recon.clamp(0, 1), x).item() < 0.01
    bare = render(e.grid, None).astype(int)                                     # the map without the agent

    def agent_cells(images: torch.Tensor) -> list[tuple[int, int]]:
        """The cell where each image differs most from the bare map."""
        out = []
        for img in tensor_to_images(images).numpy().astype(int):
            change = np.abs(img - bare).sum(-1).reshape(e.size, CELL_PX, e.size, CELL_PX).sum((1, 3))
            out.append(tuple(int(i) for i in np.unravel_index(change.argmax(), change.shape)))
        return out

    assert agent_cells(recon) == e.states()                                     # the agent is where it was
    with torch.no_grad():   # and stays there through a second round trip (codes may be near-duplicates)
        again = trained_vq.decode(trained_vq.encode(recon.clamp(0, 1)))
    assert agent_cells(again) == e.states()
    torch.testing.assert_close(again, recon, atol=0.1, rtol=0)
    save_vq(trained_vq, tmp_path, {"step": 600})
    again = load_vq(tmp_path)
    assert torch.equal(again.encode(x), codes)


def test_vq_every_parameter_gets_a_gradient_and_eval_leaves_the_codebook():
    vq = VQVAE(codebook=8, code_dim=4, channels=8)
    x = training_renders(np.random.default_rng(1), 4, 8)
    out = vq(x)
    (F.mse_loss(out.recon, x) + out.commitment).backward()
    for name, p in vq.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    vq.eval()
    before = vq.codebook.clone()
    vq(x)
    assert torch.equal(before, vq.codebook)


def test_vq_files_are_checked(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no vq.json"):
        load_vq(tmp_path)
    save_vq(VQVAE(codebook=8, code_dim=4, channels=8), tmp_path, {})
    (tmp_path / "vq.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_vq(tmp_path)


# ----------------------------------------------------------------------------- sequences and the mask


def _task(vq: VQVAE, thoughts: bool = True) -> MVoTTask:
    layout = TokenLayout(vq.size) if thoughts else None
    return MVoTTask(SETTINGS, layout, vq if thoughts else None, 248 if thoughts else 72)


def _spans_ok(tokens: list[int], layout: TokenLayout) -> bool:
    """No byte inside an image span, no image token outside one, no nested or stray markers."""
    inside = False
    for t in tokens:
        if t == layout.boi:
            if inside:
                return False
            inside = True
        elif t == layout.eoi:
            if not inside:
                return False
            inside = False
        elif layout.is_code(torch.tensor(t)):
            if not inside:
                return False
        elif inside:                                                            # a byte inside an image
            return False
    return True


def test_sequences_hold_the_thoughts_and_score_only_what_the_model_writes():
    vq = VQVAE(codebook=16, code_dim=4, channels=8)
    e = make_example("train", 5, SETTINGS)
    codes = encode_states(vq, [e])[0]
    layout = TokenLayout(16)
    tokens, prompt = example_tokens(e, codes, layout)
    assert _spans_ok(tokens, layout)
    assert tokens.count(layout.boi) == len(e.moves) + 1 == tokens.count(layout.eoi)
    assert tokens[prompt - 1] == layout.eoi                                      # the prompt ends with the start image
    assert bytes(t for t in tokens[:prompt] if t < BYTES).decode().startswith(f"map {e.size}x{e.size}\n")
    assert bytes(tokens[-13:]).decode() == f"answer: {e.outcome}\n"[-13:]
    x, y = _task(vq).batch("train", [5, 6])
    assert (y[0] != IGNORE_INDEX).sum() == len(tokens) - prompt
    text, p_text = example_tokens(e, None, None)
    assert bytes(text[p_text:]).decode() == f"answer: {e.outcome}\n" and max(text) < BYTES


def test_the_mask_allows_every_training_target_and_nothing_across_modalities():
    vq = VQVAE(codebook=16, code_dim=4, channels=8)
    layout = TokenLayout(16)
    x, y = _task(vq).batch("train", list(range(16)))
    ok = allowed_next(x, layout)
    scored = y != IGNORE_INDEX
    assert ok[scored].gather(-1, y[scored][:, None]).all()                       # masked CE stays finite
    v = torch.arange(layout.vocab_size)
    after_image = allowed_next(torch.tensor([layout.boi, BYTES + 3]), layout)
    after_text = allowed_next(torch.tensor([ord("R"), layout.eoi]), layout)
    assert torch.equal(after_image[0], layout.is_code(v) | (v == layout.eoi))
    assert torch.equal(after_image[0], after_image[1])
    assert torch.equal(after_text[0], (v < BYTES) | (v == layout.boi)) and torch.equal(after_text[0], after_text[1])


def _small_model(vocab: int, seed: int = 0) -> NeatLM:
    cfg = load_config("mvot", overrides=["model.dim=32", "model.n_layers=2", "model.n_heads=2",
                                         f"model.vocab_size={vocab}", f"vq.codebook={vocab - 258}"])
    torch.manual_seed(seed)
    return NeatLM(cfg)


def test_generation_under_the_mask_never_mixes_modalities():
    """An untrained model sampled at temperature 1 proposes anything; the mask must hold anyway."""
    layout = TokenLayout(16)
    model = _small_model(layout.vocab_size)
    with torch.no_grad():                  # push the raw model towards the wrong modality everywhere
        model.embed.weight[:BYTES] += 0.5 * model.embed.weight[layout.eoi]
    vq = VQVAE(codebook=16, code_dim=4, channels=8)
    example = make_example("test", 0, SETTINGS)
    tokens, prompt = example_tokens(example, encode_states(vq, [example])[0], layout)
    for seed in range(3):
        out = generate_masked(model, torch.tensor(tokens[:prompt]), layout, 120, stop=lambda t: False,
                              temperature=1.0, generator=torch.Generator().manual_seed(seed))
        assert len(out) == 120 and _spans_ok(tokens[:prompt] + out, layout)
        assert any(t == layout.boi for t in out) or all(t < BYTES for t in out)


def test_causality_holds_over_image_spans():
    """Changing token t (inside an image span) changes no masked logit before t."""
    vq = VQVAE(codebook=16, code_dim=4, channels=8)
    layout = TokenLayout(16)
    x, _ = _task(vq).batch("train", [0])
    model = _small_model(layout.vocab_size).eval()
    codes = layout.is_code(x[0]).nonzero().flatten()
    t = int(codes[len(codes) // 2])
    x2 = x.clone()
    x2[0, t] = BYTES + (int(x[0, t]) - BYTES + 1) % 16                            # another image token
    with torch.no_grad():
        a = mask_logits(model(x).logits, x, layout)
        b = mask_logits(model(x2).logits, x2, layout)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t:], b[:, t:])
    x3 = x.clone()
    x3[0, t] = layout.eoi                                                        # even a modality switch at t
    with torch.no_grad():
        c = mask_logits(model(x3).logits, x3, layout)
    assert torch.equal(a[:, :t], c[:, :t])


# ----------------------------------------------------------------------------- the discrepancy loss


def _line_codebook(k: int = 6) -> torch.Tensor:
    """Codes on a line at 0, 1, ..., k-1: distance grows with |i - j|."""
    e = torch.arange(k, dtype=torch.float64)[:, None] * torch.ones(1, 3, dtype=torch.float64)
    return (e[:, None, :] - e[None, :, :]).pow(2).mean(-1)


def test_discrepancy_is_zero_at_the_target_and_grows_with_codebook_distance():
    layout = TokenLayout(6)
    costs = discrepancy_costs(_line_codebook())
    target = torch.tensor([BYTES + 2])
    values = []
    for j in range(6):
        logits = torch.full((1, layout.vocab_size), float("-inf"), dtype=torch.float64)
        logits[0, BYTES + j] = 0.0                                               # all mass on code j
        values.append(discrepancy(logits, target, costs, layout).item())
    assert values[2] == 0.0
    assert values[3] < values[4] < values[5] and values[1] < values[0]           # further codes cost more
    assert values[1] == pytest.approx(values[3]) and values[0] == pytest.approx(values[4])
    logits = torch.full((1, layout.vocab_size), float("-inf"), dtype=torch.float64)
    logits[0, layout.eoi] = 0.0                                                   # ending the image early: the worst
    assert discrepancy(logits, target, costs, layout).item() == pytest.approx(costs.max().item())
    assert costs[:, :6].diagonal().abs().max() == 0


def test_discrepancy_gradient_matches_its_formula_and_gradcheck():
    torch.manual_seed(0)
    layout = TokenLayout(6)
    costs = discrepancy_costs(_line_codebook())
    inputs = torch.tensor([layout.boi, BYTES + 1, BYTES + 4, BYTES + 0])
    targets = torch.tensor([BYTES + 1, BYTES + 4, BYTES + 0, BYTES + 5])
    raw = torch.randn(4, layout.vocab_size, dtype=torch.float64, requires_grad=True)

    def f(z):
        return discrepancy(mask_logits(z, inputs, layout), targets, costs, layout).sum()

    assert torch.autograd.gradcheck(f, (raw,))
    f(raw).backward()
    p = F.softmax(mask_logits(raw.detach(), inputs, layout), -1)
    cost = torch.zeros_like(p)
    cost[:, BYTES:BYTES + 6] = costs[targets - BYTES, :6]
    cost[:, layout.eoi] = costs[targets - BYTES, 6]
    expected = p * (cost - (p * cost).sum(-1, keepdim=True))                    # p_j (S_j - sum_k p_k S_k)
    torch.testing.assert_close(raw.grad, expected)
    assert raw.grad[:, :BYTES].abs().max() == 0                                  # masked logits get nothing


def test_mvot_loss_is_masked_cross_entropy_plus_weighted_discrepancy():
    torch.manual_seed(1)
    layout = TokenLayout(6)
    dist = _line_codebook().float()
    inputs = torch.tensor([ord("R"), layout.boi, BYTES + 2, BYTES + 3, layout.eoi])
    targets = torch.tensor([layout.boi, BYTES + 2, BYTES + 3, layout.eoi, ord("\n")])
    logits = torch.randn(5, layout.vocab_size)
    masked = mask_logits(logits, inputs, layout)
    ce = lm_loss(masked, targets, reduction="sum")
    assert torch.allclose(MVoTLoss(layout, dist, 0.0)(logits, targets, inputs), ce)
    image = layout.is_code(targets)
    d = discrepancy(masked[image], targets[image], discrepancy_costs(dist), layout).sum()
    assert torch.allclose(MVoTLoss(layout, dist, 0.5)(logits, targets, inputs), ce + 0.5 * d)
    assert ce < lm_loss(logits, targets, reduction="sum")                         # the mask only removes wrong mass
    text_logits = torch.randn(3, 256)
    text_targets = torch.tensor([1, 2, IGNORE_INDEX])
    assert torch.allclose(MVoTLoss(None)(text_logits, text_targets, text_targets),
                          lm_loss(text_logits, text_targets, reduction="sum"))


# ----------------------------------------------------------------------------- config, trainer, commands


def test_bad_mvot_configs_name_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match="model.vocab_size = 256: must be 256 \\+ vq.codebook \\+ 2 = 290"):
        load_config("mvot", overrides=["model.vocab_size=256"])
    with pytest.raises(ConfigError, match="mvot.vq_run"):
        load_config("mvot", overrides=["mvot.vq_run="])
    with pytest.raises(ConfigError, match="train.seq_len \\* train.segments = 128: must be >= 244"):
        load_config("mvot", overrides=["train.seq_len=128"])
    with pytest.raises(ConfigError, match="mvot.min_size = 6: must be <= mvot.max_size = 5"):
        load_config("mvot", overrides=["mvot.min_size=6"])
    with pytest.raises(CheckpointError, match="mvot.vq_run ="):
        build_data(load_config("mvot", overrides=[f"mvot.vq_run={tmp_path / 'none'}"]))
    assert main(["train", "--preset", "mvot", "--set", f"mvot.vq_run={tmp_path / 'none'}",
                 "--run-dir", str(tmp_path / "r")]) == 2


def test_commands_end_to_end(tmp_path: Path, capsys):
    """Train a codebook and an MVoT model for a few steps; eval answers; generate writes PNGs."""
    small = ["--set", "train.threads=1", "--set", "train.progress=false", "--set", "train.device=cpu",
             "--set", "train.precision=fp32"]
    vq_dir, run = tmp_path / "vq", tmp_path / "run"
    assert main(["train", "--preset", "mvot-vq", "--run-dir", str(vq_dir), *small, "--set", "train.steps=20",
                 "--set", "train.batch_size=8", "--set", "vq.codebook=8"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"val_mse", "codes_used", "code_perplexity"} <= set(record)
    model = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
             "--set", "vq.codebook=8", "--set", "model.vocab_size=266", "--set", "train.batch_size=2",
             "--set", "eval.batches=1"]
    assert main(["train", "--preset", "mvot", "--run-dir", str(run), *small, *model, "--set", "train.steps=2",
                 "--set", f"mvot.vq_run={vq_dir}"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--task", "mvot", "--examples", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "mvot" and 0 <= result["answer_acc"] <= 1
    assert {"image_token_acc", "image_exact", "forced_answer_acc", "forced_image_acc",
            "forced_changed_acc"} <= set(result)
    assert main(["generate", "--run", str(run), "--example", "1", "--images", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("map ") and "[image 0: the start]" in out
    grid = read_png(tmp_path / "png" / "grid.png")
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert read_png(tmp_path / "png" / "start.png").shape[:2] in ((16, 16), (20, 20))
    assert main(["eval", "--run", str(run)]) == 0                                # validation under the mask: finite
    assert np.isfinite(json.loads(capsys.readouterr().out)["val_loss"])
    text_run = tmp_path / "text"                                                  # the text arm, every logit computed
    assert main(["train", "--preset", "mvot-text", "--run-dir", str(text_run), *small, *model[:6],
                 "--set", "train.batch_size=2", "--set", "train.steps=2", "--set", "train.logits=all"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(text_run), "--task", "mvot", "--examples", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "image_token_acc" not in result and 0 <= result["forced_answer_acc"] <= 1
    assert main(["generate", "--run", str(run), "--prompt", "map"]) == 2           # an MVoT run takes --example
    assert main(["train", "--preset", "mvot-vq", "--run-dir", str(vq_dir), *small]) == 2   # never overwritten


def test_every_model_parameter_gets_a_gradient_from_the_mvot_loss():
    vq = VQVAE(codebook=16, code_dim=4, channels=8)
    layout = TokenLayout(16)
    x, y = _task(vq).batch("train", [0, 1])
    model = _small_model(layout.vocab_size)
    loss = MVoTLoss(layout, vq.distances(), 1.0)(model(x).logits, y, x)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_png_round_trip(tmp_path: Path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(read_png(write_png(tmp_path / "a.png", img)), img)
    with pytest.raises(ValueError):
        write_png(tmp_path / "b.png", img.astype(np.float32))
