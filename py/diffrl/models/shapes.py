"""A procedural "shapes" world: a tiny prompt grammar and a renderer that draws exactly what a prompt says.

It is the toy text-to-image task of diffrl's end-to-end demo: a tiny diffusion model learns to draw these
scenes, then is RL-fine-tuned with the rule-based verifier :class:`diffrl.rewards.ShapesReward`.

Grammar (lower case; :func:`parse_prompt` also accepts upper case, extra spaces and a final period)::

    prompt   := groups | relation
    groups   := group | group " and " group          # distinct kinds, 1..4 objects in all
    group    := "a " COLOUR " " SHAPE                # one object
              | NUMBER " " COLOUR " " SHAPE "s"      # NUMBER in two, three, four
    relation := single " " REL " " single            # two single objects of different kinds
    single   := "a " COLOUR " " SHAPE
    REL      := "left of" | "right of" | "above" | "below"

e.g. "a red circle", "two red circles", "a green triangle and a red circle", "two yellow squares and a
blue circle", "a blue square left of a yellow triangle", "a red circle above a green square".
A *kind* is a (colour, shape) pair; "one" is accepted for "a", and "to the left of"/"to the right of"
for "left of"/"right of"; :func:`format_prompt` always writes the canonical form.

Images (``render``) are float32 [3, size, size] in [0, 1]: a black background and flat, saturated
objects from :data:`COLORS` (hard edges, no anti-aliasing). Objects are axis-aligned squares, discs and
upward-pointing isosceles triangles (base = height) whose bounding boxes are 8..11 px at size 32
(scaled with ``size``), at least :data:`GAP` px apart (boxes never touch) and 1 px inside the border.
A relation is drawn with a clear margin: "A left of B" puts A's box entirely left of B's box (by at
least the gap), and the vertical offset of their centres is at most 3/4 of the horizontal one (likewise
for the other relations). Placement is random per seed; ``render(prompt, seed)`` is deterministic.
"""

from __future__ import annotations

import functools
import random as _random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: colour name -> RGB in [0, 1]; saturated and far apart (pairwise distance > 0.6), on a black background
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (1.00, 0.90, 0.10),
    "purple": (0.80, 0.20, 0.95),
}
#: background colour of every render
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4
#: minimum number of background pixels between two objects' bounding boxes (at size 32; scaled with size)
GAP = 3
#: bounding-box side range in px at size 32 (scaled with size)
SIZE_RANGE = (8, 11)
#: a triangle covers the pixel centres within this many px of its sides (fills the apex row)
TRIANGLE_SLACK = 0.3

_WORD_TO_NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_REL_ALIASES = {"left of": "left of", "to the left of": "left of", "right of": "right of",
                "to the right of": "right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one kind: colour (a key of :data:`COLORS`) and shape (one of :data:`SHAPES`)."""

    count: int
    colour: str
    shape: str

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{NUMBERS[self.count]} {self.colour} {noun}"


@dataclass(frozen=True)
class Scene:
    """A parsed prompt: the object groups in prompt order, and an optional relation.

    With a relation, ``objects`` is two single objects of different kinds and the scene says
    "objects[0] <relation> objects[1]". Two scenes that differ only in the order of their groups, or
    "A left of B" vs "B right of A", describe the same images: compare :attr:`key`, not the scenes.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self):
        _validate_scene(self)

    @property
    def prompt(self) -> str:
        return format_prompt(self)

    @property
    def n_objects(self) -> int:
        return sum(o.count for o in self.objects)

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        """(colour, shape) -> how many objects of that kind the scene has."""
        return {o.kind: o.count for o in self.objects}

    @property
    def key(self) -> tuple:
        """A canonical, hashable form: equal keys <=> same set of images satisfies both scenes' prompts."""
        if self.relation is None:
            return (tuple(sorted((o.colour, o.shape, o.count) for o in self.objects)), None)
        a, b = self.objects[0].kind, self.objects[1].kind
        rel = self.relation
        if rel == "right of":
            a, b, rel = b, a, "left of"
        elif rel == "below":
            a, b, rel = b, a, "above"
        return (((a[0], a[1], 1), (b[0], b[1], 1)), rel)


def _validate_scene(scene: Scene) -> None:
    objs = scene.objects
    if not isinstance(objs, tuple) or not objs:
        raise ValueError("a scene needs a non-empty tuple of ObjectSpec")
    for o in objs:
        if not isinstance(o, ObjectSpec):
            raise TypeError(f"scene objects must be ObjectSpec, got {type(o).__name__}")
        if o.colour not in COLORS:
            raise ValueError(f"unknown colour {o.colour!r}; known: {', '.join(COLORS)}")
        if o.shape not in SHAPES:
            raise ValueError(f"unknown shape {o.shape!r}; known: {', '.join(SHAPES)}")
        if isinstance(o.count, bool) or not isinstance(o.count, int) or o.count not in NUMBERS:
            raise ValueError(f"object count must be 1..{MAX_OBJECTS}, got {o.count!r}")
    if len({o.kind for o in objs}) != len(objs):
        raise ValueError("a scene names each (colour, shape) kind at most once")
    if scene.relation is None:
        if len(objs) > 2:
            raise ValueError("a scene has at most two object groups")
        if sum(o.count for o in objs) > MAX_OBJECTS:
            raise ValueError(f"a scene has at most {MAX_OBJECTS} objects")
    else:
        if scene.relation not in RELATIONS:
            raise ValueError(f"unknown relation {scene.relation!r}; known: {', '.join(RELATIONS)}")
        if len(objs) != 2 or any(o.count != 1 for o in objs):
            raise ValueError("a relation joins exactly two single objects")


def format_prompt(scene: Scene) -> str:
    """The canonical prompt of a scene (the inverse of :func:`parse_prompt` on canonical prompts)."""
    if scene.relation is None:
        return " and ".join(o.phrase for o in scene.objects)
    return f"{scene.objects[0].phrase} {scene.relation} {scene.objects[1].phrase}"


_COLOUR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_GROUP_RE = re.compile(rf"^(a|an|one|two|three|four) ({_COLOUR_RE}) ({_SHAPE_RE})(s?)$")
_REL_RE = re.compile(r"^(.+?) (to the left of|to the right of|left of|right of|above|below) (.+)$")


def _parse_group(text: str, prompt: str) -> ObjectSpec:
    m = _GROUP_RE.match(text)
    if m is None:
        raise ValueError(f"prompt {prompt!r} is outside the shapes grammar: cannot read {text!r} "
                         f"(expected e.g. 'a red circle' or 'two blue squares')")
    count = _WORD_TO_NUMBER[m.group(1)]
    if (count == 1) != (m.group(4) == ""):
        raise ValueError(f"prompt {prompt!r}: number and noun disagree in {text!r}")
    return ObjectSpec(count, m.group(2), m.group(3))


@functools.lru_cache(maxsize=65536)
def _parse_cached(prompt: str) -> Scene:
    text = " ".join(prompt.strip().lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    if not text:
        raise ValueError("empty prompt")
    m = _REL_RE.match(text)
    try:
        if m is not None:
            a, b = _parse_group(m.group(1), prompt), _parse_group(m.group(3), prompt)
            if a.count != 1 or b.count != 1:
                raise ValueError(f"prompt {prompt!r}: a relation joins two single objects")
            return Scene((a, b), _REL_ALIASES[m.group(2)])
        parts = text.split(" and ")
        if len(parts) > 2:
            raise ValueError(f"prompt {prompt!r}: at most two object groups")
        return Scene(tuple(_parse_group(p, prompt) for p in parts))
    except ValueError as e:
        if str(e).startswith(("prompt ", "empty")):
            raise
        raise ValueError(f"prompt {prompt!r} is outside the shapes grammar: {e}") from None


def parse_prompt(prompt: str) -> Scene:
    """Parses a prompt of the grammar into a :class:`Scene`; raises ValueError on anything else
    (TypeError if ``prompt`` is not a string)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return _parse_cached(prompt)


class _Draw:
    """Uniform draws from random.Random, numpy Generator/RandomState, an int seed or None."""

    def __init__(self, rng):
        if rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            rng = np.random.default_rng(None if rng is None else int(rng))
        if isinstance(rng, _random.Random):
            self._int = lambda n: rng.randrange(n)
            self._float = rng.random
        elif isinstance(rng, np.random.Generator):
            self._int = lambda n: int(rng.integers(n))
            self._float = lambda: float(rng.random())
        elif isinstance(rng, np.random.RandomState):
            self._int = lambda n: int(rng.randint(n))
            self._float = lambda: float(rng.random_sample())
        else:
            raise TypeError(f"rng must be random.Random, numpy.random.Generator, an int seed or None, "
                            f"got {type(rng).__name__}")

    def int(self, n: int) -> int:
        return self._int(n)

    def float(self) -> float:
        return self._float()

    def choice(self, seq):
        return seq[self._int(len(seq))]


_KINDS = tuple((c, s) for c in COLORS for s in SHAPES)
# (count of the first group, count of the second) with at most MAX_OBJECTS objects in all
_PAIR_COUNTS = tuple((a, b) for a in range(1, MAX_OBJECTS) for b in range(1, MAX_OBJECTS) if a + b <= MAX_OBJECTS)


def random_scene(rng=None, *, relation_prob: float = 0.3, two_groups_prob: float = 0.5) -> Scene:
    """Draws a scene: with probability ``relation_prob`` a relation between two single objects of
    different kinds, else one group (count 1..4, uniform) or, with probability ``two_groups_prob``,
    two groups of different kinds (count pair uniform over those with at most 4 objects in all).
    Kinds, colours and relations are uniform."""
    d = _Draw(rng)
    if d.float() < relation_prob:
        i = d.int(len(_KINDS))
        j = d.int(len(_KINDS) - 1)
        j += j >= i
        rel = d.choice(RELATIONS)
        return Scene((ObjectSpec(1, *_KINDS[i]), ObjectSpec(1, *_KINDS[j])), rel)
    if d.float() < two_groups_prob:
        i = d.int(len(_KINDS))
        j = d.int(len(_KINDS) - 1)
        j += j >= i
        a, b = d.choice(_PAIR_COUNTS)
        return Scene((ObjectSpec(a, *_KINDS[i]), ObjectSpec(b, *_KINDS[j])))
    return Scene((ObjectSpec(1 + d.int(MAX_OBJECTS), *d.choice(_KINDS)),))


def random_prompt(rng=None, **kwargs) -> str:
    """A random canonical prompt of the grammar (see :func:`random_scene` for the distribution and
    the keyword arguments). ``rng``: random.Random, numpy Generator/RandomState, an int seed or None."""
    return random_scene(rng, **kwargs).prompt


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def near_miss_scenes(scene: Scene) -> list[Scene]:
    """Every scene one attribute away from ``scene``: one group's colour or shape changed (to a kind the
    scene does not have), one group's count moved by one (within 1..4 objects in all), or a relation
    reversed. A caption of ``scene`` on a render of one of them is what a slightly wrong caption of web
    data looks like (the shapes model's pre-training uses them as caption noise)."""
    out: list[Scene] = []
    objs = scene.objects
    kinds = {o.kind for o in objs}
    for i, o in enumerate(objs):
        def with_(new: ObjectSpec, i=i):
            return Scene(objs[:i] + (new,) + objs[i + 1:], scene.relation)
        for c in COLORS:
            if c != o.colour and (c, o.shape) not in kinds:
                out.append(with_(ObjectSpec(o.count, c, o.shape)))
        for sh in SHAPES:
            if sh != o.shape and (o.colour, sh) not in kinds:
                out.append(with_(ObjectSpec(o.count, o.colour, sh)))
        if scene.relation is None:
            for n in (o.count - 1, o.count + 1):
                if 1 <= n and scene.n_objects - o.count + n <= MAX_OBJECTS:
                    out.append(with_(ObjectSpec(n, o.colour, o.shape)))
    if scene.relation is not None:
        out.append(Scene(objs, _OPPOSITE[scene.relation]))
    return out


def near_miss_scene(scene: Scene, rng=None) -> Scene:
    """One of :func:`near_miss_scenes` (``scene``), uniformly: its kind of change first (colour, shape,
    count or relation, among those the scene allows), then the change."""
    d = _Draw(rng)
    by_kind: dict[str, list[Scene]] = {}
    for m in near_miss_scenes(scene):
        a, b = scene, m
        kind = ("relation" if a.relation != b.relation else
                "count" if [o.count for o in a.objects] != [o.count for o in b.objects] else
                "colour" if [o.colour for o in a.objects] != [o.colour for o in b.objects] else "shape")
        by_kind.setdefault(kind, []).append(m)
    kinds = sorted(by_kind)
    return d.choice(by_kind[d.choice(kinds)])


# ----------------------------------------------------------------------------------------------------
# rendering


@functools.lru_cache(maxsize=None)
def _shape_mask_cached(shape: str, s: int) -> np.ndarray:
    """Read-only boolean [s, s] mask of a shape filling an s x s box (sampled at pixel centres)."""
    c = np.arange(s, dtype=np.float64) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        m = np.ones((s, s), dtype=bool)
    elif shape == "circle":
        r = s / 2.0
        m = (x - r) ** 2 + (y - r) ** 2 <= r * r
    elif shape == "triangle":  # apex at the top centre, base along the bottom edge
        m = np.abs(x - s / 2.0) <= y * 0.5 + TRIANGLE_SLACK
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m.setflags(write=False)
    return m


def _free_positions(s: int, lo_pos: int, n_pos: int, placed, gap: int) -> np.ndarray:
    """bool [n_pos (y), n_pos (x)]: top-left corners (lo_pos + index) of an s x s box that keep at least
    ``gap`` px of background to every placed box."""
    c = lo_pos + np.arange(n_pos)
    free = np.ones((n_pos, n_pos), dtype=bool)
    for bx, by, bs in placed:
        # boxes overlap (gap included) iff both their x and their y intervals do
        ox = (c < bx + bs + gap) & (bx < c + s + gap)
        oy = (c < by + bs + gap) & (by < c + s + gap)
        free &= ~(oy[:, None] & ox[None, :])
    return free


def _relation_positions(s: int, lo_pos: int, n_pos: int, other, other_is_a: bool, relation: str,
                        gap: int) -> np.ndarray:
    """bool [n_pos (y), n_pos (x)]: top-left corners of an s x s box B (or A when ``other_is_a`` is False)
    for which "A <relation> B" holds with the already placed ``other`` box: A's box entirely on that side
    of B's (by at least ``gap``) and the centres' offset across the relation at most 3/4 of that along it."""
    c = (lo_pos + np.arange(n_pos)).astype(np.float64)
    ox, oy, os_ = other
    cy, cx = c[:, None], c[None, :]
    if other_is_a:
        ax, ay, as_, bx, by, bs = ox, oy, os_, cx, cy, s
    else:
        ax, ay, as_, bx, by, bs = cx, cy, s, ox, oy, os_
    dx = (bx + bs / 2) - (ax + as_ / 2)  # b's centre minus a's centre
    dy = (by + bs / 2) - (ay + as_ / 2)
    if relation == "left of":  # a left of b
        ok = (ax + as_ + gap <= bx) & (np.abs(dy) <= 0.75 * dx)
    elif relation == "right of":
        ok = (bx + bs + gap <= ax) & (np.abs(dy) <= -0.75 * dx)
    elif relation == "above":
        ok = (ay + as_ + gap <= by) & (np.abs(dx) <= 0.75 * dy)
    elif relation == "below":
        ok = (by + bs + gap <= ay) & (np.abs(dx) <= -0.75 * dy)
    else:
        raise ValueError(relation)
    return np.broadcast_to(ok, (n_pos, n_pos))


def _layout(scene: Scene, seed: int, size: int) -> list[tuple[str, str, int, int, int]]:
    """(colour, shape, x0, y0, side) of every object: random, non-overlapping, relation satisfied.

    Objects are placed one at a time in a random order, each at a position drawn uniformly from those
    that keep the gap to the boxes placed before it (and, for the second object of a relation, satisfy
    the relation); when no such position is left, the layout starts again, and after many failed
    starts the objects' size range shrinks."""
    rng = np.random.default_rng(seed)
    scale = size / 32.0
    gap = max(1, round(GAP * scale))
    border = max(1, round(scale))
    lo, hi = max(3, round(SIZE_RANGE[0] * scale)), max(3, round(SIZE_RANGE[1] * scale))
    objs = [(o.colour, o.shape) for o in scene.objects for _ in range(o.count)]
    order = rng.permutation(len(objs))  # which object is placed first must not leak prompt order
    while True:
        for _restart in range(50):
            boxes: list[tuple[int, int, int] | None] = [None] * len(objs)
            placed: list[tuple[int, int, int]] = []
            ok = True
            for i in order:
                s = int(rng.integers(lo, hi + 1))
                n_pos = size - 2 * border - s + 1
                if n_pos < 1:
                    ok = False
                    break
                free = _free_positions(s, border, n_pos, placed, gap)
                if scene.relation is not None and placed:  # the second of the two related objects
                    other = boxes[1 - i]
                    free = free & _relation_positions(s, border, n_pos, other, i == 1, scene.relation, gap)
                idx = np.flatnonzero(free)
                if idx.size == 0:
                    ok = False
                    break
                y, x = divmod(int(idx[rng.integers(idx.size)]), n_pos)
                boxes[i] = (border + x, border + y, s)
                placed.append(boxes[i])
            if ok:
                return [(c, sh, *box) for (c, sh), box in zip(objs, boxes)]
        if hi > lo:
            hi -= 1
        elif lo > 3:
            lo -= 1
            hi = lo
        else:  # pragma: no cover - cannot happen for the grammar at sizes >= 16
            raise RuntimeError(f"cannot place {scene.prompt!r} on a {size}x{size} canvas")


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return int(seed)


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    return int(size)


def _render_np(scene: Scene, seed: int, size: int, out: np.ndarray) -> None:
    out[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    for colour, shape, x0, y0, s in _layout(scene, seed, size):
        m = _shape_mask_cached(shape, s)
        region = out[:, y0:y0 + s, x0:x0 + s]
        for ch, v in enumerate(COLORS[colour]):
            region[ch][m] = v


def render(prompt: str | Scene, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Draws ``prompt`` (a prompt string or a :class:`Scene`): float32 [3, size, size] in [0, 1].
    Deterministic given (prompt, seed, size); the layout depends on the seed (and the objects)."""
    scene = prompt if isinstance(prompt, Scene) else parse_prompt(prompt)
    seed, size = _check_seed(seed), _check_size(size)
    out = np.empty((3, size, size), dtype=np.float32)
    _render_np(scene, seed, size, out)
    return torch.from_numpy(out)


def render_batch(prompts: Sequence[str | Scene], seeds: Sequence[int] | int = 0, size: int = 32) -> torch.Tensor:
    """Draws a batch: float32 [B, 3, size, size]. ``seeds`` is one int per prompt, or a single int s
    meaning seeds s, s+1, ..., s+B-1."""
    if isinstance(prompts, (str, Scene)):
        raise TypeError("prompts must be a sequence of prompts, not a single prompt")
    prompts = list(prompts)
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = [int(seeds) + i for i in range(len(prompts))]
    else:
        seeds = list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    size = _check_size(size)
    out = np.empty((len(prompts), 3, size, size), dtype=np.float32)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        scene = p if isinstance(p, Scene) else parse_prompt(p)
        _render_np(scene, _check_seed(s), size, out[i])
    return torch.from_numpy(out)


__all__ = ["COLORS", "BACKGROUND", "SHAPES", "RELATIONS", "NUMBERS", "MAX_OBJECTS", "ObjectSpec", "Scene",
           "parse_prompt", "format_prompt", "random_scene", "random_prompt", "near_miss_scenes", "near_miss_scene", "render", "render_batch"]
