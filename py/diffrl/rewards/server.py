"""``diffrl serve-reward``: any diffrl reward served over HTTP for :class:`~diffrl.rewards.remote.RemoteReward`.

Built on the standard library's ``ThreadingHTTPServer`` (no web framework to install): each request
runs in its own thread, the reward itself one request at a time (a lock: a model on one device is not
made faster by concurrent calls, and not every reward is thread-safe). The reward is built by name by
the factory the trainers use (:mod:`diffrl.trainers.rewards_factory`), so ``--reward shapes`` serves
exactly what ``reward: {shapes: 1}`` trains with. The wire format is in :mod:`diffrl.rewards.remote`.

Status codes: 200 scores; 400 a bad request (malformed body, images outside [0, 1], wrong counts: the
reward's own input checks); 404 an unknown path; 500 the reward failed (the client retries these);
the body of an error is ``{"error": "<message>"}``.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from diffrl.rewards.base import call_reward
from diffrl.rewards.remote import WIRE_VERSION, decode_request

__all__ = ["RewardServer", "make_server", "add_serve_parser", "cmd_serve_reward"]

MAX_BODY = 1 << 31  # bytes: refuse anything larger than 2 GiB outright


class RewardServer(ThreadingHTTPServer):
    """An HTTP server of ``reward`` (call ``serve_forever()``; ``server_address`` has the bound port)."""

    daemon_threads = True

    def __init__(self, reward, address, *, name: str = "reward", device="cpu", verbose: bool = False):
        self.reward = reward
        self.reward_name = name
        self.device = torch.device(device)
        self.verbose = verbose
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict:
        import diffrl  # noqa: PLC0415

        return {"status": "ok", "reward": self.reward_name, "heads": list(getattr(self.reward, "heads", ("reward",))),
                "diffrl": diffrl.__version__, "wire_version": WIRE_VERSION}

    def score(self, raw: bytes) -> dict:
        """The answer's body for a ``/score`` request body; ValueError/TypeError: a bad request."""
        images, prompts, metadata, group_ids = decode_request(raw)
        images = images.to(self.device)
        if group_ids is not None:
            group_ids = group_ids.to(self.device)
        with self.lock, torch.no_grad():  # (no_grad is per thread: set it in the handler's)
            out = call_reward(self.reward, images, prompts, group_ids, metadata=metadata)
        if not isinstance(out, dict) or "reward" not in out:
            raise RuntimeError(f"reward {self.reward_name!r} returned no 'reward' entry")
        scores = {}
        for k, v in out.items():
            if not isinstance(v, torch.Tensor):
                continue
            if v.numel() != images.shape[0]:
                raise RuntimeError(f"reward {self.reward_name!r}: head {k!r} has shape {tuple(v.shape)} for "
                                   f"{images.shape[0]} images")
            scores[k] = v.detach().float().cpu().reshape(-1).tolist()  # float32 values, exact as float64 JSON
        return {"scores": scores}


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode("utf-8")  # (NaN/inf as JSON's NaN/Infinity: the client rejects them)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") == "/health":
            self._reply(200, self.server.health())
        else:
            self._reply(404, {"error": f"unknown path {self.path!r} (GET /health, POST /score)"})

    def do_POST(self):  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"unknown path {self.path!r} (GET /health, POST /score)"})
            return
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reply(411, {"error": "Content-Length required"})
            return
        if not 0 < n <= MAX_BODY:
            self._reply(413 if n > 0 else 400, {"error": f"body of {n} bytes"})
            return
        raw = self.rfile.read(n)
        try:
            body = self.server.score(raw)
        except (ValueError, TypeError) as e:
            self._reply(400, {"error": str(e)})
            return
        except Exception as e:  # noqa: BLE001 - the reward failed: say why, the client may retry
            self._reply(500, {"error": f"{type(e).__name__}: {e}"})
            return
        self._reply(200, body)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        if self.server.verbose:
            super().log_message(format, *args)


def make_server(reward, host: str = "127.0.0.1", port: int = 0, *, name: str | None = None, device="cpu",
                verbose: bool = False) -> RewardServer:
    """A server of ``reward`` (a reward object) bound to ``host:port`` (0: a free port); not yet serving."""
    if not callable(reward):
        raise TypeError(f"make_server: reward must be callable, got {type(reward).__name__}")
    return RewardServer(reward, (host, port), name=name or type(reward).__name__, device=device, verbose=verbose)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve-reward", help="serve a reward over HTTP (for reward: {remote: 1})",
                       description="Serve a diffrl reward by name over HTTP: POST /score, GET /health "
                                   "(wire format: diffrl.rewards.remote).")
    p.add_argument("--reward", required=True, help="a reward name of the trainers' factory (e.g. shapes, pickscore)")
    p.add_argument("--reward-kwargs", default="{}", help="JSON object of the reward's arguments (its reward_kwargs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, required=True, help="port (0: a free one, printed at start)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    p.set_defaults(func=cmd_serve_reward)


def cmd_serve_reward(args) -> int:
    from diffrl.trainers.rewards_factory import build_reward  # noqa: PLC0415

    try:
        kwargs = json.loads(args.reward_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("--reward-kwargs must be a JSON object")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        reward = build_reward(args.reward, **kwargs)
        if isinstance(reward, torch.nn.Module):  # frozen, as in the trainers
            reward.requires_grad_(False).eval().to(device)
        server = make_server(reward, args.host, args.port, name=args.reward, device=device, verbose=args.verbose)
    except (ValueError, TypeError, OSError) as e:
        print(f"diffrl serve-reward: error: {e}", file=sys.stderr)
        return 2
    print(f"serving reward {args.reward!r} on {server.url} (device {device}); POST /score, GET /health", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
