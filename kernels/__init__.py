"""Triton kernels of diffrl (installed as ``diffrl.kernels``), one module per op.

Import a module here only when its backend runs: importing triton is slow and optional.
Kernels use plain pointer arithmetic and tl.math only (no block pointers, libdevice or inline asm),
so that they run unchanged on triton 3.6-3.9 and under TRITON_INTERPRET=1 on a CPU.
"""
