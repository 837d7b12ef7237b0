"""FrozenLake-style grid worlds: the spatial task of MVoT (Li et al. 2025), generated here.

An example is a square map of ice (``.``), holes (``H``), a start (``S``) and a goal (``G``), and
a sequence of moves (``L R U D``) the agent makes from the start. A move into the border leaves
the agent where it is (FrozenLake); the walk ends at the first hole (the agent falls) or at the
goal. The question: does the agent reach the goal or fall? Both answers are equally likely: the
target outcome is drawn first and random walks are drawn until one ends that way (within
``max_moves``), so the walks of either answer come from the same process and the number of moves
or their directions alone say nothing about the answer.

Each state along the walk is also rendered as a small RGB image (:func:`render`, numpy only):
4 x 4 pixels per cell, so a 4 x 4 map is a 16 x 16 image. These are the "visual thoughts" the
MVoT model learns to generate, as tokens of a VQ-VAE (:mod:`neatlm.nn.vq`).

Splits are by map: a map (its layout, start and goal) belongs to train, validation or test by a
CRC32 of its text, so held-out maps are never seen in training, whatever moves go with them.
Example ``i`` of a split is a function of ``(split, i)`` alone.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..settings import setting

MOVES = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}
SPLITS = ("train", "validation", "test")
CELL_PX = 4                     # pixels per cell side: one VQ code per cell at the VQ-VAE's stride 4
OUTCOMES = ("goal", "hole")
_SPLIT_SEED = 0x6D766F74        # "mvot"

# colours (RGB) of the rendering
ICE, ICE_LINE, ICE_SHINE = (196, 226, 250), (150, 186, 222), (250, 252, 255)
HOLE, HOLE_CORE = (28, 48, 100), (6, 10, 36)
GOAL, GOAL_CORE = (242, 200, 52), (176, 110, 10)
AGENT = (222, 34, 34)


@dataclass
class GridSettings:
    """[mvot] task settings: the sizes of the maps and the longest walk."""

    min_size: int = setting(4, "smallest map side (cells)", min=3, max=8)
    max_size: int = setting(5, "largest map side (cells); each example draws a side in [min_size, max_size]",
                            min=3, max=8)
    min_moves: int = setting(2, "shortest walk (moves)", min=1, max=12)
    max_moves: int = setting(5, "longest walk (moves); walks end at the first hole or at the goal", min=1, max=12)


@dataclass(frozen=True)
class GridExample:
    """One task: ``grid`` rows of ``S . H G``, the agent's ``moves`` from ``start``, its position
    after each move (``path``), and the ``outcome``: ``"goal"`` or ``"hole"``."""

    grid: tuple[str, ...]
    start: tuple[int, int]
    moves: str
    path: tuple[tuple[int, int], ...]
    outcome: str

    @property
    def size(self) -> int:
        return len(self.grid)

    def states(self) -> list[tuple[int, int]]:
        """The agent's position in each state: the start, then after each move."""
        return [self.start, *self.path]


ANSWER = "answer: "


def numbered(moves: str) -> str:
    """``"1L 2U 3D"``: each move after its step number. A thought then starts with the step's
    number and its move ("2U"), and the model finds the move after the same number in the question
    (a copy an induction head does), instead of counting letters along the moves."""
    return " ".join(f"{i}{m}" for i, m in enumerate(moves, 1))


def header(ex: "GridExample") -> bytes:
    """The question as text: the map and the numbered moves (every example's prompt starts with it)."""
    n = ex.size
    return f"map {n}x{n}\n{map_text(ex.grid)}\nmoves {numbered(ex.moves)}\n".encode()


def max_tokens(settings: GridSettings, thoughts: bool) -> int:
    """Input tokens of the longest example of :mod:`neatlm.data.mvot` (a training window must hold
    it): with ``thoughts``, the step number and move, then an image of ``n * n`` tokens between
    <boi> and <eoi>, after every move, and the image of the start."""
    n, m = settings.max_size, settings.max_moves
    steps = sum(len(str(i)) + 1 for i in range(1, m + 1))              # "1L", "2U", ...
    head = len(f"map {n}x{n}\n") + n * (n + 1) + len("moves ") + steps + (m - 1) + 1
    if not thoughts:
        return head + len(f"{ANSWER}hole\n") - 1
    return head + (n * n + 2) * (m + 1) + steps + len(f"\n{ANSWER}hole\n") - 1


def map_text(grid: tuple[str, ...]) -> str:
    return "\n".join(grid)


def split_of(grid: tuple[str, ...]) -> str:
    """train (80%), validation (10%) or test (10%), by a hash of the map: held-out maps stay held out."""
    bucket = zlib.crc32(map_text(grid).encode()) % 10
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def step(grid: tuple[str, ...], pos: tuple[int, int], move: str) -> tuple[int, int]:
    """The position after one move; a move into the border leaves the agent where it is."""
    n = len(grid)
    dr, dc = MOVES[move]
    r, c = pos[0] + dr, pos[1] + dc
    return (r, c) if 0 <= r < n and 0 <= c < n else pos


def walk(grid: tuple[str, ...], start: tuple[int, int], moves: str) -> tuple[list[tuple[int, int]], str | None]:
    """(positions after each move, outcome): the walk stops at the first hole or at the goal;
    outcome None if it did neither."""
    pos, path = start, []
    for m in moves:
        pos = step(grid, pos, m)
        path.append(pos)
        cell = grid[pos[0]][pos[1]]
        if cell == "H":
            return path, "hole"
        if cell == "G":
            return path, "goal"
    return path, None


def random_map(rng: np.random.Generator, n: int) -> tuple[tuple[str, ...], tuple[int, int]]:
    """(rows, start) of a random ``n x n`` map: a start, a goal and n - 1 to 2n - 2 holes."""
    cells = rng.permutation(n * n)
    holes = int(rng.integers(n - 1, 2 * n - 1))          # 3-6 holes at 4 x 4, 4-8 at 5 x 5
    rows = [["."] * n for _ in range(n)]
    s, g = divmod(int(cells[0]), n), divmod(int(cells[1]), n)
    rows[s[0]][s[1]], rows[g[0]][g[1]] = "S", "G"
    for c in cells[2:2 + holes]:
        r, col = divmod(int(c), n)
        rows[r][col] = "H"
    return tuple("".join(r) for r in rows), s


def make_example(split: str, index: int, settings: GridSettings) -> GridExample:
    """Example ``index`` of ``split``: a pure function of both (and the settings)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {', '.join(SPLITS)}")
    want = OUTCOMES[int(np.random.default_rng([_SPLIT_SEED, SPLITS.index(split), index]).integers(0, 2))]
    attempt = 0
    while True:
        rng = np.random.default_rng([_SPLIT_SEED, SPLITS.index(split), index, attempt])
        attempt += 1
        n = int(rng.integers(settings.min_size, settings.max_size + 1))
        grid, start = random_map(rng, n)
        if split_of(grid) != split:
            continue
        for _ in range(200):                                 # walks until one ends the wanted way
            moves = "".join(rng.choice(list(MOVES), size=settings.max_moves))
            path, outcome = walk(grid, start, moves)
            if outcome == want and len(path) >= settings.min_moves:
                return GridExample(grid, start, moves[:len(path)], tuple(path), outcome)


def render(grid: tuple[str, ...], agent: tuple[int, int] | None) -> np.ndarray:
    """The map with the agent at ``agent`` (None: no agent), uint8 (n * 4, n * 4, 3).

    Each 4 x 4 cell: ice with a darker line on its right and bottom edge and a shine pixel,
    a hole with a dark core, the goal with a core, the start drawn as ice (FrozenLake's agent
    stands on it at first). The agent is a red 2 x 2 square in the middle of its cell, over
    whatever the cell is: in a hole it has fallen, on the goal it has arrived.
    """
    n, p = len(grid), CELL_PX
    img = np.zeros((n * p, n * p, 3), dtype=np.uint8)
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            tile = img[r * p:(r + 1) * p, c * p:(c + 1) * p]
            if cell == "H":
                tile[:] = HOLE
                tile[1:3, 1:3] = HOLE_CORE
            elif cell == "G":
                tile[:] = GOAL
                tile[1:3, 1:3] = GOAL_CORE
            else:
                tile[:] = ICE
                tile[0, 0] = ICE_SHINE
            tile[p - 1, :] = tile[p - 1, :] * 0.8           # cell edges, so neighbouring cells read apart
            tile[:, p - 1] = tile[:, p - 1] * 0.8
    if agent is not None:
        r, c = agent
        img[r * p + 1:r * p + 3, c * p + 1:c * p + 3] = AGENT
    return img


def renderings(example: GridExample) -> list[np.ndarray]:
    """The image of every state: the start, then after each move."""
    return [render(example.grid, pos) for pos in example.states()]
