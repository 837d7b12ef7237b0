"""What ``neat adapt``, ``neat eval --adapt`` and ``neat generate --adapt`` do, as functions the
benchmark calls too.

Each adaptation method turns a document's first ``adapt.prefix`` bytes into z vectors (the first
pass), then the document is read whole with them and scored past the prefix (the second pass):

- ``base``: z = 1 (the base model);
- ``expert``: one named expert, whatever the document;
- ``cem``: the CEM mixture of every expert of the run (:func:`~neatlm.adapt.two_pass.cem_mixture`);
- ``classifier``: the expert the classifier expert picks;
- ``ttl``: coordinated test-time learning from z = 1 (or from ``--expert``), the memories and
  the z vectors learning from the document as it is read
  (:func:`~neatlm.adapt.test_time.learn_document`); scored past the prefix like the others.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from torch import Tensor

from ..config import AdaptConfig, Config, apply_overrides, validate
from ..errors import NeatError
from . import files
from .base import AdaptedModel, open_base, split_patterns
from .domains import Domain
from .experts import ExpertResult, documents_bits_per_byte, train_expert
from .svf import mix
from .test_time import learn_document
from .two_pass import DomainExamples, ExpertClassifier, cem_mixture, train_classifier

METHODS = ("base", "expert", "cem", "classifier", "ttl")


def settings_of(overrides: list[str]) -> AdaptConfig:
    """``adapt.*`` settings: the defaults with ``--set adapt.key=value`` applied and checked."""
    bad = [o for o in overrides if not o.strip().startswith("adapt.")]
    if bad:
        raise NeatError(f"--set {bad[0]!r}: adaptation takes adapt.* keys only (the base run's other settings "
                        "are fixed by its weights)")
    cfg = apply_overrides(Config(), overrides)
    validate(cfg, check_size=False)
    return cfg.adapt


def open_run(run: str | Path, settings: AdaptConfig) -> AdaptedModel:
    return open_base(run, split_patterns(settings.patterns))


def make_expert(adapted: AdaptedModel, domain: Domain, name: str, settings: AdaptConfig, seed: int = 0,
                log: Callable[[str], None] | None = None) -> ExpertResult:
    """Train one expert on ``domain`` and save it beside the run (atomically)."""
    files.check_name(name)
    corpus = domain.corpus()
    if corpus.train.size < settings.seq_len + 1:
        raise NeatError(f"--data {domain.path}: {corpus.train.size} training bytes, fewer than one window of "
                        f"adapt.seq_len + 1 = {settings.seq_len + 1}")
    result = train_expert(adapted, corpus, settings, seed=seed, log=log)
    adapted.save_expert(name, result.z, {"domain": domain.as_meta(), "steps": result.steps,
                                         "val_bpb_before": _finite(result.val_bpb_before),
                                         "val_bpb_after": _finite(result.val_bpb_after),
                                         "seconds": round(result.seconds, 2)})
    return result


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def expert_domains(adapted: AdaptedModel) -> tuple[list[str], list[dict[str, Tensor]], list[Domain]]:
    """(names, z vectors, domains) of every expert saved beside the run."""
    names = files.expert_names(adapted.run_dir)
    experts, domains = [], []
    for name in names:
        path = files.expert_file(adapted.run_dir, name)
        z, meta = files.read(path, "svf-expert", adapted.fingerprint)
        adapted.check_matrices(path, z)
        experts.append(z)
        domains.append(Domain.from_meta(meta.get("domain"), path))
    return names, experts, domains


def make_classifier(adapted: AdaptedModel, settings: AdaptConfig, seed: int = 0) -> ExpertClassifier:
    """Train the classifier expert over the run's experts' domains and save it."""
    names, _, domains = expert_domains(adapted)
    examples = [DomainExamples(d.corpus(), d.training_starts(settings.prefix)) for d in domains]
    classifier = train_classifier(adapted, names, examples, settings, seed=seed)
    classifier.save(adapted)
    return classifier


def chooser(adapted: AdaptedModel, method: str, settings: AdaptConfig, expert: str | None = None,
            seed: int = 0) -> Callable[[bytes], dict[str, Tensor]]:
    """The first pass of ``method``: prefix bytes -> z vectors."""
    if method not in METHODS:
        raise NeatError(f"--adapt {method!r}: choose one of {', '.join(METHODS)}")
    start = adapted.load_expert(expert) if expert else adapted.ones()
    if method == "expert" and not expert:
        raise NeatError("--adapt expert needs --expert NAME")
    if method in ("base", "expert", "ttl"):
        return lambda prefix: start
    if method == "cem":
        names, experts, _ = expert_domains(adapted)
        if not experts:
            raise NeatError(f"--adapt cem mixes the run's experts, and {adapted.run_dir} has none yet: train them "
                            "with `neat adapt --name ...`")
        return lambda prefix: mix(experts, cem_mixture(adapted, experts, prefix, settings, seed=seed))
    classifier = ExpertClassifier.load(adapted)
    experts = [adapted.load_expert(n) for n in classifier.experts]
    return lambda prefix: mix(experts, classifier.choose(adapted, prefix))


def evaluate_documents(adapted: AdaptedModel, docs: list[bytes], method: str, settings: AdaptConfig,
                       expert: str | None = None, seed: int = 0) -> float:
    """Bits per byte of ``docs`` past their prefixes under ``method`` (see the module docstring)."""
    choose = chooser(adapted, method, settings, expert, seed)
    if method != "ttl":
        return documents_bits_per_byte(adapted, docs, choose, settings.prefix)
    nats, count = 0.0, 0
    for doc in docs:
        losses = learn_document(adapted, doc, choose(doc[:settings.prefix]), settings).nats
        scored = losses[max(settings.prefix - 1, 0):]      # loss i predicts byte i + 1
        nats, count = nats + float(scored.double().sum()), count + scored.numel()
    adapted.use(adapted.ones())
    return nats / max(count, 1) / math.log(2)


def generation_z(adapted: AdaptedModel, method: str, settings: AdaptConfig, prompt: bytes,
                 expert: str | None = None) -> dict[str, Tensor]:
    """z vectors for generating after ``prompt``: the first pass reads the prompt itself."""
    if method == "ttl":
        raise NeatError("--adapt ttl learns from a document as it is read; generation takes cem, classifier or expert")
    return chooser(adapted, method, settings, expert)(prompt)
