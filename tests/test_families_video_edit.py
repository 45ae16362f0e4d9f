"""Wan 2.x text-to-video and FLUX.1-Kontext editing on tiny random-weight pipelines (no download):
the drop-in property (noise off -> the pipeline's own output for the same generator), bitwise
re-scoring, 5-D rollouts and condition images through indexing / cat, the frame-wise reward, a GRPO
epoch on each, and the bad inputs."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_video_edit import tiny_kontext, tiny_wan  # noqa: E402

from diffrl.rewards import FrameWise, JpegIncompressibility, accepts_condition_images  # noqa: E402
from diffrl.samplers import FlowSDESampler, Rollout, get_adapter  # noqa: E402

PROMPTS = ["a red circle", "two blue squares"]
WAN = dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=16)
KONTEXT = dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def wan():
    return tiny_wan(seed=7)


@pytest.fixture(scope="module")
def kontext():
    return tiny_kontext(seed=7)


def _wan_pipe_video(pipe, prompts, seed, **kw):
    """The pipeline's own video as ``[B, 3, F, H, W]`` (it returns frames-major ``[B, F, 3, H, W]``)."""
    return pipe(prompts, generator=_gen(seed), output_type="pt", **{**WAN, **kw}).frames.permute(0, 2, 1, 3, 4)


# ---- Wan: drop-in ----------------------------------------------------------------------------------

@pytest.mark.parametrize("G,w", [(1, 4.0), (2, 1.0)])
def test_wan_drop_in_matches_pipeline(wan, G, w):
    expected = _wan_pipe_video(wan, PROMPTS, 3, num_videos_per_prompt=G, guidance_scale=w)
    r = FlowSDESampler(wan, noise_level=0.0).sample(PROMPTS, num_images_per_prompt=G, generator=_gen(3),
                                                    **{**WAN, "guidance_scale": w})
    assert r.images.shape == (2 * G, 3, 5, 32, 32) and expected.shape == r.images.shape
    torch.testing.assert_close(r.images, expected.float(), rtol=0, atol=2e-6)
    assert r.info["family"] == "wan" and (r.guidance_scale is None) == (w <= 1)


def test_wan_unipc_flow_shift_is_translated_to_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.5)
    pipe = tiny_wan(seed=7, scheduler=unipc)
    euler = tiny_wan(seed=7, scheduler=FlowMatchEulerDiscreteScheduler(shift=2.5))  # the same weights
    assert get_adapter(pipe).scheduler_config() == {"num_train_timesteps": 1000, "shift": 2.5}
    r = FlowSDESampler(pipe, noise_level=0.0).sample(PROMPTS, generator=_gen(4), **WAN)
    torch.testing.assert_close(r.images, _wan_pipe_video(euler, PROMPTS, 4).float(), rtol=0, atol=2e-6)
    # (UniPC itself is another solver: its video differs, and the pipeline's scheduler is untouched)
    assert not torch.allclose(r.images, _wan_pipe_video(pipe, PROMPTS, 4).float(), atol=1e-3)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.scheduler.config.flow_shift == 2.5
    # flow-match Euler's timesteps at shift s: u evenly from 1 to the shifted last training sigma,
    # then shifted, sigma = s u / (1 + (s - 1) u), times 1000
    s = 2.5

    def shifted(u):
        return s * u / (1 + (s - 1) * u)

    u = torch.linspace(1.0, shifted(torch.tensor(1e-3, dtype=torch.float64)).item(), 3, dtype=torch.float64)
    want = 1000 * shifted(u)
    sampler = FlowSDESampler(pipe, noise_level=0.7)
    r = sampler.sample(PROMPTS, generator=_gen(4), **WAN)
    torch.testing.assert_close(r.timesteps.double(), want, rtol=1e-5, atol=1e-3)


def test_wan_2_2_expand_timesteps_drop_in():
    pipe = tiny_wan(seed=8, expand_timesteps=True)
    r = FlowSDESampler(pipe, noise_level=0.0).sample(PROMPTS, generator=_gen(5), **WAN)
    torch.testing.assert_close(r.images, _wan_pipe_video(pipe, PROMPTS, 5).float(), rtol=0, atol=2e-6)


# ---- Wan: scoring and the 5-D rollout --------------------------------------------------------------

def test_wan_score_bitwise_and_rollout_ops(wan):
    sampler = FlowSDESampler(wan, noise_level=0.7)
    r = sampler.sample(PROMPTS, num_images_per_prompt=2, generator=_gen(6), **WAN)
    B, T = 4, WAN["num_inference_steps"]
    assert r.latents.shape == (B, T + 1, 4, 2, 4, 4) and r.log_probs.shape == (B, T)
    assert r.shared["num_frames"] == 5 and torch.isfinite(r.log_probs).all()
    for j in range(T):
        assert torch.equal(sampler.score(r, j).log_prob, r.log_probs[:, j])
    per_sample = torch.tensor([2, 0, 1, 2])
    out = sampler.score(r, per_sample)
    for b in range(B):
        torch.testing.assert_close(out.log_prob[b], r.log_probs[b, per_sample[b]], rtol=1e-5, atol=1e-5)
    # indexing, split and cat along the batch of 5-D latents and videos
    parts = r.split(3)
    back = Rollout.cat(parts)
    assert [len(p) for p in parts] == [3, 1]
    for name in ("latents", "images", "log_probs", "embed_index"):
        assert torch.equal(getattr(back, name), getattr(r, name)), name
    assert torch.equal(r[[3, 1]].latents_before(1), r.latents_before(1)[[3, 1]])
    other = sampler.sample(["a green triangle"], num_images_per_prompt=2, generator=_gen(9), **WAN)
    both = Rollout.cat([r, other])
    assert both.images.shape == (6, 3, 5, 32, 32) and both.prompts[4:] == ["a green triangle"] * 2
    torch.testing.assert_close(sampler.score(both, 1).log_prob[4:], other.log_probs[:, 1], rtol=1e-5, atol=1e-5)


def test_wan_latent_scaling_inverts_decode(wan):
    adapter = get_adapter(wan)
    z = torch.randn(2, 4, 2, 4, 4, dtype=torch.float64)
    mean = torch.tensor([0.1, -0.2, 0.05, 0.3], dtype=torch.float64).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.8, 1.2, 2.0], dtype=torch.float64).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(adapter.latents_from_vae(z), (z - mean) / std, rtol=1e-12, atol=1e-12)
    video = torch.rand(2, 3, 5, 32, 32)
    lat = adapter.encode_images(video)
    assert lat.shape == (2, 4, 2, 4, 4) and lat.dtype == torch.float32 and torch.isfinite(lat).all()


def test_wan_bad_inputs(wan):
    sampler = FlowSDESampler(wan, noise_level=0.7)
    for n in (4, 6, 0, 2.0, True):
        with pytest.raises(ValueError, match="4 k \\+ 1"):
            sampler.sample(PROMPTS, generator=_gen(0), **{**WAN, "num_frames": n})
    with pytest.raises(ValueError, match="multiple of 16"):
        sampler.sample(PROMPTS, generator=_gen(0), **{**WAN, "height": 24})
    with pytest.raises(TypeError, match="num_frames"):
        sampler.sample(PROMPTS, generator=_gen(0), **WAN, image=torch.rand(3, 8, 8))
    from diffusers import UniPCMultistepScheduler

    bad = tiny_wan(seed=7, scheduler=UniPCMultistepScheduler(flow_shift=3.0))  # not a flow-sigma UniPC
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        FlowSDESampler(bad, noise_level=0.0).sample(PROMPTS, generator=_gen(0), **WAN)
    two = tiny_wan(seed=7)
    two.register_modules(transformer_2=tiny_wan(seed=8).transformer)
    with pytest.raises(ValueError, match="two denoisers"):
        FlowSDESampler(two)


# ---- FrameWise -------------------------------------------------------------------------------------

class _Redness:
    """An image reward written out here: mean red minus mean blue, per image; records its inputs."""

    heads = ("reward", "red")

    def __call__(self, images, prompts, group_ids=None):
        assert images.dim() == 4
        self.seen = (images.clone(), list(prompts), group_ids)
        red = images[:, 0].mean((1, 2))
        return {"reward": red - images[:, 2].mean((1, 2)), "red": red}


@pytest.mark.parametrize("reduce", ["mean", "min", "max"])
def test_frame_wise_reduces_an_image_reward_over_frames(reduce):
    videos = torch.rand(3, 3, 4, 5, 7, dtype=torch.float64)  # odd sizes; B=3 videos of F=4 frames
    inner = _Redness()
    out = FrameWise(inner, reduce=reduce)(videos, ["a", "b", "c"], torch.tensor([0, 0, 1]))
    ref = {"reward": [], "red": []}
    for b in range(3):
        per_frame = [(videos[b, 0, f].mean() - videos[b, 2, f].mean(), videos[b, 0, f].mean()) for f in range(4)]
        pick = {"mean": lambda v: sum(v) / len(v), "min": min, "max": max}[reduce]
        ref["reward"].append(pick([p[0] for p in per_frame]))
        ref["red"].append(pick([p[1] for p in per_frame]))
    for k in ("reward", "red"):
        torch.testing.assert_close(out[k].double(), torch.stack(ref[k]), rtol=1e-6, atol=1e-6)
    frames, prompts, gids = inner.seen
    assert frames.shape == (12, 3, 5, 7) and torch.equal(frames[5], videos[1, :, 1])
    assert prompts == ["a"] * 4 + ["b"] * 4 + ["c"] * 4 and gids.tolist() == [0] * 8 + [1] * 4


def test_frame_wise_bad_inputs():
    fw = FrameWise(_Redness())
    with pytest.raises(ValueError, match="videos must be \\[B, 3, F, H, W\\].*without FrameWise"):
        fw(torch.rand(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="videos must be"):
        fw(torch.rand(2, 4, 3, 8, 8), ["a", "b"])
    with pytest.raises(TypeError, match="torch.Tensor"):
        fw([[0.5]], ["a"])
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        fw(torch.rand(2, 3, 3, 8, 8), ["a", "b", "c"])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        fw(torch.rand(2, 3, 3, 8, 8) * 255, ["a", "b"])
    with pytest.raises(ValueError, match="reduce"):
        FrameWise(_Redness(), reduce="median")
    with pytest.raises(ValueError, match="wrap the reward in diffrl.rewards.FrameWise"):
        JpegIncompressibility()(torch.rand(2, 3, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="one value per frame"):
        FrameWise(lambda im, p, g=None: {"reward": torch.zeros(1)})(torch.rand(2, 3, 3, 8, 8), ["a", "b"])


# ---- Kontext ---------------------------------------------------------------------------------------

def _kontext_pipe(pipe, prompts, image, seed, G=1, **kw):
    return pipe(image=image, prompt=prompts, num_images_per_prompt=G, generator=_gen(seed), output_type="pt",
                max_area=32 * 32, _auto_resize=False, **{**KONTEXT, **kw}).images


def test_kontext_drop_in_matches_pipeline(kontext):
    from PIL import Image

    sampler = FlowSDESampler(kontext, noise_level=0.0)
    images = torch.rand(2, 3, 48, 32, generator=_gen(1))  # input size != output size
    # one input image for every prompt, two samples each
    r = sampler.sample(PROMPTS, num_images_per_prompt=2, generator=_gen(3), image=images[:1], auto_resize=False,
                       **KONTEXT)
    torch.testing.assert_close(r.images, _kontext_pipe(kontext, PROMPTS, images[:1], 3, G=2), rtol=0, atol=2e-6)
    # one per prompt, the same prompt twice with different images (two rows, not one)
    r = sampler.sample(["same", "same"], generator=_gen(4), image=images, auto_resize=False, **KONTEXT)
    torch.testing.assert_close(r.images, _kontext_pipe(kontext, ["same", "same"], images, 4), rtol=0, atol=2e-6)
    assert r.embed_index.tolist() == [0, 1] and not torch.equal(r.images[0], r.images[1])
    # a PIL image, and true CFG with a negative prompt (the pipeline's two calls, one batched call here)
    pil = Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy())
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.0)
    r = sampler.sample(PROMPTS, generator=_gen(5), image=pil, auto_resize=False, **kw, **KONTEXT)
    torch.testing.assert_close(r.images, _kontext_pipe(kontext, PROMPTS, pil, 5, **kw), rtol=0, atol=1e-5)
    assert r.guidance_scale == 2.0


def test_kontext_score_bitwise_and_condition_images(kontext):
    sampler = FlowSDESampler(kontext, noise_level=0.7)
    images = torch.rand(2, 3, 24, 40, generator=_gen(2))
    r = sampler.sample(PROMPTS, num_images_per_prompt=2, generator=_gen(6), image=images, auto_resize=False,
                       **KONTEXT)
    for j in range(r.num_steps):
        assert torch.equal(sampler.score(r, j).log_prob, r.log_probs[:, j])
    # the rollout carries each sample's input image (as the model saw it: here its own size, a multiple of 4)
    assert r.condition_images.shape == (4, 3, 24, 40)
    torch.testing.assert_close(r.condition_images, images.repeat_interleave(2, 0), rtol=0, atol=1e-6)
    # noise tokens 16 x 16 / 4, image tokens 24 x 40 / 16 with first id 1
    assert r.cond["image_latents"].shape == (2, 60, 16) and r.shared["img_ids"].shape == (64 + 60, 3)
    assert r.shared["img_ids"][:64, 0].eq(0).all() and r.shared["img_ids"][64:, 0].eq(1).all()
    # minibatches and cat keep the condition (images and latents) with their samples
    mb = r[[3, 0]]
    assert torch.equal(mb.condition_images, r.condition_images[[3, 0]])
    torch.testing.assert_close(sampler.score(mb, 1).log_prob, r.log_probs[[3, 0], 1], rtol=1e-5, atol=1e-5)
    other = sampler.sample(["a green triangle"], num_images_per_prompt=2, generator=_gen(9), image=images[1],
                           auto_resize=False, **KONTEXT)
    both = Rollout.cat([r, other])
    assert torch.equal(both.condition_images[4:], other.condition_images)
    assert torch.equal(both.embeddings()["image_latents"][4:], other.embeddings()["image_latents"])
    torch.testing.assert_close(sampler.score(both, 2).log_prob[4:], other.log_probs[:, 2], rtol=1e-5, atol=1e-5)
    text = FlowSDESampler(tiny_wan(seed=7), noise_level=0.7).sample(PROMPTS, generator=_gen(0), **WAN)
    assert text.condition_images is None


def test_kontext_prompt_to_image_mapping(kontext):
    sampler = FlowSDESampler(kontext, noise_level=0.0)
    a, b = torch.rand(2, 3, 32, 32, generator=_gen(3))
    r = sampler.sample(PROMPTS, generator=_gen(1), image={PROMPTS[0]: a, PROMPTS[1]: b, "unused": a},
                       auto_resize=False, **KONTEXT)
    direct = sampler.sample(PROMPTS, generator=_gen(1), image=[a, b], auto_resize=False, **KONTEXT)
    assert torch.equal(r.images, direct.images)


def test_kontext_auto_resize_picks_the_closest_kontext_resolution(kontext):
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    adapter = get_adapter(kontext)
    for h, w in ((16, 36), (40, 20), (24, 24)):
        out = adapter._preprocess(torch.rand(1, 3, h, w), auto_resize=True)
        oh, ow = out.shape[2:]
        assert (ow, oh) in PREFERRED_KONTEXT_RESOLUTIONS and oh % 16 == 0 and ow % 16 == 0
        best = min(abs(w / h - rw / rh) for rw, rh in PREFERRED_KONTEXT_RESOLUTIONS)
        assert abs(w / h - ow / oh) == best
        assert out.min() >= -1 and out.max() <= 1
        assert adapter._preprocess(torch.rand(1, 3, h, w), auto_resize=False).shape[2:] == (h // 4 * 4, w // 4 * 4)


def test_kontext_bad_inputs(kontext):
    sampler = FlowSDESampler(kontext, noise_level=0.7)
    img = torch.rand(3, 32, 32)

    def run(**kw):
        return sampler.sample(PROMPTS, generator=_gen(0), **{"auto_resize": False, **KONTEXT, **kw})

    with pytest.raises(ValueError, match="edits an input image: pass image="):
        run()
    with pytest.raises(ValueError, match="3 input images for 2 prompts"):
        run(image=torch.rand(3, 3, 32, 32))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        run(image=img * 255)
    with pytest.raises(ValueError, match="\\[3, H, W\\] or \\[N, 3, H, W\\]"):
        run(image=torch.rand(4, 32, 32))
    with pytest.raises(TypeError, match="floating point"):
        run(image=(img * 255).byte())
    with pytest.raises(ValueError, match="no input image for prompt"):
        run(image={PROMPTS[0]: img})
    with pytest.raises(ValueError, match="smaller than"):
        run(image=torch.rand(3, 2, 32))
    with pytest.raises(TypeError, match="PIL image"):
        run(image="cat.png")


# ---- trainers ----------------------------------------------------------------------------------

def _grpo(tmp_path, pipe, reward, kind="grpo", **over):
    from diffrl.trainers import GRPOConfig, GRPOTrainer, NFTConfig, NFTTrainer

    config, trainer = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (NFTConfig, NFTTrainer)
    cfg = config(prompts=list(PROMPTS), prompts_per_epoch=2, group_size=2, sample_batch_size=4,
                 train_batch_size=2, num_inference_steps=2, resolution=32, epochs=1, save_every=0,
                 output_dir=str(tmp_path), device="cpu", timestep_fraction=0.5, **over)
    return trainer(cfg, pipeline=pipe, reward=reward, progress=False)


def _lora(tr):
    return {n: p.detach().clone() for n, p in tr.trainable.items()}


@pytest.mark.parametrize("kind", ["grpo", "nft"])
def test_trainers_train_wan_with_a_frame_wise_reward(tmp_path, kind):
    reward = FrameWise(JpegIncompressibility())
    tr = _grpo(tmp_path, tiny_wan(seed=7), reward, kind, guidance_scale=4.0, eval_every=1,
               eval_prompts=["a cat"])
    tr.sampler.adapter.set_option_defaults(num_frames=5, max_sequence_length=16)
    before = _lora(tr)
    (rec,) = tr.train(1)
    assert rec["optimizer_steps"] >= 1 and not rec["nonfinite"] and rec["reward/jpeg_kb"] > 0
    assert any(not torch.equal(before[n], p) for n, p in _lora(tr).items())
    from PIL import Image

    with Image.open(tmp_path / "grids" / "epoch-000001.png") as grid:  # the 5 frames side by side
        assert grid.size == (5 * 32, 32)
    with pytest.raises(ValueError, match="4 k \\+ 1"):
        tr.sampler.adapter.set_option_defaults(num_frames=6)


class _CloseToInput:
    """An editing reward written out here: minus the mean absolute difference to the input image."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, group_ids=None, condition_images=None):
        assert condition_images is not None, "the trainer did not pass the condition images"
        self.calls.append(condition_images.clone())
        return {"reward": -(images - condition_images).abs().mean((1, 2, 3))}


def test_grpo_trains_kontext_with_a_reward_reading_the_condition_image(tmp_path):
    reward = _CloseToInput()
    assert accepts_condition_images(reward) and not accepts_condition_images(JpegIncompressibility())
    assert accepts_condition_images(lambda images, prompts, **kw: None)
    tr = _grpo(tmp_path, tiny_kontext(seed=7), reward, guidance_scale=3.5)
    image = torch.rand(3, 32, 32, generator=_gen(8))
    tr.sampler.adapter.set_option_defaults(auto_resize=False, max_sequence_length=16)
    tr.sampler.adapter.set_option_defaults(image=image)
    before = _lora(tr)
    (rec,) = tr.train(1)
    assert rec["optimizer_steps"] >= 1 and not rec["nonfinite"]
    assert any(not torch.equal(before[n], p) for n, p in _lora(tr).items())
    (seen,) = reward.calls
    torch.testing.assert_close(seen, image.expand(4, 3, 32, 32), rtol=0, atol=1e-6)
