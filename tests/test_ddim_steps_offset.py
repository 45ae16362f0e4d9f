"""Issue #22: DDIMSampler and the scheduler's ``steps_offset``.

SD 1.5's scheduler config has ``steps_offset=1``: with ``timestep_spacing="leading"`` diffusers'
``DDIMScheduler.set_timesteps`` shifts every timestep by it (50 steps: 981, 961, ..., 1), while its
``step`` still goes back by ``num_train_timesteps // num_inference_steps`` from the shifted
timestep (so the last step jumps below 0, to the final alpha). The sampler must do exactly that:
these tests compare its timesteps and its update with diffusers' ``DDIMScheduler`` on a tiny config,
on fresh random inputs, in float64 where the comparison is of the arithmetic itself. The bug the
issue found was in copying the config, not in the step: diffusers' ``from_config`` resets the keys in
``_use_default_values``, which include a ``steps_offset`` that ``StableDiffusionPipeline`` patched to
1 after the scheduler was built in code (the last test builds schedulers both ways).
"""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import DDIMScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from diffrl import schedules  # noqa: E402
from diffrl.models.tiny import tiny_pipeline  # noqa: E402
from diffrl.samplers import DDIMSampler  # noqa: E402

# a tiny training schedule: 40 train timesteps, so offsets and the last (negative) step are visible
TINY = dict(num_train_timesteps=40, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False)


def _pipe(steps_offset, spacing, prediction_type="epsilon", seed=5):
    pipe = tiny_pipeline("sd-v" if prediction_type == "v_prediction" else "sd", seed=seed)
    pipe.scheduler = DDIMScheduler(**TINY, steps_offset=steps_offset, timestep_spacing=spacing,
                                   prediction_type=prediction_type)
    return pipe


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1, 3])
def test_timesteps_are_the_schedulers(steps_offset, spacing):
    T = 6
    pipe = _pipe(steps_offset, spacing)
    r = DDIMSampler(pipe, eta=1.0).sample(["ab cd"], num_inference_steps=T, guidance_scale=1.0, height=32, width=32,
                                          generator=torch.Generator().manual_seed(0), decode=False)
    ref = DDIMScheduler(**TINY, steps_offset=steps_offset, timestep_spacing=spacing)
    ref.set_timesteps(T)
    # the recorded steps' timesteps; a last step from t = 0 goes to the same alpha (s = 0) and is not recorded
    assert r.timesteps.tolist() == ref.timesteps[r.step_indices].tolist()
    assert r.step_indices.tolist() == list(range(T if ref.timesteps[-1] > 0 else T - 1))
    if spacing == "leading":  # the offset is in the timesteps: 40 // 6 = 6, so 31, 25, ..., 1 for offset 1
        assert ref.timesteps.tolist() == [6 * k + steps_offset for k in range(T - 1, -1, -1)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_coefficients_are_the_schedulers_step_float64(prediction_type, eta):
    sched = DDIMScheduler(**TINY, steps_offset=1, prediction_type=prediction_type)
    sched.set_timesteps(7)
    gen = torch.Generator().manual_seed(1)
    for t in sched.timesteps.tolist():
        x, v, noise = (torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64) for _ in range(3))
        expected = sched.step(v, t, x, eta=eta, variance_noise=noise, return_dict=False)[0]
        co = schedules.ddim_from_scheduler(sched, t, eta)
        got = co.a.double() * x + co.c.double() * v + co.s.double() * noise
        # diffusers computes the coefficients from its float32 alphas_cumprod: float32-rounded values
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_rollout_steps_are_the_schedulers_steps(prediction_type):
    T, w, seed = 5, 3.0, 2
    pipe = _pipe(1, "leading", prediction_type)
    sampler = DDIMSampler(pipe, eta=1.0)
    r = sampler.sample(["ab cd", "ef"], num_images_per_prompt=2, num_inference_steps=T, guidance_scale=w,
                       height=32, width=32, generator=torch.Generator().manual_seed(seed), decode=False)
    ref = DDIMScheduler(**TINY, steps_offset=1, prediction_type=prediction_type)
    ref.set_timesteps(T)
    assert r.step_indices.tolist() == list(range(T))  # every step stochastic, the last one too (s > 0)
    # the generator's draws, in the documented order: the initial latents, then one per step
    gen = torch.Generator().manual_seed(seed)
    x0 = randn_tensor(r.latents_before(0).shape, generator=gen, dtype=torch.float32)
    assert torch.equal(r.latents_before(0), x0)
    emb = sampler.model_batch(r.embeddings(), r.embeddings(uncond=True))
    for j, t in enumerate(ref.timesteps.tolist()):
        noise = randn_tensor(x0.shape, generator=gen, dtype=torch.float32)
        x = r.latents_before(j)
        with torch.no_grad():
            v_cond, v_uncond = sampler.predict(x, r.timesteps[j].expand(len(r)), emb, r.shared, cfg=True)
        v = sampler.guide(v_cond, v_uncond, w)
        expected = ref.step(v.double(), t, x.double(), eta=1.0, variance_noise=noise.double(), return_dict=False)[0]
        torch.testing.assert_close(r.latents_after(j).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("built", ["in_code_then_patched", "from_config"])
def test_offset_patched_by_the_pipeline_is_kept(built):
    """A scheduler built in code with the default steps_offset (0), which StableDiffusionPipeline
    patches to 1 at construction: diffusers' from_config would reset it (the key is in
    ``_use_default_values``). The sampler must step where the pipeline steps, and at noise 0 draw its images."""
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    base = tiny_pipeline("sd", seed=int(torch.randint(0, 1000, ())))
    sched = DDIMScheduler(**{k: v for k, v in TINY.items() if k != "set_alpha_to_one"})
    if built == "from_config":  # the same values, every key explicit
        sched = DDIMScheduler.from_config({**{k: v for k, v in sched.config.items() if not k.startswith("_")},
                                           "steps_offset": 1})
    with pytest.warns(FutureWarning) if built == "in_code_then_patched" else _no_warning():
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.steps_offset == 1
    T, seed = 3, int(torch.randint(0, 10_000, ()))
    r = DDIMSampler(pipe, eta=0.0).sample(["ab cd"], num_inference_steps=T, guidance_scale=2.0, height=32, width=32,
                                          generator=torch.Generator().manual_seed(seed))
    pipe.scheduler.set_timesteps(T)
    steps = pipe.scheduler.timesteps.tolist()
    assert steps == [27, 14, 1]  # 40 // 3 = 13: leading spacing, shifted by the offset
    assert r.timesteps.tolist() == steps[:len(r.timesteps)]
    ref = pipe(["ab cd"], num_inference_steps=T, guidance_scale=2.0, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(seed)).images
    torch.testing.assert_close(r.images.float(), ref.float(), rtol=1e-4, atol=1e-4)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
