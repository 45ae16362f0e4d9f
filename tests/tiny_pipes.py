"""Tiny random-weight pipelines shared by the sampler and family tests (built once per test module)."""

from diffrl.models.tiny import tiny_pipeline


def pipeline_cache(seed: int):
    """``get(family)``: the tiny pipeline of ``family`` built with ``seed``, built on first use."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_pipeline(family, seed=seed)
        return cache[family]

    return get


def sample_options(family: str) -> dict:
    """Extra ``sample()`` keywords: a short T5 context, the tiny tokenizers' max length (the pipelines
    default to 256 / 512)."""
    return {"max_sequence_length": 16} if family in ("sd3", "flux") else {}
