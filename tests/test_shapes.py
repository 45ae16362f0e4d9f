"""The shapes world: prompt grammar, renderer and the rule-based verifier ShapesReward."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrl.models import COLORS, SHAPES, ObjectSpec, Scene, parse_prompt, random_prompt, render, render_batch
from diffrl.models.shapes import BACKGROUND, MAX_OBJECTS, RELATIONS, format_prompt, random_scene
from diffrl.rewards import ShapesReward

HEADS = {"reward", "correct", "count", "colour", "shape", "relation"}


def _prompts(n, seed):
    rng = random.Random(seed)
    return [random_prompt(rng) for _ in range(n)]


def _gauss_blur(x, sigma):
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(3, 1, 2 * r + 1, 2 * r + 1).contiguous()
    return F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k, groups=3)


@pytest.fixture(scope="module")
def reward():
    return ShapesReward()


@pytest.fixture(scope="module")
def scenes():
    prompts = _prompts(600, seed=1234)
    return prompts, render_batch(prompts, 1000)


# ---------------------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("prompt,objects,relation", [
    ("a red circle", [(1, "red", "circle")], None),
    ("two red circles", [(2, "red", "circle")], None),
    ("three blue squares", [(3, "blue", "square")], None),
    ("four purple triangles", [(4, "purple", "triangle")], None),
    ("a green triangle and a red circle", [(1, "green", "triangle"), (1, "red", "circle")], None),
    ("two yellow squares and a blue circle", [(2, "yellow", "square"), (1, "blue", "circle")], None),
    ("a blue square left of a yellow triangle", [(1, "blue", "square"), (1, "yellow", "triangle")], "left of"),
    ("a red circle above a green square", [(1, "red", "circle"), (1, "green", "square")], "above"),
    ("a red circle below a red square", [(1, "red", "circle"), (1, "red", "square")], "below"),
    ("a purple circle right of a green circle", [(1, "purple", "circle"), (1, "green", "circle")], "right of"),
])
def test_parse_examples(prompt, objects, relation):
    scene = parse_prompt(prompt)
    assert scene == Scene(tuple(ObjectSpec(*o) for o in objects), relation)
    assert scene.prompt == prompt == format_prompt(scene)
    assert scene.n_objects == sum(o[0] for o in objects)
    img = render(prompt, seed=3)
    assert img.shape == (3, 32, 32)


def test_parse_normalises_and_aliases():
    assert parse_prompt("  A  Red circle. ") == parse_prompt("a red circle")
    assert parse_prompt("one red circle") == parse_prompt("a red circle")
    assert parse_prompt("a red circle to the left of a blue square").relation == "left of"
    assert parse_prompt("a red circle to the right of a blue square").relation == "right of"


@pytest.mark.parametrize("bad", [
    "", "   ", "red circle", "a circle", "a red", "a orange circle", "a red hexagon", "five red circles",
    "a red circles", "two red circle", "two red circles and three blue squares",  # 5 objects
    "a red circle and a red circle", "two red circles and a red circle",  # repeated kind
    "a red circle and a blue square and a green triangle",  # three groups
    "two red circles left of a blue square", "a red circle left of a red circle",
    "a red circle near a blue square", "a red circle left of", "a red circle, a blue square",
])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_prompt(bad)


def test_parse_type_error():
    with pytest.raises(TypeError):
        parse_prompt(3)
    with pytest.raises(TypeError):
        parse_prompt(None)


def test_scene_validation():
    with pytest.raises(ValueError):
        Scene((ObjectSpec(5, "red", "circle"),))
    with pytest.raises(ValueError):
        Scene((ObjectSpec(1, "pink", "circle"),))
    with pytest.raises(ValueError):
        Scene((ObjectSpec(1, "red", "circle"), ObjectSpec(1, "blue", "circle")), "near")
    with pytest.raises(ValueError):
        Scene((ObjectSpec(2, "red", "circle"), ObjectSpec(1, "blue", "circle")), "above")


def test_scene_key_equivalences():
    k = lambda p: parse_prompt(p).key  # noqa: E731
    assert k("a red circle and two blue squares") == k("two blue squares and a red circle")
    assert k("a red circle left of a blue square") == k("a blue square right of a red circle")
    assert k("a red circle above a blue square") == k("a blue square below a red circle")
    assert k("a red circle left of a blue square") != k("a red circle right of a blue square")
    assert k("a red circle left of a blue square") != k("a red circle and a blue square")
    assert k("a red circle") != k("two red circles")


def test_random_prompt_round_trip_and_coverage():
    rng = random.Random(0)
    seen_counts, seen_rel, seen_kinds, seen_groups = set(), set(), set(), set()
    for _ in range(3000):
        p = random_prompt(rng)
        scene = parse_prompt(p)
        assert format_prompt(scene) == p  # canonical prompts round-trip exactly
        assert 1 <= scene.n_objects <= MAX_OBJECTS
        seen_counts.add(scene.n_objects)
        seen_rel.add(scene.relation)
        seen_groups.add(len(scene.objects))
        seen_kinds.update(o.kind for o in scene.objects)
    assert seen_counts == {1, 2, 3, 4}
    assert seen_rel == set(RELATIONS) | {None}
    assert seen_groups == {1, 2}
    assert seen_kinds == {(c, s) for c in COLORS for s in SHAPES}


def test_random_prompt_rng_types_are_deterministic():
    a = [random_prompt(random.Random(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    assert [random_prompt(g1) for _ in range(20)] == [random_prompt(g2) for _ in range(20)]
    assert random_prompt(11) == random_prompt(11)
    assert random_prompt(np.int64(11)) == random_prompt(11)
    rs = np.random.RandomState(2)
    parse_prompt(random_prompt(rs))
    assert isinstance(random_prompt(), str)
    with pytest.raises(TypeError):
        random_prompt("seed")
    # relation_prob=0 never draws a relation; 1 always does
    assert all(random_scene(i, relation_prob=0.0).relation is None for i in range(50))
    assert all(random_scene(i, relation_prob=1.0).relation is not None for i in range(50))


# ---------------------------------------------------------------------------------------------------- rendering


def test_render_deterministic_range_palette():
    palette = torch.tensor([BACKGROUND, *COLORS.values()], dtype=torch.float32)
    for p in _prompts(40, seed=7):
        a, b = render(p, seed=12), render(p, seed=12)
        assert a.dtype == torch.float32 and a.shape == (3, 32, 32)
        assert torch.equal(a, b)
        assert a.min() >= 0 and a.max() <= 1
        # flat colours only: every pixel is the background or a palette colour
        px = a.permute(1, 2, 0).reshape(-1, 1, 3)
        assert ((px - palette[None]).abs().sum(-1).min(1).values == 0).all()
        # the object colours the prompt names, and no other
        scene = parse_prompt(p)
        present = {c for c, rgb in COLORS.items() if (px == torch.tensor(rgb)).all(-1).any()}
        assert present == {o.colour for o in scene.objects}


def test_render_layout_depends_on_seed():
    imgs = torch.stack([render("two red circles and a blue square", seed=s) for s in range(20)])
    assert len({tuple(i.flatten().tolist()) for i in imgs}) > 15


def test_render_batch_matches_render():
    prompts = _prompts(10, seed=3)
    seeds = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    batch = render_batch(prompts, seeds)
    assert batch.shape == (10, 3, 32, 32)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        assert torch.equal(batch[i], render(p, s))
    assert torch.equal(render_batch(prompts, 5), batch)  # an int is the first of consecutive seeds
    assert torch.equal(render(parse_prompt(prompts[0]), 5), batch[0])  # a Scene renders like its prompt


def test_render_bad_args():
    with pytest.raises(ValueError):
        render("a red hexagon", 0)
    with pytest.raises(ValueError):
        render("a red circle", -1)
    with pytest.raises(TypeError):
        render("a red circle", 1.5)
    with pytest.raises(ValueError):
        render("a red circle", 0, size=8)
    with pytest.raises(ValueError):
        render_batch(["a red circle", "a blue square"], [1])
    with pytest.raises(TypeError):
        render_batch("a red circle", 0)


def test_other_sizes(reward):
    prompts = _prompts(100, seed=21)
    for size in (24, 64):
        imgs = render_batch(prompts, 0, size=size)
        assert imgs.shape == (100, 3, size, size)
        assert reward(imgs, prompts)["correct"].mean() >= 0.99


def test_shapes_grid_png(tmp_path):
    """A grid of renders for eyeballing (written to /tmp/shapes_grid.png when PIL is available)."""
    pil = pytest.importorskip("PIL.Image")
    prompts = _prompts(16, seed=99)
    imgs = F.pad(render_batch(prompts, 0), (1, 1, 1, 1), value=0.5)  # grey frames, row-major like grid.txt
    grid = imgs.view(4, 4, 3, 34, 34).permute(0, 3, 1, 4, 2).reshape(136, 136, 3)
    grid = (grid * 255).round().to(torch.uint8).numpy().repeat(4, 0).repeat(4, 1)
    for path in (tmp_path / "grid.png", "/tmp/shapes_grid.png"):
        try:
            pil.fromarray(grid).save(path)
        except OSError:
            pass
    for path in (tmp_path / "grid.txt", "/tmp/shapes_grid.txt"):
        try:
            Path(path).write_text("\n".join(prompts) + "\n")
        except OSError:
            pass
    assert (tmp_path / "grid.png").exists()


# ---------------------------------------------------------------------------------------------------- verifier


def test_ground_truth_scores_high(reward, scenes):
    prompts, imgs = scenes
    out = reward(imgs, prompts)
    assert set(out) == HEADS
    for k, v in out.items():
        assert v.shape == (len(prompts),) and v.dtype == torch.float32, k
        assert (v >= 0).all() and (v <= 1).all(), k
    assert out["correct"].mean() >= 0.99
    assert out["reward"].mean() >= 0.99
    # reward is 1 exactly where correct is
    assert torch.equal(out["reward"] == 1, out["correct"] == 1)


def test_detect_matches_the_scene(reward, scenes):
    prompts, imgs = scenes
    for p, objs in zip(prompts[:50], reward.detect(imgs[:50])):
        scene = parse_prompt(p)
        got = {}
        for o in objs:
            got[(o["colour"], o["shape"])] = got.get((o["colour"], o["shape"]), 0) + 1
        assert got == scene.counts, p


def test_mismatched_prompts_score_low(reward, scenes):
    prompts, imgs = scenes
    rng = random.Random(4321)
    others = []
    for p in prompts:
        q = random_prompt(rng)
        while parse_prompt(q).key == parse_prompt(p).key:
            q = random_prompt(rng)
        others.append(q)
    out = reward(imgs, others)
    assert out["correct"].mean() <= 0.1
    assert out["reward"].mean() <= 0.5
    assert out["count"].mean() <= 0.2


def test_robust_to_noise_and_blur(reward, scenes):
    prompts, imgs = scenes
    g = torch.Generator().manual_seed(0)
    noisy = (_gauss_blur(imgs, 0.7) + 0.05 * torch.randn(imgs.shape, generator=g)).clamp(0, 1)
    out = reward(noisy, prompts)
    assert out["correct"].mean() >= 0.95
    # a 3x3 box blur plus noise too
    box = F.avg_pool2d(F.pad(imgs, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    out = reward((box + 0.05 * torch.randn(imgs.shape, generator=g)).clamp(0, 1), prompts)
    assert out["correct"].mean() >= 0.95


def test_per_criterion_heads(reward):
    img = render("a red circle left of a blue square", seed=4)[None]
    ok = reward(img, ["a red circle left of a blue square"])
    assert ok["correct"].item() == 1 and ok["reward"].item() == 1
    # same image, flipped relation: objects right, relation wrong
    out = reward(img, ["a red circle right of a blue square"])
    assert out["relation"].item() == 0 and out["correct"].item() == 0
    assert out["count"].item() == out["colour"].item() == out["shape"].item() == 1
    assert out["reward"].item() == pytest.approx(0.75)
    # the equivalent statement from the other side holds
    assert reward(img, ["a blue square right of a red circle"])["correct"].item() == 1
    # no relation asked: the relation head is 1 (vacuous)
    out = reward(img, ["a red circle and a blue square"])
    assert out["correct"].item() == 1 and out["relation"].item() == 1
    # swapped colours: shapes right, colours right as a multiset, binding wrong
    out = reward(img, ["a blue circle left of a red square"])
    assert out["correct"].item() == 0 and out["count"].item() == 0
    assert out["colour"].item() == 1 and out["shape"].item() == 1 and out["relation"].item() == 0
    # wrong colour of one object
    out = reward(img, ["a green circle and a blue square"])
    assert out["colour"].item() == pytest.approx(1 / 3) and out["shape"].item() == 1
    assert out["count"].item() == pytest.approx(1 / 3) and out["correct"].item() == 0
    # wrong shape of one object
    out = reward(img, ["a red triangle and a blue square"])
    assert out["shape"].item() == pytest.approx(1 / 3) and out["colour"].item() == 1
    # one object too few in the prompt's eyes
    out = reward(render("three green triangles", seed=2)[None], ["two green triangles"])
    assert out["count"].item() == pytest.approx(2 / 3) and out["correct"].item() == 0
    assert 0 < out["reward"].item() < 1


def test_weighted_reward(reward):
    """``weights`` makes ``reward`` a weighted mean of the heads (1 where ``correct``); default unchanged."""
    rng = random.Random()
    prompts = [random_prompt(rng) for _ in range(6)]
    # images of other prompts than asked, so that most heads are partial; one image is right
    imgs = torch.stack([render(random_prompt(rng), rng.randrange(10 ** 6)) for _ in prompts[:-1]]
                       + [render(prompts[-1], rng.randrange(10 ** 6))])
    base = reward(imgs, prompts)
    w = {"count": rng.uniform(0, 2), "colour": rng.uniform(0, 2), "shape": rng.uniform(0, 2),
         "relation": rng.uniform(0, 2), "correct": rng.uniform(1, 5)}
    out = ShapesReward(weights=w)(imgs, prompts)
    heads = {k: base[k].double() for k in w}
    want = sum(w[k] * heads[k] for k in w) / sum(w.values())
    want = torch.where(base["correct"] == 1, torch.ones_like(want), want)
    torch.testing.assert_close(out["reward"].double(), want, rtol=1e-6, atol=1e-6)
    assert out["reward"][-1].item() == 1.0 and base["correct"][-1].item() == 1.0
    for k in ("correct", "count", "colour", "shape", "relation"):
        assert torch.equal(out[k], base[k])
    # the default is the plain mean of the four criteria
    mean4 = (heads["count"] + heads["colour"] + heads["shape"] + heads["relation"]) / 4
    mean4 = torch.where(base["correct"] == 1, torch.ones_like(mean4), mean4)
    torch.testing.assert_close(base["reward"].double(), mean4, rtol=1e-6, atol=1e-6)
    # only strict correctness: reward == correct
    only = ShapesReward(weights={"correct": 1.0})(imgs, prompts)
    assert torch.equal(only["reward"], base["correct"])
    for bad, err in [({"colour": -1.0}, ValueError), ({"size": 1.0}, ValueError), ({"shape": float("nan")}, ValueError),
                     ({"count": 0.0}, ValueError), ({}, TypeError), ([1.0], TypeError), ({"count": True}, ValueError)]:
        with pytest.raises(err):
            ShapesReward(weights=bad)


def test_blank_and_off_palette_images(reward):
    prompts = ["a red circle", "a red circle above a blue square"]
    blank = torch.zeros(2, 3, 32, 32)
    out = reward(blank, prompts)
    assert out["correct"].sum() == 0 and out["count"].sum() == 0
    assert out["relation"].tolist() == [1.0, 0.0]
    # white and grey blobs are not palette colours: ignored
    img = render("a red circle", seed=1)[None].clone()
    img[:, :, 0:10, 20:30] = 1.0
    img[:, :, 22:31, 1:10] = 0.5
    assert reward(img, ["a red circle"])["correct"].item() == 1
    # specks below the minimum area are ignored
    img = render("a blue square", seed=1)[None].clone()
    img[0, :, 0, 0] = torch.tensor(COLORS["red"])
    img[0, :, 31, 31] = torch.tensor(COLORS["red"])
    assert reward(img, ["a blue square"])["correct"].item() == 1


def test_two_touching_objects_are_one_blob(reward):
    img = torch.zeros(1, 3, 32, 32)
    img[0, :, 5:15, 5:15] = torch.tensor(COLORS["green"])[:, None, None]
    img[0, :, 5:15, 15:25] = torch.tensor(COLORS["green"])[:, None, None]
    out = reward(img, ["two green squares"])
    assert out["correct"].item() == 0
    assert reward.detect(img)[0][0]["shape"] == "other"  # a 20x10 box is no square


def test_inputs_numpy_and_half(reward, scenes):
    prompts, imgs = scenes
    out = reward(imgs[:8].numpy(), prompts[:8])
    assert out["correct"].mean() == 1
    out = reward(imgs[:8].half(), prompts[:8], group_ids=list(range(8)))
    assert out["correct"].mean() == 1 and out["reward"].dtype == torch.float32
    # slight overshoot (an unclamped decoder) is accepted
    assert reward(imgs[:8] * 1.01 - 0.005, prompts[:8])["correct"].mean() == 1


def test_bad_inputs(reward):
    img = render("a red circle", 0)[None]
    with pytest.raises(TypeError):
        reward([[0.0]], ["a red circle"])
    with pytest.raises(TypeError):
        reward((img * 255).to(torch.uint8), ["a red circle"])
    with pytest.raises(ValueError):
        reward(img[0], ["a red circle"])  # 3-D
    with pytest.raises(ValueError):
        reward(img[:, :1], ["a red circle"])  # 1 channel
    with pytest.raises(ValueError):
        reward(img[:0], [])  # empty batch
    with pytest.raises(ValueError):
        reward(img * 2 - 1, ["a red circle"])  # [-1, 1] range
    with pytest.raises(ValueError):
        reward(img * 255, ["a red circle"])
    nan = img.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        reward(nan, ["a red circle"])
    with pytest.raises(ValueError):
        reward(img, ["a red circle", "a blue square"])  # length mismatch
    with pytest.raises(TypeError):
        reward(img, "a red circle")  # a bare string
    with pytest.raises(TypeError):
        reward(img, [3])
    with pytest.raises(ValueError):
        reward(img, ["a red hexagon"])
    with pytest.raises(ValueError):
        reward(img, ["a red circle"], group_ids=[0, 1])
    with pytest.raises(ValueError):
        ShapesReward(min_alpha=0)
    with pytest.raises(ValueError):
        ShapesReward(min_area=0)


def _bfs_labels(cls):
    """Reference 8-connected labelling of one [H, W] class map: component id per pixel, -1 background."""
    h, w = cls.shape
    out = -np.ones((h, w), dtype=np.int64)
    n = 0
    for y in range(h):
        for x in range(w):
            if cls[y, x] == 0 or out[y, x] >= 0:
                continue
            stack, out[y, x] = [(y, x)], n
            while stack:
                cy, cx = stack.pop()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and out[ny, nx] < 0 and cls[ny, nx] == cls[cy, cx]:
                            out[ny, nx] = n
                            stack.append((ny, nx))
            n += 1
    return out


def test_connected_components_match_bfs():
    g = torch.Generator().manual_seed(1)
    # random class maps of several densities, plus a one-pixel-wide spiral (slowest to propagate)
    maps = [(torch.rand(32, 32, generator=g) < d) * torch.randint(1, 4, (32, 32), generator=g) for d in (0.3, 0.5, 0.7)]
    spiral = torch.zeros(32, 32, dtype=torch.int64)
    lo, hi = 0, 31
    while lo <= hi:
        spiral[lo, lo:hi + 1] = 1
        spiral[lo:hi + 1, hi] = 1
        spiral[hi, lo:hi + 1] = 1
        spiral[lo + 2:hi + 1, lo] = 1
        if lo + 2 <= hi:
            spiral[lo + 2, lo:lo + 3] = 1
        lo, hi = lo + 2, hi - 2
    maps.append(spiral)
    lab = ShapesReward._label(torch.stack(maps)).numpy()
    for i, m in enumerate(maps):
        ref = _bfs_labels(m.numpy())
        got = lab[i]
        fg = ref >= 0
        assert (got[~fg] == lab.size).all()
        # same partition: a bijection between reference ids and labels
        pairs = set(zip(ref[fg].tolist(), got[fg].tolist()))
        assert len(pairs) == len(set(ref[fg].tolist())) == len(set(got[fg].tolist()))
