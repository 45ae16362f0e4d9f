"""FLUX.1-Kontext (``FluxKontextPipeline``): FLUX.1 editing an input image. The image is encoded to
packed latents once per prompt; every model call sees ``[noisy latents; image latents]`` as one token
sequence (the image's position ids have first coordinate 1) and only the noisy tokens' prediction
is used."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffrl.samplers.families import model_dtype
from diffrl.samplers.families.flux import FluxAdapter


class FluxKontextAdapter(FluxAdapter):
    """``FluxKontextPipeline``. ``image`` (required) is the input image: one for every prompt (a PIL
    image, a float tensor ``[3, H, W]`` / ``[1, 3, H, W]`` in [0, 1]), one per prompt (a list of P of
    those, or a ``[P, 3, H, W]`` tensor), or a mapping prompt -> image (for trainers, which pass prompts
    only). It is resized as the pipeline resizes it: with ``auto_resize`` (the pipeline's
    ``_auto_resize``, default True) to the Kontext resolution of the closest aspect ratio, always to a
    multiple of 16 px. The output size is ``height`` x ``width`` as given (the pipeline rescales them
    to ``max_area`` first: pass it ``max_area=height * width`` for the same size).

    The image latents are a per-prompt embedding (``cond["image_latents"]``, also under CFG's
    ``uncond``); the resized images are in ``rollout.condition_images`` for the rewards."""

    family = "flux_kontext"
    options = {"image": None, "max_sequence_length": 512, "true_cfg_scale": 1.0, "auto_resize": True}
    per_prompt_options = ("image",)

    # ---- the input image -----------------------------------------------------------------------

    def _images_for(self, image, prompts):
        """The input images of ``prompts``: one PIL image / ``[N, 3, H, W]`` tensor, N in (1, P)."""
        if isinstance(image, Mapping):
            missing = [p for p in prompts if p not in image]
            if missing:
                raise ValueError(f"image: no input image for prompt(s) {missing[:3]} in the prompt -> image mapping")
            image = [image[p] for p in prompts]
        if isinstance(image, (list, tuple)):
            if len(image) not in (1, len(prompts)):
                raise ValueError(f"image: {len(image)} input images for {len(prompts)} prompts (give one, or one "
                                 "per prompt)")
            if all(isinstance(i, torch.Tensor) for i in image):
                return torch.cat([_as_batch(i) for i in image])
            if not all(_is_pil(i) for i in image):
                raise TypeError("image: a list must hold PIL images or [3, H, W] tensors, not a mix")
            sizes = {i.size for i in image}
            if len(sizes) > 1:
                raise ValueError(f"image: the input images differ in size {sorted(sizes)}; resize them to one size")
            return list(image)
        if isinstance(image, torch.Tensor):
            image = _as_batch(image)
            if image.shape[0] not in (1, len(prompts)):
                raise ValueError(f"image: {image.shape[0]} input images for {len(prompts)} prompts")
            return image
        if _is_pil(image):
            return [image]
        raise TypeError(f"image must be a PIL image, a float tensor [3, H, W] in [0, 1], a list of them or a "
                        f"mapping prompt -> image, got {type(image).__name__}")

    def _preprocess(self, image, auto_resize):
        """As the pipeline's ``__call__``: size from the first image, the Kontext resolution closest in
        aspect ratio (``auto_resize``), down to a multiple of 16; -> ``[N, 3, h, w]`` in [-1, 1]."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS  # noqa: PLC0415

        proc = self.pipe.image_processor
        first = image[0] if isinstance(image, list) else image
        h, w = proc.get_default_height_width(first)
        if auto_resize:
            _, w, h = min((abs(w / h - rw / rh), rw, rh) for rw, rh in PREFERRED_KONTEXT_RESOLUTIONS)
        m = self.size_multiple
        h, w = h // m * m, w // m * m
        if h == 0 or w == 0:
            raise ValueError(f"image: an input image of {tuple(proc.get_default_height_width(first))} px is smaller "
                             f"than {m} px")
        return proc.preprocess(proc.resize(image, h, w), h, w)

    # ---- the pieces of a rollout -----------------------------------------------------------------

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        if options["image"] is None:
            raise ValueError(f"{type(self.pipe).__name__} edits an input image: pass image= (a PIL image or a "
                             "[3, H, W] float tensor in [0, 1] for every prompt, one per prompt, or a mapping "
                             "prompt -> image)")
        cond, uncond, shared = super().encode(prompts, negative_prompts, do_cfg, options, height, width)
        pipe, P = self.pipe, len(prompts)
        pixels = self._preprocess(self._images_for(options["image"], prompts), options["auto_resize"])
        dt = cond["encoder_hidden_states"].dtype  # the pipeline encodes the image in the prompt's dtype
        pixels = pixels.to(self.device, dt)
        z = pipe._encode_vae_image(pixels, generator=None)  # the posterior's mode: no draw
        n, c, zh, zw = z.shape
        z = pipe._pack_latents(z, n, c, zh, zw)
        if n == 1:  # one image for every prompt
            z, pixels = z.expand(P, *z.shape[1:]), pixels.expand(P, *pixels.shape[1:])
        cond["image_latents"] = z
        if uncond is not None:
            uncond["image_latents"] = z  # the negative prompt edits the same image
        ids = pipe._prepare_latent_image_ids(1, zh // 2, zw // 2, self.device, dt)
        ids[..., 0] = 1  # the image's tokens: first coordinate 1, the noisy latents' 0
        shared["image_ids"] = ids
        shared["condition_images"] = (pixels.float() / 2 + 0.5).clamp(0, 1)
        return cond, uncond, shared

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        lat, _, latent_ids, _ = self.pipe.prepare_latents(None, batch, self.model.config.in_channels // 4, height,
                                                          width, model_dtype(self.model), self.device, generator,
                                                          latents)
        shared["img_ids"] = torch.cat([latent_ids, shared.pop("image_ids")])  # dim 0: the token sequence
        return lat

    def forward(self, model, x, t, emb, shared):
        n = x.shape[1]
        out = super().forward(model, torch.cat([x, emb["image_latents"].to(x.dtype)], dim=1), t, emb, shared)
        return out[:, :n]


def _is_pil(x) -> bool:
    try:
        import PIL.Image  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(x, PIL.Image.Image)


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    """A float image tensor in [0, 1] as ``[N, 3, H, W]``, or a clear error."""
    if not image.is_floating_point():
        raise TypeError(f"image: a tensor input image must be floating point in [0, 1], got {image.dtype}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image: a tensor input image must be [3, H, W] or [N, 3, H, W], got {tuple(image.shape)}")
    lo, hi = float(image.min()), float(image.max())
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):
        raise ValueError(f"image: input images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return image
