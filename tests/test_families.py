"""The family registry, the widened family contract (hooks with defaults), the public model call
(``predict`` / ``model_batch`` / ``guide``) and the denoising loop run with gradients, on tiny
random-weight pipelines (no download)."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_pipes import pipeline_cache, sample_options  # noqa: E402

from diffrl.models.tiny import tiny_pipeline  # noqa: E402
from diffrl.samplers import DDIMSampler, FlowSDESampler, get_adapter  # noqa: E402
from diffrl.samplers.base import SplitCFG  # noqa: E402

PROMPTS = ["a red circle", "two blue squares"]
FAMILY_MODULE = {"sd": "sd", "sd-v": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "shapes": "shapes"}


@pytest.fixture(scope="module")
def pipes():
    return pipeline_cache(seed=11)


_opts = sample_options


def _sample(sampler, family, seed=0, T=3, w=4.0, **kw):
    return sampler.sample(PROMPTS, num_images_per_prompt=2, num_inference_steps=T, guidance_scale=w,
                          generator=torch.Generator().manual_seed(seed), height=32, width=32, **_opts(family), **kw)


# ---- registry and the old import paths -------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILY_MODULE))
def test_each_family_lives_in_its_module(pipes, family):
    adapter = get_adapter(pipes(family))
    assert type(adapter).__module__ == f"diffrl.samplers.families.{FAMILY_MODULE[family]}"
    assert adapter.family == FAMILY_MODULE[family]


def test_old_import_paths_are_the_new_objects():
    import diffrl.models.loading
    import diffrl.models.tiny
    import diffrl.samplers.adapters as old
    import diffrl.samplers.families as families
    import diffrl.samplers.lora
    import diffrl.samplers.tiny
    import diffrl.trainers
    import diffrl.trainers.base
    from diffrl.samplers.families.flux import FluxAdapter
    from diffrl.samplers.families.sd import StableDiffusionAdapter

    assert old.Adapter is families.Adapter and old.get_adapter is families.get_adapter
    assert old.register_adapter is families.register_adapter and old.model_dtype is families.model_dtype
    assert old.FluxAdapter is FluxAdapter and old.StableDiffusionAdapter is StableDiffusionAdapter
    assert old.adapters_disabled is diffrl.samplers.lora.adapters_disabled
    assert diffrl.samplers.tiny.tiny_pipeline is diffrl.models.tiny.tiny_pipeline
    assert diffrl.trainers.load_pipeline is diffrl.models.loading.load_pipeline
    assert diffrl.trainers.base.load_pipeline is diffrl.models.loading.load_pipeline


# ---- the public model call -----------------------------------------------------------------------

def test_predict_is_what_the_sampler_calls(pipes):
    pipe = pipes("shapes")
    sampler = FlowSDESampler(pipe, noise_level=0.7)
    r = _sample(sampler, "shapes")
    emb = sampler.model_batch(r.embeddings(), r.embeddings(uncond=True))
    x, t = r.latents_before(0), r.timesteps[0].expand(len(r))
    v_cond, v_uncond = sampler.predict(x, t, emb, r.shared, cfg=True)
    old = sampler._predict(sampler.model, x, t, sampler._model_batch(r.embeddings(), r.embeddings(uncond=True)),
                           r.shared, True)
    assert torch.equal(v_cond, old[0]) and torch.equal(v_uncond, old[1])
    guided = sampler.guide(v_cond, v_uncond, r.guidance_scale)
    torch.testing.assert_close(guided, v_uncond + r.guidance_scale * (v_cond - v_uncond), rtol=0, atol=0)
    assert sampler.guide(v_cond, None, r.guidance_scale) is v_cond


def test_split_cfg_two_calls_match_one_batched_call(pipes):
    # a family whose cond and uncond cannot share a batch (Qwen-Image: different lengths) gets two calls
    pipe = pipes("sd3")
    batched = FlowSDESampler(pipe, noise_level=0.7)
    split = FlowSDESampler(pipe, noise_level=0.7)
    split.adapter.cfg_batch = lambda cond, uncond: None
    r1, r2 = _sample(batched, "sd3"), _sample(split, "sd3")
    emb = split.model_batch(r2.embeddings(), r2.embeddings(uncond=True))
    assert isinstance(emb, SplitCFG)
    torch.testing.assert_close(r2.latents, r1.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r2.log_probs, r1.log_probs, rtol=1e-5, atol=1e-5)
    assert torch.equal(split.score(r2, 1).log_prob, r2.log_probs[:, 1])  # scoring splits the same way


def test_default_cfg_batch_splits_on_different_lengths(pipes):
    adapter = get_adapter(pipes("sd"))
    cond = {"encoder_hidden_states": torch.randn(2, 7, 16)}
    assert adapter.cfg_batch(cond, {"encoder_hidden_states": torch.randn(2, 5, 16)}) is None
    both = adapter.cfg_batch(cond, {"encoder_hidden_states": torch.randn(2, 7, 16)})
    assert both["encoder_hidden_states"].shape == (4, 7, 16)


def test_non_linear_cfg_hook(pipes):
    pipe = pipes("shapes")
    fused = FlowSDESampler(pipe, noise_level=0.7)
    unfused = FlowSDESampler(pipe, noise_level=0.7)
    unfused.adapter.linear_cfg = False  # the same linear combination, but done by guide() before the step
    r1, r2 = _sample(fused, "shapes"), _sample(unfused, "shapes")
    torch.testing.assert_close(r2.latents, r1.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r2.log_probs, r1.log_probs, rtol=1e-5, atol=1e-5)

    def rescaled(v_cond, v_uncond, w):  # a non-linear guidance (CFG renormalised to the cond's norm)
        v = v_uncond + w * (v_cond - v_uncond)
        dims = tuple(range(1, v.dim()))
        return v * torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True) / torch.linalg.vector_norm(
            v, dim=dims, keepdim=True)

    unfused.adapter.guide = rescaled
    r3 = _sample(unfused, "shapes")
    assert not torch.allclose(r3.latents, r1.latents)
    for j in range(r3.log_probs.shape[1]):  # scoring applies the same combination: bitwise the recorded
        assert torch.equal(unfused.score(r3, j).log_prob, r3.log_probs[:, j])


def test_scheduler_config_hook(pipes):
    pipe = pipes("sd3")
    sampler = FlowSDESampler(pipe, noise_level=0.0)
    base = _sample(sampler, "sd3")
    # a family whose pipeline ships another solver translates its config (Wan: UniPC's flow_shift)
    sampler.adapter.scheduler_config = lambda: {**pipe.scheduler.config, "shift": 1.0}
    other = _sample(sampler, "sd3")
    assert not torch.allclose(other.images, base.images)
    assert pipe.scheduler.config.shift == 3.0  # the pipeline's scheduler is untouched


@pytest.mark.parametrize("family", list(FAMILY_MODULE))
def test_encode_images_gives_the_loops_latents(pipes, family):
    pipe = pipes(family)
    sampler = (FlowSDESampler(pipe, noise_level=0.0) if family in ("sd3", "flux", "shapes")
               else DDIMSampler(pipe, eta=0.0))
    r = _sample(sampler, family, T=2, keep_final_latents=True)
    z = sampler.adapter.encode_images(r.images)
    assert z.dtype == torch.float32 and z.shape == r.final_latents.shape and torch.isfinite(z).all()
    if family == "shapes":  # pixel space: encoding is the inverse of decoding
        torch.testing.assert_close(sampler.adapter.decode(z, 32, 32), r.images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_latents_from_vae_inverts_decode_scaling(pipes, family):
    adapter = get_adapter(pipes(family))
    vae = adapter.pipe.vae
    z = torch.randn(2, vae.config.latent_channels, 8, 8, dtype=torch.float64)
    lat = adapter.latents_from_vae(z)
    if family == "flux":
        lat = adapter.pipe._unpack_latents(lat, 8 * adapter.vae_scale_factor, 8 * adapter.vae_scale_factor,
                                           adapter.vae_scale_factor)
    if family in ("sd", "sdxl"):
        back = adapter._decode_latents(lat)
    else:
        back = lat / vae.config.scaling_factor + vae.config.shift_factor
    torch.testing.assert_close(back, z, rtol=1e-12, atol=1e-12)


# ---- the denoising loop with gradients -------------------------------------------------------------

def test_sample_with_grad_backpropagates_to_the_model(pipes):
    pipe = pipes("shapes")
    sampler = FlowSDESampler(pipe, noise_level=0.7, sde_steps=(1, 2))
    plain = _sample(sampler, "shapes")
    assert not plain.images.requires_grad
    with torch.enable_grad():  # grad=False means no graph even where autograd is on
        assert not _sample(sampler, "shapes").images.requires_grad
    model = sampler.model
    model.requires_grad_(True)
    try:
        r = _sample(sampler, "shapes", grad=True)
        assert r.images.requires_grad and r.log_probs.requires_grad
        assert torch.equal(r.images.detach(), plain.images)  # same numbers with the graph kept
        assert torch.equal(r.log_probs.detach(), plain.log_probs)
        r.images.mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
