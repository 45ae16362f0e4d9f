"""Output allocation for the kernel launchers.

With ``POISON = True`` (the tests set it) outputs are filled with NaN instead of left
uninitialised, so that an element a kernel forgets to write shows up as a NaN in the comparison.
"""

import torch

POISON = False


def empty(size, *, dtype, device) -> torch.Tensor:
    if isinstance(size, int):
        size = (size,)
    if POISON:
        return torch.full(size, float("nan"), dtype=dtype, device=device)
    return torch.empty(size, dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, dtype=t.dtype, device=t.device)
