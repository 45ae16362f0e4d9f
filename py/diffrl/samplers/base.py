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

import torch

from diffrl.ops import sde_step
from diffrl.samplers.families import Adapter, get_adapter, model_dtype
from diffrl.samplers.lora import adapters_disabled
from diffrl.samplers.rollout import Rollout
from diffrl.schedules import StepCoeffs

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

    @staticmethod
    def _model_batch(cond, uncond):
        """The embeddings of one model call: ``cond``, or ``[uncond; cond]`` under CFG (built once
        per rollout or scoring call, not per step)."""
        if uncond is None:
            return cond
        return {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def _predict(self, model, x, t, emb, shared, cfg: bool):
        """Model output(s) in float32: ``(v_cond, v_uncond)``; under CFG one call on the batch
        ``[x; x]`` with ``emb = [uncond; cond]`` (see ``_model_batch``), ``v_uncond`` None without."""
        dt = model_dtype(model)
        if not cfg:
            return self.adapter.forward(model, x.to(dt), t, emb, shared).float(), None
        out = self.adapter.forward(model, torch.cat([x, x]).to(dt), torch.cat([t, t]), emb, shared).float()
        v_uncond, v_cond = out.chunk(2)
        return v_cond, v_uncond

    # ---- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts, num_images_per_prompt: int = 1, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
               negative_prompt=None, generator=None, *, latents: torch.Tensor | None = None,
               group_ids=None, sde_steps="default", decode: bool = True, progress: bool | None = None,
               same_initial_noise: bool = False, keep_final_latents: bool = False, **options) -> Rollout:
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
        ``keep_final_latents=True`` also stores the last latent (``rollout.final_latents``, what the
        VAE decodes), which forward-process trainers (``NFTTrainer``) train on.
        """
        pipe, ad = self.pipe, self.adapter
        # ---- arguments
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one prompt")
        prompts = list(prompts)
        P = len(prompts)
        G = num_images_per_prompt
        if isinstance(G, bool) or not isinstance(G, int) or G < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {G!r}")
        T = num_inference_steps if num_inference_steps is not None else _call_default(pipe, "num_inference_steps")
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
        requested = set(resolve_sde_steps(steps_spec, T))
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
        w = ad.cfg_weight(guidance_scale, negative_prompt, options)
        negatives = _negatives(negative_prompt, P)
        device = ad.device

        # ---- prompts: each distinct (prompt, negative) pair is encoded once
        table: dict[tuple, int] = {}
        for key in zip(prompts, negatives or [None] * P):
            table.setdefault(key, len(table))
        rows = torch.tensor([table[k] for k in zip(prompts, negatives or [None] * P)], dtype=torch.long)
        distinct = list(table)
        cond, uncond, shared = ad.encode([p for p, _ in distinct],
                                         None if negatives is None else [n for _, n in distinct],
                                         w is not None, options, height, width)
        g_embed = ad.guidance_embedding(guidance_scale)
        if g_embed is not None:
            shared["guidance"] = g_embed
        embed_index = rows.repeat_interleave(G).to(device)
        emb = self._model_batch({k: v[embed_index] for k, v in cond.items()},
                                None if uncond is None else {k: v[embed_index] for k, v in uncond.items()})
        cfg = w is not None

        # ---- initial latents and the schedule
        if latents is not None:
            if same_initial_noise:
                raise ValueError("pass either latents or same_initial_noise=True, not both")
            if not isinstance(latents, torch.Tensor) or latents.shape[0] != B:
                raise ValueError(f"latents must be a tensor with {B} samples (prompts x num_images_per_prompt)")
            latents = latents.to(device=device, dtype=model_dtype(self.model))
        if same_initial_noise:
            gen0 = generator[::G] if isinstance(generator, list) else generator
            lat = ad.prepare_latents(P, height, width, gen0, None, shared).repeat_interleave(G, dim=0)
        else:
            lat = ad.prepare_latents(B, height, width, generator, latents, shared)
        scheduler = self._make_scheduler()
        timesteps = ad.set_timesteps(scheduler, T, lat, options)
        if len(timesteps) != T:
            raise ValueError(f"the scheduler made {len(timesteps)} timesteps for num_inference_steps = {T}")
        x = lat.to(torch.float32)

        # ---- coefficients of every step, computed once on the host (one device-to-host copy)
        t_host = timesteps.cpu().tolist()
        plan = []  # (recorded, coeffs on device | (a, c) floats)
        for i in range(T):
            t = t_host[i]
            if i in requested:
                co = self._coeffs(scheduler, i, t, True)
                if co.stochastic:
                    plan.append((True, co))
                    continue
            else:
                co = self._coeffs(scheduler, i, t, False)
            plan.append((False, (float(co.a), float(co.c))))
        recorded = [i for i, (rec, _) in enumerate(plan) if rec]
        positions = sorted({p for i in recorded for p in (i, i + 1)} | ({T} if keep_final_latents else set()))
        slot = {p: k for k, p in enumerate(positions)}
        store = torch.empty((B, len(positions), *x.shape[1:]), dtype=torch.float32, device=device)
        log_probs = torch.empty((B, len(recorded)), dtype=torch.float32, device=device)
        coeff_rows = [torch.stack([co.a, co.c, co.s]) for rec, co in plan if rec]
        dev_coeffs = {i: co.to(device) for i, (rec, co) in enumerate(plan) if rec}

        # ---- the loop
        bar = _progress(T, self.progress if progress is None else progress)
        model = self.model
        j = 0
        for i in range(T):
            if i in slot:
                store[:, slot[i]] = x
            t_vec = timesteps[i].expand(B)
            v_cond, v_uncond = self._predict(model, x, t_vec, emb, shared, cfg)
            rec, co = plan[i]
            if rec:
                noise = _randn(x.shape, generator, device)
                out = sde_step(x, v_cond, dev_coeffs[i], uncond_output=v_uncond, guidance_scale=w, noise=noise,
                               reduce=self.reduce, return_mean=False, backend=self.backend)
                x = out.prev_sample
                log_probs[:, j] = out.log_prob
                j += 1
            else:
                v = v_cond if v_uncond is None else v_uncond + w * (v_cond - v_uncond)
                a, c = co
                x = a * x + c * v
            if bar is not None:
                bar.update()
        if T in slot:
            store[:, slot[T]] = x
        if bar is not None:
            bar.close()

        images = ad.decode(x, height, width) if decode else None
        info = {"family": ad.family, "kind": self.kind, "num_inference_steps": T, "height": height, "width": width,
                "reduce": self.reduce, "num_images_per_prompt": G, "same_initial_noise": bool(same_initial_noise),
                "guidance_scale_arg": float(guidance_scale),
                "sde_steps": steps_spec, **self._info()}
        return Rollout(
            images=images,
            latents=store,
            log_probs=log_probs,
            group_ids=gid.repeat_interleave(G).to(device),
            embed_index=embed_index,
            prompts=[p for p in prompts for _ in range(G)],
            step_indices=torch.tensor(recorded, dtype=torch.long),
            timesteps=timesteps[recorded].cpu() if recorded else timesteps[:0].cpu(),
            coeffs=torch.stack(coeff_rows) if coeff_rows else torch.empty((0, 3), dtype=torch.float32),
            cond=cond,
            uncond=uncond,
            shared=shared,
            guidance_scale=w,
            latent_positions=tuple(positions),
            info=info,
        )

    # ---- scoring ---------------------------------------------------------------------------------

    def score(self, rollout: Rollout, step, transformer_or_unet: torch.nn.Module | None = None,
              reference=None):
        """Recompute the log-prob of recorded step ``step`` of ``rollout`` (with gradients) and,
        with ``reference``, the KL to a reference policy; returns ``diffrl.ops.SDEStepOutput``
        (``log_prob`` ``[B]``, ``kl`` ``[B]`` or None; ``prev_sample`` is the stored latent).

        ``step`` indexes the recorded steps (0 .. S-1), or is a ``[B]`` integer tensor (a step per
        sample). ``transformer_or_unet``: the model being trained (default: the pipeline's).
        ``reference``: None (no KL), a model (evaluated without gradients), or
        :data:`DISABLE_ADAPTERS` (``"disable_adapters"``: the scored model with its peft adapters off).

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
        emb = self._model_batch(rollout.embeddings(), rollout.embeddings(uncond=True))
        cfg = rollout.guidance_scale is not None
        v_cond, v_uncond = self._predict(model, x, t, emb, rollout.shared, cfg)
        ref_cond = ref_uncond = None
        if reference is not None:
            with torch.no_grad():
                if isinstance(reference, str):
                    if reference != DISABLE_ADAPTERS:
                        raise ValueError(f"reference must be None, a model or {DISABLE_ADAPTERS!r}, got {reference!r}")
                    with adapters_disabled(model):
                        ref_cond, ref_uncond = self._predict(model, x, t, emb, rollout.shared, cfg)
                elif isinstance(reference, torch.nn.Module):
                    ref_cond, ref_uncond = self._predict(reference, x, t, emb, rollout.shared, cfg)
                else:
                    raise TypeError(f"reference must be None, a model or {DISABLE_ADAPTERS!r}, "
                                    f"got {type(reference).__name__}")
        return sde_step(x, v_cond, coeffs, uncond_output=v_uncond, guidance_scale=rollout.guidance_scale,
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
