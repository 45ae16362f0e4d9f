"""ShapesReward: a rule-based verifier for the procedural shapes world (:mod:`diffrl.models.shapes`).

Pipeline, vectorised over the batch in torch (runs on the images' device; no scipy):

1. **Colour segmentation.** Each pixel is projected onto every segment background -> palette colour
   (blurring a flat object into the background moves its pixels along exactly that segment). A pixel
   belongs to colour k when k's segment is the nearest (residual distance), it lies at least
   ``min_alpha`` of the way from the background to the colour, and the residual is at most
   ``max_residual``; anything else (background, dark fringes, off-palette colours) is background.
2. **Connected components** of equal colour, 8-connected: label propagation (min over the
   neighbours of the same colour) with pointer jumping, until nothing changes. Components smaller than
   ``min_area`` px (12 at 32x32, scaled with the image area) are ignored as noise.
3. **Shape.** A component is compared with each shape template (disc, square, upward triangle)
   drawn into its own bounding box, exactly as the renderer draws them; its shape is the template of
   highest IoU. It is "other" (never matches a prompt) when the best IoU is below ``min_iou`` or the
   box's aspect ratio exceeds ``max_aspect`` (e.g. two objects merged into one blob).
4. **Relation** "A <rel> B": the largest component of A's kind and the largest of B's kind; "A left
   of B" holds when A's centroid x + ``relation_margin`` < B's centroid x (image x grows rightwards,
   y downwards: "above" compares y). Only the direction is checked, not how dominant it is.

Heads (float32 [B] in [0, 1]). Detected objects are counted per kind (colour, shape) -- "other"
shapes included -- and compared with the prompt's counts as multisets, with the Jaccard ratio
``sum(min(det, want)) / sum(max(det, want))`` (1 iff equal; extra and missing objects both cost):

- ``count``: over kinds (colour, shape): the right number of objects of each requested kind and
  nothing else;
- ``colour``: over colours only (shapes ignored);
- ``shape``: over shapes only (colours ignored);
- ``relation``: 1 if the relation holds, 0 if not or if A or B is missing; **1 for prompts without a
  relation** (vacuously true, so that ``reward`` treats every prompt alike; a batch mean of this head
  over mixed prompts is therefore inflated: average it over relation prompts only for a clean number,
  ``parse_prompt(p).relation is not None``);
- ``correct``: 1.0 iff every kind's count matches exactly and the relation holds, else 0.0 (strict
  accuracy);
- ``reward``: the mean of count, colour, shape and relation. It is 1 exactly when ``correct`` is 1
  (count = 1 implies colour = shape = 1) and gives partial credit otherwise, e.g. right colours but
  wrong shapes, or one object too many. ``weights`` makes it a weighted mean of any of the heads
  count, colour, shape, relation and correct instead (e.g. ``{"count": 1, "colour": 1, "shape": 1,
  "relation": 1, "correct": 4}`` pays strict correctness on top of partial credit); it is still 1
  exactly when ``correct`` is 1.

Targets from metadata instead of the prompt (GenEval-style): ``reward(images, prompts, metadata=[...])``
with an entry ``{"include": [{"colour": "red", "shape": "circle", "count": 2}, ...], "relation": "left of"}``
(relation optional; the scene rules of :class:`diffrl.models.shapes.Scene` apply) scores that image
against the listed objects whatever its prompt says; entries without ``"include"`` (or None) fall back
to parsing the prompt.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffrl.models.shapes import BACKGROUND, COLORS, SHAPES, TRIANGLE_SLACK, ObjectSpec, Scene, parse_prompt

_K = len(COLORS)
_S = len(SHAPES) + 1  # + "other"
_COLOUR_INDEX = {c: i for i, c in enumerate(COLORS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_CIRCLE, _SQUARE, _TRIANGLE, _OTHER = (_SHAPE_INDEX["circle"], _SHAPE_INDEX["square"], _SHAPE_INDEX["triangle"],
                                       len(SHAPES))
_REL_CODE = {"left of": 0, "right of": 1, "above": 2, "below": 3}
HEADS = ("reward", "correct", "count", "colour", "shape", "relation")


@functools.lru_cache(maxsize=65536)
def _prompt_target(prompt: str):
    return _scene_target(parse_prompt(prompt))


def scene_from_metadata(meta) -> Scene:
    """The :class:`Scene` of a metadata entry ``{"include": [{"colour", "shape", "count"}, ...], "relation"}``."""
    include = meta.get("include")
    if not isinstance(include, (list, tuple)) or not all(isinstance(o, dict) for o in include):
        raise ValueError(f"metadata 'include' must be a list of {{colour, shape, count}} objects, got {include!r}")
    try:
        objs = tuple(ObjectSpec(o.get("count", 1), o["colour"], o["shape"]) for o in include)
    except KeyError as e:
        raise ValueError(f"metadata 'include' entries need 'colour' and 'shape' (missing {e})") from None
    return Scene(objs, meta.get("relation"))


@functools.lru_cache(maxsize=65536)
def _scene_target(scene: Scene):
    """(flat counts over K x S kinds, relation or None): relation = (kind index A, kind index B, code)."""
    want = np.zeros(_K * _S, dtype=np.int64)
    for o in scene.objects:
        want[_COLOUR_INDEX[o.colour] * _S + _SHAPE_INDEX[o.shape]] += o.count
    rel = None
    if scene.relation is not None:
        a, b = scene.objects
        rel = (_COLOUR_INDEX[a.colour] * _S + _SHAPE_INDEX[a.shape],
               _COLOUR_INDEX[b.colour] * _S + _SHAPE_INDEX[b.shape], _REL_CODE[scene.relation])
    return want, rel


@functools.lru_cache(maxsize=16)
def _template_areas(h: int, w: int) -> np.ndarray:
    """[h + 1, w + 1, 3]: pixel count of each shape template drawn into a box of bh x bw px."""
    out = np.zeros((h + 1, w + 1, len(SHAPES)), dtype=np.float64)
    for bh in range(1, h + 1):
        ry = (np.arange(bh) + 0.5)[:, None]
        for bw in range(1, w + 1):
            rx = (np.arange(bw) + 0.5)[None, :]
            out[bh, bw, _SQUARE] = bh * bw
            out[bh, bw, _CIRCLE] = (((rx - bw / 2) / (bw / 2)) ** 2 + ((ry - bh / 2) / (bh / 2)) ** 2 <= 1).sum()
            out[bh, bw, _TRIANGLE] = (np.abs(rx - bw / 2) <= ry / bh * (bw / 2) + TRIANGLE_SLACK).sum()
    return out


def _jaccard(det: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return torch.minimum(det, want).sum(-1).float() / torch.maximum(det, want).sum(-1).clamp_min(1).float()


class ShapesReward:
    """Scores images against shapes-grammar prompts: ``reward(images, prompts, group_ids=None, metadata=None)`` ->
    dict of float32 [B] tensors "reward", "correct", "count", "colour", "shape", "relation" (see the
    module docstring for their definitions). ``images``: float [B, 3, H, W] in [0, 1] (a tensor or a
    numpy array; values up to ``range_slack`` outside [0, 1] are accepted and clamped). ``group_ids``
    is accepted for interface compatibility with group-aware rewards and ignored (only its length is
    checked). ``detect(images)`` lists the objects the verifier sees, for debugging.
    """

    heads = HEADS
    #: the heads ``reward`` averages by default (``weights=None``)
    DEFAULT_WEIGHTS = {"count": 1.0, "colour": 1.0, "shape": 1.0, "relation": 1.0}

    def __init__(self, *, weights: dict[str, float] | None = None, min_alpha: float = 0.5, max_residual: float = 0.3, min_area: int | None = None,
                 min_iou: float = 0.6, max_aspect: float = 1.6, relation_margin: float = 1.0,
                 range_slack: float = 0.02):
        if not 0.0 < min_alpha <= 1.0:
            raise ValueError(f"min_alpha must be in (0, 1], got {min_alpha}")
        if max_residual <= 0:
            raise ValueError(f"max_residual must be positive, got {max_residual}")
        if min_area is not None and (isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1):
            raise ValueError(f"min_area must be a positive int or None, got {min_area!r}")
        if not 0.0 <= min_iou <= 1.0:
            raise ValueError(f"min_iou must be in [0, 1], got {min_iou}")
        if max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        if relation_margin < 0 or range_slack < 0:
            raise ValueError("relation_margin and range_slack must be non-negative")
        self.weights = self._check_weights(weights)
        self.min_alpha = float(min_alpha)
        self.max_residual = float(max_residual)
        self.min_area = min_area
        self.min_iou = float(min_iou)
        self.max_aspect = float(max_aspect)
        self.relation_margin = float(relation_margin)
        self.range_slack = float(range_slack)

    # ------------------------------------------------------------------------------------------------
    # input checks

    @classmethod
    def _check_weights(cls, weights) -> dict[str, float]:
        if weights is None:
            return dict(cls.DEFAULT_WEIGHTS)
        if not isinstance(weights, dict) or not weights:
            raise TypeError(f"weights must be a non-empty dict of head name -> weight, got {weights!r}")
        allowed = ("count", "colour", "shape", "relation", "correct")
        out = {}
        for k, v in weights.items():
            if k not in allowed:
                raise ValueError(f"weights: unknown head {k!r}; the reward can weight {', '.join(allowed)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"weights[{k!r}] must be a finite number >= 0, got {v!r}")
            out[k] = float(v)
        if sum(out.values()) <= 0:
            raise ValueError(f"weights must not all be zero, got {weights!r}")
        return out

    def _check_images(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("empty batch")
        if images.shape[2] < 8 or images.shape[3] < 8:
            raise ValueError(f"images must be at least 8x8, got {tuple(images.shape[2:])}")
        images = images.detach().float()
        lo, hi = images.aminmax()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError("images contain NaN or inf")
        if lo < -self.range_slack or hi > 1.0 + self.range_slack:
            raise ValueError(f"images must be in [0, 1] (slack {self.range_slack}), got values in "
                             f"[{lo.item():.4g}, {hi.item():.4g}]; map [-1, 1] outputs with (x + 1) / 2")
        return images.clamp(0.0, 1.0)

    @staticmethod
    def _check_prompts(prompts, n: int) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a sequence of strings (one per image), not "
                            f"{type(prompts).__name__}")
        if len(prompts) != n:
            raise ValueError(f"got {n} images but {len(prompts)} prompts")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
        return list(prompts)

    # ------------------------------------------------------------------------------------------------
    # perception

    def _segment(self, images: torch.Tensor) -> torch.Tensor:
        """[B, H, W] int64 class map: 0 background, 1..K palette colours."""
        dev = images.device
        bg = torch.tensor(BACKGROUND, dtype=torch.float32, device=dev)
        pal = torch.tensor(list(COLORS.values()), dtype=torch.float32, device=dev) - bg  # [K, 3]
        dd = (pal * pal).sum(1)[None, :, None, None]  # [1, K, 1, 1]
        p = images - bg[None, :, None, None]
        pd = torch.einsum("bchw,kc->bkhw", p, pal)
        pp = (p * p).sum(1, keepdim=True)
        alpha = (pd / dd).clamp(0.0, 1.0)
        res2 = (pp - 2 * alpha * pd + alpha * alpha * dd).clamp_min(0.0)
        best_res2, k = res2.min(1)
        best_alpha = alpha.gather(1, k[:, None]).squeeze(1)
        fg = (best_alpha >= self.min_alpha) & (best_res2 <= self.max_residual ** 2)
        return torch.where(fg, k + 1, torch.zeros_like(k))

    @staticmethod
    def _label(cls: torch.Tensor) -> torch.Tensor:
        """8-connected components of equal nonzero class: [B, H, W] int64 label = the smallest flat index
        (over the whole batch) of a pixel of the component; background gets B*H*W."""
        b, h, w = cls.shape
        n = b * h * w
        fg = cls > 0
        idx = torch.arange(n, device=cls.device).view(b, h, w)
        big = torch.full_like(idx, n)
        lab = torch.where(fg, idx, big)
        cpad = F.pad(cls, (1, 1, 1, 1), value=-1)
        shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        same = [(cpad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == cls) & fg for dy, dx in shifts]
        flat_fg = fg.view(-1)
        while True:
            lpad = F.pad(lab, (1, 1, 1, 1), value=n)
            new = lab
            for (dy, dx), m in zip(shifts, same):
                nb = lpad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                new = torch.minimum(new, torch.where(m, nb, big))
            # pointer jumping: a label is a pixel of the same component whose label is <= it
            flat = new.reshape(-1)
            jumped = torch.where(flat_fg, flat.gather(0, flat.clamp_max(n - 1)), flat)
            jumped = torch.minimum(jumped, flat).view(b, h, w)
            if torch.equal(jumped, lab):
                return lab
            lab = jumped

    def _components(self, images: torch.Tensor):
        """Per component (kept ones only): image index, colour index, shape index, area, centroid x, y."""
        b, _, h, w = images.shape
        cls = self._segment(images)
        lab = self._label(cls)
        dev = images.device
        fgi = (cls.view(-1) > 0).nonzero().squeeze(1)  # flat indices of foreground pixels
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        if fgi.numel() == 0:
            return empty, empty, empty, empty, empty.float(), empty.float()
        roots, inv = torch.unique(lab.view(-1)[fgi], return_inverse=True)
        nc = roots.numel()
        pix = fgi % (h * w)
        py, px = pix // w, pix % w
        area = torch.bincount(inv, minlength=nc)
        sx = torch.bincount(inv, weights=px.double(), minlength=nc)
        sy = torch.bincount(inv, weights=py.double(), minlength=nc)

        def reduce(v, how, init):
            return torch.full((nc,), init, dtype=torch.int64, device=dev).scatter_reduce(0, inv, v, how)

        x0, x1 = reduce(px, "amin", w), reduce(px, "amax", -1)
        y0, y1 = reduce(py, "amin", h), reduce(py, "amax", -1)
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        # template membership of each pixel, in its component's box (as the renderer draws them)
        rx = (px - x0[inv]).double() + 0.5
        ry = (py - y0[inv]).double() + 0.5
        hw_, hh_ = bw[inv].double() / 2, bh[inv].double() / 2
        in_circle = ((rx - hw_) / hw_) ** 2 + ((ry - hh_) / hh_) ** 2 <= 1
        in_tri = (rx - hw_).abs() <= ry / (2 * hh_) * hw_ + TRIANGLE_SLACK
        cols = {_CIRCLE: torch.bincount(inv, weights=in_circle.double(), minlength=nc), _SQUARE: area.double(),
                _TRIANGLE: torch.bincount(inv, weights=in_tri.double(), minlength=nc)}
        inter = torch.stack([cols[i] for i in range(len(SHAPES))], 1)  # [nc, 3]: |component & template|
        tarea = torch.from_numpy(_template_areas(h, w)).to(dev)[bh, bw]  # [nc, 3]
        iou = inter / (area.double()[:, None] + tarea - inter).clamp_min(1.0)
        best_iou, shape = iou.max(1)
        aspect = torch.maximum(bw, bh).double() / torch.minimum(bw, bh).double()
        shape = torch.where((best_iou < self.min_iou) | (aspect > self.max_aspect),
                            torch.full_like(shape, _OTHER), shape)
        min_area = self.min_area if self.min_area is not None else max(1, round(12 * h * w / 1024))
        keep = area >= min_area
        img = roots // (h * w)
        colour = cls.view(-1)[roots] - 1
        cx = (sx / area.double()).float() + 0.5
        cy = (sy / area.double()).float() + 0.5
        return img[keep], colour[keep], shape[keep], area[keep], cx[keep], cy[keep]

    def detect(self, images) -> list[list[dict]]:
        """The objects the verifier sees in each image: dicts with colour, shape ("other" when it
        matches no template), area (px) and centroid x, y (px, from the top-left corner)."""
        images = self._check_images(images)
        img, colour, shape, area, cx, cy = (t.cpu() for t in self._components(images))
        names = list(COLORS)
        shapes = list(SHAPES) + ["other"]
        out: list[list[dict]] = [[] for _ in range(images.shape[0])]
        for i in range(img.numel()):
            out[int(img[i])].append({"colour": names[int(colour[i])], "shape": shapes[int(shape[i])],
                                     "area": int(area[i]), "x": float(cx[i]), "y": float(cy[i])})
        return out

    # ------------------------------------------------------------------------------------------------
    # scoring

    def __call__(self, images, prompts: Sequence[str], group_ids=None, metadata=None) -> dict[str, torch.Tensor]:
        from diffrl.rewards.base import check_metadata  # noqa: PLC0415

        images = self._check_images(images)
        b, _, h, w = images.shape
        prompts = self._check_prompts(prompts, b)
        if group_ids is not None and len(group_ids) != b:
            raise ValueError(f"got {b} images but {len(group_ids)} group ids")
        metadata = check_metadata(metadata, b, name="ShapesReward") or [None] * b
        targets = []
        for i, (p, m) in enumerate(zip(prompts, metadata)):
            try:
                targets.append(_prompt_target(p) if m is None or "include" not in m else
                               _scene_target(scene_from_metadata(m)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{'prompt' if m is None or 'include' not in m else 'metadata'} {i}: {e}") from None
        dev = images.device
        want = torch.from_numpy(np.stack([t[0] for t in targets])).to(dev)  # [B, K*S]
        img, colour, shape, area, cx, cy = self._components(images)
        kind = colour * _S + shape
        det = torch.bincount(img * (_K * _S) + kind, minlength=b * _K * _S).view(b, _K * _S)

        count = _jaccard(det, want)
        colour_head = _jaccard(det.view(b, _K, _S).sum(2), want.view(b, _K, _S).sum(2))
        shape_head = _jaccard(det.view(b, _K, _S).sum(1), want.view(b, _K, _S).sum(1))
        exact = (det == want).all(1)

        relation = torch.ones(b, dtype=torch.float32, device=dev)
        rel_rows = [i for i, t in enumerate(targets) if t[1] is not None]
        if rel_rows:
            nc = img.numel()
            rows = torch.tensor(rel_rows, dtype=torch.int64, device=dev)
            ka = torch.tensor([targets[i][1][0] for i in rel_rows], dtype=torch.int64, device=dev)
            kb = torch.tensor([targets[i][1][1] for i in rel_rows], dtype=torch.int64, device=dev)
            code = torch.tensor([targets[i][1][2] for i in rel_rows], dtype=torch.int64, device=dev)
            # the largest component of each (image, kind): argmax of area, ties to the first component
            key = img * (_K * _S) + kind
            score = area * (nc + 1) + (nc - torch.arange(nc, device=dev))
            best = torch.zeros(b * _K * _S, dtype=torch.int64, device=dev).scatter_reduce(0, key, score, "amax")
            sa, sb = best[rows * (_K * _S) + ka], best[rows * (_K * _S) + kb]
            found = (sa > 0) & (sb > 0)
            ia = (nc - sa % (nc + 1)).clamp(0, max(nc - 1, 0))
            ib = (nc - sb % (nc + 1)).clamp(0, max(nc - 1, 0))
            if nc:
                ax, ay, bx, by = cx[ia], cy[ia], cx[ib], cy[ib]
            else:
                ax = ay = bx = by = torch.zeros(len(rel_rows), device=dev)
            mx, my = self.relation_margin * w / 32.0, self.relation_margin * h / 32.0
            ok = torch.stack([ax + mx < bx, bx + mx < ax, ay + my < by, by + my < ay], 1)
            holds = ok.gather(1, code[:, None]).squeeze(1) & found
            relation[rows] = holds.float()

        correct = (exact & (relation == 1)).float()
        heads = {"correct": correct, "count": count, "colour": colour_head, "shape": shape_head, "relation": relation}
        reward = sum(w * heads[k] for k, w in self.weights.items()) / sum(self.weights.values())
        reward = torch.where(correct == 1, torch.ones_like(reward), reward)
        return {"reward": reward, **heads}


__all__ = ["ShapesReward", "HEADS", "scene_from_metadata"]
