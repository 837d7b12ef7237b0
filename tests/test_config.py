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
