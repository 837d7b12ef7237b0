import pytest
import torch
from torch import nn

from conftest import small_config
from neatlm.cli import main
from neatlm.config import preset_names
from neatlm.grad.check import check_gradients
from neatlm.nn.model import ModelOutput, NeatLM
from neatlm.train.trainer import Trainer


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return 1.5 * g  # deliberately wrong


class Toy(nn.Module):
    def __init__(self, wrong: bool = False, detached: bool = False):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.lin = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.wrong, self.detached = wrong, detached

    def forward(self, idx, state=None):
        h = self.embed(idx)
        h = torch.tanh(self.lin(_WrongBackward.apply(h) if self.wrong else h))
        if self.detached:  # a detach on a path the loss really depends on
            h = h + self.unused(h).detach()
        return ModelOutput(h @ self.embed.weight.T, None, None, {})


def test_checker_finds_wrong_and_missing_gradients():
    x = torch.randint(0, 16, (2, 9))
    torch.manual_seed(0)
    detached = {t.name: t for t in check_gradients(Toy(detached=True), x[:, :-1], x[:, 1:]).tensors}
    assert detached["unused.weight"].missing and detached["unused.bias"].missing
    assert not detached["embed.weight"].ok and not detached["embed.weight"].missing  # numeric sees the cut path
    wrong = check_gradients(Toy(wrong=True), x[:, :-1], x[:, 1:])
    assert "embed.weight" in [t.name for t in wrong.failures]
    good = check_gradients(Toy(), x[:, :-1], x[:, 1:])
    assert [t.name for t in good.failures] == ["unused.weight", "unused.bias"]  # never used: no gradient


def test_whole_model_passes_and_model_is_untouched(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "r")
    model = NeatLM(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (2, 17))
    report = check_gradients(model, x[:, :-1], x[:, 1:], samples=3)
    assert report.ok, report.table()
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())


def test_every_parameter_changes_after_training(corpus_dir, tmp_path):
    """The "A B C -> B C D" check: a few real steps move every parameter tensor."""
    trainer = Trainer(small_config(corpus_dir, tmp_path / "r", steps=3))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(before[n], p)]
    assert unchanged == []


def test_cli_gradcheck_exit_codes(capsys, monkeypatch):
    argv = ["gradcheck", "--set", "model.dim=16", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
            "--samples", "2", "--seq-len", "8"]
    assert main(argv) == 0
    assert "all gradients present and correct" in capsys.readouterr().out
    from neatlm.nn.model import SwiGLU

    original = SwiGLU.forward
    monkeypatch.setattr(SwiGLU, "forward", lambda self, x: original(self, _WrongBackward.apply(x)))
    assert main(argv) == 1  # a wrong backward anywhere in the model fails the command
    assert "WRONG" in capsys.readouterr().out


@pytest.mark.parametrize("preset", preset_names())
def test_gradcheck_passes_on_every_preset(preset, capsys):
    """`neat gradcheck --preset P` at reduced width: every component the preset uses is checked."""
    argv = ["gradcheck", "--preset", preset, "--set", "model.dim=16", "--set", "model.n_layers=1",
            "--set", "model.n_heads=2", "--set", "memory.chunk_size=4", "--samples", "2", "--seq-len", "12"]
    assert main(argv) == 0, capsys.readouterr().out
