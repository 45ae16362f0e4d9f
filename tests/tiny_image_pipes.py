"""Tiny random-weight Qwen-Image, Z-Image and FLUX.2 pipelines, built from configs (no download).

The real diffusers/transformers classes with the smallest configs that construct: one or two
layers, widths 16-32. The tokenizers are byte-level BPEs with no merges (every byte one token, the
chat-template markers single special tokens), built in memory; so prompts tokenize to many more
tokens than with the released vocabularies, which only makes the text sequences longer.
"""

from __future__ import annotations

import warnings

import torch

IMAGE_FAMILIES = ("qwenimage", "zimage", "flux2")

# a chat template of our own in the role/content format the pipelines fill (Z-Image calls
# apply_chat_template; enable_thinking is accepted and ignored)
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_vocab(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")) -> dict:
    """A byte-level BPE vocabulary: the 256 byte symbols, then ``specials``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: PLC0415

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for s in specials:
        vocab[s] = len(vocab)
    return vocab


def _qwen2_tokenizer():
    from transformers import Qwen2Tokenizer  # noqa: PLC0415

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    tok = Qwen2Tokenizer(vocab=byte_level_vocab(specials), merges=[], chat_template=_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": list(specials[1:])})
    return tok


def _qwen25_vl(vocab_size: int, hidden: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    head_dim = 16  # 2 heads of 16: mrope sections (temporal, height, width) sum to head_dim / 2
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=hidden // head_dim, num_key_value_heads=1, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                pad_token_id=0, bos_token_id=0, eos_token_id=0)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def _qwen3(vocab_size: int, hidden: int):
    from transformers import Qwen3Config, Qwen3Model  # noqa: PLC0415

    # two layers: Z-Image reads the second-to-last hidden state
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return Qwen3Model(cfg).eval()


# FLUX.2's pipeline formats each prompt as [system, user] messages whose content is a list of
# {"type": "text"} parts (for a PixtralProcessor); this template of ours flattens them
_PARTS_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
                   "[/{{ m['role'] }}]{% endfor %}")


def _mistral3(vocab_size: int, hidden: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration  # noqa: PLC0415

    # 30 layers: the pipeline stacks hidden states 10, 20 and 30 (its default text_encoder_out_layers)
    text = dict(model_type="mistral", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024, pad_token_id=256)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, image_size=32, patch_size=8)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                           vision_feature_layer=-1)).eval()


def _vae():
    from diffusers import AutoencoderKL  # noqa: PLC0415

    return AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=2, layers_per_block=1, sample_size=32, scaling_factor=0.3611,
                         shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()


def tiny_image_pipeline(family: str, *, seed: int = 0):
    """A tiny random-weight pipeline of ``family`` (one of :data:`IMAGE_FAMILIES`), seeded, in eval
    mode, progress bar off."""
    import diffusers  # noqa: PLC0415
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

    if family not in IMAGE_FAMILIES:
        raise ValueError(f"tiny_image_pipeline: family must be one of {IMAGE_FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "qwenimage":
            tok = _qwen2_tokenizer()
            # a 3-D VAE of factor 2 (one temporal-downsample flag per down level), 4 latent channels
            vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                                   temperal_downsample=[False],
                                                   latents_mean=[0.1, -0.2, 0.3, 0.05],
                                                   latents_std=[1.5, 0.8, 2.0, 1.2]).eval()
            transformer = diffusers.QwenImageTransformer2DModel(
                patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4)).eval()
            # the released scheduler's kind: dynamic exponential shift and a terminal sigma
            sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=0.9, base_image_seq_len=16, max_image_seq_len=256,
                                                    shift_terminal=0.02, time_shift_type="exponential")
            pipe = diffusers.QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=_qwen25_vl(len(tok), 32),
                                               tokenizer=tok, transformer=transformer)
        elif family == "zimage":
            tok = _qwen2_tokenizer()
            transformer = diffusers.ZImageTransformer2DModel(
                in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                axes_dims=[4, 6, 6], axes_lens=[512, 16, 16]).eval()
            sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
            pipe = diffusers.ZImagePipeline(scheduler=sched, vae=_vae(), text_encoder=_qwen3(len(tok), 32),
                                            tokenizer=tok, transformer=transformer)
        elif family == "flux2":
            from transformers import Qwen2Tokenizer  # noqa: PLC0415

            # the pipeline only calls apply_chat_template on its "tokenizer" (a PixtralProcessor in the
            # release): a plain byte-level tokenizer with a chat template stands in for it
            tok = Qwen2Tokenizer(vocab=byte_level_vocab(), merges=[], chat_template=_PARTS_TEMPLATE)
            vae = diffusers.AutoencoderKLFlux2(
                block_out_channels=[8, 8], latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=2, layers_per_block=1, sample_size=32,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False).eval()
            with torch.no_grad():  # batch-norm statistics other than the identity, so that they are exercised
                vae.bn.running_mean.normal_(0.0, 0.3)
                vae.bn.running_var.uniform_(0.5, 2.0)
            transformer = diffusers.Flux2Transformer2DModel(
                in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=3 * 16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2)).eval()
            sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
            pipe = diffusers.Flux2Pipeline(scheduler=sched, vae=vae, text_encoder=_mistral3(len(tok), 16),
                                           tokenizer=tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_pipeline_cache(seed: int):
    """``get(family)``: the tiny pipeline of ``family`` built with ``seed``, built on first use."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_image_pipeline(family, seed=seed)
        return cache[family]

    return get
