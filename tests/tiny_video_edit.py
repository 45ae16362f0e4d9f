"""Tiny random-weight Wan (text-to-video) and FLUX.1-Kontext (editing) pipelines for the tests: the real
diffusers / transformers classes with the smallest configs that construct, nothing downloaded."""

import warnings

import torch

from diffrl.models.tiny import _clip_text, _t5_text, _vae, clip_tokenizer, t5_tokenizer


def tiny_wan(seed: int = 0, *, scheduler=None, expand_timesteps: bool = False):
    """``WanPipeline``: UMT5 text encoder (1 layer, width 32) over the letter tokenizer, a 1-block
    ``WanTransformer3DModel`` (patch 1x2x2), an ``AutoencoderKLWan`` with 4 latent channels (spatial
    factor 8, temporal 4: 5 frames -> 2 latent frames; 32 px -> 4 x 4 latents). Default scheduler:
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``."""
    import diffusers
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = t5_tokenizer()
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                           latents_std=[1.5, 0.8, 1.2, 2.0]).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                                     scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
                                     expand_timesteps=expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_kontext(seed: int = 0):
    """``FluxKontextPipeline``: the tiny FLUX.1 of ``diffrl.models.tiny`` (guidance embedding, CLIP + T5,
    a VAE of factor 2 with 4 latent channels) under the Kontext pipeline class."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True,
                                         axes_dims_rope=(2, 2, 4)).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=16, max_image_seq_len=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.FluxKontextPipeline(
            scheduler=sched, vae=_vae(4, flow=True), text_encoder=_clip_text(16, False), tokenizer=clip_tokenizer(),
            text_encoder_2=_t5_text(32), tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
