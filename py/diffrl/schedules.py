"""Schedule coefficients: turn a scheduler state into the affine Gaussian step (a, c, s).

Every stochastic step diffrl knows is ``x' = a * x + c * v + s * eps`` with per-sample scalars
``a, c, s`` (see ``diffrl.ops.sde_step``). The functions here own the numerical guards of each
schedule (sigma == 1, the last step, excluded steps) so that the kernels never see a degenerate step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Number = float | int


def _as_coeff(name: str, value) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"StepCoeffs.{name} must be a float or a float tensor, got {type(value).__name__}")
    t = torch.as_tensor(value)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dim() > 1:
        raise ValueError(f"StepCoeffs.{name} must be a scalar or a 1-D [B] tensor, got shape {tuple(t.shape)}")
    return t.to(torch.float32)


@dataclass(frozen=True)
class StepCoeffs:
    """Per-sample coefficients of one affine Gaussian step: ``mean = a*x + c*v``, ``std = s``.

    ``a``, ``c`` and ``s`` are float32 tensors, each either 0-d (one value for the whole batch) or
    ``[B]`` (one step per sample). Values are checked once, here, when the object is built (finite,
    ``s >= 0``), so that ``sde_step`` never synchronises with the device to check them: build
    coefficients on the host and move them with ``.to(device)`` once per rollout.
    """

    a: torch.Tensor
    c: torch.Tensor
    s: torch.Tensor
    # True when every s > 0 (a stochastic step with a log-prob); set by validation.
    stochastic: bool = field(default=True, compare=False)

    def __init__(self, a, c, s, *, _checked: tuple[bool] | None = None):
        a, c, s = (_as_coeff(n, v) for n, v in (("a", a), ("c", c), ("s", s)))
        devices = {a.device, c.device, s.device}
        if len(devices) != 1:
            raise ValueError(f"StepCoeffs: a, c, s must be on one device, got {sorted(map(str, devices))}")
        sizes = {t.numel() for t in (a, c, s) if t.dim() == 1}
        if len(sizes) > 1:
            raise ValueError(f"StepCoeffs: a, c, s have different lengths {sorted(sizes)}")
        if _checked is None:
            for name, t in (("a", a), ("c", c), ("s", s)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"StepCoeffs.{name} has non-finite values: {t.tolist()}")
            if bool((s < 0).any()):
                raise ValueError(f"StepCoeffs.s must be >= 0, got {s.tolist()}")
            stochastic = bool((s > 0).all())
        else:
            (stochastic,) = _checked
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "s", s)
        object.__setattr__(self, "stochastic", stochastic)

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def batch_size(self) -> int | None:
        """Length of the per-sample coefficients, or None when all three are scalars."""
        for t in (self.a, self.c, self.s):
            if t.dim() == 1:
                return t.numel()
        return None

    def to(self, device) -> "StepCoeffs":
        """Move to ``device`` without re-checking (and so without a device synchronisation)."""
        return StepCoeffs(self.a.to(device), self.c.to(device), self.s.to(device), _checked=(self.stochastic,))

    def expand(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three coefficients as contiguous float32 ``[batch]`` tensors."""
        n = self.batch_size
        if n is not None and n != batch:
            raise ValueError(f"coeffs have {n} per-sample values but the batch has {batch} samples")
        return tuple(t.expand(batch).contiguous() for t in (self.a, self.c, self.s))

    def __repr__(self) -> str:
        def fmt(t):
            return f"{t.item():.6g}" if t.dim() == 0 else f"[{t.numel()}]"

        return f"StepCoeffs(a={fmt(self.a)}, c={fmt(self.c)}, s={fmt(self.s)})"
