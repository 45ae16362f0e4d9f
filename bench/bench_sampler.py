"""Whole-rollout benchmark: diffrl's samplers against a research-style eager sampling loop.

One rollout of P prompts x G images, T steps, classifier-free guidance, every step stochastic and its
log-prob recorded, images decoded. Both implementations call the same pipeline's model; what
differs is the loop around it.

Models (``--shapes``):

tiny-sd3    the tiny random-weight SD3 pipeline of ``diffrl.models.tiny`` (flow SDE, CPU default)
tiny-sd     the tiny random-weight SD 1.x pipeline (DDIM with eta = 1, CPU default)
sd3-medium  an SD3-medium-shaped random transformer (24 joint blocks, width 1536, ~2 B parameters)
            with tiny text towers and VAE (``diffrl.models.tiny.sd3_medium_pipeline``), bf16, 512 px
            by default (CUDA default; ``--sizes`` sets the image side; ``DIFFRL_BENCH_SD3_LAYERS=1``
            shrinks it to one block for a smoke test on a CPU)

Implementations:

research-eager  the loop as published RL code writes it (Flow-GRPO's / DDPO's pipelines with log-prob,
                written here from the math, not copied): the prompt list repeated G times and
                encoded per sample, the CFG combination as a separate step in the model dtype, the
                scheduler's index looked up per sample and step on the host, the step mean, sample
                and log-prob in unfused PyTorch (~ten latent-sized temporaries), every latent of the
                trajectory kept (``[B, T + 1, ...]``)
diffrl          ``FlowSDESampler`` / ``DDIMSampler``: distinct prompts encoded once, coefficients
                computed once per rollout, CFG + step + log-prob in one fused ``sde_step``, latents of
                the recorded steps stored once
diffrl-window   the same with only 2 stochastic steps (``sde_steps=(0, 2)``, Flow-GRPO-Fast /
                MixGRPO style); the others are ODE/DDIM steps with nothing stored

Columns: the standard ones (``bytes_moved`` empty; ``x eager`` against ``research-eager``) plus
``stored_mb`` (the trajectory a trainer keeps: latents and log-probs) and ``logp_maxdiff`` (max
|log-prob difference| to the research loop on the same seed, a sanity check; diffrl-window records
fewer steps and shows none). Peak memory covers the whole rollout (model activations included).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from bench import harness

OP = "sampler"
GUIDANCE = 4.5
NOISE_LEVEL = 0.7


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    prompts: int
    group: int
    steps: int
    dtype: torch.dtype

    @property
    def batch(self) -> int:
        return self.prompts * self.group

    @property
    def shape(self) -> str:
        return f"{self.prompts}x{self.group}x{self.size}px/T={self.steps}"

    @property
    def kind(self) -> str:
        return "ddim" if self.model == "tiny-sd" else "flow"


MODELS = ("tiny-sd3", "tiny-sd", "sd3-medium")


def cases(device_type: str, quick: bool = False, shapes=None, sizes=None, batches=None, dtypes=None) -> list[Case]:
    """``batches`` overrides G (images per prompt; P = 2), ``sizes`` the image side."""
    if shapes:
        unknown = [s for s in shapes if s not in MODELS]
        if unknown:
            raise ValueError(f"bench_sampler: unknown model(s) {unknown}; choose from {MODELS}")
        models = tuple(shapes)
    else:
        models = ("sd3-medium",) if device_type == "cuda" else ("tiny-sd3", "tiny-sd")
    out = []
    for m in models:
        big = m == "sd3-medium"
        dt = (dtypes or ((torch.bfloat16,) if big else (torch.float32,)))[0]
        szs = sizes or ((512,) if big else (64,))
        groups = batches or ((4,) if quick else (8,))
        steps = 4 if quick else 10
        out += [Case(m, s, 2, g, steps, dt) for s in szs for g in groups]
    return out


def build(case: Case, device: torch.device):
    from diffrl.models.tiny import sd3_medium_pipeline, tiny_pipeline  # noqa: PLC0415

    if case.model == "sd3-medium":
        # DIFFRL_BENCH_SD3_LAYERS=1 makes a smoke-test-sized model of the same width (CPU checks)
        layers = int(os.environ.get("DIFFRL_BENCH_SD3_LAYERS", "24"))
        return sd3_medium_pipeline(dtype=case.dtype, device=device, num_layers=layers)
    return tiny_pipeline(case.model.removeprefix("tiny-"), dtype=case.dtype, device=device)


def _prompts(case: Case) -> list[str]:
    words = ["a red circle", "two blue squares", "a green triangle left of a yellow square", "three purple circles"]
    return [words[i % len(words)] for i in range(case.prompts)]


def _options(case: Case) -> dict:
    # the tiny pipelines' T5 context is 16 tokens; SD3-medium's pipeline default (256) otherwise
    return {"max_sequence_length": 16} if case.model == "tiny-sd3" else {}


# ----------------------------------------------------------------------------------------------
# the research-style loop (eager PyTorch, one op at a time)


def _gaussian_log_prob(prev, mean, std):
    lp = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _flow_step(scheduler, v, t, x, eta, generator):
    # scheduler index looked up per sample on the host, then the Flow-GRPO SDE step term by term
    idx = torch.tensor([scheduler.index_for_timestep(tt) for tt in t.expand(x.shape[0])])
    sigmas = scheduler.sigmas.to(x.device)
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigma = sigmas[idx].view(shape)
    sigma_next = sigmas[idx + 1].view(shape)
    dt = sigma_next - sigma
    std_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma))) * eta
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    noise = randn_tensor(v.shape, generator=generator, device=v.device, dtype=v.dtype)
    std = std_t * torch.sqrt(-dt)
    prev = mean + std * noise
    return prev, _gaussian_log_prob(prev, mean, std)


def _ddim_step(scheduler, eps, t, x, eta, generator):
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.to(x.device)
    shape = (-1,) + (1,) * (x.ndim - 1)
    tt = t.expand(x.shape[0]).to(x.device)
    pt = prev_t.expand(x.shape[0]).to(x.device)
    alpha = ac.gather(0, tt).view(shape)
    alpha_prev = torch.where(pt >= 0, ac.gather(0, pt.clamp(min=0)),
                             torch.as_tensor(float(scheduler.final_alpha_cumprod), device=x.device)).view(shape)
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    x0 = (x - beta**0.5 * eps) / alpha**0.5
    variance = (beta_prev / beta) * (1 - alpha / alpha_prev)
    std = eta * variance**0.5
    mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
    noise = randn_tensor(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
    prev = mean + std * noise
    return prev, _gaussian_log_prob(prev, mean, std)


@torch.no_grad()
def research_rollout(pipe, case: Case, generator) -> dict:
    """One rollout the way published RL pipelines write it (see the module docstring)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: PLC0415
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    device = pipe._execution_device
    prompts = [p for p in _prompts(case) for _ in range(case.group)]  # each copy is its own sample
    B = len(prompts)
    if case.kind == "flow":
        model = pipe.transformer
        pe, npe, pooled, npooled = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True,
                                                      device=device, num_images_per_prompt=1, **_options(case))
        emb = torch.cat([npe, pe])
        pool = torch.cat([npooled, pooled])
        latents = pipe.prepare_latents(B, model.config.in_channels, case.size, case.size, pe.dtype, device,
                                       generator).float()
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        model = pipe.unet
        pe, npe = pipe.encode_prompt(prompts, device, 1, True)
        emb = torch.cat([npe, pe])
        vsf = pipe.vae_scale_factor
        latents = randn_tensor((B, model.config.in_channels, case.size // vsf, case.size // vsf), generator=generator,
                               device=device, dtype=pe.dtype).float()
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(case.steps, device=device)
    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        x_in = torch.cat([latents] * 2).to(pe.dtype)
        if case.kind == "flow":
            out = model(hidden_states=x_in, timestep=t.expand(2 * B), encoder_hidden_states=emb,
                        pooled_projections=pool, return_dict=False)[0]
        else:
            out = model(x_in, t, encoder_hidden_states=emb, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        guided = uncond + GUIDANCE * (cond - uncond)
        if case.kind == "flow":
            latents, log_prob = _flow_step(scheduler, guided.float(), t, latents, NOISE_LEVEL, generator)
        else:
            latents, log_prob = _ddim_step(scheduler, guided.float(), t, latents, 1.0, generator)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    images = _decode(pipe, case, latents)
    return {"images": images, "latents": torch.stack(all_latents, dim=1),
            "log_probs": torch.stack(all_log_probs, dim=1)}


def _decode(pipe, case, latents):
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    if case.kind == "flow":
        z = z + vae.config.shift_factor
    image = vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt").float()


# ----------------------------------------------------------------------------------------------


def _stored_bytes(latents, log_probs) -> int:
    return latents.numel() * latents.element_size() + log_probs.numel() * log_probs.element_size()


def bench_case(ctx, case: Case) -> list[dict]:
    from diffrl.samplers import DDIMSampler, FlowSDESampler  # noqa: PLC0415

    device = ctx.device
    pipe = build(case, device)

    def gen():
        return torch.Generator(device).manual_seed(0)

    def sampler(window):
        kw = {"sde_steps": (0, 2)} if window else {}
        if case.kind == "flow":
            return FlowSDESampler(pipe, noise_level=NOISE_LEVEL, **kw)
        return DDIMSampler(pipe, eta=1.0, **kw)

    def ours(window):
        s = sampler(window)

        def fn():
            r = s.sample(_prompts(case), num_images_per_prompt=case.group, num_inference_steps=case.steps,
                         guidance_scale=GUIDANCE, height=case.size, width=case.size, generator=gen(),
                         **_options(case))
            return {"images": r.images, "latents": r.latents, "log_probs": r.log_probs}

        return fn

    impls = {"research-eager": lambda: research_rollout(pipe, case, gen()), "diffrl": ours(False),
             "diffrl-window": ours(True)}
    measured, want = [], None
    for impl, fn in impls.items():
        note, diff = "", None
        try:
            got = fn()
            if want is None:
                want = got
            elif got["log_probs"].shape == want["log_probs"].shape:
                diff = (got["log_probs"] - want["log_probs"]).abs().max().item()
            stored = _stored_bytes(got["latents"], got["log_probs"])
            del got
            timing = ctx.timing(fn, min_reps=3, flush_l2=False)
            peak = harness.peak_memory_bytes(fn, device)
        except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking the rest
            ctx.log(f"  {impl}: FAILED {type(exc).__name__}: {exc}")
            timing = harness.Timing(float("nan"), float("nan"), float("nan"), 0)
            peak, stored, note = None, None, f"FAILED {type(exc).__name__}: {exc}"[:200]
        measured.append((impl, timing, peak, stored, diff, note))
        ctx.log(f"  {impl:15s} {timing.median_ms:10.2f} ms  peak {peak} B  stored {stored} B  dlogp {diff} {note}")
    base = measured[0][1].median_ms
    return [harness.result_row(op=OP, case=case.model, shape=case.shape, dtype=case.dtype, batch=case.batch,
                               mode=f"rollout T={case.steps}", impl=impl, timing=timing, bytes_moved=None,
                               eager_ms=base if timing.reps else None, peak_bytes=peak, note=note,
                               stored_mb=None if stored is None else round(stored / 2**20, 3),
                               logp_maxdiff=None if diff is None else float(f"{diff:.3g}"))
            for impl, timing, peak, stored, diff, note in measured]


def run(ctx) -> list[dict]:
    rows = []
    for case in cases(ctx.device.type, ctx.quick, ctx.shapes, ctx.sizes, ctx.batches, ctx.dtypes):
        ctx.log(f"[{OP}] {case.model} {case.shape} B={case.batch} {harness.dtype_name(case.dtype)}")
        rows += bench_case(ctx, case)
    return rows
