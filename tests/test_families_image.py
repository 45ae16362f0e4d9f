"""The Qwen-Image, Z-Image and FLUX.2 families on tiny random-weight pipelines (no download).

Per family: with the noise off the sampler reproduces the pipeline's own images for the same
generator (with and without CFG where the family has it), a recorded step re-scores bit for bit,
a GRPO trainer runs a short preset on it, and sizes the model cannot take are clear errors.
"""

import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_image_pipes import IMAGE_FAMILIES, image_pipeline_cache  # noqa: E402

from diffrl.samplers import FlowSDESampler, get_adapter  # noqa: E402

PROMPTS = ["a red circle", "two blue squares"]
# odd-ish sizes each family takes (latent grids of odd patch counts where the family allows)
SIZE = {"qwenimage": dict(height=24, width=40), "zimage": dict(height=24, width=44),
        "flux2": dict(height=28, width=20)}
# negatives that encode to the prompts' lengths or to others (padded and masked)
NEGATIVES = {"joint": ["a red circlx", "two blue squarez"], "split": ["dark", "a dull grey"]}


@pytest.fixture(scope="module")
def pipes():
    return image_pipeline_cache(seed=5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cfg_kw(family, cfg):
    """The pipeline's CFG keywords for ``cfg`` (None: no CFG; "empty": CFG without a negative prompt)."""
    neg = {} if cfg in (None, "empty") else {"negative_prompt": list(NEGATIVES[cfg])}
    if family == "qwenimage":  # true CFG: a scale above 1 and a negative prompt
        return {} if cfg is None else {"true_cfg_scale": 3.0, **neg}
    if family == "zimage":  # CFG whenever guidance_scale > 0, an empty negative by default
        return {"guidance_scale": 0.0} if cfg is None else {"guidance_scale": 3.0, **neg}
    if family == "flux2":  # no CFG: guidance_scale feeds the guidance embedding
        assert cfg is None
        return {"guidance_scale": 3.5}
    raise AssertionError(family)


def _sampler_kw(family):
    # QwenImagePipeline's guidance_scale defaults to None (no guidance embedding); the sampler wants a number
    return {"guidance_scale": 1.0} if family == "qwenimage" else {}


# ---- drop-in --------------------------------------------------------------------------------------

DROP_IN = [("qwenimage", None), ("qwenimage", "joint"), ("qwenimage", "split"),
           ("zimage", None), ("zimage", "empty"), ("zimage", "split"), ("flux2", None)]
# a CFG setting per family for the tests that need one (negatives of lengths other than the prompts')
DROP_IN_CFG = {"qwenimage": "split", "zimage": "split", "flux2": None}
# (the pipelines write into the prompt lists they are given: each call gets a fresh list)


@pytest.mark.parametrize("family,cfg", DROP_IN)
def test_drop_in_matches_pipeline(pipes, family, cfg):
    pipe = pipes(family)
    # one image per prompt: QwenImagePipeline (diffusers 0.42.1) pairs the text padding masks with the
    # wrong samples when num_images_per_prompt > 1 and the prompts differ in length (its
    # mask.repeat(1, G, 1) tiles the prompts instead of repeating each); the sampler indexes its rows
    G = 1 if family == "qwenimage" else 2
    kw = dict(num_images_per_prompt=G, num_inference_steps=3, **SIZE[family], **_cfg_kw(family, cfg))
    expected = pipe(prompt=list(PROMPTS), generator=_gen(3), output_type="pt", **kw).images
    sampler = FlowSDESampler(pipe, noise_level=0.0)
    kw = dict(kw, **_cfg_kw(family, cfg))  # (fresh lists again)
    r = sampler.sample(list(PROMPTS), generator=_gen(3), **kw, **_sampler_kw(family))
    h, w = SIZE[family]["height"], SIZE[family]["width"]
    assert r.images.shape == (2 * G, 3, h, w) and r.images.dtype == torch.float32
    assert (r.guidance_scale is None) == (cfg is None)
    if cfg is not None:
        emb = sampler.model_batch(r.embeddings(), r.embeddings(uncond=True))
        # one model call on [uncond; cond] even where the pipeline makes two (Qwen-Image) and where the
        # negative encodes to another length (padded, with lengths)
        assert isinstance(emb, dict)
    torch.testing.assert_close(r.images, expected.float(), rtol=0, atol=2e-6)
    assert r.num_steps == 0


# ---- exact re-scoring -----------------------------------------------------------------------------

@pytest.mark.parametrize("family,cfg", DROP_IN)
def test_score_reproduces_recorded_log_prob_bitwise(pipes, family, cfg):
    pipe = pipes(family)
    sampler = FlowSDESampler(pipe, noise_level=0.7)
    r = sampler.sample(PROMPTS, num_images_per_prompt=2, num_inference_steps=3, generator=_gen(1),
                       **SIZE[family], **_cfg_kw(family, cfg), **_sampler_kw(family))
    assert r.num_steps == 3 and torch.isfinite(r.log_probs).all()
    for j in range(r.num_steps):
        out = sampler.score(r, j)
        assert torch.equal(out.log_prob, r.log_probs[:, j]), (j, out.log_prob - r.log_probs[:, j])
        assert out.log_prob.requires_grad


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_rollouts_of_different_prompt_lengths_concatenate_and_score(pipes, family):
    # a trainer samples an epoch in several calls and concatenates them: prompt embeddings must not
    # take each call's own padded length
    from diffrl.samplers import Rollout  # noqa: PLC0415

    sampler = FlowSDESampler(pipes(family), noise_level=0.7)
    kw = dict(num_images_per_prompt=2, num_inference_steps=2, **SIZE[family], **_cfg_kw(family, DROP_IN_CFG[family]),
              **_sampler_kw(family))
    if "negative_prompt" in kw:
        kw["negative_prompt"] = "dark"  # one for every prompt
    parts = [sampler.sample(["a red circle"], generator=_gen(1), **kw),
             sampler.sample(["two blue squares", "a b"], generator=_gen(2), **kw)]
    r = Rollout.cat(parts)
    assert len(r) == 6
    for j in range(r.num_steps):  # in another batch composition than sampled: close, not bitwise
        torch.testing.assert_close(sampler.score(r, j).log_prob, r.log_probs[:, j], rtol=0, atol=1e-4)


# ---- family specifics -----------------------------------------------------------------------------

def test_qwenimage_guide_is_the_norm_rescaled_cfg(pipes):
    adapter = get_adapter(pipes("qwenimage"))
    assert adapter.family == "qwenimage" and not adapter.linear_cfg
    c, u = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    w = 2.5
    got = adapter.guide(c, u, w)
    for b in range(3):  # token by token: the linear CFG rescaled to the conditional prediction's length
        for k in range(7):
            lin = [u[b, k, j].item() + w * (c[b, k, j].item() - u[b, k, j].item()) for j in range(16)]
            scale = math.sqrt(sum(x * x for x in c[b, k].tolist())) / math.sqrt(sum(x * x for x in lin))
            torch.testing.assert_close(got[b, k], torch.tensor(lin, dtype=torch.float64) * scale,
                                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_encode_images_inverts_decode(pipes, family):
    pipe = pipes(family)
    sampler = FlowSDESampler(pipe, noise_level=0.0)
    r = sampler.sample(PROMPTS[:1], num_inference_steps=2, generator=_gen(0), keep_final_latents=True,
                       **SIZE[family], **_sampler_kw(family))
    z = sampler.adapter.encode_images(r.images)
    assert z.dtype == torch.float32 and z.shape == r.final_latents.shape and torch.isfinite(z).all()


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_decode_of_latents_from_vae_is_the_vaes_decode(pipes, family):
    # the loop's layout and scaling (latents_from_vae) and decode's inverse of them meet at the VAE
    adapter = get_adapter(pipes(family))
    vae = adapter.pipe.vae
    h, w = SIZE[family]["height"], SIZE[family]["width"]
    f = adapter.vae_scale_factor
    c = vae.config.z_dim if family == "qwenimage" else vae.config.latent_channels
    z = torch.randn(2, c, *((1,) if family == "qwenimage" else ()), h // f, w // f, generator=_gen(4))
    with torch.no_grad():
        got = adapter.decode(adapter.latents_from_vae(z), h, w)
        pixels = vae.decode(z, return_dict=False)[0]
    if family == "qwenimage":
        pixels = pixels[:, :, 0]  # the one frame
    torch.testing.assert_close(got, (pixels.float() / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


# ---- bad inputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_sizes_the_model_cannot_take_are_clear_errors(pipes, family):
    pipe = pipes(family)
    sampler = FlowSDESampler(pipe, noise_level=0.7)
    m = sampler.adapter.size_multiple
    h = SIZE[family]["height"]
    with pytest.raises(ValueError, match=f"multiple of {m}"):
        sampler.sample(PROMPTS, num_inference_steps=2, height=h + m // 2, width=h, **_sampler_kw(family))
    with pytest.raises(ValueError, match="positive int"):
        sampler.sample(PROMPTS, num_inference_steps=2, height=0, width=h, **_sampler_kw(family))
    with pytest.raises(TypeError, match="unexpected keyword"):
        sampler.sample(PROMPTS, num_inference_steps=2, height=h, width=h, guidance_scale_2=1.0,
                       **_sampler_kw(family))


# ---- a trainer on it ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_grpo_preset_trains_the_family(tmp_path, family):
    from test_trainers import _config  # noqa: PLC0415

    from diffrl.trainers import GRPOTrainer  # noqa: PLC0415

    pipe = image_pipeline_cache(seed=9)(family)
    res = SIZE[family]["height"]
    # one prompt per sampling call: an epoch concatenates rollouts of prompts of different lengths
    cfg = _config("tiny-sd3-jpeg", tmp_path, epochs=2, save_every=0, resolution=res, sample_batch_size=2,
                  **({"guidance_scale": 1.0} if family == "qwenimage" else {}))
    tr = GRPOTrainer(cfg, pipeline=pipe, progress=False)
    lora = {n: p.detach().clone() for n, p in tr.sampler.model.named_parameters() if "lora_" in n}
    assert lora
    recs = tr.train(2)
    assert [r["epoch"] for r in recs] == [1, 2] and not any(r["nonfinite"] for r in recs)
    assert all(math.isfinite(r["loss"]) and r["optimizer_steps"] >= 1 for r in recs)
    after = dict(tr.sampler.model.named_parameters())
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "two epochs changed no LoRA weight"


def test_zimage_refuses_what_it_does_not_reproduce(pipes):
    sampler = FlowSDESampler(pipes("zimage"), noise_level=0.7)
    kw = dict(num_inference_steps=2, **SIZE["zimage"])
    with pytest.raises(ValueError, match="cfg_normalization"):
        sampler.sample(PROMPTS, cfg_normalization=True, **kw)
    with pytest.raises(ValueError, match="cfg_truncation"):
        sampler.sample(PROMPTS, cfg_truncation=0.5, **kw)
    top = sampler.adapter.max_size()  # the rotary table's extent
    assert top == 16 * 4
    with pytest.raises(ValueError, match="too large"):
        sampler.sample(PROMPTS, num_inference_steps=2, height=top + 4, width=24)
    r = sampler.sample(PROMPTS, guidance_scale=2.5, **kw)
    assert r.guidance_scale == 3.5  # pos + w (pos - neg) is the loop's linear CFG with weight w + 1


def test_flux2_guidance_is_an_embedding_not_cfg(pipes):
    sampler = FlowSDESampler(pipes("flux2"), noise_level=0.0)
    kw = dict(num_inference_steps=2, **SIZE["flux2"])
    a = sampler.sample(PROMPTS, guidance_scale=2.0, generator=_gen(0), **kw)
    b = sampler.sample(PROMPTS, guidance_scale=5.0, generator=_gen(0), **kw)
    assert a.guidance_scale is None and a.uncond is None and a.shared["guidance"] == 2.0
    assert not torch.allclose(a.images, b.images)  # the embedding reaches the model
    with pytest.raises(ValueError, match="no negative prompt"):
        sampler.sample(PROMPTS, negative_prompt="dark", **kw)


def test_qwenimage_padded_prompts_with_several_images_match_each_prompt_alone(pipes):
    # where the pipeline mis-pairs its masks (num_images_per_prompt > 1, prompts of different lengths),
    # the sampler's images equal the pipeline's for each prompt alone (no padding) from the same latents
    pipe = pipes("qwenimage")
    size = SIZE["qwenimage"]
    sampler = FlowSDESampler(pipe, noise_level=0.0)
    f = sampler.adapter.size_multiple
    lat = torch.randn(4, (size["height"] // f) * (size["width"] // f), 16, generator=_gen(8))
    r = sampler.sample(list(PROMPTS), num_images_per_prompt=2, num_inference_steps=2, latents=lat,
                       guidance_scale=1.0, **size)
    lens = r.cond["text_lens"].tolist()
    assert lens[0] < lens[1]  # the shorter prompt is padded (and masked)
    for p, prompt in enumerate(PROMPTS):
        alone = pipe(prompt=[prompt], num_images_per_prompt=2, num_inference_steps=2, latents=lat[2 * p:2 * p + 2],
                     output_type="pt", **size).images
        torch.testing.assert_close(r.images[2 * p:2 * p + 2], alone, rtol=0, atol=1e-5)
