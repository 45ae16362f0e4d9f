"""The sampling loop shared by every sampler and every model family.

One rollout is: encode each distinct prompt once (the adapter), draw the initial latents as the
pipeline does, then for each of the T steps one model call on the concatenated ``[uncond; cond]``
batch (classifier-free guidance), followed by either

* a **stochastic** step (in ``sde_steps`` and with ``s > 0``): ``diffrl.ops.sde_step`` in sampling
  mode, which fuses the CFG combination, the Gaussian step and its log-prob; the latents before and
  after it are stored; or
* a **deterministic** step (outside ``sde_steps``, or one whose schedule has ``s == 0`` such as
  DDIM's last step or CPS's): ``x' = a x + c v`` in float32 with the same coefficient functions at
  zero noise. Nothing is stored or drawn.

The steps are :meth:`BaseSampler.denoise` (``sample`` prepares its inputs: prompts, initial
latents, the step plan of :meth:`BaseSampler.plan_steps`); it runs without autograd unless asked
(``grad=True``, for trainers that backpropagate a reward through the sampling chain).

The loop keeps latents in float32 whatever the model's dtype (model inputs are cast to it, outputs
back): for a float32 model that is exactly what the pipeline does; for half-precision models the
pipeline rounds its latents to the model dtype after every step and this loop does not.

Noise order (the generator's draws, hence what a seed means): first the initial latents, exactly as
the pipeline draws them (one ``randn`` of the full latent shape in the model's dtype, or one per
sample when ``generator`` is a list of B generators); then, for each recorded step in increasing
order, one float32 ``randn`` of the latent shape (per sample with a list of generators). Deterministic
steps draw nothing, so with the noise off the generator is used exactly as by the pipeline.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from diffrl.ops import sde_step
from diffrl.samplers.families import Adapter, get_adapter, model_dtype
from diffrl.samplers.lora import adapters_disabled
from diffrl.samplers.rollout import Rollout
from diffrl.schedules import StepCoeffs


class SplitCFG(NamedTuple):
    """CFG embeddings that cannot share one model call (``Adapter.cfg_batch`` said so): two calls."""

    cond: dict
    uncond: dict


class DenoiseResult(NamedTuple):
    """What :meth:`BaseSampler.denoise` returns: the final latents (float32), the latents at the
    asked positions ``[B, len(store_positions), ...]`` and the recorded steps' log-probs ``[B, S]``."""

    latents: torch.Tensor
    stored: torch.Tensor
    log_probs: torch.Tensor


@dataclass
class _Call:
    """One ``sample`` call's checked arguments."""

    prompts: list
    P: int
    G: int
    T: int
    guidance_scale: float
    height: int
    width: int
    options: dict
    steps_spec: object
    stochastic_steps: set
    group_ids: torch.Tensor
    cfg_weight: float | None
    negatives: list | None


#: ``score(..., reference=DISABLE_ADAPTERS)``: the reference policy is the scored model with its
#: (peft/LoRA) adapters switched off, i.e. the base weights
DISABLE_ADAPTERS = "disable_adapters"


def resolve_sde_steps(spec, num_inference_steps: int) -> list[int]:
    """The schedule positions chosen by ``sde_steps``, sorted.

    * ``None``: every step;
    * a 2-tuple ``(start, end)``: the window ``start <= i < end`` (MixGRPO / Flow-GRPO-Fast);
    * a ``range``, or a list (or tuple of another length) of distinct step indices.

    Indices lie in ``[0, num_inference_steps)``; anything else raises ``ValueError``.
    """
    T = num_inference_steps
    if spec is None:
        return list(range(T))

    def _int(v, what):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"sde_steps: {what} must be ints, got {v!r}")
        return v

    if isinstance(spec, tuple) and len(spec) == 2:
        start, end = (_int(v, "a window's bounds") for v in spec)
        if not 0 <= start < end <= T:
            raise ValueError(f"sde_steps window ({start}, {end}) must satisfy 0 <= start < end <= "
                             f"num_inference_steps = {T}")
        return list(range(start, end))
    if isinstance(spec, range):
        spec = list(spec)
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    if not isinstance(spec, (list, tuple)):
        raise TypeError("sde_steps must be None, a (start, end) window, a range or a list of step indices, got "
                        f"{type(spec).__name__}")
    idx = [_int(v, "step indices") for v in spec]
    if not idx:
        raise ValueError("sde_steps is empty: choose at least one stochastic step (or None for all)")
    if len(set(idx)) != len(idx):
        raise ValueError(f"sde_steps has repeated indices: {idx}")
    bad = [i for i in idx if not 0 <= i < T]
    if bad:
        raise ValueError(f"sde_steps {bad} out of range: steps are 0 .. {T - 1} for num_inference_steps = {T}")
    return sorted(idx)


def _call_default(pipe, name):
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _randn(shape, generator, device):
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


class BaseSampler:
    """Shared loop; subclasses supply the scheduler and the step coefficients.

    ``sde_steps``: which steps are stochastic and recorded (see :func:`resolve_sde_steps`), settable
    between calls and overridable per ``sample`` call. ``reduce``: the log-prob reduction of
    ``sde_step`` (``"mean"`` as DDPO / Flow-GRPO, or ``"sum"``). ``backend``: ``sde_step``'s backend.
    ``progress``: a tqdm bar over the steps.
    """

    kind = ""

    def __init__(self, pipe, sde_steps=None, *, reduce: str = "mean", backend: str = "auto",
                 progress: bool = False):
        self.pipe = pipe
        self.adapter: Adapter = get_adapter(pipe, self.kind)
        if sde_steps is not None:
            resolve_sde_steps(sde_steps, 2**31 - 1)  # type and shape errors now; the range at sample()
        self.sde_steps = sde_steps
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        self.reduce = reduce
        self.backend = backend
        self.progress = progress

    # ---- subclass hooks --------------------------------------------------------------------------

    def _make_scheduler(self):
        raise NotImplementedError

    def _coeffs(self, scheduler, i: int, t: int | float, stochastic: bool) -> StepCoeffs:
        """Host (CPU) coefficients of step ``i`` at timestep ``t`` (a Python number): the sampler's
        stochastic step, or its zero-noise step when ``stochastic`` is False."""
        raise NotImplementedError

    def _info(self) -> dict:
        return {}

    @property
    def model(self) -> torch.nn.Module:
        """The denoiser the sampler calls (the pipeline's unet or transformer)."""
        return self.adapter.model

    # ---- the model call ------------------------------------------------------------------------

    def model_batch(self, cond: dict, uncond: dict | None):
        """The embeddings of one :meth:`predict` call: ``cond`` without CFG; under CFG ``[uncond;
        cond]`` concatenated for one model call, or a :class:`SplitCFG` pair (two calls) where the
        family says the two cannot share a batch (``Adapter.cfg_batch``). Build it once per rollout
        or scoring call, not per step."""
        if uncond is None:
            return cond
        batch = self.adapter.cfg_batch(cond, uncond)
        return SplitCFG(cond, uncond) if batch is None else batch

    def predict(self, x, t, emb, shared=None, *, cfg: bool = False, model: torch.nn.Module | None = None):
        """The model's outputs in float32 at latents ``x`` ``[B, ...]`` and timesteps ``t`` ``[B]``:
        ``(v_cond, v_uncond)``, ``v_uncond`` None without CFG. ``emb`` comes from
        :meth:`model_batch` (under CFG: one call on ``[x; x]``, or two calls for a ``SplitCFG``).
        ``model``: the denoiser to call (default the pipeline's, e.g. a trained copy or a
        reference). Runs with gradients where autograd is on; combine the pair with :meth:`guide`."""
        model = self.model if model is None else model
        shared = {} if shared is None else shared
        forward = self.adapter.forward
        dt = model_dtype(model)
        if not cfg:
            return forward(model, x.to(dt), t, emb, shared).float(), None
        if isinstance(emb, SplitCFG):
            x_m = x.to(dt)
            return forward(model, x_m, t, emb.cond, shared).float(), forward(model, x_m, t, emb.uncond, shared).float()
        out = forward(model, torch.cat([x, x]).to(dt), torch.cat([t, t]), emb, shared).float()
        v_uncond, v_cond = out.chunk(2)
        return v_cond, v_uncond

    def _predict_pair(self, x, t, emb, shared, cfg, model):
        return self.predict(x, t, emb, shared, cfg=cfg, model=model)

    def guide(self, v_cond, v_uncond, guidance_scale):
        """The guided prediction from :meth:`predict`'s pair (``v_cond`` when there is no ``v_uncond``),
        combined as the family does (``Adapter.guide``; linear CFG by default)."""
        if v_uncond is None:
            return v_cond
        return self.adapter.guide(v_cond, v_uncond, guidance_scale)

    # the names trainers used before predict() and model_batch() were public
    def _model_batch(self, cond, uncond):
        return self.model_batch(cond, uncond)

    def _predict(self, model, x, t, emb, shared, cfg: bool):
        return self.predict(x, t, emb, shared, cfg=cfg, model=model)

    # ---- the denoising loop ----------------------------------------------------------------------

    def plan_steps(self, scheduler, timesteps, stochastic_steps) -> list[tuple[bool, object]]:
        """Per step ``i``: ``(True, StepCoeffs)`` for a stochastic step (``i`` in ``stochastic_steps``
        and ``s > 0``), else ``(False, (a, c))`` floats of the zero-noise step. Computed on the host
        once per rollout (one device-to-host copy of the timesteps), so the loop has no host syncs."""
        plan = []
        for i, t in enumerate(timesteps.cpu().tolist()):
            if i in stochastic_steps:
                co = self._coeffs(scheduler, i, t, True)
                if co.stochastic:
                    plan.append((True, co))
                    continue
            else:
                co = self._coeffs(scheduler, i, t, False)
            plan.append((False, (float(co.a), float(co.c))))
        return plan

    def denoise(self, x, timesteps, plan, emb, shared, guidance_scale, generator=None, *, store_positions=(),
                model: torch.nn.Module | None = None, grad: bool = False, checkpoint: bool = False,
                progress: bool = False) -> DenoiseResult:
        """Run the steps of ``plan`` (from :meth:`plan_steps`) from float32 latents ``x`` ``[B, ...]``.

        ``emb``: from :meth:`model_batch`; ``guidance_scale``: the CFG weight, None for no CFG.
        Stochastic steps draw their noise from ``generator`` (one float32 ``randn`` of the latent
        shape each, in step order: the documented draw order) and record their log-prob.
        ``store_positions``: the positions ``0 .. T`` whose latents are returned (position ``i``
        is the input of step ``i``, ``T`` the final latent), in the order given. ``model``: the
        denoiser (default the pipeline's). ``grad=True`` runs with autograd on whatever the
        caller's mode (a reward-backprop trainer differentiates the final latent through every
        step); the default runs without it. ``checkpoint``: with ``grad``, each step's model call is
        recomputed in the backward pass (``torch.utils.checkpoint``) instead of keeping its activations.
        """
        model = self.model if model is None else model
        cfg = guidance_scale is not None
        fused_cfg = cfg and self.adapter.linear_cfg  # non-linear CFG is combined before the step
        B, T, device = x.shape[0], len(plan), x.device
        slot = {p: k for k, p in enumerate(store_positions)}
        recorded = [i for i, (rec, _) in enumerate(plan) if rec]
        dev_coeffs = {i: plan[i][1].to(device) for i in recorded}
        bar = _progress(T, progress)
        with torch.set_grad_enabled(grad):
            store = torch.empty((B, len(slot), *x.shape[1:]), dtype=torch.float32, device=device)
            log_probs = torch.empty((B, len(recorded)), dtype=torch.float32, device=device)
            j = 0
            for i in range(T):
                if i in slot:
                    store[:, slot[i]] = x
                if checkpoint and grad:
                    from torch.utils.checkpoint import checkpoint as _recompute  # noqa: PLC0415

                    v_cond, v_uncond = _recompute(self._predict_pair, x, timesteps[i].expand(B), emb, shared, cfg,
                                                  model, use_reentrant=False)
                else:
                    v_cond, v_uncond = self.predict(x, timesteps[i].expand(B), emb, shared, cfg=cfg, model=model)
                if cfg and not fused_cfg:
                    v_cond, v_uncond = self.adapter.guide(v_cond, v_uncond, guidance_scale), None
                rec, co = plan[i]
                if rec:
                    noise = _randn(x.shape, generator, device)
                    out = sde_step(x, v_cond, dev_coeffs[i], uncond_output=v_uncond,
                                   guidance_scale=guidance_scale if fused_cfg else None, noise=noise,
                                   reduce=self.reduce, return_mean=False, backend=self.backend)
                    x = out.prev_sample
                    log_probs[:, j] = out.log_prob
                    j += 1
                else:
                    v = v_cond if v_uncond is None else v_uncond + guidance_scale * (v_cond - v_uncond)
                    a, c = co
                    x = a * x + c * v
                if bar is not None:
                    bar.update()
            if T in slot:
                store[:, slot[T]] = x
        if bar is not None:
            bar.close()
        return DenoiseResult(x, store, log_probs)

    # ---- sampling --------------------------------------------------------------------------------

    def sample(self, prompts, num_images_per_prompt: int = 1, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
               negative_prompt=None, generator=None, *, latents: torch.Tensor | None = None,
               group_ids=None, sde_steps="default", decode: bool = True, progress: bool | None = None,
               same_initial_noise: bool = False, share_prefix: bool = False, keep_final_latents: bool = False,
               grad: bool = False, grad_steps: int | None = None, checkpoint_steps: bool = False,
               **options) -> Rollout:
        """Sample ``num_images_per_prompt`` images for each prompt and record the stochastic steps.

        Arguments mean what they mean for the pipeline's ``__call__`` (and default to its defaults):
        ``prompts`` (a str or a non-empty list of str), ``num_images_per_prompt`` (G),
        ``num_inference_steps`` (T), ``guidance_scale``, ``height``/``width``, ``negative_prompt``
        (a str or one per prompt), ``generator`` (a torch.Generator or a list of B of them),
        ``latents`` (initial latents in the pipeline's layout). Family-specific pipeline options go
        in ``**options`` (e.g. ``max_sequence_length`` for SD3/FLUX, ``true_cfg_scale`` for FLUX,
        ``original_size`` for SDXL).

        Samples are ordered prompt-major: sample ``p * G + g`` is image g of prompt p, as in the
        pipeline. ``group_ids`` defaults to the prompt's position in ``prompts`` (so a prompt given
        twice makes two groups); pass one id per prompt to choose them. ``sde_steps`` overrides the
        sampler's for this call; ``decode=False`` skips the VAE (``rollout.images`` is None).
        ``same_initial_noise=True`` starts the G images of a prompt from one initial latent (as
        DanceGRPO): the group then differs only by the stochastic steps' noise, so the group mean is a
        baseline for the same start and reward differences are credited to the steps that made them
        (with a list of generators, image ``p * G``'s draws the prompt's latent).
        ``share_prefix=True`` (with ``same_initial_noise``) runs the deterministic steps before the
        first stochastic one once per prompt instead of G times, and branches the group there
        (Flow-GRPO-Fast / MixGRPO with a window that starts late): the same images up to the model's
        batch-composition rounding, ``(G - 1) / G`` fewer model rows on those steps.
        ``keep_final_latents=True`` also stores the last latent (``rollout.final_latents``, what the
        VAE decodes), which forward-process trainers (``NFTTrainer``) train on.

        ``grad=True`` runs the steps and the decode with autograd (the images, latents and log-probs
        then carry gradients to the denoiser: reward backpropagation); the prompt encoding and the
        initial latents stay without. By default nothing is differentiable. ``grad_steps=K`` (with
        ``grad``) keeps autograd on the last K steps only (DRaFT-K: the earlier steps run without it);
        ``checkpoint_steps=True`` recomputes each differentiable step's model call in the backward pass
        instead of keeping its activations (memory of one step, not of K).

        The steps themselves are :meth:`denoise`.
        """
        ad = self.adapter
        with torch.no_grad():
            call = self._check_call(prompts, num_images_per_prompt, num_inference_steps, guidance_scale, height,
                                    width, negative_prompt, generator, group_ids, sde_steps, options)
            if share_prefix and not same_initial_noise:
                raise ValueError("share_prefix=True needs same_initial_noise=True: the G images of a prompt share "
                                 "their deterministic prefix only when they start from one latent")
            G, T = call.G, call.T
            height, width, options, w = call.height, call.width, call.options, call.cfg_weight
            cond, uncond, shared, embed_index = self._encode_prompts(call)
            # an editing family's input images, one per embedding row: per sample into the rollout
            condition_images = shared.pop("condition_images", None)
            emb = self.model_batch({k: v[embed_index] for k, v in cond.items()},
                                   None if uncond is None else {k: v[embed_index] for k, v in uncond.items()})
            lat = self._initial_latents(call, generator, latents, same_initial_noise, shared)
            scheduler = self._make_scheduler()
            timesteps = ad.set_timesteps(scheduler, T, lat, options)
            if len(timesteps) != T:
                raise ValueError(f"the scheduler made {len(timesteps)} timesteps for num_inference_steps = {T}")
            plan = self.plan_steps(scheduler, timesteps, call.stochastic_steps)
        recorded = [i for i, (rec, _) in enumerate(plan) if rec]
        # each recorded step's input and output latent, once (neighbouring steps share one)
        positions = sorted({p for i in recorded for p in (i, i + 1)} | ({T} if keep_final_latents else set()))
        show = self.progress if progress is None else progress
        lat = lat.to(torch.float32)
        # the group's common deterministic prefix, once per prompt (its steps draw no noise, so the
        # generator's draws are unchanged); then the G branches from where the first stochastic step starts
        k = (recorded[0] if recorded else T) if share_prefix and G > 1 else 0
        if k:
            first = embed_index[::G]
            emb_p = self.model_batch({n: v[first] for n, v in cond.items()},
                                     None if uncond is None else {n: v[first] for n, v in uncond.items()})
            lat = self.denoise(lat[::G], timesteps[:k], plan[:k], emb_p, shared, w, None, grad=grad,
                               progress=show).latents.repeat_interleave(G, dim=0)
        m = k
        if grad and grad_steps is not None:
            if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or not 1 <= grad_steps <= T:
                raise ValueError(f"grad_steps must be an int in [1, num_inference_steps = {T}], got {grad_steps!r}")
            m = max(k, T - grad_steps)
        if m > k:  # the steps before the differentiable ones, without autograd (their noise drawn in order)
            head = self.denoise(lat, timesteps[k:m], plan[k:m], emb, shared, w, generator,
                                store_positions=[p - k for p in positions if p < m], progress=show)
            tail = self.denoise(head.latents, timesteps[m:], plan[m:], emb, shared, w, generator,
                                store_positions=[p - m for p in positions if p >= m], grad=True,
                                checkpoint=checkpoint_steps, progress=show)
            result = DenoiseResult(tail.latents, torch.cat([head.stored, tail.stored], 1),
                                   torch.cat([head.log_probs, tail.log_probs], 1))
        else:
            result = self.denoise(lat, timesteps[k:], plan[k:], emb, shared, w, generator,
                                  store_positions=[p - k for p in positions], grad=grad,
                                  checkpoint=checkpoint_steps and grad, progress=show)
        with torch.set_grad_enabled(grad):
            images = ad.decode(result.latents, height, width) if decode else None
        info = {"family": ad.family, "kind": self.kind, "num_inference_steps": T, "height": height, "width": width,
                "reduce": self.reduce, "num_images_per_prompt": G, "same_initial_noise": bool(same_initial_noise),
                "share_prefix": bool(share_prefix),
                "guidance_scale_arg": float(call.guidance_scale),
                "sde_steps": call.steps_spec, **self._info()}
        coeff_rows = [torch.stack([co.a, co.c, co.s]) for rec, co in plan if rec]
        return Rollout(
            images=images,
            latents=result.stored,
            log_probs=result.log_probs,
            group_ids=call.group_ids.repeat_interleave(G).to(ad.device),
            embed_index=embed_index,
            prompts=[p for p in call.prompts for _ in range(G)],
            step_indices=torch.tensor(recorded, dtype=torch.long),
            timesteps=timesteps[recorded].cpu() if recorded else timesteps[:0].cpu(),
            coeffs=torch.stack(coeff_rows) if coeff_rows else torch.empty((0, 3), dtype=torch.float32),
            cond=cond,
            uncond=uncond,
            shared=shared,
            guidance_scale=w,
            latent_positions=tuple(positions),
            info=info,
            condition_images=None if condition_images is None else condition_images[embed_index],
        )

    def _check_call(self, prompts, G, T, guidance_scale, height, width, negative_prompt, generator, group_ids,
                    sde_steps, options) -> _Call:
        """``sample``'s arguments checked, with the pipeline's defaults filled in."""
        pipe, ad = self.pipe, self.adapter
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one prompt")
        prompts = list(prompts)
        P = len(prompts)
        if isinstance(G, bool) or not isinstance(G, int) or G < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {G!r}")
        T = T if T is not None else _call_default(pipe, "num_inference_steps")
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {T!r}")
        if guidance_scale is None:
            guidance_scale = _call_default(pipe, "guidance_scale")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        options = ad.check_options(options)
        height, width = ad.check_size(height, width)
        steps_spec = self.sde_steps if isinstance(sde_steps, str) and sde_steps == "default" else sde_steps
        stochastic_steps = set(resolve_sde_steps(steps_spec, T))
        B = P * G
        if isinstance(generator, list) and len(generator) != B:
            raise ValueError(f"a list of generators needs one per sample: {B} (= {P} prompts x {G}), "
                             f"got {len(generator)}")
        if group_ids is None:
            gid = torch.arange(P, dtype=torch.long)
        else:
            gid = torch.as_tensor(group_ids)
            if gid.is_floating_point() or gid.shape != (P,):
                raise ValueError(f"group_ids must be {P} integers (one per prompt), got shape {tuple(gid.shape)}")
            gid = gid.long().cpu()
        return _Call(prompts=prompts, P=P, G=G, T=T, guidance_scale=guidance_scale, height=height, width=width,
                     options=options, steps_spec=steps_spec, stochastic_steps=stochastic_steps, group_ids=gid,
                     cfg_weight=ad.cfg_weight(guidance_scale, negative_prompt, options),
                     negatives=_negatives(negative_prompt, P))

    def _encode_prompts(self, call: _Call):
        """Encode each distinct (prompt, negative) pair once: ``(cond, uncond, shared, embed_index)``
        with ``embed_index`` ``[B]`` the row of each sample."""
        ad = self.adapter
        P, negatives = call.P, call.negatives
        # an option given per prompt (an editing family's input images) makes each prompt its own row,
        # so that encode sees the option's entries aligned with its prompts
        per_prompt = any(call.options.get(n) is not None for n in ad.per_prompt_options)
        keys = list(zip(call.prompts, negatives or [None] * P, range(P) if per_prompt else [None] * P))
        table: dict[tuple, int] = {}
        for key in keys:
            table.setdefault(key, len(table))
        rows = torch.tensor([table[k] for k in keys], dtype=torch.long)
        distinct = list(table)
        cond, uncond, shared = ad.encode([p for p, _, _ in distinct],
                                         None if negatives is None else [n for _, n, _ in distinct],
                                         call.cfg_weight is not None, call.options, call.height, call.width)
        g_embed = ad.guidance_embedding(call.guidance_scale)
        if g_embed is not None:
            shared["guidance"] = g_embed
        return cond, uncond, shared, rows.repeat_interleave(call.G).to(ad.device)

    def _initial_latents(self, call: _Call, generator, latents, same_initial_noise, shared):
        """The initial latents, drawn as the pipeline draws them (one per prompt, repeated, with
        ``same_initial_noise``), or the given ones."""
        ad, P, G = self.adapter, call.P, call.G
        B = P * G
        if latents is not None:
            if same_initial_noise:
                raise ValueError("pass either latents or same_initial_noise=True, not both")
            if not isinstance(latents, torch.Tensor) or latents.shape[0] != B:
                raise ValueError(f"latents must be a tensor with {B} samples (prompts x num_images_per_prompt)")
            latents = latents.to(device=ad.device, dtype=model_dtype(self.model))
        if same_initial_noise:
            gen0 = generator[::G] if isinstance(generator, list) else generator
            return ad.prepare_latents(P, call.height, call.width, gen0, None, shared).repeat_interleave(G, dim=0)
        return ad.prepare_latents(B, call.height, call.width, generator, latents, shared)

    # ---- completing a trajectory -----------------------------------------------------------------

    def complete(self, rollout: Rollout, position: int, *, decode: bool = True) -> torch.Tensor:
        """The deterministic (ODE) completion of every trajectory of ``rollout`` from its stored latent at
        ``position`` (0 .. T; ``T``: the final latent, nothing to run): the images ``[B, 3, H, W]`` (the
        final latents with ``decode=False``). Dense per-step rewards (DenseGRPO) score these: how good the
        image a step leads to is, without the later steps' noise. The schedule is rebuilt as ``sample``
        built it (the family's default options, which is what the trainers sample with)."""
        if not isinstance(rollout, Rollout):
            raise TypeError(f"complete needs a Rollout, got {type(rollout).__name__}")
        if position not in rollout.latent_positions:
            raise ValueError(f"position {position} is not stored in this rollout (stored: {rollout.latent_positions})")
        ad, info = self.adapter, rollout.info
        T, height, width = int(info["num_inference_steps"]), int(info["height"]), int(info["width"])
        x = rollout.latents[:, rollout._slot(position)]
        with torch.no_grad():
            if position < T:
                scheduler = self._make_scheduler()
                timesteps = ad.set_timesteps(scheduler, T, x, ad.check_options({}))
                plan = self.plan_steps(scheduler, timesteps, set())
                emb = self.model_batch(rollout.embeddings(), rollout.embeddings(uncond=True))
                x = self.denoise(x, timesteps[position:], plan[position:], emb, rollout.shared,
                                 rollout.guidance_scale).latents
            return ad.decode(x, height, width) if decode else x

    def _forward_noise(self, scheduler, i: int, t, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x0`` noised to the input level of step ``i`` (timestep ``t``) by the forward process."""
        raise NotImplementedError

    def last_step_from(self, rollout: Rollout, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """DRaFT-LV's step: the final latents ``x0`` ``[B, ...]`` of ``rollout``'s trajectories noised afresh
        (noise from ``generator``) to the last step's input level, and that step taken with autograd (the
        family's zero-noise step); returns the decoded images ``[B, 3, H, W]``, differentiable in the model."""
        ad, info = self.adapter, rollout.info
        T, height, width = int(info["num_inference_steps"]), int(info["height"]), int(info["width"])
        with torch.no_grad():
            scheduler = self._make_scheduler()
            timesteps = ad.set_timesteps(scheduler, T, x0, ad.check_options({}))
            plan = self.plan_steps(scheduler, timesteps, set())
            eps = _randn(x0.shape, generator, x0.device)
            x = self._forward_noise(scheduler, T - 1, timesteps[T - 1], x0.float(), eps)
        emb = self.model_batch(rollout.embeddings(), rollout.embeddings(uncond=True))
        out = self.denoise(x, timesteps[T - 1:], plan[T - 1:], emb, rollout.shared, rollout.guidance_scale,
                           grad=True).latents
        with torch.enable_grad():
            return ad.decode(out, height, width)

    # ---- scoring ---------------------------------------------------------------------------------

    def score(self, rollout: Rollout, step, transformer_or_unet: torch.nn.Module | None = None,
              reference=None):
        """Recompute the log-prob of recorded step ``step`` of ``rollout`` (with gradients) and,
        with ``reference``, the KL to a reference policy; returns ``diffrl.ops.SDEStepOutput``
        (``log_prob`` ``[B]``, ``kl`` ``[B]`` or None; ``prev_sample`` is the stored latent).

        ``step`` indexes the recorded steps (0 .. S-1), or is a ``[B]`` integer tensor (a step per
        sample). ``transformer_or_unet``: the model being trained (default: the pipeline's).
        ``reference``: None (no KL), a model (evaluated without gradients),
        :data:`DISABLE_ADAPTERS` (``"disable_adapters"``: the scored model with its peft adapters off), or a
        tensor ``[B, ...]``: the reference policy's (guided) prediction at the step's input, computed
        before (GRPO-Guard's KL to the sampling policy).

        With the unchanged model and the same batch, the log-prob is bitwise the recorded one (the
        model's forward must be deterministic and batch-composition independent for that: score the
        rollout, or its minibatches, the way it was sampled to compare bitwise).
        """
        if not isinstance(rollout, Rollout):
            raise TypeError(f"score needs a Rollout, got {type(rollout).__name__}")
        if rollout.info.get("kind") not in (None, self.kind):
            raise ValueError(f"this rollout was sampled by a {rollout.info.get('kind')} sampler, not {self.kind}")
        st = rollout._check_step(step)
        model = self.model if transformer_or_unet is None else transformer_or_unet
        device = rollout.latents.device
        B = len(rollout)
        x = rollout.latents_before(st)
        x_next = rollout.latents_after(st)
        rows = rollout.coeffs[st]
        if isinstance(st, int):
            coeffs = StepCoeffs(rows[0], rows[1], rows[2]).to(device)
            t = rollout.timesteps[st].to(device).expand(B)
        else:
            coeffs = StepCoeffs(rows[:, 0], rows[:, 1], rows[:, 2]).to(device)
            t = rollout.timesteps[st].to(device)
        emb = self.model_batch(rollout.embeddings(), rollout.embeddings(uncond=True))
        cfg = rollout.guidance_scale is not None
        v_cond, v_uncond = self.predict(x, t, emb, rollout.shared, cfg=cfg, model=model)
        ref_cond = ref_uncond = None
        if reference is not None:
            with torch.no_grad():
                if isinstance(reference, str):
                    if reference != DISABLE_ADAPTERS:
                        raise ValueError(f"reference must be None, a model or {DISABLE_ADAPTERS!r}, got {reference!r}")
                    with adapters_disabled(model):
                        ref_cond, ref_uncond = self.predict(x, t, emb, rollout.shared, cfg=cfg, model=model)
                elif isinstance(reference, torch.nn.Module):
                    ref_cond, ref_uncond = self.predict(x, t, emb, rollout.shared, cfg=cfg, model=reference)
                elif isinstance(reference, torch.Tensor):
                    if reference.shape != x.shape:
                        raise ValueError(f"a reference prediction must have the latents' shape {tuple(x.shape)}, "
                                         f"got {tuple(reference.shape)}")
                    # already guided: as the pair (g, g), any CFG weight combines it to g
                    ref_cond = reference.to(v_cond.dtype)
                    ref_uncond = ref_cond if cfg else None
                else:
                    raise TypeError(f"reference must be None, a model or {DISABLE_ADAPTERS!r}, "
                                    f"got {type(reference).__name__}")
        w = rollout.guidance_scale
        if cfg and not self.adapter.linear_cfg:  # as denoise(): the family's combination, then a plain step
            v_cond, v_uncond = self.adapter.guide(v_cond, v_uncond, w), None
            if ref_cond is not None:
                ref_cond, ref_uncond = (ref_cond if isinstance(reference, torch.Tensor)
                                        else self.adapter.guide(ref_cond, ref_uncond, w)), None
            w = None
        return sde_step(x, v_cond, coeffs, uncond_output=v_uncond, guidance_scale=w,
                        prev_sample=x_next, ref_output=ref_cond, ref_uncond_output=ref_uncond,
                        reduce=rollout.info.get("reduce", self.reduce), return_mean=False, backend=self.backend)


def _negatives(negative_prompt, count):
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
        raise TypeError(f"negative_prompt must be a str or a list of str, got {type(negative_prompt).__name__}")
    if len(negative_prompt) != count:
        raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {count} prompts")
    return list(negative_prompt)


def _progress(total, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="sampling", leave=False)
