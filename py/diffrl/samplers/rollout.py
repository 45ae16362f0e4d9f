"""``Rollout``: what a sampler returns and a trainer scores.

Storage is per sample along dim 0 (``B`` samples) except for the prompt-embedding tables, which hold
one row per distinct prompt (``P`` rows, ``embed_index`` maps samples to rows): the G images of a
group share one row instead of G copies, and minibatches share the tables without copying them.

Latents are stored once each: ``latents`` ``[B, K, ...]`` holds the trajectory states that some
recorded step starts from or ends at (``latent_positions``, positions 0..T of the trajectory, where
position i is the latent before step i). For a window of S consecutive recorded steps that is
``K = S + 1`` latents rather than the ``2 S`` of storing "latents" and "next latents" apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch


def _move(value, device, non_blocking=False):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: _move(v, device, non_blocking) for k, v in value.items()}
    return value


@dataclass
class Rollout:
    """A batch of sampled trajectories with the log-probs of their stochastic steps.

    Per sample (dim 0 is the batch, ``B``):

    ``images``        ``[B, 3, H, W]`` float32 in [0, 1] (None when sampled with ``decode=False``); a video
                      family's are videos ``[B, 3, F, H, W]``
    ``latents``       ``[B, K, ...]`` the stored trajectory states (latent layout of the model; packed
                      ``[tokens, channels]`` for FLUX, ``[C, F, H, W]`` for Wan), float32
    ``condition_images``  ``[B, 3, h, w]`` float32 in [0, 1]: an editing family's input image of each
                      sample, as the model saw it (resized); None for text-to-image / text-to-video.
                      The model reads its latents from ``cond``; this copy is for rewards
    ``log_probs``     ``[B, S]`` float32: log-prob of recorded step j (``reduce`` of the sampler)
    ``group_ids``     ``[B]`` int64: one id per prompt of the ``sample`` call (the GRPO group)
    ``embed_index``   ``[B]`` int64: row of the sample's prompt in the embedding tables
    ``prompts``       ``list[str]`` of length B

    Per recorded step (S of them, in sampling order):

    ``step_indices``  ``[S]`` int64: position of the step in the schedule (0 .. T-1)
    ``timesteps``     ``[S]``: the scheduler's timestep at that step (what the model is given)
    ``coeffs``        ``[S, 3]`` float32: the step's ``(a, c, s)`` exactly as sampled (scoring
                      reuses them, so a recomputed log-prob is bitwise the recorded one)

    Shared:

    ``cond`` / ``uncond``  ``{name: [P, ...]}`` prompt embeddings by model keyword (``uncond`` is
                      None without classifier-free guidance)
    ``shared``        model inputs common to every sample (FLUX's ``txt_ids``/``img_ids``, the
                      guidance embedding value)
    ``guidance_scale``  the CFG weight of the steps (None: no CFG)
    ``latent_positions``  trajectory position of each of the K stored latents
    ``info``          sampler settings (family, kind, noise level / eta, steps T, size, reduce, ...)
    """

    images: torch.Tensor | None
    latents: torch.Tensor
    log_probs: torch.Tensor
    group_ids: torch.Tensor
    embed_index: torch.Tensor
    prompts: list[str]
    step_indices: torch.Tensor
    timesteps: torch.Tensor
    coeffs: torch.Tensor
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    shared: dict
    guidance_scale: float | None
    latent_positions: tuple[int, ...]
    info: dict = field(default_factory=dict)
    condition_images: torch.Tensor | None = None

    # per-sample fields (indexed, split and concatenated along dim 0)
    _PER_SAMPLE = ("images", "latents", "log_probs", "group_ids", "embed_index", "condition_images")

    def __repr__(self) -> str:  # the dataclass repr would print every tensor
        lat = "x".join(map(str, self.latents.shape))
        return (f"Rollout(B={len(self)}, recorded steps={self.step_indices.tolist()}, latents={lat} "
                f"{str(self.latents.dtype).replace('torch.', '')} on {self.latents.device}, "
                f"prompts={len(set(self.prompts))} distinct, images={'yes' if self.images is not None else 'no'}, "
                f"guidance={self.guidance_scale}, {self.info.get('family', '?')}/{self.info.get('kind', '?')})")

    # ---- shape -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.log_probs.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self)

    @property
    def num_steps(self) -> int:
        """S, the number of recorded (stochastic) steps."""
        return int(self.step_indices.numel())

    @property
    def device(self) -> torch.device:
        return self.latents.device

    # ---- the latents of a recorded step ------------------------------------------------------

    def _slot(self, position: int) -> int:
        return self.latent_positions.index(position)

    def _slots(self, after: bool) -> torch.Tensor:
        pos = self.step_indices + int(after)
        return torch.tensor([self._slot(int(p)) for p in pos], dtype=torch.long)

    def _check_step(self, step):
        S = self.num_steps
        if isinstance(step, bool):
            raise TypeError("step must be an int or an integer tensor, got bool")
        if isinstance(step, int):
            if not 0 <= step < S:
                raise IndexError(f"recorded step {step} out of range: this rollout has {S} recorded steps "
                                 f"(schedule positions {self.step_indices.tolist()})")
            return step
        if isinstance(step, torch.Tensor) and not step.is_floating_point() and step.dim() == 1:
            if step.numel() != len(self):
                raise ValueError(f"a per-sample step tensor needs {len(self)} entries, got {step.numel()}")
            st = step.detach().cpu().long()
            if st.numel() and (int(st.min()) < 0 or int(st.max()) >= S):
                raise IndexError(f"recorded steps {st.tolist()} out of range [0, {S})")
            return st
        raise TypeError(f"step must be an int or a [B] integer tensor, got {type(step).__name__}")

    def _gather(self, step, after: bool) -> torch.Tensor:
        step = self._check_step(step)
        slots = self._slots(after)
        if isinstance(step, int):
            return self.latents[:, int(slots[step])]
        rows = torch.arange(len(self), device=self.latents.device)
        return self.latents[rows, slots[step].to(self.latents.device)]

    def latents_before(self, step=None) -> torch.Tensor:
        """The latent each sample was in before recorded step ``step`` (``[B, ...]``); ``step`` may
        be a ``[B]`` tensor (a step per sample). ``None``: all steps, ``[B, S, ...]`` (a copy)."""
        if step is None:
            return self.latents[:, self._slots(False).to(self.latents.device)]
        return self._gather(step, False)

    def latents_after(self, step=None) -> torch.Tensor:
        """The latent recorded step ``step`` produced (the stored ``prev_sample``); see latents_before."""
        if step is None:
            return self.latents[:, self._slots(True).to(self.latents.device)]
        return self._gather(step, True)

    @property
    def final_latents(self) -> torch.Tensor:
        """``[B, ...]`` the last latent of each trajectory (the sampled image before decoding); stored
        when the last step is recorded or the sampler was called with ``keep_final_latents=True``."""
        T = self.info.get("num_inference_steps")
        if T is None or T not in self.latent_positions:
            raise ValueError("this rollout did not store its final latents: sample with keep_final_latents=True")
        return self.latents[:, self._slot(T)]

    def embeddings(self, uncond: bool = False) -> dict[str, torch.Tensor] | None:
        """The prompt embeddings of each sample, ``{name: [B, ...]}`` (gathered from the tables)."""
        table = self.uncond if uncond else self.cond
        if table is None:
            return None
        idx = self.embed_index.to(next(iter(table.values())).device) if table else self.embed_index
        return {k: v[idx] for k, v in table.items()}

    # ---- moving, indexing, splitting, concatenating -----------------------------------------

    def to(self, device, non_blocking: bool = False) -> Rollout:
        """A copy on ``device`` (schedule values ``step_indices``/``coeffs`` stay on the host: they
        are read on the host to build each step's coefficients)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("step_indices", "coeffs", "timesteps"):
                kw[f.name] = v
            else:
                kw[f.name] = _move(v, device, non_blocking)
        return Rollout(**kw)

    def __getitem__(self, index) -> Rollout:
        """The samples at ``index`` (an int, a slice, a list / integer tensor of indices, or a
        boolean mask); the embedding tables are shared, not copied."""
        if isinstance(index, bool):
            raise TypeError("cannot index a Rollout with a bool")
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"sample {index} out of range for a rollout of {n}")
            index = slice(index % n, index % n + 1)
        if isinstance(index, slice):
            idx = index
            prompts = self.prompts[index]
        else:
            t = torch.as_tensor(index)
            if t.dtype == torch.bool:
                if t.shape != (len(self),):
                    raise ValueError(f"a boolean mask needs shape ({len(self)},), got {tuple(t.shape)}")
                t = t.nonzero().flatten()
            if t.is_floating_point() or t.dim() != 1:
                raise TypeError("index a Rollout with an int, a slice, or a 1-D integer index / boolean mask")
            t = t.long().cpu()
            if t.numel() and (int(t.max()) >= len(self) or int(t.min()) < -len(self)):
                raise IndexError(f"indices out of range for a rollout of {len(self)}")
            t = t % len(self)
            idx = t
            prompts = [self.prompts[i] for i in t.tolist()]
        kw = {"prompts": prompts}
        for name in self._PER_SAMPLE:
            v = getattr(self, name)
            if v is None:
                kw[name] = None
            elif isinstance(idx, slice):
                kw[name] = v[idx]
            else:
                kw[name] = v[idx.to(v.device)]
        return replace(self, **kw)

    def split(self, minibatch_size: int) -> list[Rollout]:
        """Consecutive minibatches of ``minibatch_size`` samples (the last may be smaller)."""
        if isinstance(minibatch_size, bool) or not isinstance(minibatch_size, int) or minibatch_size <= 0:
            raise ValueError(f"minibatch_size must be a positive int, got {minibatch_size!r}")
        return [self[i:i + minibatch_size] for i in range(0, len(self), minibatch_size)]

    @classmethod
    def cat(cls, rollouts: Sequence[Rollout]) -> Rollout:
        """One rollout of the samples of ``rollouts`` in order. They must come from the same schedule
        (same recorded steps, coefficients, timesteps, guidance and shared inputs); their embedding
        tables are concatenated (``embed_index`` offset accordingly)."""
        rollouts = list(rollouts)
        if not rollouts or not all(isinstance(r, Rollout) for r in rollouts):
            raise ValueError("Rollout.cat needs a non-empty list of Rollouts")
        first = rollouts[0]
        if len(rollouts) == 1:
            return first
        for r in rollouts[1:]:
            _check_compatible(first, r)
        kw = {"prompts": [p for r in rollouts for p in r.prompts]}
        for name in cls._PER_SAMPLE:
            if name == "embed_index":
                continue
            vals = [getattr(r, name) for r in rollouts]
            if any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"Rollout.cat: {name} is missing in some rollouts and present in others")
                kw[name] = None
            else:
                kw[name] = torch.cat(vals)
        # tables: share when every rollout holds the very same tables (minibatches of one rollout)
        same = all(r.cond is first.cond and r.uncond is first.uncond for r in rollouts)
        if same:
            kw["embed_index"] = torch.cat([r.embed_index for r in rollouts])
        else:
            offsets, idx, n = [], [], 0
            for r in rollouts:
                idx.append(r.embed_index + n)
                offsets.append(n)
                n += _rows(r.cond)
            kw["embed_index"] = torch.cat(idx)
            kw["cond"] = {k: torch.cat([r.cond[k] for r in rollouts]) for k in first.cond}
            kw["uncond"] = (None if first.uncond is None
                            else {k: torch.cat([r.uncond[k] for r in rollouts]) for k in first.uncond})
        return replace(first, **kw)


def _rows(table: dict) -> int:
    return int(next(iter(table.values())).shape[0]) if table else 0


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu())))
    return a == b


def _check_compatible(a: Rollout, b: Rollout) -> None:
    checks = [("step_indices", a.step_indices, b.step_indices), ("timesteps", a.timesteps, b.timesteps),
              ("coeffs", a.coeffs, b.coeffs), ("guidance_scale", a.guidance_scale, b.guidance_scale),
              ("latent_positions", a.latent_positions, b.latent_positions)]
    for name, x, y in checks:
        if not _same(x, y):
            raise ValueError(f"Rollout.cat: the rollouts differ in {name} (sampled with different schedules "
                             "or settings); only rollouts of one schedule can be concatenated")
    if a.latents.shape[1:] != b.latents.shape[1:]:
        raise ValueError(f"Rollout.cat: latent shapes differ: {tuple(a.latents.shape[1:])} vs "
                         f"{tuple(b.latents.shape[1:])}")
    if set(a.shared) != set(b.shared) or not all(_same(a.shared[k], b.shared[k]) for k in a.shared):
        raise ValueError("Rollout.cat: the rollouts' shared model inputs differ (e.g. image size or guidance)")
    if (a.uncond is None) != (b.uncond is None) or set(a.cond) != set(b.cond):
        raise ValueError("Rollout.cat: the rollouts' prompt embeddings have different structure")
    for k in a.cond:
        if a.cond[k].shape[1:] != b.cond[k].shape[1:]:
            raise ValueError(f"Rollout.cat: embedding {k!r} has shape {tuple(a.cond[k].shape[1:])} in one rollout "
                             f"and {tuple(b.cond[k].shape[1:])} in another")
    if (a.images is None) != (b.images is None):
        raise ValueError("Rollout.cat: some rollouts have images and others not")
