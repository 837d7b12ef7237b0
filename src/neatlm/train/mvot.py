"""Visual thoughts at inference: the model writes the state images and the answer; what is scored.

:func:`think` gives a trained MVoT run the prompt of one held-out example (the question and, with
thoughts, the image of the start) and lets it write greedily under the modality mask until it has
written its answer line. :func:`mvot_eval` scores many such examples:

- ``answer_acc``: the fraction of examples whose written answer (goal or hole) is right;
- ``image_token_acc``: of the image tokens of the true states, the fraction the model wrote
  at the same place (its k-th image against the true k-th state; an image of the wrong length
  counts as all wrong), so a wrong early state counts against every later one;
- ``image_exact``: the fraction of written images equal to the true state's tokens;
- ``forced_image_acc``: the arg-max accuracy at image-token targets with the true earlier tokens
  given (teacher forcing): how well the model draws the next state from a correct past.

:func:`thought_grid` lays the written images beside the true ones (decoded by the VQ-VAE) as one
RGB picture, which ``neat generate --images`` and the benchmark write as PNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.gridworld import ANSWER, GridExample, make_example
from ..data.mvot import MVoTTask, encode_states, example_tokens
from ..nn.model import NeatLM
from ..nn.mvot import BYTES, generate_masked, mask_logits
from ..nn.vq import tensor_to_images


@dataclass
class Thought:
    """What the model wrote for one example: ``text`` (bytes, each image shown as ``[image k]``),
    the code ids of each image it wrote, its answer (None if it wrote none), and the truth."""

    example: GridExample
    text: str
    images: list[list[int]]
    answer: str | None
    truth: list[list[int]]          # code ids of every true state, the start first (empty: text run)

    @property
    def correct(self) -> bool:
        return self.answer == self.example.outcome


def _answered(tokens: list[int]) -> bool:
    """Stop once the answer line is complete."""
    if not tokens or tokens[-1] != ord("\n"):
        return False
    text = bytes(t for t in tokens if t < BYTES)
    return 0 <= text.rfind(ANSWER.encode()) < len(text) - len(ANSWER) - 1


def parse(tokens: list[int], boi: int | None, eoi: int | None) -> tuple[str, list[list[int]], str | None]:
    """(text with ``[image k]`` placeholders, the code ids of each image, the answer or None)."""
    text, images, current = bytearray(), [], None
    for t in tokens:
        if boi is not None and t == boi:
            current = []
        elif eoi is not None and t == eoi:
            images.append(current or [])
            text += f"[image {len(images)}]".encode()
            current = None
        elif t >= BYTES:
            if current is not None:
                current.append(t - BYTES)
        else:
            text.append(t)
    decoded = text.decode("utf-8", errors="replace")
    answer = None
    if ANSWER in decoded:
        answer = decoded.rsplit(ANSWER, 1)[1].split("\n", 1)[0].strip()
    return decoded, images, answer


def think(model: NeatLM, task: MVoTTask, example: GridExample, temperature: float = 0.0,
          generator: torch.Generator | None = None) -> Thought:
    """Let the model write its thoughts (with images, for an MVoT run) and answer for ``example``."""
    codes = encode_states(task.vq, [example])[0] if task.vq is not None else None
    tokens, prompt = example_tokens(example, codes, task.layout)
    device = next(model.parameters()).device
    out = generate_masked(model, torch.tensor(tokens[:prompt], device=device), task.layout,
                          max_new=task.length + 8 - prompt, stop=_answered, temperature=temperature,
                          generator=generator)
    layout = task.layout
    text, images, answer = parse(out, layout.boi if layout else None, layout.eoi if layout else None)
    return Thought(example, text, images, answer, codes or [])


@torch.no_grad()
def forced_image_accuracy(model: NeatLM, task: MVoTTask, split: str, indices: list[int],
                          batch_size: int = 16) -> float:
    """Arg-max accuracy at image-token targets, the true earlier tokens given (NaN: no images)."""
    if task.layout is None:
        return float("nan")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for i in range(0, len(indices), batch_size):
        x, y = task.batch(split, indices[i:i + batch_size])
        x, y = x.to(device), y.to(device)
        logits = mask_logits(model(x).logits, x, task.layout)
        image = task.layout.is_code(y)
        right += int((logits.argmax(-1)[image] == y[image]).sum())
        total += int(image.sum())
    model.train(was)
    return right / max(total, 1)


def image_scores(thought: Thought) -> tuple[int, int, int]:
    """(true image tokens written at their place, true image tokens, images written exactly)."""
    truth = thought.truth[1:]                     # the states after each move
    right = exact = 0
    for k, true in enumerate(truth):
        made = thought.images[k] if k < len(thought.images) else []
        if len(made) == len(true):
            hits = sum(a == b for a, b in zip(made, true))
            right += hits
            exact += hits == len(true)
    return right, sum(len(t) for t in truth), exact


def mvot_eval(model: NeatLM, task: MVoTTask, examples: int, split: str = "test",
              start: int = 0) -> tuple[dict[str, float], list[Thought]]:
    """Score ``examples`` held-out examples (``split``, from index ``start``); see the module doc."""
    thoughts = [think(model, task, make_example(split, i, task.settings)) for i in range(start, start + examples)]
    result = {"examples": float(examples), "answer_acc": sum(t.correct for t in thoughts) / max(examples, 1)}
    if task.layout is not None:
        scores = [image_scores(t) for t in thoughts]
        right, total, exact = (sum(s[i] for s in scores) for i in range(3))
        images = sum(len(t.truth) - 1 for t in thoughts)
        result["image_token_acc"] = right / max(total, 1)
        result["image_exact"] = exact / max(images, 1)
        result["forced_image_acc"] = forced_image_accuracy(model, task, split, list(range(start, start + examples)))
    return result, thoughts


TILE, SCALE, GAP = 20, 4, 2


def _tile(image: np.ndarray | None) -> np.ndarray:
    """One state image padded to TILE x TILE (white) and scaled up; None (an image the model did not
    write, or of the wrong length) is a grey tile."""
    out = np.full((TILE, TILE, 3), 255, dtype=np.uint8)
    if image is None:
        out[:] = 128
    else:
        out[:image.shape[0], :image.shape[1]] = image
    return out.repeat(SCALE, 0).repeat(SCALE, 1)


@torch.no_grad()
def decode_images(task: MVoTTask, thought: Thought) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """(the true states decoded from their codes, the written images decoded; None where an image
    has the wrong number of tokens), each uint8 (4n, 4n, 3)."""
    assert task.vq is not None
    n = thought.example.size

    def decode(ids: list[int]) -> np.ndarray | None:
        if len(ids) != n * n:
            return None
        img = task.vq.decode(torch.tensor(ids).view(1, n, n))
        return tensor_to_images(img)[0].numpy()

    truth = [decode(c) for c in thought.truth]
    made = [decode(c) for c in thought.images]
    return [t for t in truth if t is not None], made


def thought_grid(task: MVoTTask, thoughts: list[Thought]) -> np.ndarray:
    """Two rows per example: the true states (start, then after each move; decoded from their
    codes) and below them the images the model wrote; a bar on the left of the written row is green
    where the model's answer was right, red where wrong. uint8 (H, W, 3)."""
    cols = max(len(t.truth) for t in thoughts)
    side = TILE * SCALE
    bar = 6
    width = bar + cols * (side + GAP)
    rows = []
    for t in thoughts:
        truth, made = decode_images(task, t)
        top = np.full((side, width, 3), 255, dtype=np.uint8)
        bottom = top.copy()
        top[:, :bar] = (160, 160, 160)
        bottom[:, :bar] = (40, 170, 60) if t.correct else (210, 40, 40)
        for k, img in enumerate(truth):
            top[:, bar + k * (side + GAP):bar + k * (side + GAP) + side] = _tile(img)
        bottom[:, bar:bar + side] = _tile(truth[0])                       # the start is given
        for k in range(1, len(truth)):
            img = made[k - 1] if k - 1 < len(made) else None
            bottom[:, bar + k * (side + GAP):bar + k * (side + GAP) + side] = _tile(img)
        rows += [top, np.full((GAP, width, 3), 255, dtype=np.uint8), bottom,
                 np.full((3 * GAP, width, 3), 255, dtype=np.uint8)]
    return np.concatenate(rows[:-1], axis=0)
