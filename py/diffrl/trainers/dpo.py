"""``DPOTrainer``: Diffusion-DPO (Wallace et al. 2023) on preference pairs of images.

Each pair is a prompt with a preferred image (w) and a rejected one (l), as clean latents ``x0``.
A training step draws one timestep and one noise per pair, the same for w and l (as the paper), noises
both latents, runs the trained model and the frozen reference (the base weights: LoRA adapters off,
or a frozen copy under full fine-tuning) on both, and calls the fused ``diffrl.ops.diffusion_dpo_loss``:

    e(pred, target) = mean over the latent's elements of (pred - target)^2
    z    = -dpo_beta / 2 * ((e(policy_w) - e(ref_w)) - (e(policy_l) - e(ref_l)))
    loss = mean over pairs of -log sigmoid(z)

Noising and targets follow the model's training objective:

* UNet (DDIM) families: ``t`` uniform over the scheduler's ``num_train_timesteps``,
  ``x_t = sqrt(A_t) x0 + sqrt(1 - A_t) eps``; the target is ``eps`` (``prediction_type: epsilon``),
  ``sqrt(A_t) eps - sqrt(1 - A_t) x0`` (``v_prediction``) or ``x0`` (``sample``);
* flow-matching families (SD3, FLUX, the shapes model): ``sigma`` logit-normal (``sigmoid(N(0, 1))``,
  SD3's training density), ``x_t = (1 - sigma) x0 + sigma eps``, target the velocity ``eps - x0``, the
  model's timestep ``sigma * num_train_timesteps``.

The model is trained on the conditional prediction (no classifier-free guidance in the loss).

Data (``dpo_data``): ``online`` samples the trained model (``prompts_per_epoch`` prompts x ``group_size``
images, deterministic DDIM / ODE sampling), scores the images with the reward and pairs the best and the
worst image of each group; a group whose images all score alike gives a pair of weight 0 (so every rank
still takes the same number of optimizer steps). ``offline`` draws ``prompts_per_epoch`` pairs per epoch
from ``dpo_dataset`` in the Pick-a-Pic layout (:func:`load_pairs`), encodes the images with the
pipeline's VAE (``Adapter.encode_images``) and the captions with its text encoders.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from diffrl.trainers.base import BaseTrainer
from diffrl.trainers.data import EpochData, RolloutSource
from diffrl.trainers.objectives import Objective

__all__ = ["DPOTrainer", "DPOObjective", "PreferencePairs", "OnlinePairs", "OfflinePairs", "PairRecord", "load_pairs",
           "best_and_worst"]


# ----------------------------------------------------------------------------------------------
# the batch


@dataclass
class PreferencePairs:
    """A batch of preference pairs (dim 0: the pair, ``N``)."""

    latents_w: torch.Tensor            # [N, ...] clean latents of the preferred images (the loop's layout)
    latents_l: torch.Tensor            # [N, ...] of the rejected images
    weights: torch.Tensor              # [N] float32: each pair's weight in the loss (0: no preference)
    cond: dict[str, torch.Tensor]      # prompt embeddings by model keyword, one row per distinct prompt
    embed_index: torch.Tensor          # [N] int64: the row of each pair's prompt
    shared: dict                       # model inputs common to every pair (FLUX's ids)
    prompts: list[str]

    _PER_PAIR = ("latents_w", "latents_l", "weights", "embed_index")

    def __len__(self) -> int:
        return self.latents_w.shape[0]

    def __getitem__(self, idx) -> PreferencePairs:
        """The pairs at ``idx`` (an integer tensor or list); the embedding table is shared, not copied."""
        t = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
        kw = {n: getattr(self, n)[t.to(getattr(self, n).device)] for n in self._PER_PAIR}
        return replace(self, prompts=[self.prompts[i] for i in t.tolist()], **kw)

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The prompt embeddings of each pair, ``{name: [N, ...]}``."""
        return {k: v[self.embed_index.to(v.device)] for k, v in self.cond.items()}


def best_and_worst(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per group (in order of first appearance): the index of its best and of its worst sample (the
    first of equal ones), and the pair's weight, 1, or 0 when the two rewards are equal."""
    r, g = rewards.detach().double().cpu(), group_ids.long().cpu()
    best, worst, weight = [], [], []
    seen: dict[int, list[int]] = {}
    for i, gid in enumerate(g.tolist()):
        seen.setdefault(gid, []).append(i)
    for members in seen.values():
        vals = r[members]
        b, w = members[int(vals.argmax())], members[int(vals.argmin())]
        best.append(b)
        worst.append(w)
        weight.append(1.0 if r[b] > r[w] else 0.0)
    return torch.tensor(best), torch.tensor(worst), torch.tensor(weight, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# data sources


class OnlinePairs(RolloutSource):
    """Rollouts of the trained model, ranked by the reward: the best vs the worst image of each group."""

    def collect(self, epoch: int) -> EpochData:
        from diffrl.distributed import gather_rewards  # noqa: PLC0415

        tr = self.trainer
        t0 = time.perf_counter()
        rollout = self.sample(epoch)
        t1 = time.perf_counter()
        heads = self.score(rollout)
        rewards = heads["reward"].to(tr.device)
        t2 = time.perf_counter()
        gids = rollout.group_ids.to(tr.device)
        all_rewards = gather_rewards(rewards, gids)[0]
        rec: dict[str, Any] = {"reward_mean": float(all_rewards.mean()),
                               "reward_std": float(all_rewards.std(unbiased=False)),
                               "time_sample": t1 - t0, "time_reward": t2 - t1, "samples": len(all_rewards)}
        if not bool(torch.isfinite(all_rewards).all()):  # a ranking of non-finite rewards means nothing
            return EpochData(None, None, rec)
        best, worst, weights = best_and_worst(rewards, gids)
        x0 = rollout.final_latents
        dev = x0.device
        pairs = PreferencePairs(latents_w=x0[best.to(dev)], latents_l=x0[worst.to(dev)], weights=weights.to(dev),
                                cond=rollout.cond, embed_index=rollout.embed_index[best.to(rollout.embed_index.device)],
                                shared=rollout.shared, prompts=[rollout.prompts[i] for i in best.tolist()])
        gap = (rewards.cpu()[best] - rewards.cpu()[worst]).double()
        rec.update(pairs=len(pairs), pair_reward_gap=float(gap.mean()), tied_pairs=int((weights == 0).sum()))
        tr.last_batch = {"rewards": rewards.detach().cpu(), "group_ids": rollout.group_ids.cpu(), "best": best,
                         "worst": worst, "weights": weights, "prompts": list(rollout.prompts)}
        return EpochData(pairs, weights.to(dev), rec)


@dataclass(frozen=True)
class PairRecord:
    """One preference pair of a dataset: the caption and the two images (encoded bytes or a file)."""

    caption: str
    preferred: bytes | Path
    rejected: bytes | Path


PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def _image_field(value, root: Path | None):
    """An image column's value as bytes or a path: bytes (parquet), a dict with 'bytes' / 'path' (the
    Hugging Face Image feature), or a file name relative to the dataset folder (metadata.jsonl)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value:
        p = Path(value)
        return p if p.is_absolute() or root is None else root / p
    raise ValueError(f"an image column must hold image bytes or a file name, got {type(value).__name__}")


def _records(rows, root: Path | None, where: str) -> list[PairRecord]:
    out = []
    for n, row in enumerate(rows):
        missing = [c for c in PICKAPIC_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"{where}: row {n} has no column(s) {missing}; the Pick-a-Pic layout has "
                             f"{', '.join(PICKAPIC_COLUMNS)}")
        label = float(row["label_0"])
        if label == 0.5:  # a tie: no preference to learn from (dropped, as the official training does)
            continue
        if label not in (0.0, 1.0):
            raise ValueError(f"{where}: row {n} has label_0 = {label}; expected 1 (jpg_0 preferred), 0 (jpg_1) "
                             "or 0.5 (tie)")
        a, b = _image_field(row["jpg_0"], root), _image_field(row["jpg_1"], root)
        out.append(PairRecord(str(row["caption"]), a if label == 1.0 else b, b if label == 1.0 else a))
    return out


def load_pairs(path: str | Path) -> list[PairRecord]:
    """The preference pairs of a dataset in the Pick-a-Pic (v2) layout, ties (``label_0 == 0.5``) dropped.

    ``path``: a folder with ``metadata.jsonl`` (one JSON object per line with ``caption``, ``jpg_0``,
    ``jpg_1`` -- image file names relative to the folder -- and ``label_0``), or a ``.parquet`` file or
    a folder of them with the columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes) and
    ``label_0`` (1.0: jpg_0 is preferred, 0.0: jpg_1, 0.5: tie), as the published shards are (reading
    parquet needs pyarrow)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dpo_dataset {str(p)!r} does not exist")
    if p.is_dir() and (p / "metadata.jsonl").is_file():
        meta = p / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        records = _records(rows, p, str(meta))
    else:
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        if not files or any(f.suffix != ".parquet" for f in files):
            raise ValueError(f"dpo_dataset {str(p)!r}: expected a folder with metadata.jsonl or parquet files, "
                             "or a .parquet file (the Pick-a-Pic layout)")
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415
        except ImportError as exc:
            raise ImportError("reading a parquet dpo_dataset needs pyarrow (pip install pyarrow); a folder with "
                              "metadata.jsonl and image files needs nothing") from exc
        records = []
        for f in files:
            table = pq.read_table(f, columns=[c for c in PICKAPIC_COLUMNS])
            records += _records(table.to_pylist(), f.parent, str(f))
    if not records:
        raise ValueError(f"dpo_dataset {str(p)!r} has no pair with a preference (every label_0 is 0.5, or no rows)")
    return records


def load_image(src: bytes | Path, size: int) -> torch.Tensor:
    """``[3, size, size]`` float32 in [0, 1]: the image resized (shorter side to ``size``, bicubic)
    and centre-cropped."""
    from PIL import Image  # noqa: PLC0415

    im = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3).permute(2, 0, 1) / 255.0


class OfflinePairs:
    """``prompts_per_epoch`` pairs per epoch drawn (with replacement, seeded by the epoch) from ``dpo_dataset``,
    split over the ranks; images encoded by the pipeline's VAE, captions by its text encoders."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.config = trainer.config
        self.records = load_pairs(self.config.dpo_dataset)

    def collect(self, epoch: int) -> EpochData:
        tr, cfg = self.trainer, self.config
        t0 = time.perf_counter()
        n = cfg.prompts_per_epoch
        draw = torch.randint(len(self.records), (n,), generator=tr._generator(epoch, 0)).tolist()
        rows = [self.records[draw[i]] for i in range(tr.rank, n, tr.world)]
        ad = tr.sampler.adapter
        size = cfg.resolution
        with torch.no_grad():
            lat_w = ad.encode_images(torch.stack([load_image(r.preferred, size) for r in rows]))
            lat_l = ad.encode_images(torch.stack([load_image(r.rejected, size) for r in rows]))
            distinct = list(dict.fromkeys(r.caption for r in rows))
            cond, _, shared = ad.encode(distinct, None, False, ad.check_options({}), size, size)
        dev = lat_w.device
        index = torch.tensor([distinct.index(r.caption) for r in rows], dtype=torch.long, device=dev)
        weights = torch.ones(len(rows), dtype=torch.float32, device=dev)
        pairs = PreferencePairs(lat_w, lat_l, weights, cond, index, shared, [r.caption for r in rows])
        rec = {"pairs": n, "time_data": time.perf_counter() - t0}
        return EpochData(pairs, weights, rec)


# ----------------------------------------------------------------------------------------------
# the objective


class DPOObjective(Objective):
    """The Diffusion-DPO loss on noised preference pairs (the maths is in :mod:`diffrl.trainers.dpo`)."""

    keep_final_latents = True  # the online pairs are the sampled latents

    @classmethod
    def needs_reference(cls, config) -> bool:
        return True

    def __init__(self, trainer):
        super().__init__(trainer)
        kind = trainer.sampler.adapter.kind
        sched = trainer.pipe.scheduler
        self.kind = kind
        self.num_train = int(getattr(sched, "config", {}).get("num_train_timesteps", 1000))
        if kind == "ddim":
            self.prediction_type = sched.config.get("prediction_type", "epsilon")
            if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(f"DPOTrainer: unknown prediction_type {self.prediction_type!r} of "
                                 f"{type(sched).__name__}")
            self.alphas_cumprod = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
        else:
            self.prediction_type = "flow"

    def prepare(self, epoch, batch, advantages):
        """Per inner epoch: an order of the pairs, a timestep and a noise draw per pair (shared by w and l)."""
        tr = self.trainer
        gen = tr._generator(epoch, 2, tr.rank)
        N = len(batch)
        shape = batch.latents_w.shape
        plan = []
        for _ in range(self.config.inner_epochs):
            perm = torch.randperm(N, generator=gen)
            if self.kind == "ddim":
                t = torch.randint(0, self.num_train, (N,), generator=gen)
            else:
                t = torch.sigmoid(torch.randn(N, generator=gen, dtype=torch.float64))
            eps = torch.randn(shape, generator=gen)
            plan.append({"perm": perm, "t": t, "eps": eps})
        return {"plan": plan, "weights": advantages.float()}

    def order(self, state, inner):
        state["inner"] = inner  # the loop asks for an inner epoch's order before its minibatches' losses
        return state["plan"][inner]["perm"]

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
        """``(x_t, target, model timestep)`` for clean latents ``x0`` [N, ...], noise ``eps`` and draws ``t`` [N]."""
        view = (-1,) + (1,) * (x0.dim() - 1)
        if self.kind == "ddim":
            a = self.alphas_cumprod[t].to(x0.device, torch.float32).view(view)
            sa, sb = a.sqrt(), (1 - a).sqrt()
            x_t = sa * x0 + sb * eps
            target = {"epsilon": eps, "v_prediction": sa * eps - sb * x0, "sample": x0}[self.prediction_type]
            return x_t, target, t.to(x0.device)
        sigma = t.to(x0.device, torch.float32)
        s = sigma.view(view)
        return (1 - s) * x0 + s * eps, eps - x0, sigma * self.num_train

    def tensors(self, state, sub: PreferencePairs, idx: torch.Tensor):
        """The op's inputs for minibatch ``sub = batch[idx]``: ``(policy_w, policy_l, ref_w, ref_l, target_w,
        target_l, weights)``, the policy's with gradients."""
        tr = self.trainer
        p = state["plan"][state["inner"]]
        x_w, x_l = sub.latents_w.float(), sub.latents_l.float()
        eps = p["eps"][idx].to(x_w.device)
        t = p["t"][idx]
        xt_w, tgt_w, tm = self.noised(x_w, eps, t)
        xt_l, tgt_l, _ = self.noised(x_l, eps, t)
        emb = {k: torch.cat([v, v]) for k, v in sub.embeddings().items()}
        x = torch.cat([xt_w, xt_l])
        tt = torch.cat([tm, tm])
        pred = tr.sampler.predict(x, tt, emb, sub.shared, model=tr.model)[0]
        with torch.no_grad():
            ref = tr.reference
            if isinstance(ref, str):  # the trained model with its LoRA adapters off
                from diffrl.samplers.lora import adapters_disabled  # noqa: PLC0415

                with adapters_disabled(tr.model):
                    ref_pred = tr.sampler.predict(x, tt, emb, sub.shared, model=tr.model)[0]
            else:
                ref_pred = tr.sampler.predict(x, tt, emb, sub.shared, model=ref)[0]
        pw, pl = pred.chunk(2)
        rw, rl = ref_pred.chunk(2)
        return pw, pl, rw, rl, tgt_w, tgt_l, state["weights"][idx.to(state["weights"].device)]

    def loss(self, state, sub, idx, term):
        from diffrl.ops import diffusion_dpo_loss  # noqa: PLC0415

        pw, pl, rw, rl, tw, tl, w = self.tensors(state, sub, idx)
        loss, stats = diffusion_dpo_loss(pw, pl, rw, rl, tw, tl, beta=self.config.dpo_beta, weights=w)
        return loss, {f"dpo_{k}": v for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------
# the trainer


class DPOTrainer(BaseTrainer):
    """Diffusion-DPO (kind ``dpo``, diffrl.trainers.kinds) on any family: UNet (epsilon / v prediction) or
    flow matching. Online pairs (the reward ranks the trained model's own samples) or offline pairs
    (a dataset in the Pick-a-Pic layout), by ``dpo_data``."""

    objective_class = DPOObjective

    def __init__(self, config, **kwargs):
        self.data_source_class = OnlinePairs if getattr(config, "dpo_data", "online") == "online" else OfflinePairs
        super().__init__(config, **kwargs)

    def make_sampler(self, pipe):
        from diffrl.samplers import DDIMSampler, FlowSDESampler  # noqa: PLC0415
        from diffrl.samplers.families import get_adapter  # noqa: PLC0415

        # deterministic sampling (online pairs, image grids): DPO needs no log-probs
        if get_adapter(pipe).kind == "ddim":
            return DDIMSampler(pipe, eta=0.0)
        return FlowSDESampler(pipe, noise_level=0.0)

    def compute_advantages(self, rewards, group_ids, prompts, heads=None, rollout=None):
        raise NotImplementedError("DPOTrainer trains on preference pairs (OnlinePairs / OfflinePairs), not advantages")

    def _optimizer_steps_per_epoch(self, rank: int) -> int:
        """One pair per prompt (online: the best and the worst image of its group; offline: a drawn pair)."""
        import math  # noqa: PLC0415

        cfg = self.config
        pairs = len(range(rank, cfg.prompts_per_epoch, self.world))
        return cfg.inner_epochs * math.ceil(math.ceil(pairs / cfg.train_batch_size) / cfg.gradient_accumulation_steps)
