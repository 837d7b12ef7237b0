"""The gradient checker: finds wrong or missing gradients in a whole model.

``check_gradients(model, inputs, targets)`` works on a float64 copy of the model:

1. one real loss and ``backward``: every trainable parameter must get a gradient that is not
   all zeros (a missing weight gradient is the classic silent bug: a model that trains only its
   embeddings still shows a falling loss);
2. central differences on a random sample of entries of every parameter tensor, compared with
   autograd, reported per tensor as ``||g_num - g_auto|| / max(||g_num||, ||g_auto||)``.

A tensor passes when that relative error is within ``tolerance`` or when the absolute difference
is within the rounding noise of the central difference itself, ``8 eps_64 |loss| / h`` per entry
(about 5e-9 for a loss of 5 and h = 1e-6): tiny gradients (memory gates, say) cannot be checked
more finely than that by finite differences, and a wrong gradient is far above it.

Nothing here is specific to one architecture: it sees parameters and a loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..nn.loss import lm_loss

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def default_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Next-byte cross-entropy plus any auxiliary loss the model reports (e.g. MoE balance)."""
    out = model(inputs)
    loss = lm_loss(out.logits, targets)
    return loss if out.aux_loss is None else loss + out.aux_loss


@dataclass
class TensorCheck:
    name: str
    shape: tuple[int, ...]
    sampled: int
    grad_norm: float  # of the full autograd gradient
    rel_error: float  # over the sampled entries
    abs_error: float  # ||g_num - g_auto|| over the sampled entries
    noise: float  # rounding noise of the central differences over the sampled entries
    missing: bool  # gradient None or all zeros
    tolerance: float

    @property
    def ok(self) -> bool:
        return not self.missing and (self.rel_error <= self.tolerance or self.abs_error <= self.noise)


@dataclass
class GradCheckReport:
    tensors: list[TensorCheck] = field(default_factory=list)
    tolerance: float = 1e-5

    @property
    def failures(self) -> list[TensorCheck]:
        return [t for t in self.tensors if not t.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        rows = [f"{'parameter':<44}{'shape':>16}{'n':>4}{'|grad|':>11}{'rel err':>11}{'abs err':>11}"
                f"{'noise':>10}  status"]
        for t in self.tensors:
            status = "MISSING" if t.missing else ("ok" if t.ok else "WRONG")
            rows.append(f"{t.name:<44}{str(tuple(t.shape)):>16}{t.sampled:>4}{t.grad_norm:>11.3e}"
                        f"{t.rel_error:>11.2e}{t.abs_error:>11.2e}{t.noise:>10.1e}  {status}")
        bad = self.failures
        rows.append(f"{len(self.tensors)} tensors, relative tolerance {self.tolerance:.0e} or rounding noise: "
                    + ("all gradients present and correct" if not bad else
                       f"{len(bad)} FAILED: {', '.join(t.name for t in bad)}"))
        return "\n".join(rows)


def check_gradients(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn = default_loss,
                    samples: int = 4, eps: float = 1e-6, tolerance: float = 1e-5, seed: int = 0) -> GradCheckReport:
    """Check every trainable parameter of ``model`` (left untouched: a float64 copy is used)."""
    if samples < 1:
        raise ValueError(f"samples = {samples!r}: must be >= 1")
    for name, value in (("eps", eps), ("tolerance", tolerance)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} = {value!r}: must be a finite number > 0")
    model64 = copy.deepcopy(model).to(torch.float64)
    model64.train()
    params = [(n, p) for n, p in model64.named_parameters() if p.requires_grad]
    model64.zero_grad(set_to_none=True)
    loss = loss_fn(model64, inputs, targets)
    loss.backward()
    noise_per_entry = 8 * torch.finfo(torch.float64).eps * max(abs(loss.item()), 1.0) / eps
    autograd = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in params}
    g = torch.Generator().manual_seed(seed)
    report = GradCheckReport(tolerance=tolerance)
    with torch.no_grad():
        for name, p in params:
            grad = autograd[name]
            missing = grad is None or not bool(grad.abs().sum() > 0)
            k = min(samples, p.numel())
            idx = torch.randperm(p.numel(), generator=g)[:k]
            if grad is not None and k < p.numel():  # always include the largest entry: it must be right
                idx[0] = grad.abs().flatten().argmax()
            flat = p.view(-1)
            numeric = torch.empty(k, dtype=torch.float64)
            for j, i in enumerate(idx.tolist()):
                orig = flat[i].item()
                flat[i] = orig + eps
                plus = loss_fn(model64, inputs, targets).item()
                flat[i] = orig - eps
                minus = loss_fn(model64, inputs, targets).item()
                flat[i] = orig
                numeric[j] = (plus - minus) / (2 * eps)
            analytic = grad.reshape(-1)[idx].cpu() if grad is not None else torch.zeros(k, dtype=torch.float64)
            scale = max(numeric.norm().item(), analytic.norm().item())
            diff = (numeric - analytic).norm().item()
            rel = diff / scale if scale > 1e-12 else 0.0
            report.tensors.append(TensorCheck(name, tuple(p.shape), k,
                                              grad.norm().item() if grad is not None else math.nan,
                                              rel, diff, noise_per_entry * math.sqrt(k), missing, tolerance))
    return report
