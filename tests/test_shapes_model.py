"""The shapes base model: tokenizer, text encoder, pixel-space DiT, ShapesPipeline save/load and sampling."""

import random
from pathlib import Path

import pytest
import torch

from diffrl.models.shapes import parse_prompt, random_prompt
from diffrl.models.shapes_model import (ShapesDiT, ShapesPipeline, ShapesTextEncoder, ShapesTokenizer, build_pipeline,
                                        default_vocab)

PACKAGED = Path(__file__).resolve().parents[1] / "py" / "diffrl" / "models" / "shapes_base"


def _tiny(patch_size=8):
    """A tiny pipeline with random (not zero-initialised) weights, so outputs depend on every parameter."""
    pipe = build_pipeline(dim=32, num_layers=2, num_heads=2, text_dim=32, text_layers=1, patch_size=patch_size)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (pipe.text_encoder, pipe.transformer):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pipe


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    pipe = _tiny()
    folder = tmp_path_factory.mktemp("shapes_tiny")
    pipe.save_pretrained(folder)
    return pipe, folder


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_padding():
    tok = ShapesTokenizer()
    rng = random.Random(0)
    prompts = [random_prompt(rng) for _ in range(200)]
    out = tok(prompts)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (200, tok.max_length) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.bos_token_id).all()
    for p, row, m in zip(prompts, ids, mask):
        assert tok.decode(row) == p
        n = len(p.split()) + 1
        assert m.sum() == n and m[:n].all()
        assert (row[n:] == tok.pad_token_id).all()
    assert (ids != tok.unk_token_id).all()  # the vocabulary covers the grammar


def test_tokenizer_edge_cases(tmp_path):
    tok = ShapesTokenizer(max_length=5)
    e = tok(["", "A Red  Circle.", "a red hexagon", "a red circle and a blue square"])
    assert e["input_ids"][0].tolist() == [1, 0, 0, 0, 0] and e["attention_mask"][0].tolist() == [1, 0, 0, 0, 0]
    assert tok.decode(e["input_ids"][1]) == "a red circle"
    assert e["input_ids"][2, 3] == tok.unk_token_id
    assert e["attention_mask"][3].all()  # truncated to max_length
    assert tok(["a red circle"])["input_ids"].shape == (1, 5)
    tok.save_pretrained(tmp_path)
    tok2 = ShapesTokenizer.from_pretrained(tmp_path)
    assert tok2.vocab == tok.vocab and tok2.max_length == 5
    assert not list(tmp_path.glob("*.safetensors"))  # no weights, config only
    assert default_vocab()[:3] == ["<pad>", "<bos>", "<unk>"]
    with pytest.raises(ValueError):
        ShapesTokenizer(vocab=["a", "b", "c"])


# ---------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("patch_size", [4, 8])
def test_forward_shapes(patch_size):
    pipe = _tiny(patch_size)
    tok = pipe.tokenizer(["a red circle", "", "two blue squares and a green triangle"])
    hidden, pooled = pipe.text_encoder(tok["input_ids"], tok["attention_mask"])
    assert hidden.shape == (3, 12, 32) and pooled.shape == (3, 32)
    x = torch.randn(3, 3, 32, 32)
    v = pipe.transformer(x, torch.tensor([0.0, 500.0, 1000.0]), hidden, pooled, tok["attention_mask"])
    assert v.shape == x.shape and torch.isfinite(v).all()
    v_scalar = pipe.transformer(x, torch.tensor(500.0), hidden, pooled, tok["attention_mask"])
    v_vec = pipe.transformer(x, torch.full((3,), 500.0), hidden, pooled, tok["attention_mask"])
    torch.testing.assert_close(v_scalar, v_vec)
    (v_tuple,) = pipe.transformer(x, 500.0, hidden, pooled, tok["attention_mask"], return_dict=False)
    torch.testing.assert_close(v_tuple, v_vec)
    assert pipe.default_sample_size == 32 and pipe.vae_scale_factor == 1
    # padded tokens are masked out: changing their ids does not change the output
    ids2 = tok["input_ids"].clone()
    ids2[tok["attention_mask"] == 0] = 5
    h2, p2 = pipe.text_encoder(ids2, tok["attention_mask"])
    torch.testing.assert_close(h2[tok["attention_mask"].bool()], hidden[tok["attention_mask"].bool()])
    torch.testing.assert_close(p2, pooled)


def test_fresh_dit_predicts_zero():
    # adaLN-Zero + zero output projection: training starts from v = 0
    dit = ShapesDiT(dim=32, num_layers=1, num_heads=2, text_dim=32)
    v = dit(torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0]), torch.randn(2, 12, 32), torch.randn(2, 32))
    assert v.abs().max() == 0


def test_models_save_load_round_trip(tmp_path):
    pipe = _tiny()
    pipe.text_encoder.save_pretrained(tmp_path / "te")
    pipe.transformer.save_pretrained(tmp_path / "dit")
    assert (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").exists()
    te = ShapesTextEncoder.from_pretrained(tmp_path / "te")
    dit = ShapesDiT.from_pretrained(tmp_path / "dit")
    tok = pipe.tokenizer(["a red circle above a green square"])
    with torch.no_grad():
        a = pipe.text_encoder(tok["input_ids"], tok["attention_mask"])
        b = te(tok["input_ids"], tok["attention_mask"])
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        x = torch.randn(1, 3, 32, 32)
        # weights are bit-identical; outputs may differ in the last bits (kernel choice depends on layout)
        for k, w in pipe.transformer.state_dict().items():
            assert torch.equal(w, dit.state_dict()[k]), k
        torch.testing.assert_close(pipe.transformer(x, 300.0, *a, tok["attention_mask"]),
                                   dit(x, 300.0, *b, tok["attention_mask"]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- pipeline


def test_pipeline_offline_round_trip(saved_tiny):
    pipe, folder = saved_tiny
    loaded = ShapesPipeline.from_pretrained(folder, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.tokenizer, ShapesTokenizer) and isinstance(loaded.transformer, ShapesDiT)
    prompts = ["a red circle", "two blue squares"]
    kw = dict(num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0, return_dict=False)
    a = pipe(prompts, generator=torch.Generator().manual_seed(7), **kw)
    b = loaded(prompts, generator=torch.Generator().manual_seed(7), **kw)
    c = loaded(prompts, generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # same weights, possibly other kernels
    again = loaded(prompts, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(again, b)  # same generator -> same images
    assert not torch.equal(a, c)
    np_imgs = loaded("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                     output_type="np").images
    assert np_imgs.shape == (1, 32, 32, 3)
    pil = loaded("a red circle", num_inference_steps=2, output_type="pil").images
    assert pil[0].size == (32, 32)
    with pytest.raises(ValueError):
        loaded("a red circle", num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="32x32"):
        loaded("a red circle", num_inference_steps=2, height=64, width=64)
    assert loaded("a red circle", num_inference_steps=2, height=32, width=32).images.shape == (1, 3, 32, 32)


def test_pipeline_helpers(saved_tiny):
    pipe, _ = saved_tiny
    cond, uncond = pipe.encode_prompt(["a red circle", "a blue square"], True, num_images_per_prompt=3)
    assert cond["encoder_hidden_states"].shape == (6, 12, 32) and cond["pooled_projections"].shape == (6, 32)
    assert (uncond["encoder_attention_mask"].sum(1) == 1).all()  # null prompt = <bos> only
    cond1, none = pipe.encode_prompt("a red circle", False)
    assert none is None and cond1["pooled_projections"].shape == (1, 32)
    _, neg = pipe.encode_prompt(["a red circle"], True, negative_prompt="a blue square")
    assert neg["encoder_attention_mask"].sum() == 4
    assert pipe.latents_shape(5) == (5, 3, 32, 32)
    lat = pipe.prepare_latents(2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lat, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(pipe.decode(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    # CFG on the concatenated batch = uncond + w (cond - uncond), evaluated separately
    cond, uncond = pipe.encode_prompt(["a red circle", "a blue square"], True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([700.0, 700.0])
    with torch.no_grad():
        v = pipe.predict_velocity(x, t, cond, uncond, guidance_scale=4.0)
        vc = pipe.transformer(hidden_states=x, timestep=t, **cond)
        vu = pipe.transformer(hidden_states=x, timestep=t, **uncond)
    torch.testing.assert_close(v, vu + 4.0 * (vc - vu), rtol=1e-4, atol=1e-5)


def test_pipeline_flow_convention(saved_tiny, monkeypatch):
    """timestep = 1000 sigma and v = eps - x0: an oracle velocity (x_t - x0) / sigma lands exactly on x0."""
    pipe, _ = saved_tiny
    target = torch.rand(1, 3, 32, 32) * 2 - 1

    def oracle(hidden_states, timestep, **kw):
        sigma = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000
        return (hidden_states - target) / sigma

    monkeypatch.setattr(pipe.transformer, "forward", oracle)
    img = pipe("a red circle", num_inference_steps=5, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
               return_dict=False)
    torch.testing.assert_close(img, (target + 1) / 2, rtol=0, atol=1e-5)


@pytest.mark.skipif(not (PACKAGED / "model_index.json").exists(), reason="packaged shapes_base not trained yet")
def test_packaged_model_loads_and_samples():
    pipe = ShapesPipeline.from_pretrained(PACKAGED, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    n_bytes = sum(f.stat().st_size for f in PACKAGED.rglob("*.safetensors"))
    assert n_bytes <= 20 * 2**20
    imgs = pipe(["a red circle", "two blue squares"], num_inference_steps=4, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0)).images
    assert imgs.shape == (2, 3, 32, 32) and imgs.min() >= 0 and imgs.max() <= 1


def test_evaluate_seed_sets_match_single_image_evaluations():
    """``evaluate(images_per_prompt=K)``: seed set 0 is the one-image evaluation, set k the same prompts
    from seeds i + SEED_SET_STRIDE * k, and the metrics are the reward's means over all K * N images."""
    from diffrl.models.shapes_eval import SEED_SET_STRIDE, evaluate
    from diffrl.rewards import ShapesReward

    pipe = _tiny()
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(random.randrange(2**31))
    prompts = [random_prompt(rng) for _ in range(5)]  # odd size, split over batches of 2
    reward = ShapesReward()
    res1, img1 = evaluate(pipe, prompts, reward, steps=3, batch=2)
    res3, img3 = evaluate(pipe, prompts, reward, images_per_prompt=3, steps=3, batch=2)
    assert img1.shape == (5, 3, 32, 32) and img3.shape == (15, 3, 32, 32)
    torch.testing.assert_close(img3[:5], img1)
    for k in (1, 2):  # set k: each image from its own seed, whatever the batch
        for i in (0, 4):
            one = pipe([prompts[i]], num_inference_steps=3, guidance_scale=4.0,
                       generator=[torch.Generator().manual_seed(i + SEED_SET_STRIDE * k)]).images.float()
            torch.testing.assert_close(img3[5 * k + i], one[0], atol=1e-5, rtol=1e-5)
    scored = reward(img3, prompts * 3)
    for h in reward.heads:
        assert res3[h] == pytest.approx(scored[h].mean().item(), abs=1e-6)
    assert res3["accuracy"] == res3["correct"]
    assert res3["accuracy_per_seed_set"] == pytest.approx(scored["correct"].view(3, 5).mean(1).tolist())
    assert res1["accuracy_per_seed_set"] == pytest.approx([res1["accuracy"]])
    rel = [j for j, p in enumerate(prompts * 3) if parse_prompt(p).relation is not None]
    if rel:
        assert res3["relation_on_relation_prompts"] == pytest.approx(scored["relation"][rel].mean().item())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="images_per_prompt"):
            evaluate(pipe, prompts, reward, images_per_prompt=bad)
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(pipe, [], reward)
