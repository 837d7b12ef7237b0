"""BLT: does a global model that runs once per patch pay, and do entropy patches beat fixed strides?

    python benchmarks/blt.py [--seconds 420] [--arms byte,stride,entropy,monotonic] [--patch 4]
                             [--runs DIR] [--entropy RUN] [--val-batches 40]

The entropy model (preset ``blt-entropy``) is trained first into ``DIR/entropy`` (or ``--entropy``
names one). Then every arm trains for the same wall time on the default corpus (a few timed steps
first, then as many steps as fit in ``--seconds``; the cosine schedule ends there):

- ``byte``: the byte model (preset ``tiny``);
- ``stride``: BLT (preset ``blt``) with a patch every ``--patch`` bytes;
- ``entropy``: BLT with entropy patches, the threshold measured for the same average patch size;
- ``monotonic``: BLT with the approximate monotonic patcher, likewise.

Columns: the average patch size on the validation windows, forward matmul FLOPs per byte of the
global model and of the whole model (2 per multiply-add; the frozen entropy model's are listed
apart: the stride arm has none), training bytes per second, steps, and validation bits per byte on
the same windows, at the end and at the step count every arm reaches (all arms are timed before
any trains, and each evaluates at that step too), so that the patchers are also compared at equal
data. Run it alone (one thread per process; other processes on the same cores slow an arm down and
it fits fewer steps in its time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import Config, load_config  # noqa: E402
from neatlm.data.corpus import validation_batches  # noqa: E402
from neatlm.nn.blt.model import BLTModel, entropy_config, matmul_flops_per_byte  # noqa: E402
from neatlm.nn.model import swiglu_hidden  # noqa: E402
from neatlm.train.checkpoint import list_checkpoints  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402

COMMON = ["train.progress=false", "train.device=cpu", "train.precision=fp32", "eval.every=0"]


def arms(patch: float, entropy_run: Path) -> dict[str, tuple[str, list[str]]]:
    blt = [f"blt.entropy_run={entropy_run}", f"blt.target_patch_size={patch}"]
    return {"byte": ("tiny", []),
            "stride": ("blt", blt + ["blt.patcher=stride"]),
            "entropy": ("blt", blt + ["blt.patcher=entropy"]),
            "monotonic": ("blt", blt + ["blt.patcher=monotonic"])}


def byte_flops_per_byte(cfg: Config) -> float:
    """Forward matmul FLOPs per byte of a NeatLM (attention scores left out, as for BLT)."""
    m = cfg.model
    return 2.0 * (m.n_layers * (4 * m.dim * m.dim + 3 * m.dim * swiglu_hidden(m.dim, m.mlp_hidden)) + 256 * m.dim)


def seconds_per_step(preset: str, sets: list[str], probe_steps: int = 4) -> float:
    probe = Trainer(load_config(preset, overrides=sets + ["train.steps=1000"]), run_dir=tempfile.mkdtemp())
    probe.train_step()
    start = time.perf_counter()
    for _ in range(probe_steps):
        probe.train_step()
    return (time.perf_counter() - start) / probe_steps


def train_entropy(run: Path, threads: int) -> None:
    if list_checkpoints(run):
        print(f"entropy model: reusing {run}", flush=True)
        return
    print(f"entropy model: training preset blt-entropy into {run}", flush=True)
    cfg = load_config("blt-entropy", overrides=COMMON + [f"train.run_dir={run}", f"train.threads={threads}"])
    Trainer(cfg).train()


def val_bpb_at(run: Path, step: int) -> float:
    """The validation bits per byte the run recorded at ``step``."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("step") == step and "val_bpb" in record:
            return record["val_bpb"]
    return float("nan")


def average_patch(model: BLTModel, cfg: Config, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        starts = torch.cat([model.patches(x)[0].flatten() for x in batches])
    return starts.numel() / starts.sum().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=420.0, help="training wall time of each arm")
    p.add_argument("--arms", default="byte,stride,entropy,monotonic")
    p.add_argument("--patch", type=float, default=4.0, help="target average patch size of every BLT arm")
    p.add_argument("--runs", default=None, help="where the runs go (default: a temporary directory)")
    p.add_argument("--entropy", default=None, help="an entropy-model run to reuse")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-batches", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="blt-bench-"))
    entropy_run = Path(args.entropy) if args.entropy else runs / "entropy"
    train_entropy(entropy_run, args.threads)
    table = arms(args.patch, entropy_run)
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    plan = {}
    for name in names:
        preset, sets = table[name]
        sets = sets + COMMON + [f"train.threads={args.threads}", f"eval.batches={args.val_batches}"]
        per_step = seconds_per_step(preset, sets)
        plan[name] = (preset, sets, max(1, int(args.seconds / per_step)))
        print(f"{name}: {per_step:.3f} s/step -> {plan[name][2]} steps", flush=True)
    common = max(1, min(steps for _, _, steps in plan.values()) // 50 * 50)
    rows = []
    for name in names:
        preset, sets, steps = plan[name]
        cfg = load_config(preset, overrides=sets + [f"train.steps={steps}", f"train.save_every={steps}",
                                                   f"train.run_dir={runs / name}", f"eval.every={common}"])
        trainer = Trainer(cfg)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        model = trainer.model.eval()
        if isinstance(model, BLTModel):
            val = [x for x, _ in validation_batches(trainer.data.corpus.val, cfg.train.batch_size, cfg.train.seq_len,
                                                     min(args.val_batches, 8))]
            patch = average_patch(model, cfg, val)
            flops = matmul_flops_per_byte(cfg, patch)
            ent = "-" if model.entropy is None else f"{byte_flops_per_byte(entropy_config(cfg.blt)) / 1e6:.3f}"
            row = (name, f"{patch:.2f}", f"{flops['global'] / 1e6:.3f}", f"{flops['total'] / 1e6:.3f}", ent)
        else:
            row = (name, "1.00", f"{byte_flops_per_byte(cfg) / 1e6:.3f}", f"{byte_flops_per_byte(cfg) / 1e6:.3f}", "-")
        params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        at_common = val_bpb_at(runs / name, common)
        rows.append(row + (f"{params / 1e6:.2f}", str(steps), f"{seconds:.0f}",
                           f"{result.get('tokens_per_s', float('nan')):,.0f}", f"{at_common:.3f}",
                           f"{result['val_bpb']:.3f}"))
        print(" | ".join(rows[-1]), flush=True)
    head = ("arm", "patch (bytes)", "global MFLOP/byte", "total MFLOP/byte", "entropy model MFLOP/byte",
            "params (M)", "steps", "train s", "bytes/s", f"val bpb at step {common}", "val bpb at the end")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nthreads {args.threads}, {args.seconds:.0f} s per arm, target patch {args.patch}; runs in {runs}")


if __name__ == "__main__":
    main()
