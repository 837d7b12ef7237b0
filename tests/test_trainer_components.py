"""The trainer optimises through the coordinator: components, checkpointing and the guard from config."""

import pytest
import torch

from conftest import small_config
from neatlm.cli import main
from neatlm.config import ConfigError, apply_overrides, load_config
from neatlm.data.corpus import BatchSampler
from neatlm.grad.checkpointing import current_policies, measure_activations
from neatlm.nn.loss import lm_loss
from neatlm.train.metrics import read_metrics
from neatlm.train.trainer import Trainer


def with_memory(cfg):
    cfg.memory.enabled, cfg.memory.chunk_size, cfg.model.window = True, 8, 8
    cfg.components = {"memory": {"patterns": ["*.memory.*"], "lr": 1e-3, "optimizer": "adamw", "importance": 0.5},
                      "trunk": {"patterns": ["*"], "exclude": ["*.memory.*"], "optimizer": "muon"}}
    return cfg


def test_components_from_config_get_their_own_metrics_and_resume(corpus_dir, tmp_path):
    cfg = with_memory(small_config(corpus_dir, tmp_path / "r", steps=4, save_every=2, log_every=1))
    trainer = Trainer(cfg)
    assert trainer.coord.names == ["memory", "trunk"]
    trainer.train()
    recs = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert all("grad/memory/norm" in r and "grad/trunk/lr" in r for r in recs)
    assert recs[-1]["grad/memory/lr"] < 1e-3  # its own schedule from its own peak
    resumed = Trainer.resume(tmp_path / "r" / "checkpoints" / "step_0000002")
    resumed.train()
    again = [r["loss"] for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert again == [r["loss"] for r in recs]


def test_component_errors_are_config_errors(corpus_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="components.memory.optimizer = 'lion'"):
        load_config(overrides=["components.memory.patterns=['*.memory.*']", "components.memory.optimizer=lion"])
    argv = ["train", "--set", f"data.path={corpus_dir}", "--set", "components.embed.patterns=['embed.*']",
            "--set", "train.progress=false"]
    assert main(argv) == 2  # every other parameter is an orphan
    err = capsys.readouterr().err
    assert "blocks.0.norm1.weight" in err and err.count("\n") == 1


@pytest.mark.parametrize("setting", ["checkpointing.policy=full", "checkpointing.policy=selective",
                                     "checkpointing.memory_budget_mb=0.05"])
def test_checkpointing_from_config_keeps_the_losses(corpus_dir, tmp_path, setting):
    def run(name, extra):
        cfg = apply_overrides(small_config(corpus_dir, tmp_path / name, steps=2), extra)
        trainer = Trainer(cfg)
        trainer.train()
        return trainer, [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]

    base, base_losses = run("none", [])
    ckpt, losses = run("ckpt", [setting])
    assert ckpt.checkpointing.startswith("checkpointing:") and ckpt.checkpointing != "checkpointing: none"
    assert losses == pytest.approx(base_losses, rel=1e-6, abs=1e-6)
    # the policy is in place and keeps fewer activations than none would on the same batch
    policies = current_policies(ckpt.model)
    assert set(policies) == {"blocks.0", "blocks.1"}
    if "policy=" in setting:
        assert set(policies.values()) == {setting.rpartition("=")[2]}
    x, y = next(ckpt.data.validation(1))

    def step(model):
        return lm_loss(model(x)[0], y)

    assert measure_activations(ckpt.model, step).total < measure_activations(ckpt.model, step, "none").total


def test_budget_probe_leaves_the_training_stream_alone(corpus_dir, tmp_path, monkeypatch):
    cfg = apply_overrides(small_config(corpus_dir, tmp_path / "b", steps=1), ["checkpointing.memory_budget_mb=0.05"])

    def untouchable(self):
        raise AssertionError("the checkpointing probe read a training batch")

    monkeypatch.setattr(BatchSampler, "next", untouchable)
    trainer = Trainer(cfg)
    assert trainer.sampler.position == 0 and current_policies(trainer.model)


def test_guard_rolls_back_and_training_continues(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "g", steps=4)
    cfg.guard.backup_every = 1
    trainer = Trainer(cfg)
    trainer.train(until_step=2)
    good = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    original = trainer.model.embed.forward
    trainer.model.embed.forward = lambda idx: original(idx) * float("nan")  # one poisoned step
    loss, stats = trainer.train_step(log=True)
    trainer.model.embed.forward = original
    assert stats["grad/all/nonfinite"] == 1.0
    assert all(torch.equal(p, good[n]) for n, p in trainer.model.named_parameters())
    assert trainer.coord.lr("all") < cfg.train.lr
    trainer.train()
    assert trainer.step == 4
