import json

from neatlm.cli import main


def _base(corpus_dir):
    sets = [f"data.path={corpus_dir}", "model.dim=16", "model.n_layers=1", "model.n_heads=2", "train.steps=3",
            "train.batch_size=2", "train.seq_len=16", "eval.batches=1", "train.progress=false",
            "data.val_fraction=0.2", "guard.max_failures=1"]
    return [a for s in sets for a in ("--set", s)]


def test_sweep_runs_grid_and_reports_failures(corpus_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    # lr=1e9 is valid but diverges at run time (the guard stops at the first non-finite step):
    # those runs must fail without stopping the sweep
    code = main(["sweep", *_base(corpus_dir), "--grid", "train.lr=0.001,1e9", "--grid", "model.window=0,4",
                 "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 4
    assert {r["run"] for r in results} == {f"train.lr={lr}__model.window={w}" for lr in ("0.001", "1e9") for w in (0, 4)}
    ok = [r for r in results if r["status"] == "ok"]
    assert len(ok) == 2 and all(r["final_val_loss"] > 0 for r in ok)
    assert (out / "results.md").read_text().count("\n") == 6
    assert all("TrainingDiverged" in r["status"] for r in results if r["status"] != "ok")
    assert code == 1


def test_sweep_validates_every_point_before_running(corpus_dir, tmp_path, capsys):
    assert main(["sweep", *_base(corpus_dir), "--grid", "model.window=0,-1", "--out", str(tmp_path / "s")]) == 2
    assert "model.window = -1: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
