"""``FrameWise``: an image reward applied to videos, frame by frame, reduced over the frames."""

from __future__ import annotations

import torch

from diffrl.rewards.base import Reward, check_inputs

REDUCTIONS = ("mean", "min", "max")


class FrameWise(Reward):
    """Score videos ``[B, 3, F, H, W]`` (what a video family such as Wan decodes) with an image reward:
    each of the ``B F`` frames is scored with its video's prompt (and group id), then every head is
    reduced over the frames (``reduce``: ``"mean"``, ``"min"`` or ``"max"``). The heads are the image
    reward's. Images ``[B, 3, H, W]`` are an error (use the image reward itself). To combine rewards,
    wrap the combination: ``FrameWise(MultiReward({...}))`` (a MultiReward checks for images)."""

    def __init__(self, reward, reduce: str = "mean"):
        if not callable(reward):
            raise TypeError(f"FrameWise: reward must be callable, got {type(reward).__name__}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"FrameWise: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.reward = reward
        self.reduce = reduce
        self.heads = tuple(getattr(reward, "heads", ("reward",)))
        self.range_slack = getattr(reward, "range_slack", Reward.range_slack)

    def __call__(self, images, prompts, group_ids=None) -> dict[str, torch.Tensor]:
        name = f"FrameWise({type(self.reward).__name__})"
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{name}: videos must be a torch.Tensor [B, 3, F, H, W], got {type(images).__name__}")
        if images.dim() != 5 or images.shape[1] != 3:
            raise ValueError(f"{name}: videos must be [B, 3, F, H, W], got shape {tuple(images.shape)}"
                             + (" (images: use the image reward without FrameWise)" if images.dim() == 4 else ""))
        B, _, F, H, W = images.shape
        if F == 0:
            raise ValueError(f"{name}: videos have no frames (shape {tuple(images.shape)})")
        frames = images.permute(0, 2, 1, 3, 4).reshape(B * F, 3, H, W)  # video-major: frame f of video b at b F + f
        # the videos' prompts and group ids checked at their length B, then repeated per frame
        _, prompts, group_ids = check_inputs(frames[::F], prompts, group_ids, range_slack=self.range_slack, name=name)
        frames, _, _ = check_inputs(frames, [""] * (B * F), range_slack=self.range_slack, name=name)
        out = self.reward(frames, [p for p in prompts for _ in range(F)],
                          None if group_ids is None else group_ids.repeat_interleave(F))
        if not isinstance(out, dict) or "reward" not in out:
            raise TypeError(f"{name}: the image reward must return a dict with a 'reward' entry")
        reduced = {}
        for k, v in out.items():
            if not isinstance(v, torch.Tensor) or v.shape != (B * F,):
                raise ValueError(f"{name}: head {k!r} of the image reward must be a [{B * F}] tensor (one value per "
                                 f"frame), got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            v = v.float().reshape(B, F)
            reduced[k] = v.mean(1) if self.reduce == "mean" else (v.amin(1) if self.reduce == "min" else v.amax(1))
        return reduced
