"""The backend registry (diffrl.ops._dispatch) and the keyword convention of diffrl._C's entry points."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import diffrl
from diffrl import _native
from diffrl.ops import _dispatch, _native_backend
from diffrl.ops import advantages as adv_mod
from diffrl.ops import attention as attn_mod
from diffrl.ops import loss as loss_mod
from diffrl.ops import sde as sde_mod

from conftest import available


def test_op_files_take_their_backends_from_the_registry():
    assert sde_mod.IMPLEMENTED == _dispatch.implementing("sde_step") == ("torch", "cpp", "triton", "cuda", "cupy")
    assert loss_mod.IMPLEMENTED == _dispatch.implementing("grpo_loss")
    assert adv_mod.IMPLEMENTED == _dispatch.implementing("group_advantages")
    assert adv_mod.WIN_RATE_IMPLEMENTED == _dispatch.implementing("win_rate")
    assert attn_mod.IMPLEMENTED == ("torch", "triton", "flash_attn")
    assert _dispatch.BACKENDS == ("torch", "cpp", "triton", "cuda", "cupy", "flash_attn")


def test_every_launcher_resolves():
    names = {n for launchers in _dispatch.OP_LAUNCHERS.values() for n in launchers}
    no_triton = importlib.util.find_spec("triton") is None
    for b in _dispatch.REGISTRY.values():
        assert set(b.launchers) <= names, b.name
        for n, spec in b.launchers.items():
            if no_triton and isinstance(spec, str) and spec.startswith("diffrl.kernels."):
                continue
            assert callable(_dispatch.launcher(b.name, n)), (b.name, n)
    with pytest.raises(ValueError, match="has no launcher 'reward_attention_forward'"):
        _dispatch.launcher("cpp", "reward_attention_forward")


def test_errors_list_the_usable_backends():
    x = torch.randn(2, 5)
    usable = _dispatch._usable("sde_step", sde_mod.IMPLEMENTED, torch.device("cpu"))
    assert "torch" in usable and "cuda" not in usable
    with pytest.raises(ValueError, match=r"unknown backend 'metal'.*usable here for sde_step on cpu tensors: "
                                         + repr(usable).replace("(", r"\(").replace(")", r"\)")):
        diffrl.sde_step(x, x, (0.9, -0.1, 0.3), noise=x, backend="metal")
    if not available("cuda", "cuda"):
        with pytest.raises(ValueError, match=r"backend 'cuda' is not available here: .*\(usable here for sde_step"):
            diffrl.sde_step(x, x, (0.9, -0.1, 0.3), noise=x, backend="cuda")


@pytest.mark.skipif(not available("cpp"), reason="needs the cpp backend")
def test_entry_points_take_their_fields_by_name():
    C, _ = _native.load()
    fields = {"vals_double": 0, "B": 0, "vals": 0, "order": 0, "sorted_ids": 0, "out": 0}
    C.win_rate_cpu(**fields)  # B = 0: nothing to do
    C.win_rate_cpu(**dict(reversed(fields.items())))  # any order
    with pytest.raises(TypeError, match="win_rate_cpu: takes keyword arguments only"):
        C.win_rate_cpu(*fields.values())
    with pytest.raises(TypeError, match="win_rate_cpu: missing argument 'out'"):
        C.win_rate_cpu(**{k: v for k, v in fields.items() if k != "out"})
    with pytest.raises(TypeError, match="win_rate_cpu: unexpected argument\\(s\\) 'stream'"):
        C.win_rate_cpu(**fields, stream=0)
    with pytest.raises(TypeError, match="win_rate_cpu: argument 'B'"):
        C.win_rate_cpu(**{**fields, "B": 0.5})
    with pytest.raises(ValueError, match="sde_step: unsupported dtype code 7"):
        x = torch.randn(1, 1)
        _native_backend.PointerBackend("cpp", gpu=False, raw_module="diffrl._C", raw_suffix="_cpu").raw(
            "sde_step_forward")(dtype=7, B=1, D=1, x=x.data_ptr(), v=x.data_ptr(), v_uncond=0, w=1.0, noise=0,
                                prev_in=x.data_ptr(), v_ref=0, v_ref_uncond=0, a=0, c=0, s=0, prev_out=0, mean_out=0,
                                log_prob=0, kl=0, reduce_sum=0)
