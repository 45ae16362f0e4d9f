"""diffrl.rewards: CLIP-based scorers on tiny random CLIP checkpoints saved in the published layout
(checked against the naive transformers computation), the diffrl attention inside transformers,
JPEG rewards, MultiReward, input checks."""

from __future__ import annotations

import io
import string

import pytest
import torch

from diffrl.rewards import (
    AestheticScore,
    CLIPScore,
    JpegCompressibility,
    JpegIncompressibility,
    MultiReward,
    PickScore,
    Reward,
    hf_attention,
)
from diffrl.rewards.clip import AestheticHead, ImagePreprocess

from conftest import available

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red cat", "two blue dogs on a green field", "a red cat", "sky", "two blue dogs on a green field",
           "a red cat"]


# ----------------------------------------------------------------------------------------------
# tiny checkpoints in the published layout: config.json + model.safetensors, tokenizer files,
# preprocessor_config.json (what openai/clip-vit-large-patch14 and PickScore_v1 + the LAION processor ship)


def _tokenizer():
    vocab = {}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    for a, b in (("r", "e"), ("re", "d</w>"), ("o", "n</w>")):
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in CLIP's vocabulary
    merges = [("r", "e"), ("re", "d</w>"), ("o", "n</w>")]
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77), vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    tok, vocab = _tokenizer()
    eos = vocab["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos,
                         bos_token_id=vocab["<|startoftext|>"], pad_token_id=eos),
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32, logit_scale_init_value=3.0)
    torch.manual_seed(1234)
    model = transformers.CLIPModel(cfg)
    d = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(d)
    head = AestheticHead(32)
    torch.save(head.state_dict(), d / "aesthetic.pth")
    return d


def images(B=6, H=40, W=52):
    return torch.rand(B, 3, H, W)


# ----------------------------------------------------------------------------------------------
# the naive scorer: what the published code does (PIL + CLIPImageProcessor, one prompt per image,
# padded to 77, default attention)


def naive_clip(clip_dir, imgs, prompts):
    model = transformers.CLIPModel.from_pretrained(clip_dir, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(clip_dir)
    proc = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    u8 = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    img_emb, txt_emb = [], []
    with torch.no_grad():
        for i in range(len(prompts)):
            px = proc(images=[u8[i]], return_tensors="pt")["pixel_values"]
            t = tok([prompts[i]], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            img_emb.append(model.get_image_features(pixel_values=px).pooler_output)
            txt_emb.append(model.get_text_features(**t).pooler_output)
    img = torch.nn.functional.normalize(torch.cat(img_emb), dim=-1)
    txt = torch.nn.functional.normalize(torch.cat(txt_emb), dim=-1)
    return model, img, (img * txt).sum(-1)


# cosines agree to ~1e-5: float32 sums in another order, and a rare pixel a uint8 step apart (PIL's fixed-point filter)
TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_pickscore_matches_the_naive_scorer(clip_dir, backend):
    """auto on a CPU: SDPA with the same semantics; torch: reward_attention's reference."""
    imgs = images()
    reward = PickScore.from_pretrained(str(clip_dir), attention_backend=backend)
    assert reward.model.config._attn_implementation == hf_attention.NAME
    out = reward(imgs, PROMPTS)
    model, _, cos = naive_clip(clip_dir, imgs, PROMPTS)
    assert set(out) == {"reward", "cosine"}
    assert all(v.dtype == torch.float32 and v.shape == (6,) for v in out.values())
    torch.testing.assert_close(out["cosine"], cos, **TOL)
    scale = model.logit_scale.exp()  # e^3 = 20
    torch.testing.assert_close(out["reward"], scale * cos, rtol=1e-4, atol=20 * TOL["atol"])


def test_clipscore_matches_the_naive_scorer(clip_dir):
    imgs = images(4, 32, 32)
    prompts = PROMPTS[:4]
    out = CLIPScore.from_pretrained(str(clip_dir), w=100.0)(imgs, prompts)
    _, _, cos = naive_clip(clip_dir, imgs, prompts)
    torch.testing.assert_close(out["reward"], 100.0 * cos.clamp_min(0), **TOL)
    assert CLIPScore.from_pretrained(str(clip_dir)).w == 2.5


def test_aesthetic_matches_the_naive_scorer(clip_dir):
    imgs = images(3, 48, 36)
    reward = AestheticScore.from_pretrained(str(clip_dir / "aesthetic.pth"), clip=str(clip_dir))
    out = reward(imgs, ["", "x", "y"])
    _, img, _ = naive_clip(clip_dir, imgs, ["a"] * 3)
    head = AestheticHead(32)
    head.load_state_dict(torch.load(clip_dir / "aesthetic.pth", weights_only=True))
    with torch.no_grad():
        want = head.eval()(img)[:, 0]
    assert set(out) == {"reward"}
    torch.testing.assert_close(out["reward"], want, **TOL)
    # a folder holding the head under its published file name works too
    (clip_dir / "head").mkdir(exist_ok=True)
    torch.save(head.state_dict(), clip_dir / "head" / "sac+logos+ava1-l14-linearMSE.pth")
    again = AestheticScore.from_pretrained(str(clip_dir / "head"), clip=str(clip_dir))(imgs, ["", "x", "y"])
    torch.testing.assert_close(again["reward"], out["reward"], rtol=0, atol=0)


def test_from_pretrained_round_trip_keeps_the_weights(clip_dir):
    reward = PickScore.from_pretrained(str(clip_dir))
    ref = transformers.CLIPModel.from_pretrained(clip_dir)
    for (n, a), (_, b) in zip(reward.model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    assert reward.max_length == 77
    assert reward.preprocess.size == {"shortest_edge": 32}


def test_aesthetic_rejects_other_checkpoints(clip_dir, tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an aesthetic-predictor state dict"):
        AestheticScore.from_pretrained(str(tmp_path / "bad.pth"), clip=str(clip_dir))
    torch.save(AestheticHead(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="takes 768-dim embeddings"):
        AestheticScore.from_pretrained(str(tmp_path / "l14.pth"), clip=str(clip_dir))


def test_preprocessing_matches_clip_image_processor(clip_dir):
    pre = ImagePreprocess.from_pretrained(str(clip_dir))
    proc = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    std = torch.tensor(pre.image_std)[None, :, None, None]
    for H, W in [(32, 32), (40, 52), (64, 50), (97, 131), (33, 200)]:
        imgs = torch.rand(2, 3, H, W)
        want = proc(images=list((imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()),
                    return_tensors="pt")["pixel_values"]
        got = pre(imgs)
        assert got.shape == want.shape == (2, 3, 32, 32)
        # in uint8 steps: PIL's fixed-point filter may round a few pixels differently
        steps = ((got - want) * std * 255).abs()
        assert steps.max() <= 2.01 and (steps > 0.5).float().mean() < 0.05
    # without PIL matching: one float pass, still close on smooth images
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 7), size=(40, 52), mode="bilinear")
    a = ImagePreprocess.from_pretrained(str(clip_dir), match_pil=False)(smooth)
    b = pre(smooth)
    assert ((a - b) * std).abs().max() < 3 / 255


def test_text_tower_runs_once_per_distinct_prompt(clip_dir):
    reward = PickScore.from_pretrained(str(clip_dir))
    rows = []
    hook = reward.model.text_model.register_forward_hook(lambda m, args, kw, out: rows.append(kw["input_ids"].shape),
                                                         with_kwargs=True)
    try:
        reward(images(), PROMPTS)
    finally:
        hook.remove()
    assert len(rows) == 1
    assert rows[0][0] == len(set(PROMPTS))
    # padded to the longest distinct prompt, not to 77
    assert rows[0][1] < 77


def test_diffrl_attention_receives_lengths_and_causal_flag(clip_dir, monkeypatch):
    reward = PickScore.from_pretrained(str(clip_dir), attention_backend="torch")
    seen = []
    real = hf_attention.reward_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], None if kw["q_lens"] is None else kw["q_lens"].tolist(), kw["causal"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf_attention, "reward_attention", spy)
    reward(images(3), ["a red cat", "sky", "a red cat"])
    text = [s for s in seen if s[2]]
    vision = [s for s in seen if not s[2]]
    assert len(text) == 2 and len(vision) == 2  # two layers each
    assert text[0][1] == [7, 5]  # <start> a red c a t <end>; <start> s k y <end>
    assert vision[0] == (17, None, False)  # 16 patches + class token, no padding


@pytest.mark.skipif(not available("triton"), reason="needs triton (interpreter)")
def test_triton_backend_inside_the_reward(clip_dir):
    reward = PickScore.from_pretrained(str(clip_dir), attention_backend="torch")
    imgs = images(4)
    want = reward(imgs, PROMPTS[:4])
    reward.set_attention_backend("triton")
    got = reward(imgs, PROMPTS[:4])
    torch.testing.assert_close(got["reward"], want["reward"], rtol=1e-5, atol=1e-5)


def test_left_padded_masks_are_refused():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="pad on the right"):
        hf_attention.lengths_mask(2, 3, 3, attention_mask=mask.bool())
    assert hf_attention.lengths_mask(2, 3, 3, attention_mask=mask.flip(-1).bool()).tolist() == [2, 3]
    assert hf_attention.lengths_mask(2, 3, 3, attention_mask=None) is None


# ----------------------------------------------------------------------------------------------
# JPEG


def test_jpeg_rewards():
    torch.manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64)
    imgs = torch.cat([flat, noise])
    inc = JpegIncompressibility()(imgs, ["a", "b"])
    comp = JpegCompressibility()(imgs, ["a", "b"])
    assert inc["jpeg_kb"][1] > 5 * inc["jpeg_kb"][0]  # noise compresses far worse than a flat image
    assert torch.equal(comp["reward"], -inc["reward"]) and torch.equal(comp["jpeg_kb"], inc["jpeg_kb"])
    assert comp["reward"][0] > comp["reward"][1]
    # the measure itself: Pillow's JPEG at quality 95 of the uint8 image, in kB
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((noise[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(buf, format="JPEG",
                                                                                             quality=95)
    assert inc["jpeg_kb"][1].item() == pytest.approx(buf.tell() / 1000)
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


# ----------------------------------------------------------------------------------------------
# MultiReward


class _Const(Reward):
    heads = ("reward", "extra")

    def __init__(self, value):
        self.value = value

    def score(self, images, prompts, group_ids):
        r = torch.full((images.shape[0],), self.value)
        return {"reward": r, "extra": r + 1}


def test_multi_reward_combines_and_keeps_every_head(clip_dir):
    imgs = images(3)
    prompts = PROMPTS[:3]
    pick = PickScore.from_pretrained(str(clip_dir))
    multi = MultiReward({"pick": pick, "jpeg": JpegCompressibility(), "c": _Const(2.0)},
                        weights={"pick": 0.5, "jpeg": 0.1})
    out = multi(imgs, prompts, group_ids=[0, 1, 0])
    p, j = pick(imgs, prompts), JpegCompressibility()(imgs, prompts)
    assert set(out) == {"reward", "pick/reward", "pick/cosine", "jpeg/reward", "jpeg/jpeg_kb", "c/reward", "c/extra"}
    assert set(multi.heads) == set(out)
    torch.testing.assert_close(out["pick/reward"], p["reward"])
    torch.testing.assert_close(out["reward"], 0.5 * p["reward"] + 0.1 * j["reward"] + 2.0)
    with pytest.raises(ValueError, match="unknown rewards"):
        MultiReward({"a": _Const(1.0)}, weights={"b": 1.0})
    with pytest.raises(ValueError, match="must be a finite number"):
        MultiReward({"a": _Const(1.0)}, weights={"a": float("inf")})
    with pytest.raises(ValueError, match="without '/'"):
        MultiReward({"a/b": _Const(1.0)})
    with pytest.raises(ValueError, match="non-empty mapping"):
        MultiReward({})


# ----------------------------------------------------------------------------------------------
# bad input


def _bad_inputs():
    ok = torch.rand(2, 3, 16, 16)
    yield "images must be in \\[0, 1\\]", ValueError, (ok * 255, ["a", "b"])
    yield "images must be in \\[0, 1\\]", ValueError, (ok * 2 - 1, ["a", "b"])
    yield "images must be in \\[0, 1\\]", ValueError, (ok.masked_fill(ok > 0.5, float("nan")), ["a", "b"])
    yield "images must be \\[B, 3, H, W\\]", ValueError, (torch.rand(2, 4, 16, 16), ["a", "b"])
    yield "images must be \\[B, 3, H, W\\]", ValueError, (torch.rand(3, 16, 16), ["a", "b"])
    yield "images must be floating point", TypeError, ((ok * 255).to(torch.uint8), ["a", "b"])
    yield "images must be a torch.Tensor", TypeError, (ok.numpy(), ["a", "b"])
    yield "empty batch", ValueError, (torch.rand(0, 3, 16, 16), [])
    yield "3 prompts for 2 images", ValueError, (ok, ["a", "b", "c"])
    yield "prompts must be a list of str", TypeError, (ok, "ab")
    yield "prompts must be str", TypeError, (ok, ["a", 3])
    yield "group_ids must have shape \\[2\\]", ValueError, (ok, ["a", "b"], [0])
    yield "group_ids must be integers", TypeError, (ok, ["a", "b"], [0.5, 1.0])


@pytest.mark.parametrize("match,exc,args", list(_bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_gets_a_clear_error(clip_dir, match, exc, args):
    for reward in (JpegCompressibility(), PickScore.from_pretrained(str(clip_dir))):
        with pytest.raises(exc, match=match):
            reward(*args)


@pytest.mark.parametrize("kind", ["pickscore", "clipscore", "aesthetic"])
def test_differentiable_clip_rewards_give_the_images_gradient(clip_dir, kind):
    """differentiable=True (reward backprop): the same scores as match_pil=False scoring, and a gradient in the
    images that matches central differences along a random direction; the default keeps no graph."""
    def build(**kw):
        if kind == "aesthetic":
            return AestheticScore.from_pretrained(str(clip_dir / "aesthetic.pth"), clip=str(clip_dir), **kw)
        cls = PickScore if kind == "pickscore" else CLIPScore
        return cls.from_pretrained(str(clip_dir), **kw)

    imgs = (torch.rand(3, 3, 32, 32) * 0.8 + 0.1).requires_grad_(True)
    prompts = PROMPTS[:3]
    r = build(differentiable=True)
    out = r(imgs, prompts)["reward"]
    plain = build(match_pil=False)(imgs.detach(), prompts)["reward"]
    torch.testing.assert_close(out.detach(), plain, rtol=1e-5, atol=1e-5)
    w = torch.randn(3)
    (g,) = torch.autograd.grad((out * w).sum(), imgs)
    u = torch.randn_like(imgs)
    h = 1e-2
    with torch.no_grad():
        fd = ((r(imgs + h * u, prompts)["reward"] - r(imgs - h * u, prompts)["reward"]) * w).sum() / (2 * h)
    assert float(g.abs().sum()) > 0
    torch.testing.assert_close((g * u).sum(), fd, rtol=5e-2, atol=1e-3 * float(fd.abs()) + 1e-4)
    assert not build()(imgs, prompts)["reward"].requires_grad
    with pytest.raises(ValueError, match="match_pil=False"):
        build(differentiable=True, match_pil=True)
