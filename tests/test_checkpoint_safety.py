"""A checkpoint is data: loading one never runs code it names, and every defect is one line naming
the file (missing keys, a newer schema, garbage, another model's weights or optimizer state)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import small_config, write_corpus
from neatlm.cli import main
from neatlm.errors import CheckpointError
from neatlm.train import checkpoint as ckpt
from neatlm.train.metrics import read_metrics
from neatlm.train.state_io import unflatten_state
from neatlm.train.trainer import Trainer


def config(root: Path, run: str, **train):
    cfg = small_config(root / "corpus", root / run, steps=4, save_every=2, **train)
    cfg.memory.reset, cfg.model.window = "never", 8  # a carried model state in every checkpoint
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    write_corpus(root / "corpus")
    Trainer(config(root, "run")).train()  # checkpoints at steps 2 and 4
    return root


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run."""
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


def last(run: Path) -> Path:
    return ckpt.list_checkpoints(run)[-1]


def edit_state(ck: Path, fn) -> None:
    doc = json.loads((ck / "state.json").read_text())
    fn(doc)
    (ck / "state.json").write_text(json.dumps(doc))


def reseal(ck: Path, name: str) -> None:
    """Make the manifest match a replaced file, as a careful attacker would."""
    data = (ck / name).read_bytes()
    edit_state(ck, lambda d: d["files"].__setitem__(name, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def one_line_error(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and all(f in message for f in fragments), message


# ----------------------------------------------------------------------------- no code runs

@pytest.mark.parametrize("target, fields", [
    ("os:system", {"command": "touch {marker}"}),
    ("builtins:eval", {"source": "open({marker!r}, 'w')"}),
    ("subprocess:Popen", {"args": "touch {marker}"}),
    ("posix.system", {"command": "touch {marker}"}),
])
def test_a_state_naming_any_other_class_is_refused_and_nothing_runs(tmp_path, target, fields):
    marker = tmp_path / "ran"
    structure = {"list": [{"dataclass": target,
                           "fields": {k: {"value": v.format(marker=str(marker))} for k, v in fields.items()}}]}
    with pytest.raises(CheckpointError) as err:
        unflatten_state(structure, {}, source="state.json")
    one_line_error(err, "state.json", "refusing to build", target)
    assert not marker.exists()


def test_a_hostile_carried_state_in_a_checkpoint_is_refused(run, tmp_path):
    marker = tmp_path / "ran"

    def plant(doc):
        layer = doc["states"]["carry"]["structure"]["list"][0]
        assert layer["dataclass"] == "AttentionState"
        layer["dataclass"], layer["fields"] = "os:system", {"command": {"value": f"touch {marker}"}}

    edit_state(last(run), plant)
    with pytest.raises(CheckpointError) as err:
        Trainer.resume(run)
    one_line_error(err, str(last(run) / "state.json"), "os:system")
    assert not marker.exists()


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_in_optimizer_pt_is_refused(run, tmp_path):
    marker = tmp_path / "ran"
    ck = last(run)
    torch.save({"components": {}, "payload": _RunsCode(marker)}, ck / "optimizer.pt")
    reseal(ck, "optimizer.pt")
    for load in (lambda: Trainer.resume(run), lambda: ckpt.load_checkpoint(run)):
        with pytest.raises(CheckpointError) as err:
            load()
        one_line_error(err, str(ck / "optimizer.pt"), "nothing in it was run")
    assert not marker.exists()


def test_garbage_optimizer_pt_with_a_matching_manifest(run):
    ck = last(run)
    (ck / "optimizer.pt").write_bytes(os.urandom(3000))
    reseal(ck, "optimizer.pt")
    with pytest.raises(CheckpointError) as err:
        Trainer.resume(run)
    one_line_error(err, str(ck / "optimizer.pt"), "cannot be read")


# ----------------------------------------------------------------------------- incomplete or foreign

@pytest.mark.parametrize("path", [("config",), ("step",), ("files",), ("states",), ("states", "sampler"),
                                  ("states", "rng"), ("states", "progress"), ("states", "carry"),
                                  ("states", "sampler", "position"), ("states", "rng", "torch"),
                                  ("states", "progress", "step"), ("states", "carry", "structure"),
                                  ("files", "optimizer.pt")])
def test_a_missing_entry_is_one_line_naming_the_file(run, path):
    def drop(doc):
        for key in path[:-1]:
            doc = doc[key]
        del doc[path[-1]]

    edit_state(last(run), drop)
    with pytest.raises(CheckpointError) as err:
        Trainer.resume(run)
    one_line_error(err, str(last(run) / "state.json"), path[-1])


@pytest.mark.parametrize("schema, fragment", [(99, "newer than this neatlm reads"), ("2", "not a checkpoint schema")])
def test_the_schema_version_is_checked(run, schema, fragment):
    edit_state(last(run), lambda d: d.__setitem__("schema", schema))
    with pytest.raises(CheckpointError) as err:
        ckpt.read_checkpoint(run)
    one_line_error(err, "state.json", fragment)


def test_resume_with_another_model_size_names_the_first_tensor(run):
    with pytest.raises(CheckpointError) as err:
        Trainer.resume(run, ["model.dim=64"])
    one_line_error(err, str(last(run) / "model.safetensors"), "does not match the model of this run",
                   "embed.weight is 256x32 there but 256x64")


@pytest.mark.parametrize("command", [["generate", "--max-bytes", "3"], ["eval", "--batches", "1"]])
def test_eval_and_generate_of_a_checkpoint_that_does_not_fit_its_config(run, command, capsys):
    edit_state(last(run), lambda d: d["config"]["model"].__setitem__("dim", 64))
    assert main([command[0], "--run", str(run), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(last(run) / "model.safetensors") in err and "embed.weight" in err


def test_an_optimizer_state_of_another_model_fails_at_load(run, tmp_path):
    write_corpus(tmp_path / "corpus")
    other = config(tmp_path, "other")
    other.model.dim = 48
    Trainer(other).train(until_step=1)
    ck = last(run)
    shutil.copy(last(tmp_path / "other") / "optimizer.pt", ck / "optimizer.pt")
    reseal(ck, "optimizer.pt")
    with pytest.raises(CheckpointError) as err:
        Trainer.resume(run)
    one_line_error(err, str(ck / "optimizer.pt"), "is (144, 48), the parameter (96, 32)", "another model")


def test_stray_entries_in_checkpoints_do_not_break_listing_resume_or_saving(run):
    root = ckpt.checkpoint_root(run)
    (root / "step_0000099").write_text("a file, not a checkpoint")
    (root / "notes.txt").write_text("")
    (root / ".tmp-step_0000006").write_text("a file where a save puts its directory")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    trainer = Trainer.resume(run, ["train.steps=6"])
    assert trainer.step == 4
    trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000004", "step_0000006"]
    not_a_dir = run.parent / "plain"
    not_a_dir.mkdir()
    (not_a_dir / "checkpoints").write_text("")
    assert ckpt.list_checkpoints(not_a_dir) == []
    with pytest.raises(CheckpointError, match="no checkpoints"):
        ckpt.read_checkpoint(not_a_dir)


# ----------------------------------------------------------------------------- the layout before schema 2

def to_schema_1(ck: Path) -> None:
    """Rewrite a checkpoint in the layout neatlm wrote before schema versions."""
    doc = json.loads((ck / "state.json").read_text())
    extra = ckpt.load_file(str(ck / "extra.safetensors"))
    states = doc["states"]
    encode = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    old = {"config": doc["config"], "sampler_position": states["sampler"]["position"],
           "rng": {"torch": encode(extra["rng/torch"])}, "best_val": states["progress"]["best_val"],
           "device": "cpu", "precision": "fp32", "step": doc["step"]}

    def legacy(s):  # class paths and plain tensor keys, as flatten_state wrote them then
        if isinstance(s, dict):
            if "dataclass" in s:
                cls = {"AttentionState": "neatlm.nn.attention:AttentionState"}[s["dataclass"]]
                return {"dataclass": cls, "fields": {k: legacy(v) for k, v in s["fields"].items()}}
            return {k: legacy(v) for k, v in s.items()}
        return [legacy(v) for v in s] if isinstance(s, list) else s

    old["carry"] = legacy(states["carry"]["structure"])
    prefix = "carry/tensors/"
    ckpt.save_file({k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}, str(ck / "extra.safetensors"))
    (ck / "state.json").write_text(json.dumps({**old, "files": doc["files"]}))
    reseal(ck, "extra.safetensors")


def test_a_checkpoint_from_before_schema_versions_resumes_exactly(run, trained):
    ck = ckpt.list_checkpoints(run)[0]  # step 2 of 4
    to_schema_1(ck)
    shutil.rmtree(last(run))
    resumed = Trainer.resume(run)
    assert resumed.step == 2 and resumed.carry[0].position == 2 * 32
    resumed.train()
    losses = lambda r: [x["loss"] for x in read_metrics(r) if "loss" in x]  # noqa: E731
    assert losses(run) == losses(trained / "run")
    for name, t in ckpt.load_file(str(last(trained / "run") / "model.safetensors")).items():
        assert torch.equal(t, resumed.model.state_dict()[name]), name


@pytest.mark.parametrize("key", ["sampler_position", "rng", "config"])
def test_a_legacy_checkpoint_missing_an_entry_is_one_line(run, key):
    ck = last(run)
    to_schema_1(ck)
    edit_state(ck, lambda d: d.pop(key))
    with pytest.raises(CheckpointError) as err:
        Trainer.resume(run)
    one_line_error(err, str(ck / "state.json"), key)


def test_a_carried_state_of_another_model_is_named_at_resume(run, trained, tmp_path):
    """extra.safetensors from a wider model, resealed so the manifest matches: the resume names the
    file in one line instead of failing inside the first forward."""
    other = config(trained, "other")
    other.model.dim = 64   # same structure of state, other sizes
    other.train.run_dir = str(tmp_path / "other")
    from neatlm.config import validate
    validate(other)
    Trainer(other).train()
    mine, theirs = last(run), last(tmp_path / "other")
    shutil.copy(theirs / "extra.safetensors", mine / "extra.safetensors")
    theirs_doc = json.loads((theirs / "state.json").read_text())
    edit_state(mine, lambda d: d.__setitem__("carry", theirs_doc["carry"]) if "carry" in d else None)
    reseal(mine, "extra.safetensors")
    with pytest.raises(CheckpointError) as err:
        Trainer.resume(run)
    one_line_error(err, "extra.safetensors", "does not fit this model")
