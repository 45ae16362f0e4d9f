"""Latent consistency models (RLCM): the LCM step as an affine Gaussian step against LCMScheduler.step, the
sampler as a drop-in for LatentConsistencyModelPipeline (its noise is the policy's), bitwise re-scoring, and
DDPO on it (preset tiny-lcm-ddpo-jpeg)."""

import pytest
import torch

from diffrl import schedules
from diffrl.models.tiny import tiny_pipeline
from diffrl.samplers import DDIMSampler, LCMSampler
from diffrl.trainers import DDPOConfig, DDPOTrainer, get_preset, load_config

PROMPTS = ["a red circle", "two blue squares above a green triangle"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("lcm")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_lcm_step_is_the_schedulers_step(prediction_type):
    from diffusers import LCMScheduler

    T = int(torch.randint(2, 7, ()))
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, set_alpha_to_one=bool(torch.randint(2, ())),
                         original_inference_steps=50)
    sched.set_timesteps(T)
    x = torch.randn(3, 4, 5, 7, dtype=torch.float64)
    for i, t in enumerate(sched.timesteps.tolist()):
        v = torch.randn_like(x)
        seed = int(torch.randint(1 << 30, ()))
        want = sched.step(v, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        co = schedules.lcm_from_scheduler(sched, i)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        got = co.a.double() * x + co.c.double() * v + co.s.double() * noise
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert co.stochastic == (i < T - 1)  # the last step returns the clean estimate
        mean = schedules.lcm_from_scheduler(sched, i, noise=False)
        assert float(mean.s) == 0.0 and torch.equal(mean.a, co.a) and torch.equal(mean.c, co.c)
        x = want


@pytest.mark.parametrize("T", [1, 2, 4])
def test_sampler_is_the_pipeline_and_rescores_bitwise(pipe, T):
    seed = int(torch.randint(1 << 30, ()))
    kw = dict(num_inference_steps=T, guidance_scale=float(torch.rand(()) * 6 + 1), num_images_per_prompt=2,
              height=32, width=32)
    want = pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images
    sampler = LCMSampler(pipe)
    r = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(seed), **kw)
    torch.testing.assert_close(r.images, want.float(), rtol=0, atol=2e-6)
    assert r.step_indices.tolist() == list(range(T - 1)) and r.log_probs.shape == (4, T - 1)
    for j in range(r.num_steps):
        assert torch.equal(sampler.score(r, j).log_prob, r.log_probs[:, j])
    # a window: the steps outside it take their mean, and record nothing
    if T == 4:
        w = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(seed), sde_steps=(1, 2), **kw)
        assert w.step_indices.tolist() == [1] and not torch.allclose(w.images, r.images)


def test_bad_inputs(pipe):
    s = LCMSampler(pipe)
    with pytest.raises(ValueError, match="no negative prompt"):
        s.sample(PROMPTS, num_inference_steps=2, negative_prompt="blurry", height=32, width=32)
    with pytest.raises(ValueError, match="use LCMSampler"):
        DDIMSampler(pipe)
    from diffusers import LCMScheduler

    clipping = tiny_pipeline("lcm")
    clipping.scheduler = LCMScheduler.from_config(clipping.scheduler.config, clip_sample=True)
    with pytest.raises(ValueError, match="clips or thresholds"):
        LCMSampler(clipping)


def test_rlcm_preset_trains(tmp_path):
    kind, values = get_preset("tiny-lcm-ddpo-jpeg")
    assert kind == "ddpo"
    values.update(output_dir=str(tmp_path), epochs=2, save_every=0)
    tr = DDPOTrainer(load_config(DDPOConfig, base=values), progress=False)
    assert isinstance(tr.sampler, LCMSampler)
    before = {n: p.detach().clone() for n, p in tr.trainable.items()}
    recs = tr.train()
    assert all(r["optimizer_steps"] >= 1 and torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert any(not torch.equal(p, before[n]) for n, p in tr.trainable.items())
