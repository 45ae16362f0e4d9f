"""``diffrl.ops.reward_attention`` as a transformers attention implementation named ``"diffrl"``.

``register()`` adds it to transformers' registries (``AttentionInterface`` for the attention
function, ``AttentionMaskInterface`` for the mask it receives); then any model whose attention
modules call ``ALL_ATTENTION_FUNCTIONS`` (CLIP, SigLIP, BERT-like encoders, ...) runs it when loaded
with ``from_pretrained(..., attn_implementation="diffrl")`` or after
``model.set_attn_implementation("diffrl")``.

The mask function turns the tokenizer's 2-D padding mask into per-sequence lengths once per
forward (instead of a [B, 1, L, L] additive mask built for every layer), so the kernel skips the
padded tiles; causality comes from the ``is_causal`` flag transformers passes (CLIP's text tower)
or the module's own ``is_causal``. Padding must be on the right (what CLIP tokenizers do): the mask
function checks it. Padded query positions come out as zeros rather than the values the default
attention computes for them; no real token depends on them (their keys are masked), and poolers
read real tokens (CLIP's the end-of-text token), so every output a reward uses is unchanged.
Not covered (a 4-D mask given by the caller falls back to SDPA with that mask): sliding windows,
packed sequences, custom mask functions.

The backend of ``reward_attention`` is read from ``module.diffrl_attention_backend`` ("auto" if
unset; :func:`set_backend` sets it on every module of a model). With "auto" on a device where
reward_attention has no fused kernel (a CPU), the function calls torch's SDPA instead, with the
same semantics (the reference, which is what "auto" would run there, is a spec and materialises
every score): there a causal self-attention over right-padded sequences needs only the causal mask
(a real token never sees a later, padded, key), and other attention a boolean key mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffrl.ops import _dispatch
from diffrl.ops.attention import IMPLEMENTED, reward_attention

NAME = "diffrl"
_registered = False


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: q/k/v [B, H, L, D] -> ([B, L, H, D], None)."""
    if dropout and module.training:
        raise ValueError("diffrl attention is forward-only inference attention: it has no dropout "
                         "(call model.eval(), or use another attn_implementation for training)")
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = bool(getattr(module, "is_causal", False))
    causal = bool(causal) and query.shape[2] > 1
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        # a mask someone prepared in full: honour it exactly with SDPA (no length skipping)
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    lens = None
    if isinstance(attention_mask, torch.Tensor):
        lens = attention_mask if attention_mask.dim() == 1 else _lengths(attention_mask, key.shape[2])
    backend = getattr(module, "diffrl_attention_backend", "auto")
    self_attention = query.shape[2] == key.shape[2]
    if backend == "auto" and _dispatch.resolve("reward_attention", IMPLEMENTED, "auto", query.device) == "torch":
        return _sdpa(query, key, value, lens, causal, scaling, self_attention), None
    out = reward_attention(query, key, value, q_lens=lens if self_attention else None, kv_lens=lens,
                           causal=causal, scale=scaling, backend=backend, validate=False)
    return out.transpose(1, 2), None


def _sdpa(query, key, value, lens, causal, scale, self_attention):
    """reward_attention's result through torch's SDPA, for devices without a fused kernel."""
    Lq, Lk = query.shape[2], key.shape[2]
    if causal and self_attention:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    else:
        mask = None
        if lens is not None:
            mask = (torch.arange(Lk, device=key.device)[None, :] < lens[:, None])[:, None, None, :]
        if causal:
            tri = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()
            mask = tri if mask is None else mask & tri
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    if lens is not None and self_attention:  # padded query rows are zeros, as reward_attention's
        rows = torch.arange(Lq, device=query.device)[None, :] < lens[:, None]
        out = torch.where(rows[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2).contiguous()


def _lengths(mask: torch.Tensor, kv_length: int, check: bool = False) -> torch.Tensor:
    """int32 [B] lengths of a right-padded [B, L] mask (1 = real token)."""
    mask = mask[:, -kv_length:].to(torch.bool)
    lens = mask.sum(dim=-1, dtype=torch.int32)
    if check and not torch.compiler.is_compiling():
        # right padding: the real tokens must be exactly the first `lens` positions (one host sync per forward)
        prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lens[:, None]
        if not bool(torch.equal(prefix, mask)):
            raise ValueError("diffrl attention: the attention mask must pad on the right (real tokens first); "
                             "set tokenizer.padding_side = 'right'")
    return lens


def lengths_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """transformers' mask-interface signature: what the attention function receives as its mask.
    Returns int32 [B] lengths (None without a padding mask)."""
    if attention_mask is None:
        return None
    return _lengths(attention_mask, kv_length, check=True)


def register() -> str:
    """Register ``"diffrl"`` with transformers (idempotent); returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface  # noqa: PLC0415
        from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, lengths_mask)
        _registered = True
    return NAME


def set_backend(model: torch.nn.Module, backend: str) -> None:
    """Choose the ``reward_attention`` backend for every attention module of ``model``."""
    for m in model.modules():
        m.diffrl_attention_backend = backend
