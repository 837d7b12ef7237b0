"""Visual thoughts at inference: the model writes the state images and the answer; what is scored.

:func:`think` gives a trained MVoT run the prompt of one held-out example (the question and, with
thoughts, the image of the start) and lets it write greedily under the modality mask until it has
written its answer line. :func:`mvot_eval` scores many such examples:

- ``answer_acc``: the fraction of examples whose written answer (goal or hole) is right;
- ``image_token_acc``: of the image tokens of the true states, the fraction the model wrote
  at the same place (its k-th image against the true k-th state; an image of the wrong length
  counts as all wrong), so a wrong early state counts against every later one;
- ``image_exact``: the fraction of written images equal to the true state's tokens;
- ``forced_*``: arg-max accuracies with the true earlier tokens given (teacher forcing): the
  answer after the true thoughts, every image token, and the tokens of the cells that change
  (:func:`forced_scores`): how well the model draws the next state from a correct past.

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
def forced_scores(model: NeatLM, task: MVoTTask, split: str, indices: list[int],
                  batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced arg-max accuracies (the true earlier tokens given):

    - ``forced_answer_acc``: the first letter of the answer (goal/hole), after the true thoughts;
    - ``forced_image_acc``: every image token of the states after the moves (NaN for a text run);
    - ``forced_changed_acc``: only the image tokens of cells that differ from the same cell of the
      state before (where the agent left and where it arrived): what copying cannot get right.
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    layout, answer = task.layout, list(ANSWER.encode())
    counts = {"answer": [0, 0], "image": [0, 0], "changed": [0, 0]}
    for i in range(0, len(indices), batch_size):
        x, y = task.batch(split, indices[i:i + batch_size])
        x, y = x.to(device), y.to(device)
        logits = model(x).logits
        if layout is not None:
            logits = mask_logits(logits, x, layout)
        pred = logits.argmax(-1)
        for b in range(x.shape[0]):
            row, ok = x[b].tolist(), (pred[b] == y[b]).tolist()
            for t in range(len(answer) - 1, len(row)):
                if row[t - len(answer) + 1:t + 1] == answer and int(y[b, t]) >= 0:
                    counts["answer"][0] += ok[t]
                    counts["answer"][1] += 1
            if layout is None:
                continue
            starts = [t + 1 for t, v in enumerate(row) if v == layout.boi]           # where each image begins
            n = task.settings.max_size ** 2
            for k in range(1, len(starts)):
                prev, cur = starts[k - 1], starts[k]
                for j in range(n):
                    if cur + j >= len(row) or not layout.is_code(torch.tensor(row[cur + j])):
                        break
                    hit = ok[cur + j - 1]                                             # the logits before the token
                    counts["image"][0] += hit
                    counts["image"][1] += 1
                    if row[cur + j] != row[prev + j]:
                        counts["changed"][0] += hit
                        counts["changed"][1] += 1
    model.train(was)
    rate = lambda k: counts[k][0] / counts[k][1] if counts[k][1] else float("nan")  # noqa: E731
    return {"forced_answer_acc": rate("answer"), "forced_image_acc": rate("image"),
            "forced_changed_acc": rate("changed")}


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
    forced = forced_scores(model, task, split, list(range(start, start + examples)))
    result["forced_answer_acc"] = forced["forced_answer_acc"]
    if task.layout is not None:
        result["forced_image_acc"] = forced["forced_image_acc"]
        result["forced_changed_acc"] = forced["forced_changed_acc"]
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
