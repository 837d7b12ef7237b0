"""Two-pass inference (Transformer²): the first pass reads a document's first bytes and decides
how to mix the experts, the second reads the document with ``z = sum_k alpha_k z_k``.

Two ways to decide, as in the paper:

- **CEM search** (:func:`cem`, :func:`cem_mixture`): the cross-entropy method over the mixing
  weights ``alpha``, maximising the model's log-likelihood of the prefix itself (the few-shot
  bytes). The paper's strongest variant; it costs ``population * generations`` forward passes of
  the prefix.
- **Classifier expert** (:class:`ExpertClassifier`): an SVF z vector of its own plus a linear
  head on the mean of the final hidden states, trained to tell the experts' domains apart; the
  predicted domain's expert is used (one forward pass of the prefix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdaptConfig
from ..data.corpus import Corpus
from ..errors import NeatError
from ..grad.components import ComponentSpec
from ..grad.coordinator import GradientCoordinator
from ..nn.memory import TTLControl
from . import files
from .base import AdaptedModel
from .experts import document_nats
from .svf import Z_PATTERN, mix


@dataclass
class CEMResult:
    best: Tensor                 # (dim,) the best candidate seen
    best_value: float
    history: list[float]         # the best value after each generation (never decreases)


def cem(objective: Callable[[Tensor], Tensor], mean: Tensor, std: float, population: int, generations: int,
        elite: float, seed: int = 0, min_std: float = 1e-3) -> CEMResult:
    """Maximise ``objective`` (a (population, dim) batch of candidates -> (population,) values) by
    the cross-entropy method: sample a Gaussian, keep the elite fraction, refit mean and per-
    coordinate spread to it, repeat."""
    gen = torch.Generator().manual_seed(seed)
    mu = mean.double().clone()
    sigma = torch.full_like(mu, float(std))
    n_elite = max(1, int(math.ceil(elite * population)))
    best, best_value, history = mu.clone(), -math.inf, []
    for _ in range(generations):
        samples = mu + sigma * torch.randn(population, mu.numel(), generator=gen, dtype=torch.float64)
        values = objective(samples).double()
        order = torch.argsort(values, descending=True)
        if float(values[order[0]]) > best_value:
            best_value, best = float(values[order[0]]), samples[order[0]].clone()
        top = samples[order[:n_elite]]
        mu = top.mean(dim=0)
        sigma = (top.std(dim=0, unbiased=False) if n_elite > 1 else sigma / 2).clamp_min(min_std)
        history.append(best_value)
    return CEMResult(best, best_value, history)


def cem_mixture(adapted: AdaptedModel, experts: list[dict[str, Tensor]], prefix: bytes, settings: AdaptConfig,
                seed: int = 0) -> Tensor:
    """Mixing weights ``alpha`` (one per expert) that maximise the log-likelihood of ``prefix``
    under ``z = sum_k alpha_k z_k``, by CEM from the uniform mixture."""
    if len(prefix) < 2:
        return torch.full((len(experts),), 1.0 / len(experts))

    def objective(candidates: Tensor) -> Tensor:
        values = []
        for alpha in candidates:
            nats, count = document_nats(adapted, prefix, mix(experts, alpha), start=1)
            values.append(-nats / max(count, 1))
        return torch.tensor(values)

    k = len(experts)
    result = cem(objective, torch.full((k,), 1.0 / k), std=0.5, population=settings.cem_population,
                 generations=settings.cem_generations, elite=settings.cem_elite, seed=seed)
    return result.best.float()


# ---------------------------------------------------------------------------- classifier expert

class _ClassifierNet(nn.Module):
    """The adapted model (its z vectors trainable) and a linear head on its pooled hidden states."""

    def __init__(self, adapted: AdaptedModel, classes: int):
        super().__init__()
        self.model = adapted.model
        dim = adapted.cfg.model.dim
        self.head = nn.Linear(dim, classes).to(next(adapted.model.parameters()).device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: Tensor) -> Tensor:
        hidden = self.model.features(idx, None, TTLControl()).hidden     # (B, T, dim)
        return self.head(hidden.mean(dim=1))                              # (B, classes)


@dataclass
class ExpertClassifier:
    """Which expert's domain a prefix comes from: its own z vectors and a linear head."""

    experts: list[str]
    z: dict[str, Tensor]
    head_weight: Tensor
    head_bias: Tensor

    @torch.no_grad()
    def probabilities(self, adapted: AdaptedModel, prefix: bytes) -> Tensor:
        """(experts,) class probabilities of one prefix (empty prefix: uniform)."""
        if not prefix:
            return torch.full((len(self.experts),), 1.0 / len(self.experts))
        adapted.use(self.z)
        was_training = adapted.model.training
        adapted.model.eval()
        device = next(adapted.model.parameters()).device
        idx = torch.frombuffer(bytearray(prefix), dtype=torch.uint8).long().to(device)[None]
        hidden = adapted.model.features(idx, None, TTLControl()).hidden.mean(dim=1)
        adapted.model.train(was_training)
        return F.softmax(F.linear(hidden, self.head_weight, self.head_bias), dim=-1)[0].cpu()

    def choose(self, adapted: AdaptedModel, prefix: bytes) -> Tensor:
        """One-hot mixing weights on the most probable expert (the paper's classification expert)."""
        return F.one_hot(self.probabilities(adapted, prefix).argmax(), len(self.experts)).float()

    def save(self, adapted: AdaptedModel) -> None:
        files.write(files.classifier_file(adapted.run_dir),
                    {**{f"z.{k}": v for k, v in self.z.items()}, "head.weight": self.head_weight,
                     "head.bias": self.head_bias},
                    {"kind": "svf-classifier", "base": adapted.fingerprint, "experts": self.experts})

    @staticmethod
    def load(adapted: AdaptedModel) -> "ExpertClassifier":
        path = files.classifier_file(adapted.run_dir)
        if not path.is_file():
            raise NeatError(f"{path}: no classifier expert yet; train it with `neat adapt --run "
                            f"{adapted.run_dir} --classifier`")
        tensors, meta = files.read(path, "svf-classifier", adapted.fingerprint)
        z = {k[2:]: v for k, v in tensors.items() if k.startswith("z.")}
        adapted.check_matrices(path, z)
        names = meta.get("experts")
        if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)
                and set(tensors) >= {"head.weight", "head.bias"}
                and tuple(tensors["head.weight"].shape) == (len(names), adapted.cfg.model.dim)
                and tuple(tensors["head.bias"].shape) == (len(names),)):
            raise NeatError(f"{path}: not a classifier of this run (it must name two or more experts and hold a "
                            f"head of {adapted.cfg.model.dim} inputs per expert); retrain it with "
                            "`neat adapt --classifier`")
        missing = [n for n in names if n not in files.expert_names(adapted.run_dir)]
        if missing:
            raise NeatError(f"{path} chooses among experts {names}, but {missing} are gone; retrain it with "
                            "`neat adapt --classifier`")
        return ExpertClassifier(list(names), z, tensors["head.weight"], tensors["head.bias"])


@dataclass
class DomainExamples:
    """Where a domain's classifier examples come from: its training bytes, and the starts of its
    training documents (empty for a single-file domain)."""

    corpus: Corpus
    starts: list[bytes]


def prefix_batch(domains: list[DomainExamples], per_class: int, length: int,
                 rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``per_class`` examples of ``length`` bytes per domain, and their class labels: alternately the
    start of a random training document (what the first pass reads at evaluation) and a random
    window of the training bytes (a prompt from the middle of a text)."""
    rows, labels = [], []
    for label, d in enumerate(domains):
        for i in range(per_class):
            if d.starts and i % 2 == 0:
                rows.append(np.frombuffer(d.starts[int(rng.integers(len(d.starts)))], dtype=np.uint8))
            else:
                s = int(rng.integers(0, d.corpus.train.size - length))
                rows.append(d.corpus.train[s:s + length])
            labels.append(label)
    return torch.from_numpy(np.stack(rows).astype(np.int64)), torch.tensor(labels)


def train_classifier(adapted: AdaptedModel, names: list[str], domains: list[DomainExamples], settings: AdaptConfig,
                     seed: int = 0) -> ExpertClassifier:
    """Train the classifier expert on prefixes of ``settings.prefix`` bytes from each domain."""
    if len(names) < 2:
        raise NeatError(f"the classifier chooses among experts: this run has {len(names)} ({', '.join(names) or 'none'}); "
                        "train at least two with `neat adapt --name ...`")
    for name, d in zip(names, domains):
        corpus = d.corpus
        if corpus.train.size <= settings.prefix:
            raise NeatError(f"expert {name!r}: its domain has {corpus.train.size} training bytes, fewer than "
                            f"adapt.prefix = {settings.prefix}")
    adapted.use(adapted.ones())
    net = _ClassifierNet(adapted, len(names))
    specs = [ComponentSpec(name="svf", patterns=(f"model.{Z_PATTERN}",), lr=settings.lr, clip=1.0,
                           warmup_steps=min(settings.warmup_steps, settings.steps - 1)),
             ComponentSpec(name="head", patterns=("head",), lr=settings.lr, clip=1.0,
                           warmup_steps=min(settings.warmup_steps, settings.steps - 1))]
    coord = GradientCoordinator(net, specs, total_steps=settings.steps, guard=adapted.cfg.guard)
    rng = np.random.default_rng([seed, 0xC1A55])
    per_class = max(1, settings.batch_size // len(names))
    device = next(adapted.model.parameters()).device
    net.train()
    for _ in range(settings.steps):
        x, labels = prefix_batch(domains, per_class, settings.prefix, rng)
        loss = F.cross_entropy(net(x.to(device)), labels.to(device))
        coord.backward(loss)
        coord.step()
        coord.zero_grad()
    classifier = ExpertClassifier(list(names), adapted.current_z(), net.head.weight.detach().cpu().clone(),
                                  net.head.bias.detach().cpu().clone())
    adapted.use(adapted.ones())
    return classifier
