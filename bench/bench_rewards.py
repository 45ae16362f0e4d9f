"""Whole-reward benchmark: diffrl's PickScore against the naive transformers scorer.

A batch of B images over P prompts (B / P images per prompt, as a GRPO group), scored with a CLIP
model of random weights (no download): PickScore-sized on a GPU (ViT-H/14 image tower at 224 px,
1024-wide text tower, float16), a small CLIP on a CPU (ViT-B/32-like at 224 px, 4 + 4 layers of
width 256, float32). Images are decoded-pipeline sized (512 px on a GPU, 256 px on a CPU) float
tensors in [0, 1] on the device; prompts are random words of about 20 tokens.

Implementations (each returns PickScore's ``exp(logit_scale) * cos``):

naive         what the published scorer does: images to uint8 PIL on the host, CLIPImageProcessor,
              every prompt tokenised per image and padded to 77, one batched forward of the model
              with transformers' default attention (sdpa)
diffrl-sdpa   diffrl's PickScore with transformers' sdpa attention: on-device preprocessing and each
              distinct prompt encoded once, padded to the longest (isolates those two gains)
diffrl        diffrl's PickScore as shipped (attn_implementation="diffrl": reward_attention with
              the prompts' lengths; Triton on a GPU, SDPA with the same semantics on a CPU)

Columns: the standard ones with ``bytes_moved`` empty (not a memory-bound op) and ``x eager``
against ``naive``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from bench import harness

OP = "rewards"


@dataclass(frozen=True)
class Case:
    images: int
    prompts: int
    size: int
    dtype: torch.dtype
    model: str

    @property
    def shape(self) -> str:
        return f"{self.images}x3x{self.size}x{self.size}/{self.prompts}prompts"


def cases(device_type: str, quick: bool = False, dtypes=None, sizes=None) -> list[Case]:
    """``sizes`` overrides the number of images B (P = B / 8)."""
    if device_type == "cuda":
        dt = (dtypes or (torch.float16,))[0]
        bs = sizes or ((64,) if quick else (64, 256))
        return [Case(b, max(1, b // 8), 512, dt, "pickscore-vit-h") for b in bs]
    dt = (dtypes or (torch.float32,))[0]
    bs = sizes or ((16,) if quick else (64,))
    return [Case(b, max(1, b // 8), 256, dt, "small-clip") for b in bs]


# ----------------------------------------------------------------------------------------------
# the model, tokenizer and processor, built in memory


def _tokenizer():
    from diffrl.models.tiny import clip_tokenizer  # noqa: PLC0415 - the same single-letter CLIP tokenizer

    tok = clip_tokenizer(77)
    return tok, tok.get_vocab()


def _config(name: str, vocab: dict):
    from transformers import CLIPConfig  # noqa: PLC0415

    eos = vocab["<|endoftext|>"]
    text = dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=eos, bos_token_id=eos - 1,
                pad_token_id=eos, hidden_act="gelu")
    if name == "pickscore-vit-h":  # PickScore_v1 = CLIP ViT-H/14 (laion2B)
        text.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="gelu")
        proj = 1024
    else:
        text.update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      image_size=224, patch_size=32)
        proj = 256
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


def build(case: Case, device: torch.device, seed: int = 0):
    """(model, tokenizer, processor dict, images, prompts) for a case."""
    from diffrl.rewards import hf_attention  # noqa: PLC0415
    from transformers import CLIPModel  # noqa: PLC0415

    hf_attention.register()
    tok, vocab = _tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        model = CLIPModel(_config(case.model, vocab)).to(case.dtype).eval().requires_grad_(False)
    proc = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    g = torch.Generator().manual_seed(seed)
    # smooth random images (what a decoder produces is not white noise)
    low = torch.rand(case.images, 3, case.size // 16, case.size // 16, generator=g)
    imgs = torch.nn.functional.interpolate(low, size=(case.size, case.size), mode="bilinear").to(device)
    words = []
    for _ in range(case.prompts):  # about 20 tokens: 3-5 words of 3-7 letters, one token per letter
        n = int(torch.randint(3, 6, (), generator=g))
        words.append(" ".join("".join(string.ascii_lowercase[int(i)] for i in
                                      torch.randint(0, 26, (int(torch.randint(3, 8, (), generator=g)),), generator=g))
                              for _ in range(n)))
    prompts = [words[i // (case.images // case.prompts)] for i in range(case.images)]
    return model, tok, proc, imgs, prompts


def naive_scorer(model, tok, proc_cfg):
    from transformers import CLIPImageProcessor  # noqa: PLC0415

    processor = CLIPImageProcessor(**proc_cfg)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    def score(images, prompts):
        u8 = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        px = processor(images=list(u8), return_tensors="pt")["pixel_values"].to(device, dtype)
        t = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").to(device)
        img = model.get_image_features(pixel_values=px).pooler_output
        txt = model.get_text_features(**t).pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (img * txt).sum(-1)).float()

    return score


def bench_case(ctx, case: Case) -> list[dict]:
    """Rows for one case (a function, so that its model is freed before the next case builds one)."""
    from diffrl.rewards import PickScore  # noqa: PLC0415
    from diffrl.rewards.clip import ImagePreprocess  # noqa: PLC0415

    device = ctx.device
    model, tok, proc, imgs, prompts = build(case, device)
    pick = PickScore(model, tok, ImagePreprocess.from_dict(proc))
    naive = naive_scorer(model, tok, proc)
    impls = {
        "naive": ("sdpa", lambda: naive(imgs, prompts)),
        "diffrl-sdpa": ("sdpa", lambda: pick(imgs, prompts)["reward"]),
        "diffrl": ("diffrl", lambda: pick(imgs, prompts)["reward"]),
    }
    measured, want = [], None
    for impl, (attn, fn) in impls.items():
        model.set_attn_implementation(attn)
        try:
            with torch.no_grad():
                got = fn()
                note = ""
                if want is None:
                    want = got
                else:
                    # relative to the scores' scale (random models score near 0); the pixels may
                    # differ by a uint8 step from PIL's (see diffrl.rewards.clip)
                    tol = 5e-3 if case.dtype == torch.float32 else 3e-2
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    note = f"MISMATCH max diff {err:.3g} x max|score|" if err > tol else ""
                timing = ctx.timing(fn, flush_l2=False)
                peak = harness.peak_memory_bytes(fn, device)
        except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking the rest
            ctx.log(f"  {impl}: FAILED {type(exc).__name__}: {exc}")
            timing = harness.Timing(float("nan"), float("nan"), float("nan"), 0)
            peak, note = None, f"FAILED {type(exc).__name__}: {exc}"[:200]
        measured.append((impl, timing, peak, note))
        ctx.log(f"  {impl:12s} {timing.median_ms:10.3f} ms  peak {peak} B {note}")
    base = measured[0][1].median_ms
    return [harness.result_row(op=OP, case=case.model, shape=case.shape, dtype=case.dtype, batch=case.images,
                               mode="score", impl=impl, timing=timing, bytes_moved=None,
                               eager_ms=base if timing.reps else None, peak_bytes=peak, note=note,
                               prompts=case.prompts)
            for impl, timing, peak, note in measured]


def run(ctx) -> list[dict]:
    rows = []
    for case in cases(ctx.device.type, ctx.quick, ctx.dtypes, getattr(ctx, "sizes", None)):
        ctx.log(f"[{OP}] {case.model} {case.shape} {harness.dtype_name(case.dtype)}")
        rows += bench_case(ctx, case)
    return rows
