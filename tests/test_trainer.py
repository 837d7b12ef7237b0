import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import small_config
from neatlm.cli import main
from neatlm import hardware
from neatlm.errors import CheckpointError, DataError
from neatlm.train import checkpoint as ckpt
from neatlm.train.metrics import read_metrics
from neatlm.train.trainer import RunDirectoryInUse, Trainer


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_resume_is_bit_exact(corpus_dir, tmp_path):
    whole = Trainer(small_config(corpus_dir, tmp_path / "whole"))
    whole.train()
    split = Trainer(small_config(corpus_dir, tmp_path / "split"))
    split.train(until_step=3)  # stops and checkpoints at step 3 as a crash would leave it
    del split
    resumed = Trainer.resume(tmp_path / "split")
    assert resumed.step == 3
    resumed.train()
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert list(b) == list(range(1, 9))  # records are not duplicated by the resume
    assert a == b  # bit for bit
    for (n, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n


def test_checkpoint_layout_and_keep_last(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "r", save_every=2, keep_last=2)
    Trainer(cfg).train()
    found = ckpt.list_checkpoints(tmp_path / "r")
    assert [p.name for p in found] == ["step_0000006", "step_0000008"]
    last = found[-1]
    assert {p.name for p in last.iterdir()} == {"model.safetensors", "optimizer.pt", "extra.safetensors", "state.json"}
    torch.load(last / "optimizer.pt", weights_only=True)
    state = json.loads((last / "state.json").read_text())
    assert state["schema"] == ckpt.SCHEMA and state["step"] == 8
    assert state["hardware"] == {"device": "cpu", "precision": "fp32"} and state["config"]["train"]["steps"] == 8
    states = state["states"]
    assert states["sampler"] == {"position": 8} and states["progress"]["step"] == 8
    assert states["rng"]["torch"] == {"__tensor__": "rng/torch"}  # tensors live in extra.safetensors
    assert states["carry"]["structure"] == {"value": None}
    assert set(state["files"]) == {"model.safetensors", "optimizer.pt", "extra.safetensors"}
    assert (tmp_path / "r" / "config.toml").is_file()


@pytest.mark.parametrize("writer", ["torch.save", "save_file"])
def test_full_disk_during_save_keeps_previous_checkpoint(corpus_dir, tmp_path, monkeypatch, writer):
    trainer = Trainer(small_config(corpus_dir, tmp_path / "r"))
    trainer.train(until_step=4)
    good = ckpt.list_checkpoints(tmp_path / "r")[-1]
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real = ckpt.torch.save if writer == "torch.save" else ckpt.save_file

    def full_disk(obj, f, *args, **kwargs):  # writes part of the file, then the disk is full
        real(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if writer == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", full_disk)
    else:
        monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(CheckpointError) as err:
        trainer.train(until_step=6)
    monkeypatch.undo()
    message = str(err.value)
    assert "No space left on device" in message and str(good) in message and "--resume" in message
    assert "\n" not in message
    assert ckpt.list_checkpoints(tmp_path / "r") == [good]
    assert [p.name for p in ckpt.checkpoint_root(tmp_path / "r").iterdir()] == [good.name]  # no partial dir
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert Trainer.resume(tmp_path / "r").step == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "state"])
def test_corrupted_checkpoint_is_named_and_previous_stays_loadable(corpus_dir, tmp_path, damage):
    Trainer(small_config(corpus_dir, tmp_path / "r")).train()  # saves at 4 and 8
    first, last = ckpt.list_checkpoints(tmp_path / "r")
    target = last / ("state.json" if damage == "state" else "model.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        target.write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        Trainer.resume(tmp_path / "r")
    assert str(target) in str(err.value) and str(first) in str(err.value)
    assert Trainer.resume(first).step == 4


def test_cli_train_generate_eval(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--set", f"data.path={corpus_dir}", "--set", "model.dim=32", "--set", "model.n_layers=1",
                 "--set", "model.n_heads=2", "--set", "train.steps=3", "--set", "train.batch_size=2",
                 "--set", "train.seq_len=32", "--set", "eval.batches=1", "--set", "train.progress=false",
                 "--set", "data.val_fraction=0.2", "--run-dir", str(run)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 3 and "val_bpb" in out
    assert main(["generate", "--run", str(run), "--prompt", "def ", "--max-bytes", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text.encode("utf-8", errors="replace")) >= 20
    assert main(["eval", "--run", str(run), "--batches", "1"]) == 0
    assert "val_bpb" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--set", "model.dim=abc"], "model.dim = 'abc': expected an integer"),
    (["train", "--set", "train.steps=0"], "train.steps = 0: must be >= 1"),
    (["train", "--preset", "nope"], "unknown preset"),
    (["train", "--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
    (["train", "--set", "data.path=/nonexistent/corpus"], "data.path = '/nonexistent/corpus': no such file"),
    (["train", "--resume", "/nonexistent/run"], "/nonexistent/run: no such run"),
    (["generate", "--run", "/nonexistent/run"], "/nonexistent/run: no such run"),
    (["eval", "--run", "/nonexistent/run"], "/nonexistent/run: no such run"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_usage_errors_exit_2(capsys):
    assert main(["train", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "--bogus" in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_plot_writes_pngs(corpus_dir, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(small_config(corpus_dir, run)).train()
    assert main(["plot", str(run)]) == 0
    names = {p.name for p in (run / "plots").iterdir()}
    assert {"loss.png", "bits_per_byte.png", "grad_norm.png"} <= names
    assert all((run / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_new_run_into_an_existing_run_dir_is_refused(corpus_dir, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(small_config(corpus_dir, run)).train(until_step=1)
    with pytest.raises(RunDirectoryInUse, match=f"continue it with `neat train --resume {run}` or choose another"):
        Trainer(small_config(corpus_dir, run))
    assert main(["train", "--set", f"data.path={corpus_dir}", "--set", "train.progress=false", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "--run-dir" in err
    shutil.rmtree(run / "checkpoints")  # metrics but nothing to resume from
    with pytest.raises(RunDirectoryInUse, match="wrote no checkpoint: choose another --run-dir, or delete"):
        Trainer(small_config(corpus_dir, run))
    (run / "metrics.jsonl").unlink()
    Trainer(small_config(corpus_dir, run))  # config.toml alone is not a run


def test_without_validation_data_training_skips_evaluation(corpus_dir, tmp_path, capsys):
    cfg = small_config(corpus_dir, tmp_path / "r", steps=4)
    cfg.data.val_fraction = 0.0
    trainer = Trainer(cfg)
    assert not trainer.data.has_validation
    result = trainer.train()
    assert "loss" in result and not any(k.startswith("val_") for r in read_metrics(tmp_path / "r") for k in r)
    assert main(["eval", "--run", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no validation data (data.val_fraction = 0.0)" in err


def test_too_little_validation_data_is_refused_at_load(tmp_path):
    one = tmp_path / "one.txt"
    one.write_bytes(bytes(range(256)) * 8)
    cfg = small_config(one, tmp_path / "r")
    cfg.data.val_fraction = 0.01  # 20 bytes: less than one window of seq_len + 1 = 33
    with pytest.raises(DataError, match="holds out 20 bytes .* fewer than one validation window"):
        Trainer(cfg)


def test_after_a_resume_the_records_have_the_keys_of_an_uninterrupted_run(corpus_dir, tmp_path):
    def cfg(run):
        return small_config(corpus_dir, tmp_path / run, steps=8, log_every=3, save_every=3)

    Trainer(cfg("whole")).train()
    Trainer(cfg("split")).train(until_step=6)
    Trainer.resume(tmp_path / "split").train()
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in whole if "loss" in r] == [1, 4, 7, 8]  # the schedule, and the last step
    assert [(r["step"], sorted(r)) for r in whole] == [(r["step"], sorted(r)) for r in split]
    assert all("grad/all/cos_prev" in r for r in whole if "loss" in r and r["step"] > 1)
    for a, b in zip(whole, split):
        assert a.get("loss") == b.get("loss") and a.get("grad/all/cos_prev") == b.get("grad/all/cos_prev")


def test_resume_reuses_the_precision_the_run_measured(corpus_dir, tmp_path, monkeypatch):
    """precision = "auto" measures; a resume must compute as the run did, whatever it measures now."""
    timings = {"fp32": 1.0, "bf16": 5.0}  # as on most CPUs: fp32 is faster
    monkeypatch.setattr(hardware, "probe_timings", lambda device, shape, precisions: {p: timings[p] for p in precisions})

    def cfg(run):
        c = small_config(corpus_dir, tmp_path / run, steps=6, save_every=3)
        c.train.precision = "auto"
        return c

    whole = Trainer(cfg("whole"))
    assert whole.hw.precision == "fp32" and whole.hw.timings
    whole.train()
    Trainer(cfg("split")).train(until_step=3)
    timings["bf16"] = 0.1  # the machine is busy differently now: bf16 would win this measurement
    resumed = Trainer.resume(tmp_path / "split")
    assert resumed.hw.precision == "fp32" and not resumed.hw.timings and "as measured" in resumed.hw.describe()
    resumed.train()
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    explicit = Trainer.resume(tmp_path / "split", ["train.precision=bf16"])  # an explicit choice still wins
    assert explicit.hw.precision == "bf16"
