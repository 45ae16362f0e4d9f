"""What the tests that run a trainer on two CPU processes (gloo) share: launching the two ranks,
waiting for them, sampling the eval prompts the same way in a worker and in the test, comparing
state dicts. Not a test module (no ``test_`` prefix); the test files import it from their folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch


def images(tr):
    """The eval prompts sampled with fixed noise, as floats (finer than the uint8 of a grid). The workers
    get this function's source (``inspect.getsource``) and ``exec`` it, so it names only ``torch``."""
    c = tr.config
    with torch.no_grad():
        return tr.sampler.sample(list(c.eval_prompts), num_images_per_prompt=1,
                                 num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                                 height=c.resolution, width=c.resolution,
                                 generator=torch.Generator().manual_seed(0)).images


def launch_two_ranks(worker: str, args: list[str], extra_env: dict | None = None) -> list[subprocess.Popen]:
    """Starts ``python -c worker *args`` as ranks 0 and 1 of a 2-process group on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, "-c", worker, *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Waits for every process; a failed one fails the test with the tail of its output."""
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out.decode()[-4000:]


def assert_close_dicts(a: dict, b: dict, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The same keys, and each tensor of ``a`` close to ``b``'s."""
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}")
