"""RemoteReward and ``diffrl serve-reward``: the wire format, served = in-process bit for bit, retries and
their clear errors, bad answers (from a tiny fake server), training through a served reward, a server
killed mid-run and the resume after its restart. Servers run on 127.0.0.1 on free ports (threads, or a
subprocess where it must be killed)."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffrl.rewards import JpegIncompressibility, MultiReward, Reward, RemoteReward, RemoteRewardError, ShapesReward
from diffrl.rewards.remote import decode_images, encode_images
from diffrl.rewards.server import make_server
from diffrl.trainers import GRPOConfig, GRPOTrainer, get_preset, latest_checkpoint, load_config

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def serving(reward, name="test"):
    srv = make_server(reward, name=name)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.url
    finally:
        srv.shutdown()
        srv.server_close()


@contextmanager
def fake_server(answer):
    """A server whose ``/score`` answer is ``answer(request_number, body) -> (status, bytes)``; counts requests."""
    calls = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(body)
            code, data = answer(len(calls), body)
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", calls
    finally:
        srv.shutdown()
        srv.server_close()


def _scores(n, **heads):
    return json.dumps({"scores": {"reward": [0.5] * n, **heads}}).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantised(x):
    """The png path's images, written out here: uint8 round(x * 255), back as float32 / 255."""
    q = np.clip(np.round(x.double().numpy() * 255), 0, 255).astype(np.uint8)
    return torch.from_numpy(q).float() / 255


def _shapes_batch(n, size=32):
    """Random images in [0, 1] with a few flat palette-coloured squares (so the verifier finds objects)."""
    from diffrl.models.shapes import BACKGROUND, COLORS

    x = torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(n, 1, size, size) + 0.05 * torch.rand(n, 3, size, size)
    cols = list(COLORS.values())
    for i in range(n):
        for _ in range(int(torch.randint(1, 3, ()))):
            y0, x0 = torch.randint(0, size - 10, (2,)).tolist()
            x[i, :, y0:y0 + 8, x0:x0 + 8] = torch.tensor(cols[int(torch.randint(len(cols), ()))]).view(3, 1, 1)
    return x.clamp(0, 1)


# ---- wire format ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (5, 3, 7, 13), (2, 3, 32, 31)])
def test_wire_images_roundtrip(shape):
    x = torch.rand(shape)
    back = decode_images(json.loads(json.dumps(encode_images(x, "float32"))))
    assert back.dtype == torch.float32 and torch.equal(back, x)
    png = decode_images(json.loads(json.dumps(encode_images(x, "png"))))
    assert torch.equal(png, _quantised(x))
    # float32 on the wire is little-endian whatever the host
    raw = base64.b64decode(encode_images(x, "float32")["data"])
    assert np.array_equal(np.frombuffer(raw, dtype="<f4"), x.numpy().ravel())


def test_wire_rejects_malformed_images():
    x = torch.rand(2, 3, 4, 4)
    obj = encode_images(x)
    with pytest.raises(ValueError, match="bytes"):
        decode_images({**obj, "shape": [2, 3, 4, 5]})
    with pytest.raises(ValueError, match="format"):
        decode_images({**obj, "format": "jpeg"})
    with pytest.raises(ValueError, match="decoded"):
        decode_images({**obj, "data": "not base64!"})
    gray = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(gray, format="PNG")
    with pytest.raises(ValueError, match="RGB"):
        decode_images({"format": "png", "data": [base64.b64encode(gray.getvalue()).decode()]})


# ---- served = in-process -------------------------------------------------------------------------------

@pytest.mark.parametrize("make,size", [(JpegIncompressibility, 31), (ShapesReward, 32)])
def test_served_reward_equals_in_process_bit_for_bit(make, size):
    reward = make()
    x = _shapes_batch(7, size) if make is ShapesReward else torch.rand(7, 3, size, size)
    prompts = ["two red circles", "a blue square left of a yellow triangle", "three green triangles"] * 2 + \
        ["a red square"]
    want = reward(x, prompts)
    with serving(reward) as url:
        remote = RemoteReward(url, max_batch=3)  # 3 + 3 + 1 images: chunks joined in order
        assert remote.heads == tuple(getattr(reward, "heads"))
        got = remote(x, prompts)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float()), k
        # png: the same reward on the same quantised images
        got_png = RemoteReward(url, image_format="png")(x, prompts)
        want_q = reward(_quantised(x), prompts)
        for k in want_q:
            assert torch.equal(got_png[k], want_q[k].float()), k


class _TargetReward(Reward):
    """Scores each image by its metadata: target * mean pixel (+ 1 for prompts without metadata)."""

    uses_metadata = True
    heads = ("reward", "target")

    def score(self, images, prompts, group_ids, metadata=None):
        t = torch.tensor([1.0 if m is None else float(m["target"]) for m in (metadata or [None] * len(prompts))])
        return {"reward": t * images.mean((1, 2, 3)), "target": t}


def test_metadata_reaches_the_served_reward():
    x = torch.rand(5, 3, 8, 8)
    prompts = [f"p{i}" for i in range(5)]
    meta = [{"target": float(t), "include": [{"class": "cat", "count": 2}]} for t in torch.randn(4)] + [None]
    reward = _TargetReward()
    want = reward(x, prompts, metadata=meta)
    assert torch.equal(want["target"][:4], torch.tensor([m["target"] for m in meta[:4]], dtype=torch.float32))
    with serving(reward) as url:
        remote = RemoteReward(url, max_batch=2)
        got = remote(x, prompts, metadata=meta)
        assert torch.equal(got["reward"], want["reward"]) and torch.equal(got["target"], want["target"])
        # inside a MultiReward the metadata is passed on; a reward that does not use it ignores it
        multi = MultiReward({"remote": remote, "jpeg": JpegIncompressibility()}, weights={"remote": 2.0})
        out = multi(x, prompts, metadata=meta)
        assert torch.equal(out["remote/target"], want["target"])
        assert torch.equal(out["reward"], 2.0 * want["reward"] + JpegIncompressibility()(x, prompts)["reward"])
        with pytest.raises(TypeError, match="JSON"):
            remote(x, prompts, metadata=[{"target": object()}] * 5)
        with pytest.raises(ValueError, match="4 metadata entries for 5 images"):
            remote(x, prompts, metadata=meta[:4])


def test_cli_serve_reward_health_and_scores(capsys):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffrl", "serve-reward", "--reward", "jpeg_incompressibility",
                             "--port", str(port), "--reward-kwargs", '{"quality": 80}'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line + proc.stderr.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as r:
            health = json.loads(r.read())
        import diffrl
        assert health["reward"] == "jpeg_incompressibility" and health["diffrl"] == diffrl.__version__
        assert health["heads"] == ["reward", "jpeg_kb"]
        x = torch.rand(3, 3, 16, 16)
        got = RemoteReward(f"http://127.0.0.1:{port}")(x, ["a", "b", "c"])
        assert torch.equal(got["reward"], JpegIncompressibility(quality=80)(x, ["a", "b", "c"])["reward"])
    finally:
        proc.kill()
        proc.communicate()
    from diffrl.cli import main  # (in-process: a typo in the name is an error before anything is bound)

    assert main(["serve-reward", "--reward", "jpeg_incompresibility", "--port", "0"]) == 2
    assert "did you mean 'jpeg_incompressibility'" in capsys.readouterr().err


# ---- bad inputs and bad answers --------------------------------------------------------------------------

def test_bad_inputs_fail_before_any_request():
    with fake_server(lambda n, body: (200, _scores(len(body["prompts"])))) as (url, calls):
        remote = RemoteReward(url)
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            remote(torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"])
        with pytest.raises(ValueError, match="empty batch"):
            remote(torch.rand(0, 3, 8, 8), [])
        with pytest.raises(ValueError, match="3 prompts for 2 images"):
            remote(torch.rand(2, 3, 8, 8), ["a", "b", "c"])
        assert calls == []
    for kw, match in [({"image_format": "jpeg"}, "image_format"), ({"max_batch": 0}, "max_batch"),
                      ({"retries": -1}, "retries"), ({"timeout": 0}, "timeout")]:
        with pytest.raises(ValueError, match=match):
            RemoteReward("http://127.0.0.1:1", **kw)
    with pytest.raises(ValueError, match="http://"):
        RemoteReward("127.0.0.1:8000")


@pytest.mark.parametrize("answer,match", [
    (lambda n: {"scores": {"reward": [float("nan")] * n}}, "non-finite score nan at image 0"),
    (lambda n: {"scores": {"reward": [1.0] * n, "aux": [0.0] * (n - 1) + [float("inf")]}}, "'aux' has a non-finite"),
    (lambda n: {"scores": {"reward": [1.0] * (n + 1)}}, f"head 'reward' has {4} scores for 3 images"),
    (lambda n: {"scores": {"reward": [1.0] * (n - 1) + ["1.0"]}}, "non-numeric score '1.0'"),
    (lambda n: {"scores": {"reward": [1.0] * (n - 1) + [None]}}, "non-numeric score None"),
    (lambda n: {"scores": {"reward": [True] * n}}, "non-numeric score True"),
    (lambda n: {"scores": {"aesthetic": [1.0] * n}}, "no scores.reward"),
    (lambda n: [1.0] * n, "no scores.reward"),
])
def test_bad_answers_are_clear_errors(answer, match):
    with fake_server(lambda k, body: (200, json.dumps(answer(len(body["prompts"]))).encode())) as (url, calls):
        with pytest.raises(RemoteRewardError, match=match) as e:
            RemoteReward(url, retries=2)(torch.rand(3, 3, 8, 8), ["a", "b", "c"])
        assert url in str(e.value) and len(calls) == 1  # a bad answer is not retried


def test_nonfinite_scores_pass_when_allowed():
    answer = json.dumps({"scores": {"reward": [float("nan"), 2.0]}}).encode()  # (Python writes NaN as JSON's NaN)
    with fake_server(lambda k, body: (200, answer)) as (url, _):
        out = RemoteReward(url, allow_nonfinite=True)(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert torch.isnan(out["reward"][0]) and out["reward"][1] == 2.0


def test_non_json_answer_is_a_clear_error():
    with fake_server(lambda k, body: (200, b"<html>proxy error</html>")) as (url, _):
        with pytest.raises(RemoteRewardError, match="not JSON"):
            RemoteReward(url)(torch.rand(1, 3, 8, 8), ["a"])


def test_5xx_is_retried_with_backoff_then_named():
    def flaky(k, body):
        return (503, b'{"error": "warming up"}') if k <= 2 else (200, _scores(len(body["prompts"])))

    with fake_server(flaky) as (url, calls):
        t0 = time.monotonic()
        out = RemoteReward(url, retries=2, backoff=0.1)(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert time.monotonic() - t0 >= 0.1 + 0.2 - 0.02  # waited backoff, then 2 * backoff
        assert len(calls) == 3 and out["reward"].tolist() == [0.5, 0.5]
    with fake_server(lambda k, body: (500, b'{"error": "CUDA out of memory"}')) as (url, calls):
        with pytest.raises(RemoteRewardError, match=r"no answer after 3 attempt\(s\).*HTTP 500: CUDA out of memory"):
            RemoteReward(url, retries=2, backoff=0.01)(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert len(calls) == 3
    with fake_server(lambda k, body: (400, b'{"error": "prompt 0 is not in the grammar"}')) as (url, calls):
        with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 400\): prompt 0 is not"):
            RemoteReward(url, retries=2, backoff=0.01)(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert len(calls) == 1  # a 4xx is the request's fault: not retried


def test_unreachable_and_slow_servers_are_named():
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(RemoteRewardError, match=rf"{url}/score: no answer after 2 attempt.*ConnectionRefused"):
        RemoteReward(url, retries=1, backoff=0.01)(torch.rand(1, 3, 8, 8), ["a"])

    def slow(k, body):
        time.sleep(0.6)
        return 200, _scores(len(body["prompts"]))

    with fake_server(slow) as (url, calls):
        with pytest.raises(RemoteRewardError, match=r"timeout 0.2 s each.*(timed out|Timeout)"):
            RemoteReward(url, retries=1, backoff=0.01, timeout=0.2)(torch.rand(1, 3, 8, 8), ["a"])
        assert len(calls) == 2


def test_server_reports_bad_requests_and_reward_failures():
    class Broken(Reward):
        def score(self, images, prompts, group_ids):
            raise RuntimeError("the model fell over")

    with serving(ShapesReward()) as url:
        with pytest.raises(RemoteRewardError, match="HTTP 400.*outside the shapes grammar"):
            RemoteReward(url)(torch.rand(1, 3, 32, 32), ["a purple hexagon"])
        req = urllib.request.Request(url + "/score", data=b"{not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and "not JSON" in json.loads(e.value.read())["error"]
    with serving(Broken()) as url:
        with pytest.raises(RemoteRewardError, match="3 attempt.*HTTP 500: RuntimeError: the model fell over"):
            RemoteReward(url, retries=2, backoff=0.01)(torch.rand(1, 3, 8, 8), ["a"])


# ---- training through a served reward ------------------------------------------------------------------

def _config(out, url, **over):
    _, values = get_preset("tiny-sd3-jpeg")
    values.update(num_inference_steps=1, output_dir=str(out), **over)
    if url is not None:
        values.update(reward={"remote": 1.0}, reward_kwargs={"remote": {"url": url, "retries": 1, "backoff": 0.05,
                                                                        "timeout": 30}})
    return load_config(GRPOConfig, base=values)


def _start_server(port):
    proc = subprocess.Popen([sys.executable, "-m", "diffrl", "serve-reward", "--reward", "jpeg_incompressibility",
                             "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    return proc


def test_training_through_the_server_killed_mid_run_and_resumed(tmp_path):
    """Two GRPO epochs through a served JPEG reward equal the in-process run bit for bit; the server killed
    after the first checkpoint makes the second epoch raise the clear error; restarted, --resume finishes
    the run with the uninterrupted run's weights."""
    straight = GRPOTrainer(_config(tmp_path / "local", None, epochs=2), progress=False)
    straight.train()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(port)
    try:
        tr = GRPOTrainer(_config(tmp_path / "remote", url, epochs=2), progress=False)
        assert isinstance(tr.reward_fn, RemoteReward) and tr.reward_fn.url == url
        save = tr.save_state

        def save_then_kill():  # the server dies right after the checkpoint of epoch 1
            path = save()
            proc.kill()
            proc.communicate()
            return path

        tr.save_state = save_then_kill
        with pytest.raises(RemoteRewardError, match=rf"{url}/score: no answer after 2 attempt.*Connection"):
            tr.train()
        assert tr.epoch == 1 and tr.history[0]["reward_mean"] == straight.history[0]["reward_mean"]
        assert latest_checkpoint(tmp_path / "remote" / "checkpoints").name == "epoch-000001"
        proc = _start_server(port)  # the same address again
        resumed = GRPOTrainer(_config(tmp_path / "remote", url, epochs=2), resume=True, progress=False)
        assert resumed.resumed_from == 1
        (rec,) = resumed.train()
        assert rec["reward_mean"] == straight.history[1]["reward_mean"] and rec["loss"] == straight.history[1]["loss"]
        a, b = resumed.trained_weights(), straight.trained_weights()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        proc.kill()
        proc.communicate()


def test_shapes_reward_targets_from_metadata():
    """GenEval-style targets: an image scored against metadata listing its scene's objects equals the score
    against the scene's prompt; free-text prompts then need no grammar. Also through the server."""
    from diffrl.models.shapes import random_scene, render_batch

    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))  # (fresh per test id, from conftest's seed)
    scenes = [random_scene(rng) for _ in range(6)]
    images = render_batch(scenes, seeds=int(torch.randint(1000, ())))
    meta = [{"include": [{"colour": o.colour, "shape": o.shape, "count": o.count} for o in s.objects],
             "relation": s.relation} for s in scenes]
    reward = ShapesReward()
    by_prompt = reward(images, [s.prompt for s in scenes])
    free = [f"a photo, take {i}" for i in range(6)]
    by_meta = reward(images, free, metadata=meta)
    for k in by_prompt:
        assert torch.equal(by_meta[k], by_prompt[k]), k
    # the first group in another colour (one not in the scene): never correct where the prompt's target was
    from diffrl.models.shapes import COLORS

    def recoloured(m):
        used = {o["colour"] for o in m["include"]}
        other = next(c for c in COLORS if c not in used)
        return dict(m, include=[dict(m["include"][0], colour=other)] + m["include"][1:])

    wrong = [recoloured(m) for m in meta]
    off = reward(images, free, metadata=wrong)
    assert by_prompt["correct"].sum() >= 3 and not bool(((off["correct"] == 1) & (by_prompt["correct"] == 1)).any())
    # entries without "include" fall back to the prompt
    mixed = reward(images, [s.prompt for s in scenes], metadata=[None, {"tag": "x"}] + meta[2:])
    assert torch.equal(mixed["reward"], by_prompt["reward"])
    with serving(reward) as url:
        got = RemoteReward(url, max_batch=4)(images, free, metadata=meta)
        assert all(torch.equal(got[k], by_prompt[k]) for k in by_prompt)
    with pytest.raises(ValueError, match="metadata 1: unknown colour 'mauve'"):
        reward(images[:2], free[:2], metadata=[meta[0], {"include": [{"colour": "mauve", "shape": "circle"}]}])
    with pytest.raises(ValueError, match="metadata 0: .*need 'colour' and 'shape'"):
        reward(images[:1], free[:1], metadata=[{"include": [{"count": 2}]}])
