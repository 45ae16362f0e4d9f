"""Z-Image (``ZImagePipeline``): a single-stream rectified-flow transformer that takes lists of
per-sample latents and unpadded caption features (from a Qwen3 text encoder), on 2-D latents."""

from __future__ import annotations

import torch

from diffrl.samplers.families import Adapter, quiet_transformers

_EMB, _LEN = "cap_feats", "cap_lens"


class ZImageAdapter(Adapter):
    """``ZImagePipeline``: latents ``[B, C, H, W]``; the transformer takes a list of ``[C, 1, H, W]``
    latents, a list of caption features of each prompt's own length, and ``(1000 - t) / 1000``, and
    predicts the negative of the flow velocity (the loop's ``v`` is minus its output).

    The caption features are carried padded to ``max_sequence_length`` ``[P, L, D]`` with their
    lengths ``[P]`` and cut per sample for the model (one host read of the lengths per call). CFG is on for ``guidance_scale > 0`` (the pipeline's rule) and is
    ``pos + w (pos - neg)``: the loop's linear CFG with weight ``w + 1`` (so ``rollout.guidance_scale``
    is ``w + 1``); without a negative prompt the pipeline's empty one is used. Prompt and negative
    run as one model call, as in the pipeline. The pipeline's
    ``cfg_normalization`` and ``cfg_truncation < 1`` (a norm cap and a per-step switch of CFG) are
    not supported: asking for them is an error."""

    kind = "flow"
    family = "zimage"
    model_attr = "transformer"
    options = {"max_sequence_length": 512, "cfg_normalization": False, "cfg_truncation": 1.0}

    @property
    def size_multiple(self):
        return self.vae_scale_factor * 2  # the VAE's factor times the 2x2 patches

    def default_size(self):
        return 1024, 1024  # the pipeline's default

    def max_size(self):
        # the rotary table covers axes_lens[1] / [2] patch rows / columns
        lens = self.model.config.axes_lens
        return int(min(lens[1], lens[2])) * self.size_multiple

    def check_options(self, options):
        options = super().check_options(options)
        if options["cfg_normalization"]:
            raise ValueError("ZImageAdapter: cfg_normalization (a cap on the guided prediction's norm) is not "
                             "supported by diffrl's sampler; leave it False")
        if float(options["cfg_truncation"]) < 1.0:
            raise ValueError("ZImageAdapter: cfg_truncation < 1 (CFG switched off on late steps) is not supported "
                             "by diffrl's sampler; leave it at 1.0")
        return options

    def cfg_weight(self, guidance_scale, negative_prompt, options):
        return float(guidance_scale) + 1.0 if guidance_scale > 0 else None

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        # (copies: the pipeline writes the chat-templated text back into the lists it is given)
        negs = None if negative_prompts is None else list(negative_prompts)
        pos, neg = self.pipe.encode_prompt(prompt=list(prompts), negative_prompt=negs,
                                           do_classifier_free_guidance=do_cfg, device=self.device,
                                           max_sequence_length=options["max_sequence_length"])
        n = options["max_sequence_length"]
        return _padded(pos, n), (_padded(neg, n) if do_cfg else None), {}

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        # float32 whatever the model's dtype, as the pipeline draws them
        return self.pipe.prepare_latents(batch, self.model.in_channels, height, width, torch.float32, self.device,
                                         generator, latents)

    def set_timesteps(self, scheduler, num_inference_steps, latents, options):
        with quiet_transformers():
            from diffusers.pipelines.z_image.pipeline_z_image import (  # noqa: PLC0415
                calculate_shift, get_default_z_image_sigmas, retrieve_timesteps)

        cfg = scheduler.config
        seq = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        mu = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return retrieve_timesteps(scheduler, num_inference_steps, self.device,
                                  sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu)[0]

    def forward(self, model, x, t, emb, shared):
        feats, lens = emb[_EMB], emb[_LEN].tolist()
        caps = [feats[i, :n] for i, n in enumerate(lens)]
        out = model(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def latents_from_vae(self, z):
        cfg = self.pipe.vae.config
        return (z - cfg.shift_factor) * cfg.scaling_factor

    def decode(self, latents, height, width):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return self._postprocess(vae.decode(z, return_dict=False)[0])


def _pad_to(x, n):
    return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[1]))


def _padded(feats: list, n: int) -> dict:
    # padded to max_sequence_length (the tokenizer's cut), so that rollouts of separate calls
    # concatenate and prompt and negative share one model call; the model sees each unpadded
    lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long, device=feats[0].device)
    return {_EMB: torch.stack([_pad_to(f[None], n)[0] for f in feats]), _LEN: lens}
