"""Transformer² on a byte model: do SVF experts pay on their domain, and does two-pass inference
find the right mixture without being told the domain?

    python benchmarks/svf.py [--base RUN_DIR | --base-preset long] [--threads 2] [--steps 200]
                             [--docs 8] [--doc-bytes 2048] [--prefix 512] [--out DIR]

One run: opens (or first trains) a base run, trains one expert per domain found on this machine
(Python standard library, C headers, Perl modules, packaged documentation; a missing one is
skipped and said so), trains the classifier expert over them, then reads each domain's first
``--docs`` held-out documents (cut to ``--doc-bytes``) with every method and scores the bytes past
the first ``--prefix`` (which the first pass reads):

    base        z = 1, the base model (its memories learning as they read, as in every row)
    expert      the domain's own expert (told the domain)
    cem         CEM mixture of all experts, searched on the prefix (not told)
    classifier  the classifier expert's pick from the prefix (not told)
    ttl         coordinated test-time learning from z = 1: memory and SVF vectors learning from
                the document as it is read, an Adam step per adapt.ttl_chunk bytes (not told)

It prints bits per byte per domain and method, the share of the expert's gain over the base that
each untold method recovers, SVF's trainable parameters against a rank-4 LoRA on the same
matrices, and the seconds each expert took. The experts are written beside the base run
(``RUN_DIR/adapt``); ``--out`` copies the base there first so the run stays untouched.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.adapt.domains import benchmark_domains  # noqa: E402
from neatlm.adapt.files import classifier_file, expert_file, expert_names, read  # noqa: E402
from neatlm.adapt.two_pass import ExpertClassifier  # noqa: E402
from neatlm.adapt.session import evaluate_documents, make_classifier, make_expert, open_run, settings_of  # noqa: E402
from neatlm.adapt.svf import lora_parameters  # noqa: E402
from neatlm.config import load_config  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402

METHODS = ("base", "expert", "cem", "classifier", "ttl")


def train_base(preset: str, steps: int, threads: int, run_dir: Path) -> Path:
    sets = ["train.progress=false", "train.device=cpu", "train.precision=fp32", f"train.threads={threads}",
            f"train.run_dir={run_dir}"]
    if steps:
        sets += [f"train.steps={steps}", f"train.save_every={steps}"]
    cfg = load_config(preset, overrides=sets)
    start = time.perf_counter()
    Trainer(cfg, run_dir=run_dir).train()
    print(f"base: {preset} trained {cfg.train.steps} steps in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="", help="an existing run to adapt (default: train --base-preset)")
    ap.add_argument("--base-preset", default="long")
    ap.add_argument("--base-steps", type=int, default=0, help="0 = the preset's train.steps")
    ap.add_argument("--out", default="", help="work here (a copy of --base); default: a temporary directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per expert")
    ap.add_argument("--classifier-steps", type=int, default=100)
    ap.add_argument("--docs", type=int, default=8, help="held-out documents per domain")
    ap.add_argument("--doc-bytes", type=int, default=2048)
    ap.add_argument("--prefix", type=int, default=512, help="bytes the first pass reads; scored after them")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="adapt.key=value")
    ap.add_argument("--reuse", action="store_true",
                    help="with --out: keep the experts and classifier already there (same base) instead of retraining")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = settings_of([f"adapt.steps={args.steps}", f"adapt.prefix={args.prefix}", *args.overrides])
    domains, skipped = benchmark_domains()
    for line in skipped:
        print(f"skipped domain {line}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="svf_") as temporary:
        work = Path(args.out or temporary)
        run = work / "base"
        if args.reuse and (run / "adapt").is_dir():
            pass                                       # the base copy and its experts are already there
        elif args.base:
            shutil.copytree(args.base, run, dirs_exist_ok=True, ignore=shutil.ignore_patterns("adapt"))
        else:
            train_base(args.base_preset, args.base_steps, args.threads, run)
        if not args.reuse:
            shutil.rmtree(run / "adapt", ignore_errors=True)
        adapted = open_run(run, settings)
        seconds, windows = {}, {}
        for d in domains:
            if args.reuse and d.name in expert_names(run):
                meta = read(expert_file(run, d.name), "svf-expert", adapted.fingerprint)[1]
                seconds[d.name], windows[d.name] = meta["seconds"], (meta["val_bpb_before"], meta["val_bpb_after"])
                print(f"expert {d.name}: reused", file=sys.stderr)
                continue
            result = make_expert(adapted, d, d.name, settings,
                                 log=lambda line, n=d.name: print(f"{n}: {line}", file=sys.stderr))
            seconds[d.name], windows[d.name] = result.seconds, (result.val_bpb_before, result.val_bpb_after)
            print(f"expert {d.name}: held-out windows {result.val_bpb_before:.3f} -> {result.val_bpb_after:.3f} "
                  f"bits per byte, {result.seconds:.0f} s", file=sys.stderr)
        start = time.perf_counter()
        if args.reuse and classifier_file(run).is_file():
            classifier, classifier_s = ExpertClassifier.load(adapted), float("nan")
        else:
            classifier = make_classifier(adapted, replace(settings, steps=args.classifier_steps))
            classifier_s = time.perf_counter() - start
        table: dict[str, dict[str, float]] = {}
        eval_s = {m: 0.0 for m in METHODS}
        picks: dict[str, list[str]] = {}
        for d in domains:
            docs = d.documents(args.docs, args.doc_bytes, args.prefix + 64)
            row = {}
            for method in METHODS:
                start = time.perf_counter()
                row[method] = evaluate_documents(adapted, docs, method, settings,
                                                 expert=d.name if method == "expert" else None)
                eval_s[method] += time.perf_counter() - start
            picks[d.name] = [classifier.experts[int(classifier.probabilities(adapted, doc[:args.prefix]).argmax())]
                             for doc in docs]
            table[d.name] = row
            print(f"{d.name}: " + ", ".join(f"{m} {v:.3f}" for m, v in row.items()), file=sys.stderr)
        svf_params = sum(adapted.basis.sizes().values())
        lora_params = lora_parameters(adapted.basis, 4)
    print_table(args, adapted.cfg, table, picks, seconds, windows, classifier_s, eval_s, svf_params, lora_params,
                len(adapted.basis.factors), settings)


def print_table(args, cfg, table, picks, seconds, windows, classifier_s, eval_s, svf_params, lora_params, matrices,
                settings) -> None:
    m = cfg.model
    print(f"\nSVF experts on a {m.dim}-wide, {m.n_layers}-layer byte model (window {m.window}, memory "
          f"{'on' if cfg.memory.enabled else 'off'}); {args.docs} held-out documents per domain cut to "
          f"{args.doc_bytes} bytes, scored past the first {args.prefix}; {args.threads} threads, fp32")
    print(f"\nbits per byte{'':<12}" + "".join(f"{x:>11}" for x in METHODS)
          + f"{'cem gain':>10}{'clf gain':>10}{'clf right':>10}")
    for name, row in table.items():
        gain = row["base"] - row["expert"]
        share = lambda v: (row["base"] - v) / gain if gain > 0 else float("nan")  # noqa: E731
        right = sum(p == name for p in picks[name]) / max(len(picks[name]), 1)
        print(f"{name:<25}" + "".join(f"{row[x]:>11.3f}" for x in METHODS)
              + f"{share(row['cem']):>10.0%}{share(row['classifier']):>10.0%}{right:>10.0%}")
    print("\nexperts on held-out 256-byte windows of their domain (fresh state per window), base -> expert: "
          + ", ".join(f"{n} {a:.3f} -> {b:.3f}" for n, (a, b) in windows.items()))
    print("\n(cem / clf gain: the share of the matching expert's gain over the base that the untold mixture "
          "recovers; clf right: documents whose prefix the classifier assigned to their own domain)")
    print(f"\ntrainable parameters on {matrices} matrices: SVF {svf_params:,}, LoRA rank 4 {lora_params:,} "
          f"({lora_params / svf_params:.1f}x)")
    print("seconds per expert (" + f"{settings.steps} steps of {settings.batch_size} x {settings.seq_len} bytes): "
          + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items())
          + ("; classifier reused" if classifier_s != classifier_s else
             f"; classifier {classifier_s:.0f} s ({args.classifier_steps} steps)"))
    print("evaluation seconds, all domains: " + ", ".join(f"{k} {v:.0f}" for k, v in eval_s.items()))


if __name__ == "__main__":
    main()
