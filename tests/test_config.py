from pathlib import Path

import pytest

from neatlm.config import Config, ConfigError, from_dict, load_config, preset_names, to_toml


def test_defaults_equal_tiny_preset():
    assert "tiny" in preset_names()
    assert load_config("tiny").to_dict() == Config().to_dict()


def test_overrides_and_types():
    cfg = load_config("tiny", overrides=["train.lr=1e-4", "model.window=64", "memory.enabled=true",
                                         "data.path=/x y"])
    assert cfg.train.lr == 1e-4 and cfg.model.window == 64 and cfg.memory.enabled is True
    assert cfg.data.path == "/x y"


@pytest.mark.parametrize("override, fragment", [
    ("model.dim=abc", "model.dim = 'abc': expected an integer"),
    ("model.nope=1", "model.nope: unknown key"),
    ("nosection.dim=1", "unknown section 'nosection'"),
    ("train.lr=-1", "train.lr = -1.0: must be >= 0.0"),
    ("model.mixer=lstm", "model.mixer = 'lstm': allowed values are 'attention', 'bk'"),
    ("train.seq_len=1024", "train.seq_len = 1024: must be <= model.context = 256"),
    ("model.n_heads=3", "model.n_heads = 3: must divide model.dim = 128"),
    ("memory.enabled=maybe", "memory.enabled = 'maybe': expected a boolean"),
    ("train.lr", "expected section.key=value"),
    ("train.lr=nan", "train.lr = nan: must be a finite number"),
])
def test_bad_values_name_key_value_and_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_toml_file_errors(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ndim = 'wide'\n")
    with pytest.raises(ConfigError, match="model.dim = 'wide': expected an integer"):
        load_config(config_file=bad)
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_resolved_config_round_trips_through_toml(tmp_path: Path):
    cfg = load_config("tiny", overrides=["train.lr=0.002", "data.path=C:\\data \"q\""])
    f = tmp_path / "c.toml"
    f.write_text(to_toml(cfg))
    assert load_config(config_file=f).to_dict() == cfg.to_dict()
    assert from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides, fragment", [
    (["memory.chunk_size=64", "train.seq_len=16", "train.segments=2"],
     "memory.chunk_size = 64: must be < train.seq_len * train.segments = 16 * 2 = 32 with memory.reset = 'sequence'"),
    (["memory.chunk_size=32", "train.seq_len=16", "train.segments=2"],   # completes at the last token: never read
     "memory.chunk_size = 32: must be < train.seq_len * train.segments = 16 * 2 = 32"),
    (["memory.chunk_size=32", "train.seq_len=32", "train.segments=4", "memory.reset=batch"],
     "memory.chunk_size = 32: must be < train.seq_len = 32 with memory.reset = 'batch'"),
])
def test_memory_that_never_reads_an_update_in_a_window_is_rejected(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=["memory.enabled=true", *overrides])
    assert fragment in str(err.value) and "never learns" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["memory.enabled=true", "memory.chunk_size=16", "train.seq_len=12", "train.segments=2"],  # read in segment 2
    ["memory.enabled=true", "memory.chunk_size=64", "train.seq_len=24", "memory.reset=never",
     "model.window=16"],                                                  # updates carry over to later steps
    ["memory.chunk_size=64", "train.seq_len=16", "train.segments=2"],     # no memory: nothing to check
])
def test_memory_windows_that_read_updates_are_accepted(overrides):
    load_config("tiny", overrides=overrides)


@pytest.mark.parametrize("overrides", [
    ["train.seq_len=8", "memory.chunk_size=8", "train.segments=2"],
    ["train.seq_len=4", "memory.chunk_size=8", "memory.reset=never", "model.window=8"],
])
def test_chunks_ending_only_at_forward_ends_are_rejected(overrides):
    """Every update is first read in a later, detached forward: keys, values and gates get no gradient."""
    with pytest.raises(ConfigError, match=r"memory\.chunk_size = 8: a multiple of train\.seq_len = [48], .*"
                       r"keys, values and gates never get a gradient"):
        load_config("tiny", overrides=["memory.enabled=true", *overrides])
    load_config("tiny", overrides=["memory.enabled=true", "memory.detach_output=true", *overrides])
