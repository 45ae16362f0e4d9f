"""Tiny random-weight diffusers pipelines built from configs, for tests, benchmarks and CPU presets.

Nothing is downloaded: the tokenizers are built in memory from a character vocabulary (every
lower-case letter is a token), the models from small configs with seeded random weights. The
architectures are the real diffusers/transformers classes, so a sampler that is right on these is
right on the released checkpoints of the same family; only the sizes differ.

``tiny_pipeline(family, ...)`` with ``family`` in :data:`FAMILIES`:

=============  ========================================  ==========================  ========
family         pipeline                                  scheduler                   latent
=============  ========================================  ==========================  ========
``sd``         StableDiffusionPipeline (epsilon)         DDIMScheduler               4 x H/2
``sd-v``       StableDiffusionPipeline (v_prediction)    DDIMScheduler               4 x H/2
``sdxl``       StableDiffusionXLPipeline                 DDIMScheduler               4 x H/2
``sd3``        StableDiffusion3Pipeline (CLIP x2 + T5)   FlowMatchEulerDiscrete      4 x H/2
``flux``       FluxPipeline (guidance embedding)         FlowMatchEulerDiscrete      packed
``lcm``        LatentConsistencyModelPipeline            LCMScheduler                4 x H/2
=============  ========================================  ==========================  ========

``sd3_medium_transformer()`` builds an SD3-medium-shaped transformer (24 joint blocks, width 1536)
with random weights for GPU benchmarks, ``sd3_medium_pipeline()`` a pipeline around it.
"""

from __future__ import annotations

import string
import warnings

import torch

FAMILIES = ("sd", "sd-v", "sdxl", "sd3", "flux", "shapes", "lcm")

_CLIP_MAX_LEN = 16  # short CLIP context: tiny prompts, fast text towers
_T5_MAX_LEN = 16


def clip_tokenizer(max_length: int = _CLIP_MAX_LEN):
    """A CLIPTokenizer over single letters (no merges): each letter of a word is one token."""
    from transformers import CLIPTokenizer  # noqa: PLC0415

    vocab = {}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = _T5_MAX_LEN):
    """A T5TokenizerFast (unigram) over single letters, built in memory."""
    from transformers import T5TokenizerFast  # noqa: PLC0415

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + ch, -1.0) for ch in string.ascii_lowercase] + [(ch, -2.0) for ch in string.ascii_lowercase]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_text(hidden: int, projection: bool, projection_dim: int | None = None, layers: int = 2,
               max_positions: int = _CLIP_MAX_LEN):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    n = len(clip_tokenizer().get_vocab())
    cfg = CLIPTextConfig(vocab_size=n, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=max_positions, bos_token_id=n - 2,
                         eos_token_id=n - 1, pad_token_id=n - 1, projection_dim=projection_dim or hidden,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5_text(d_model: int):
    from transformers import T5Config, T5EncoderModel  # noqa: PLC0415

    cfg = T5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                   num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, *, flow: bool):
    from diffusers import AutoencoderKL  # noqa: PLC0415

    kw = dict(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=latent_channels,
              down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
              norm_num_groups=2, layers_per_block=1, sample_size=32)
    if flow:  # SD3/FLUX VAEs: shift factor, no quant convs
        kw.update(scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(**kw).eval()


def _unet(cross_attention_dim: int, *, sdxl: bool = False, time_cond_proj_dim: int | None = None):
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    kw = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
              norm_num_groups=4, attention_head_dim=(2, 4))
    if time_cond_proj_dim is not None:  # LCM: the guidance scale's embedding as a model input
        kw.update(time_cond_proj_dim=time_cond_proj_dim)
    if sdxl:  # SDXL: pooled text embeddings + size/crop conditioning through added_cond_kwargs
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=6 * 4 + cross_attention_dim // 2,
                  transformer_layers_per_block=(1, 1), use_linear_projection=True)
    return UNet2DConditionModel(**kw).eval()


def _ddim(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler  # noqa: PLC0415

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_pipeline(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """A tiny random-weight pipeline of ``family`` (see the module docstring), seeded, in eval mode,
    with its progress bar off. Sample at 32 px (latents 16 x 16)."""
    import diffusers  # noqa: PLC0415

    if family not in FAMILIES:
        raise ValueError(f"tiny_pipeline: family must be one of {FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family in ("sd", "sd-v"):
            pipe = diffusers.StableDiffusionPipeline(
                vae=_vae(4, flow=False), text_encoder=_clip_text(16, False), tokenizer=clip_tokenizer(),
                unet=_unet(16), scheduler=_ddim("v_prediction" if family == "sd-v" else "epsilon"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif family == "lcm":  # a latent consistency model: SD's UNet with a guidance embedding, LCMScheduler
            from diffusers import LCMScheduler  # noqa: PLC0415

            pipe = diffusers.LatentConsistencyModelPipeline(
                vae=_vae(4, flow=False), text_encoder=_clip_text(16, False), tokenizer=clip_tokenizer(),
                unet=_unet(16, time_cond_proj_dim=8),
                scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       set_alpha_to_one=True, original_inference_steps=50),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif family == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=_vae(4, flow=False), text_encoder=_clip_text(16, False), tokenizer=clip_tokenizer(),
                text_encoder_2=_clip_text(16, True, projection_dim=16), tokenizer_2=clip_tokenizer(),
                unet=_unet(32, sdxl=True), scheduler=_ddim())
        elif family == "sd3":
            from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: PLC0415

            transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                                num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                                joint_attention_dim=32, caption_projection_dim=16,
                                                pooled_projection_dim=32, pos_embed_max_size=16).eval()
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=_vae(4, flow=True), text_encoder=_clip_text(16, True), tokenizer=clip_tokenizer(),
                text_encoder_2=_clip_text(16, True), tokenizer_2=clip_tokenizer(),
                text_encoder_3=_t5_text(32), tokenizer_3=t5_tokenizer())
        elif family == "shapes":  # diffrl's own pixel-space model (32 px only), shrunk
            from diffrl.models.shapes_model import build_pipeline  # noqa: PLC0415

            pipe = build_pipeline(dim=32, num_layers=1, num_heads=2, text_dim=32, text_layers=1, patch_size=8)
            with torch.no_grad():  # adaLN-Zero starts as the zero function: make the tiny model do something
                for p in pipe.transformer.parameters():
                    if not p.any():
                        p.normal_(0.0, 0.05)
            pipe.transformer.eval()
            pipe.text_encoder.eval()
        else:  # flux
            from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: PLC0415

            transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                                 pooled_projection_dim=16, guidance_embeds=True,
                                                 axes_dims_rope=(2, 2, 4)).eval()
            sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256)
            pipe = diffusers.FluxPipeline(
                scheduler=sched, vae=_vae(4, flow=True), text_encoder=_clip_text(16, False),
                tokenizer=clip_tokenizer(), text_encoder_2=_t5_text(32), tokenizer_2=t5_tokenizer(),
                transformer=transformer)
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        from diffusers.utils import logging as dlogging  # noqa: PLC0415

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # "modules that should be kept in float32": none here
        try:
            pipe = pipe.to(device=device, dtype=dtype)
        finally:
            dlogging.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_medium_pipeline(*, dtype: torch.dtype = torch.bfloat16, device="cuda", num_layers: int = 24,
                        seed: int = 0):
    """A ``StableDiffusion3Pipeline`` around :func:`sd3_medium_transformer` for sampler benchmarks.

    The transformer has SD3-medium's shape; the rest is tiny but shaped to feed it as the real
    pipeline does: two CLIP towers of width 64 with 1024-wide projections (pooled 2048), 77 CLIP
    tokens, no T5 (``text_encoder_3=None``: the pipeline then feeds zeros of width 4096 for the T5
    tokens, so the text sequence is SD3's 77 + ``max_sequence_length``), and a 4-level VAE with 16
    latent channels (factor 8) of width 8. Rollout time is then the transformer's, as with the
    released model, up to the text encoders and the VAE's decode."""
    import diffusers  # noqa: PLC0415
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

    transformer = sd3_medium_transformer(dtype=dtype, device=device, num_layers=num_layers, seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[8, 8, 8, 8], in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=2, layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=_clip_text(64, True, projection_dim=1024, max_positions=77),
            tokenizer=clip_tokenizer(77),
            text_encoder_2=_clip_text(64, True, projection_dim=1024, max_positions=77),
            tokenizer_2=clip_tokenizer(77), text_encoder_3=None, tokenizer_3=None)
    from diffusers.utils import logging as dlogging  # noqa: PLC0415

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        for name in ("vae", "text_encoder", "text_encoder_2"):
            getattr(pipe, name).to(device=device, dtype=dtype)
    finally:
        dlogging.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_medium_transformer(*, sample_size: int = 64, dtype: torch.dtype = torch.bfloat16, device="cuda",
                           num_layers: int = 24, seed: int = 0):
    """An SD3-medium-shaped ``SD3Transformer2DModel`` (24 joint blocks, 24 heads x 64, patch 2,
    16 latent channels) with random weights: for benchmarks on a GPU (about 2 B parameters).
    ``sample_size`` is the latent side (64 for 512 px)."""
    from diffusers import SD3Transformer2DModel  # noqa: PLC0415

    torch.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16,
                                      num_layers=num_layers, attention_head_dim=64, num_attention_heads=24,
                                      joint_attention_dim=4096, caption_projection_dim=1536,
                                      pooled_projection_dim=2048, pos_embed_max_size=192)
    from diffusers.utils import logging as dlogging  # noqa: PLC0415

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "modules that should be kept in float32": none here
    try:
        model = model.to(dtype)
    finally:
        dlogging.set_verbosity(level)
    return model.eval().requires_grad_(False)
