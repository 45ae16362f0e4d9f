"""``RemoteReward``: a reward served over HTTP (``diffrl serve-reward``, :mod:`diffrl.rewards.server`).

Wire format (JSON, version :data:`WIRE_VERSION`). ``POST /score`` with::

    {"version": 1,
     "images": {"format": "float32", "shape": [B, 3, H, W], "data": "<base64 of little-endian float32>"}
             | {"format": "png", "data": ["<base64 PNG, 8-bit RGB, H x W>", ...]},
     "prompts": ["...", ...],            # B strings
     "metadata": [{...} | null, ...] | null,   # optional, one JSON object per image
     "group_ids": [int, ...] | null}     # optional

answers ``200 {"scores": {"reward": [B floats], "<head>": [B floats], ...}}``, or an error status with
``{"error": "<message>"}`` (400: the request is bad, e.g. images outside [0, 1]; 500: the reward
failed). ``GET /health`` answers ``{"status": "ok", "reward": NAME, "heads": [...], "diffrl": VERSION,
"wire_version": 1}``.

``float32`` is exact: the server's reward sees the very tensor the client sent, and float32 scores
survive JSON unchanged (each is written as the shortest decimal of its float64 value), so a served
reward equals the in-process one bit for bit. ``png`` is about ten times smaller for real images but
quantises them to uint8 (``round(x * 255)``); the server scores ``uint8 / 255``.

Client semantics: batches of at most ``max_batch`` images per request (in order; a group-aware reward
sees the group ids of its chunk); each request has ``timeout`` seconds; connection errors, timeouts
and 5xx answers are retried ``retries`` times with exponential backoff (``backoff * 2**k`` s, at most
``max_backoff``); 4xx answers are not retried. When a request fails for good, :class:`RemoteRewardError`
names the URL and the last cause: a reward never silently becomes 0. Answers are checked: the count of
scores per head, numbers only, finite (unless ``allow_nonfinite``: then NaN/inf reach the trainer,
whose non-finite guard skips the update).

The client uses only the standard library (``urllib``).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from diffrl.rewards.base import Reward

__all__ = ["RemoteReward", "RemoteRewardError", "WIRE_VERSION", "IMAGE_FORMATS", "encode_images", "decode_images",
           "encode_request", "decode_request", "quantise_uint8"]

WIRE_VERSION = 1
IMAGE_FORMATS = ("float32", "png")


class RemoteRewardError(RuntimeError):
    """A remote reward that could not be scored: the server is unreachable, failed, or answered nonsense."""


# ---- wire format (shared by client and server) ----------------------------------------------------

def quantise_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] on the CPU, ``round(x * 255)`` (what the png path sends)."""
    return (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def encode_images(images: torch.Tensor, fmt: str = "float32") -> dict:
    """The ``images`` object of a request, from float images [B, 3, H, W] (checked by the caller)."""
    if fmt == "float32":
        arr = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy(), dtype="<f4")
        return {"format": "float32", "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}
    if fmt == "png":
        from PIL import Image  # noqa: PLC0415

        data = []
        for px in quantise_uint8(images).numpy():
            buf = io.BytesIO()
            Image.fromarray(px, mode="RGB").save(buf, format="PNG")
            data.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return {"format": "png", "data": data}
    raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")


def decode_images(obj) -> torch.Tensor:
    """Float32 [B, 3, H, W] on the CPU from a request's ``images`` object; ValueError when it is malformed."""
    if not isinstance(obj, dict) or obj.get("format") not in IMAGE_FORMATS:
        raise ValueError(f"images must be an object with format one of {', '.join(IMAGE_FORMATS)}")
    try:
        if obj["format"] == "float32":
            shape = obj.get("shape")
            if (not isinstance(shape, list) or len(shape) != 4
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise ValueError(f"images.shape must be 4 non-negative ints [B, 3, H, W], got {shape!r}")
            raw = base64.b64decode(obj["data"], validate=True)
            if len(raw) != 4 * math.prod(shape):
                raise ValueError(f"images.data has {len(raw)} bytes, shape {shape} needs {4 * math.prod(shape)}")
            arr = np.frombuffer(raw, dtype="<f4").reshape(shape)
            return torch.from_numpy(arr.astype(np.float32))  # (a native-order, writable copy)
        from PIL import Image  # noqa: PLC0415

        data = obj.get("data")
        if not isinstance(data, list) or not data:
            raise ValueError("images.data must be a non-empty list of base64 PNGs")
        imgs = []
        for i, s in enumerate(data):
            with Image.open(io.BytesIO(base64.b64decode(s, validate=True))) as im:
                if im.mode != "RGB":
                    raise ValueError(f"image {i}: PNG must be 8-bit RGB, got mode {im.mode}")
                imgs.append(np.asarray(im, dtype=np.uint8))
        if len({a.shape for a in imgs}) != 1:
            raise ValueError(f"images differ in size: {sorted({a.shape[:2] for a in imgs})}")
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    except (KeyError, TypeError, base64.binascii.Error, OSError) as e:  # (OSError: PIL's unreadable image)
        raise ValueError(f"images could not be decoded: {type(e).__name__}: {e}") from None


def encode_request(images, prompts, metadata=None, group_ids=None, fmt: str = "float32") -> bytes:
    body = {"version": WIRE_VERSION, "images": encode_images(images, fmt), "prompts": list(prompts),
            "metadata": None if metadata is None else [None if m is None else dict(m) for m in metadata],
            "group_ids": None if group_ids is None else [int(g) for g in group_ids.tolist()]}
    try:
        return json.dumps(body, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"RemoteReward: metadata must be JSON-serialisable (dicts of str, numbers, lists): {e}") \
            from None


def decode_request(raw: bytes):
    """(images, prompts, metadata, group_ids) of a ``/score`` body; ValueError when it is malformed."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    if body.get("version", WIRE_VERSION) != WIRE_VERSION:
        raise ValueError(f"wire version {body.get('version')!r} not supported (this server speaks {WIRE_VERSION})")
    if "images" not in body or "prompts" not in body:
        raise ValueError("body needs 'images' and 'prompts'")
    images = decode_images(body["images"])
    gids = body.get("group_ids")
    if gids is not None:
        if not isinstance(gids, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in gids):
            raise ValueError("group_ids must be a list of ints or null")
        gids = torch.tensor(gids, dtype=torch.int64)
    return images, body["prompts"], body.get("metadata"), gids


def _check_scores(body, n: int, where: str, allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, dict) or "reward" not in scores:
        raise RemoteRewardError(f"{where}: the answer has no scores.reward (got {str(body)[:200]!r})")
    out = {}
    for head, vals in scores.items():
        if not isinstance(vals, list) or len(vals) != n:
            got = len(vals) if isinstance(vals, list) else type(vals).__name__
            raise RemoteRewardError(f"{where}: head {head!r} has {got} scores for {n} images")
        bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise RemoteRewardError(f"{where}: head {head!r} has a non-numeric score {bad[0]!r}")
        t = torch.tensor(vals, dtype=torch.float64).float()
        if not allow_nonfinite and not bool(torch.isfinite(t).all()):
            i = int((~torch.isfinite(t)).nonzero()[0])
            raise RemoteRewardError(f"{where}: head {head!r} has a non-finite score {vals[i]!r} at image {i} "
                                    "(allow_nonfinite=True passes NaN/inf on to the trainer's non-finite guard)")
        out[head] = t
    return out


# ---- the client ---------------------------------------------------------------------------------

class RemoteReward(Reward):
    """A reward scored by a server at ``url`` (``http://host:port``; see the module docstring).

    ``image_format``: ``"float32"`` (exact) or ``"png"`` (uint8, smaller). ``max_batch``: images per
    request. ``timeout``: seconds per request. ``retries``: extra attempts after a connection error,
    timeout or 5xx, waiting ``backoff * 2**k`` s (at most ``max_backoff``) before attempt k + 1.
    ``heads``: the result's keys (default: asked from ``/health`` when first needed).
    ``allow_nonfinite``: pass NaN/inf scores on instead of raising.
    """

    uses_metadata = True

    def __init__(self, url: str, *, image_format: str = "float32", max_batch: int = 64, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, max_backoff: float = 10.0, heads=None,
                 allow_nonfinite: bool = False, range_slack: float = 1e-3):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward: url must start with http:// or https://, got {url!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"RemoteReward: image_format must be one of {', '.join(IMAGE_FORMATS)}, "
                             f"got {image_format!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"RemoteReward: max_batch must be a positive int, got {max_batch!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"RemoteReward: retries must be an int >= 0, got {retries!r}")
        for name, v in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            positive = name == "timeout"
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
                    (positive and v == 0):
                raise ValueError(f"RemoteReward: {name} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {v!r}")
        self.url = url.rstrip("/")
        self.image_format = image_format
        self.max_batch = max_batch
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.allow_nonfinite = bool(allow_nonfinite)
        self.range_slack = float(range_slack)
        self._heads = tuple(heads) if heads is not None else None

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, image_format={self.image_format!r}, max_batch={self.max_batch})"

    @property
    def heads(self) -> tuple[str, ...]:
        if self._heads is None:
            self._heads = tuple(self.health()["heads"])
        return self._heads

    def health(self) -> dict:
        """The server's ``/health`` answer (with the same retries as scoring)."""
        body = self._request("GET", "/health")
        if not isinstance(body, dict) or not isinstance(body.get("heads"), list):
            raise RemoteRewardError(f"remote reward at {self.url}/health: unexpected answer {str(body)[:200]!r}")
        return body

    def score(self, images, prompts, group_ids, metadata=None):
        B = images.shape[0]
        parts: list[dict[str, torch.Tensor]] = []
        for s in range(0, B, self.max_batch):
            sl = slice(s, s + self.max_batch)
            raw = encode_request(images[sl], prompts[sl], None if metadata is None else metadata[sl],
                                 None if group_ids is None else group_ids[sl], self.image_format)
            n = len(prompts[sl])
            body = self._request("POST", "/score", raw)
            parts.append(_check_scores(body, n, f"remote reward at {self.url}/score (images {s}..{s + n - 1})",
                                       self.allow_nonfinite))
        keys = list(parts[0])
        for p in parts[1:]:
            if list(p) != keys:
                raise RemoteRewardError(f"remote reward at {self.url}: heads changed between requests "
                                        f"({keys} then {list(p)})")
        return {k: torch.cat([p[k] for p in parts]).to(images.device) for k in keys}

    def _request(self, method: str, path: str, data: bytes | None = None):
        """The JSON answer to one request, retried on connection errors, timeouts and 5xx."""
        url = self.url + path
        attempts = self.retries + 1
        t0 = time.monotonic()
        last = ""
        for k in range(attempts):
            if k:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (k - 1)))
            req = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data is not None else {})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http(s) checked)
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                msg = _server_message(e)
                if e.code < 500:  # the request is wrong: retrying does not help
                    raise RemoteRewardError(f"remote reward at {url} refused the request (HTTP {e.code}): {msg}") \
                        from None
                last = f"HTTP {e.code}: {msg}"
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout, cut
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
                continue
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RemoteRewardError(f"remote reward at {url}: the answer is not JSON ({e}): {raw[:200]!r}") \
                    from None
        raise RemoteRewardError(f"remote reward at {url}: no answer after {attempts} attempt(s) over "
                                f"{time.monotonic() - t0:.1f} s (timeout {self.timeout:g} s each); last error: {last}")


def _server_message(e) -> str:
    try:
        raw = e.read()
        body = json.loads(raw)
        return str(body.get("error", body)) if isinstance(body, dict) else str(body)
    except Exception:  # noqa: BLE001 - any unreadable error body: fall back to the status text
        return str(e.reason)
