"""Reward names of a config (``reward: {name: weight}``) to reward objects.

Names are resolved lazily so that a config naming only the JPEG rewards never imports CLIP code or
loads a model. ``reward_kwargs[name]`` is passed to the constructor (or ``from_pretrained`` for the
model-based rewards).
"""

from __future__ import annotations

import difflib

__all__ = ["REWARD_NAMES", "build_reward", "build_rewards"]


def _jpeg_incompressibility(**kw):
    from diffrl.rewards import JpegIncompressibility  # noqa: PLC0415

    return JpegIncompressibility(**kw)


def _jpeg_compressibility(**kw):
    from diffrl.rewards import JpegCompressibility  # noqa: PLC0415

    return JpegCompressibility(**kw)


def _aesthetic(**kw):
    from diffrl.rewards import AestheticScore  # noqa: PLC0415

    if "path" not in kw:
        raise ValueError("reward 'aesthetic' needs reward_kwargs.aesthetic.path (the aesthetic head checkpoint)")
    return AestheticScore.from_pretrained(kw.pop("path"), **kw)


def _clip(**kw):
    from diffrl.rewards import CLIPScore  # noqa: PLC0415

    return CLIPScore.from_pretrained(**kw)


def _pickscore(**kw):
    from diffrl.rewards import PickScore  # noqa: PLC0415

    return PickScore.from_pretrained(**kw)


def _colour_target(**kw):
    from diffrl.rewards import ColourTarget  # noqa: PLC0415

    return ColourTarget(**kw)


def _hpsv2(**kw):
    from diffrl.rewards import HPSv2Score  # noqa: PLC0415

    if "path" not in kw:
        raise ValueError("reward 'hpsv2' needs a path: reward_kwargs.<name>.path, the HPS_v2*_compressed.pt file")
    return HPSv2Score.from_pretrained(kw.pop("path"), **kw)


def _image_reward(**kw):
    from diffrl.rewards import ImageRewardScore  # noqa: PLC0415

    if "path" not in kw:
        raise ValueError("reward 'image_reward' needs a path: reward_kwargs.<name>.path, the ImageReward.pt file")
    return ImageRewardScore.from_pretrained(kw.pop("path"), **kw)


def _shapes(**kw):
    from diffrl.rewards import ShapesReward  # noqa: PLC0415

    return ShapesReward(**kw)


def _remote(**kw):
    from diffrl.rewards import RemoteReward  # noqa: PLC0415

    if "url" not in kw:
        raise ValueError("reward 'remote' needs reward_kwargs.remote.url (the server of `diffrl serve-reward`)")
    return RemoteReward(kw.pop("url"), **kw)


_FACTORIES = {
    "jpeg_incompressibility": _jpeg_incompressibility,
    "jpeg_compressibility": _jpeg_compressibility,
    "aesthetic": _aesthetic,
    "clip": _clip,
    "clipscore": _clip,
    "pickscore": _pickscore,
    "shapes": _shapes,
    "colour_target": _colour_target,
    "hpsv2": _hpsv2,
    "hps": _hpsv2,
    "image_reward": _image_reward,
    "imagereward": _image_reward,
    "remote": _remote,
}
REWARD_NAMES = tuple(_FACTORIES)


def build_reward(name: str, **kwargs):
    """One reward by name."""
    key = name.lower().replace("-", "_")
    if key not in _FACTORIES:
        close = difflib.get_close_matches(key, REWARD_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint}; known: {', '.join(REWARD_NAMES)}")
    return _FACTORIES[key](**dict(kwargs))


def build_rewards(weights: dict[str, float], kwargs: dict[str, dict] | None = None):
    """The reward of a config: a single reward at weight 1 as itself (its heads keep their names),
    anything else as a ``MultiReward`` with the weights."""
    kwargs = kwargs or {}
    unknown = set(kwargs) - set(weights)
    if unknown:
        raise ValueError(f"reward_kwargs names rewards not in reward: {sorted(unknown)}")
    if not weights:
        raise ValueError("reward must name at least one reward")
    built = {name: build_reward(name, **kwargs.get(name, {})) for name in weights}
    if len(built) == 1 and float(next(iter(weights.values()))) == 1.0:
        return next(iter(built.values()))
    from diffrl.rewards import MultiReward  # noqa: PLC0415

    return MultiReward(built, weights={k: float(v) for k, v in weights.items()})
