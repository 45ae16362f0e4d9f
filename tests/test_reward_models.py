"""HPSv2Score and ImageRewardScore on tiny random models saved in the published checkpoint layouts.

Each checkpoint is written here from plain tensors under the key names the published files use
(open_clip's for HPSv2, BLIP's + the MLP's for ImageReward), independently of the loaders' mapping.
The expected scores come from a float64 forward of those tensors written out in this file, fed
images preprocessed with PIL as the authors' torchvision transforms do. No real weights are used.
"""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrl.rewards import HPSv2Score

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

PROMPTS = ["a red cat", "two blue dogs on a green field", "a red cat", "sky", "two blue dogs on a green field",
           "a red cat"]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64)[:, None, None]
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64)[:, None, None]


def _rand(*shape, scale=1.0):
    return torch.randn(*shape) * scale


def _ln(s, name, width):
    s[name + ".weight"] = 1.0 + _rand(width, scale=0.1)
    s[name + ".bias"] = _rand(width, scale=0.1)


def _linear(s, name, n_out, n_in, bias=True):
    s[name + ".weight"] = _rand(n_out, n_in, scale=n_in ** -0.5)
    if bias:
        s[name + ".bias"] = _rand(n_out, scale=0.1)


def _u8(img: torch.Tensor) -> np.ndarray:
    return (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _normalise(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(arr, dtype=np.float64) / 255.0).permute(2, 0, 1)
    return (x - CLIP_MEAN) / CLIP_STD


def _mha(x, kv, wq, bq, wk, bk, wv, bv, wo, bo, heads, *, causal=False, key_mask=None):
    """Plain multi-head attention in float64 (a masked softmax over all keys)."""
    B, L, W = x.shape
    d = wq.shape[0] // heads

    def split(t):
        return t.reshape(B, t.shape[1], heads, d).transpose(1, 2)

    q, k, v = split(x @ wq.T + bq), split(kv @ wk.T + bk), split(kv @ wv.T + bv)
    att = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        att = att.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    if key_mask is not None:
        att = att.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, wq.shape[0])
    return out @ wo.T + bo


# ==============================================================================================
# HPSv2: open_clip ViT CLIP


def _clip_tokenizer():
    vocab = {}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    for a, b in (("r", "e"), ("re", "d</w>"), ("o", "n</w>")):
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in CLIP's vocabulary (open_clip pools at the argmax)
    merges = [("r", "e"), ("re", "d</w>"), ("o", "n</w>")]
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


HPS = dict(wv=48, wt=32, embed=24, lv=2, lt=3, patch=8, image=32, ctx=77, head_width=16)


def _open_clip_block(s, p, width, mlp):
    _ln(s, p + "ln_1", width)
    s[p + "attn.in_proj_weight"] = _rand(3 * width, width, scale=width ** -0.5)
    s[p + "attn.in_proj_bias"] = _rand(3 * width, scale=0.1)
    _linear(s, p + "attn.out_proj", width, width)
    _ln(s, p + "ln_2", width)
    _linear(s, p + "mlp.c_fc", mlp, width)
    _linear(s, p + "mlp.c_proj", width, mlp)


def hps_state(vocab_size):
    """A tiny open_clip CLIP state dict under the HPSv2 files' key names."""
    c = HPS
    s = {}
    grid = c["image"] // c["patch"]
    s["visual.class_embedding"] = _rand(c["wv"])
    s["visual.positional_embedding"] = _rand(grid * grid + 1, c["wv"], scale=0.5)
    s["visual.proj"] = _rand(c["wv"], c["embed"], scale=c["wv"] ** -0.5)
    s["visual.conv1.weight"] = _rand(c["wv"], 3, c["patch"], c["patch"], scale=(3 * c["patch"] ** 2) ** -0.5)
    _ln(s, "visual.ln_pre", c["wv"])
    for i in range(c["lv"]):
        _open_clip_block(s, f"visual.transformer.resblocks.{i}.", c["wv"], 80)
    _ln(s, "visual.ln_post", c["wv"])
    s["positional_embedding"] = _rand(c["ctx"], c["wt"], scale=0.5)
    s["text_projection"] = _rand(c["wt"], c["embed"], scale=c["wt"] ** -0.5)
    s["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    s["token_embedding.weight"] = _rand(vocab_size, c["wt"])
    for i in range(c["lt"]):
        _open_clip_block(s, f"transformer.resblocks.{i}.", c["wt"], 56)
    _ln(s, "ln_final", c["wt"])
    return s


def _open_clip_tower(s, x, prefix, n, heads, causal):
    for i in range(n):
        p = f"{prefix}{i}."
        h = F.layer_norm(x, x.shape[-1:], s[p + "ln_1.weight"], s[p + "ln_1.bias"], 1e-5)
        wq, wk, wv = s[p + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = s[p + "attn.in_proj_bias"].chunk(3)
        x = x + _mha(h, h, wq, bq, wk, bk, wv, bv, s[p + "attn.out_proj.weight"], s[p + "attn.out_proj.bias"],
                     heads, causal=causal)
        h = F.layer_norm(x, x.shape[-1:], s[p + "ln_2.weight"], s[p + "ln_2.bias"], 1e-5)
        x = x + F.gelu(h @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"]) @ s[p + "mlp.c_proj.weight"].T \
            + s[p + "mlp.c_proj.bias"]
    return x


def hps_reference(state, pixels, token_ids):
    """The open_clip forward in float64: normalised image and text features -> their cosines."""
    s = {k: v.double() for k, v in state.items()}
    c = HPS
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=c["patch"]).flatten(2).transpose(1, 2)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], 1e-5)
    x = _open_clip_tower(s, x, "visual.transformer.resblocks.", c["lv"], c["wv"] // c["head_width"], False)
    img = F.layer_norm(x[:, 0], x.shape[-1:], s["visual.ln_post.weight"], s["visual.ln_post.bias"], 1e-5)
    img = img @ s["visual.proj"]
    t = s["token_embedding.weight"][token_ids] + s["positional_embedding"]
    t = _open_clip_tower(s, t, "transformer.resblocks.", c["lt"], c["wt"] // c["head_width"], True)
    t = F.layer_norm(t, t.shape[-1:], s["ln_final.weight"], s["ln_final.bias"], 1e-5)
    txt = t[torch.arange(t.shape[0]), token_ids.argmax(-1)] @ s["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def hps_pixels(imgs, size=HPS["image"]):
    """open_clip's resize_longest_max transform with PIL: longest edge to `size` (bicubic), black padding."""
    out = []
    for img in imgs:
        h, w = img.shape[-2:]
        scale = size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        arr = np.asarray(Image.fromarray(_u8(img)).resize((nw, nh), Image.BICUBIC))
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[top:top + nh, left:left + nw] = arr
        out.append(_normalise(canvas))
    return torch.stack(out)


def open_clip_tokens(tok, prompts, ctx=77):
    """open_clip's tokenisation: <start> ... <end>, zero padding to the context length."""
    ids = torch.zeros(len(prompts), ctx, dtype=torch.long)
    for i, p in enumerate(prompts):
        t = tok(p)["input_ids"][:ctx]
        ids[i, :len(t)] = torch.tensor(t)
    return ids


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    torch.manual_seed(2024)
    d = tmp_path_factory.mktemp("tiny-hps")
    tok = _clip_tokenizer()
    tok.save_pretrained(d / "tokenizer")
    state = hps_state(len(tok))
    torch.save({"epoch": 3, "name": "tiny", "state_dict": state}, d / "HPS_v2_compressed.pt")  # as the authors save
    torch.save(state, d / "bare.pt")
    return d, state, tok


def load_hps(path, tok_dir, **kw):
    return HPSv2Score.from_pretrained(str(path), tokenizer=str(tok_dir), vision_head_width=HPS["head_width"],
                                      text_head_width=HPS["head_width"], **kw)


@pytest.mark.parametrize("H,W", [(32, 32), (40, 52), (61, 29)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_hps_matches_the_float64_reference(hps_files, H, W, backend):
    d, state, tok = hps_files
    reward = load_hps(d / "HPS_v2_compressed.pt", d / "tokenizer", attention_backend=backend)
    imgs = torch.rand(len(PROMPTS), 3, H, W)
    out = reward(imgs, PROMPTS)
    assert set(out) == {"reward", "cosine"}
    assert all(v.dtype == torch.float32 and v.shape == (len(PROMPTS),) for v in out.values())
    want = hps_reference(state, hps_pixels(imgs), open_clip_tokens(tok, PROMPTS))
    # no resize: pixels identical; resized: PIL's fixed-point bicubic moves a few pixels by a uint8 step
    tol = 2e-5 if (H, W) == (32, 32) else 2e-3
    torch.testing.assert_close(out["cosine"].double(), want, rtol=0, atol=tol)
    torch.testing.assert_close(out["reward"], out["cosine"], rtol=0, atol=0)
    scaled = load_hps(d / "bare.pt", d / "tokenizer", scale=100.0)(imgs, PROMPTS)
    torch.testing.assert_close(scaled["reward"], 100 * out["cosine"], rtol=1e-5, atol=1e-4)


def test_hps_preprocessing_matches_pil(hps_files):
    d, _, _ = hps_files
    pre = load_hps(d / "bare.pt", d / "tokenizer").preprocess
    std = CLIP_STD.float()
    for H, W in [(32, 32), (64, 64), (40, 52), (97, 131), (20, 200), (16, 16), (61, 29), (90, 41)]:
        imgs = torch.rand(2, 3, H, W)
        got, want = pre(imgs), hps_pixels(imgs).float()
        assert got.shape == want.shape == (2, 3, 32, 32)
        steps = ((got - want) * std * 255).abs()
        if H <= W:  # PIL's two passes in torch: exact but for a rare uint8 step (fixed-point filter weights)
            assert steps.max() <= 2.01 and (steps > 0.5).float().mean() < 0.05, (H, W)
        else:  # shrinking both edges of a portrait image, Pillow may run its passes in the other order
            assert steps.max() <= 4.01 and (steps > 0.5).float().mean() < 0.25, (H, W)
    # the padding is black (zero before normalisation), centred
    x = pre(torch.ones(1, 3, 16, 32))[0] * std + CLIP_MEAN.float()
    assert torch.allclose(x[:, 8:24], torch.ones(3, 16, 32), atol=1e-5)
    assert torch.allclose(x[:, :8], torch.zeros(3, 8, 32), atol=1e-5)
    assert torch.allclose(x[:, 24:], torch.zeros(3, 8, 32), atol=1e-5)


def test_hps_text_tower_runs_once_per_distinct_prompt(hps_files):
    d, _, _ = hps_files
    reward = load_hps(d / "bare.pt", d / "tokenizer")
    rows = []
    hook = reward.model.text_model.register_forward_hook(
        lambda m, args, kw, out: rows.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        reward(torch.rand(len(PROMPTS), 3, 32, 32), PROMPTS)
    finally:
        hook.remove()
    assert len(rows) == 1 and rows[0][0] == len(set(PROMPTS))


def test_hps_checkpoint_errors(hps_files, tmp_path):
    d, state, _ = hps_files
    tok_dir = d / "tokenizer"
    missing = {k: v for k, v in state.items() if k != "visual.transformer.resblocks.1.attn.in_proj_bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing keys.*visual.transformer.resblocks.1.attn.in_proj_bias"):
        load_hps(tmp_path / "missing.pt", tok_dir)
    extra = {**state, "visual.attn_pool.query": torch.zeros(3)}
    torch.save({"state_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unknown keys.*visual.attn_pool.query"):
        load_hps(tmp_path / "extra.pt", tok_dir)
    imgs = torch.rand(2, 3, 32, 32)
    lenient = load_hps(tmp_path / "extra.pt", tok_dir, strict=False)(imgs, ["sky", "a red cat"])
    exact = load_hps(d / "bare.pt", tok_dir)(imgs, ["sky", "a red cat"])
    torch.testing.assert_close(lenient["reward"], exact["reward"], rtol=0, atol=0)
    torch.save({"state_dict": [1, 2]}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_hps(tmp_path / "junk.pt", tok_dir)
    with pytest.raises(ValueError, match="not a multiple of the head width"):
        HPSv2Score.from_pretrained(str(d / "bare.pt"), tokenizer=str(tok_dir), vision_head_width=80)


def _bad_inputs():
    ok = torch.rand(2, 3, 32, 32)
    yield "images must be in \\[0, 1\\]", ValueError, (ok * 255, ["a", "b"])
    yield "images must be in \\[0, 1\\]", ValueError, (ok * 2 - 1, ["a", "b"])
    yield "images must be \\[B, 3, H, W\\]", ValueError, (torch.rand(3, 32, 32), ["a", "b"])
    yield "empty batch", ValueError, (torch.rand(0, 3, 32, 32), [])
    yield "3 prompts for 2 images", ValueError, (ok, ["a", "b", "c"])


@pytest.mark.parametrize("match,exc,args", list(_bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_hps_bad_input(hps_files, match, exc, args):
    d, _, _ = hps_files
    with pytest.raises(exc, match=match):
        load_hps(d / "bare.pt", d / "tokenizer")(*args)


def test_hps_from_the_reward_factory(hps_files):
    from diffrl.trainers.rewards_factory import build_reward, build_rewards

    d, _, _ = hps_files
    kw = dict(path=str(d / "bare.pt"), tokenizer=str(d / "tokenizer"), vision_head_width=16, text_head_width=16)
    reward = build_reward("hpsv2", **kw)
    assert isinstance(reward, HPSv2Score)
    imgs = torch.rand(2, 3, 32, 32)
    direct = load_hps(d / "bare.pt", d / "tokenizer")(imgs, ["sky", "a red cat"])
    torch.testing.assert_close(reward(imgs, ["sky", "a red cat"])["reward"], direct["reward"], rtol=0, atol=0)
    assert isinstance(build_rewards({"hps": 1.0}, {"hps": kw}), HPSv2Score)
    with pytest.raises(ValueError, match="needs a path"):
        build_reward("hpsv2")
