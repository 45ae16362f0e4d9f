"""The torch.library namespace of diffrl's ops (one Library object per process).

Ops are registered with define/impl + register_fake (cheaper per call than @custom_op), and autograd
lives in an autograd.Function outside the op, so that a function calling a diffrl op compiles under
torch.compile(fullgraph=True).
"""

import torch

LIB = torch.library.Library("diffrl", "DEF")
