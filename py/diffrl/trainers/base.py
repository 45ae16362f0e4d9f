"""The training loop shared by the trainers: data (a data source) -> updates (an objective's loss).

A trainer kind is a config class, a data source (:mod:`diffrl.trainers.data`: rollouts of the trained
policy, scored and turned into advantages), an objective (:mod:`diffrl.trainers.objectives`: PPO on
the recorded log-probs, NFT's flow matching, ...) and a sampler; how it runs over processes (DDP,
FSDP2, ZeRO) is one object from :mod:`diffrl.trainers.parallel`, chosen from the accelerator.

Determinism and exact resume. Everything random in an epoch comes from generators seeded by
``(config.seed, epoch, rank, ...)``, not from the global RNG: the prompts of the epoch, the sampling
noise of each sampler call, the minibatch shuffle and the trained steps. So an epoch depends only on
the weights, the optimizer state and the tracker state at its start, which is exactly what a
checkpoint holds; a run resumed from the checkpoint of epoch k repeats the uninterrupted run's
epoch k + 1 bit for bit (on the same machine and software). The global RNG states are saved and
restored too, for user code that draws from them.

Epochs are counted from 1: ``epoch-000003`` is the state after 3 epochs, and the metrics record with
``"epoch": 3`` describes the third epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from diffrl.models.loading import load_pipeline  # re-exported: its home was here
from diffrl.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffrl.trainers.config import TrainConfig, config_to_dict
from diffrl.trainers.data import RolloutSource, read_prompts
from diffrl.trainers.kinds import KINDS, kind_of
from diffrl.trainers.metrics import MetricsLog
from diffrl.trainers.objectives import PPOObjective
from diffrl.trainers.parallel import parallel_for, torch_optimizer

__all__ = ["BaseTrainer", "NonFiniteError", "load_pipeline", "DEFAULT_LORA_TARGETS"]

# attention projections: what Flow-GRPO / DDPO adapt, present in both the SD3 transformer and the UNet
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class NonFiniteError(RuntimeError):
    """Raised after ``max_nonfinite`` consecutive epochs with a non-finite reward, loss or gradient."""


def _denoiser_name(pipe) -> str:
    for name in ("transformer", "unet"):
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet to train")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB; process peak RSS


def _available_trackers(names) -> list[str]:
    """The ``log_with`` trackers that are installed; the others are skipped with a warning."""
    import importlib.util  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    out = []
    for name in names:
        if name not in modules:
            raise ValueError(f"config: log_with entries must be tensorboard or wandb, got {name!r}")
        if importlib.util.find_spec(modules[name]) is None:
            warnings.warn(f"log_with: {name} is not installed; logging only to metrics.jsonl", stacklevel=3)
        else:
            out.append(name)
    return out


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def lr_factor(schedule: str, warmup: int, total: int):
    """The multiplier of ``lr`` for the optimizer step after ``s`` steps, as ``LambdaLR`` wants it.

    Warm-up: steps 1..``warmup`` use lr * k / warmup (the first step already moves the weights).
    Then ``linear`` / ``cosine`` fall from 1 to 0 over the remaining ``total - warmup`` steps: the
    last of them still has a small positive lr, and the lr after the run is 0."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"config: lr_scheduler must be constant, linear or cosine, got {schedule!r}")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class BaseTrainer:
    """Subclasses implement ``make_sampler`` and ``compute_advantages`` and may set ``objective_class`` /
    ``data_source_class``; their kind and config class come from :data:`diffrl.trainers.kinds.KINDS`.

    ``pipeline``: a diffusers pipeline to train (default: built from ``config.pretrained``).
    ``reward``: a ``diffrl.rewards`` reward, or any callable ``(images, prompts) -> {"reward": [B]}``
    (default: built from ``config.reward``). ``resume``: continue from the newest checkpoint in
    ``<output_dir>/checkpoints`` (a fresh start when there is none). ``progress``: a tqdm bar.
    """

    config_class = TrainConfig
    kind = ""
    objective_class = PPOObjective
    data_source_class = RolloutSource

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = kind_of(cls)  # declared once, in diffrl.trainers.kinds
        if kind:
            cls.kind, cls.config_class = kind, KINDS[kind].config

    def __init__(self, config: TrainConfig, *, pipeline=None, reward=None, accelerator=None,
                 resume: bool = False, progress: bool = True):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()  # (again: a config's fields may have been changed after it was built)
        self.config = cfg = config
        self.progress = progress
        self.accelerator = acc = self._accelerator(accelerator)
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.parallel = par = parallel_for(acc)
        self._check_batch_split()
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"

        self.prompts = self._load_prompts()  # (and prompt_metadata: one dict or None per prompt, or None)
        self.eval_prompts, self.eval_metadata = read_prompts(cfg.eval_prompts, cfg.eval_prompts_file,
                                                             key="eval_prompts")
        # the global RNG seeds what is initialised here (LoRA weights); resume overwrites them anyway
        torch.manual_seed(cfg.seed)
        # frozen weights in the mixed-precision dtype (half the memory); trained ones stay float32 below
        weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
        with par.build_context():  # (ZeRO-3: only the denoiser is partitioned)
            self.pipe = (pipeline if pipeline is not None
                         else load_pipeline(cfg.pretrained, seed=cfg.seed, dtype=weight_dtype))
        self.pipe.to(self.device)
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        self.denoiser_name = _denoiser_name(self.pipe)
        raw = self._trained_model()
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           weight_decay=cfg.adam_weight_decay, eps=cfg.adam_eps)
        self.model, self.optimizer = par.prepare(raw, self.optimizer, cfg)
        self.raw_model = raw
        # FSDP2 replaced the parameters (same names) by DTensor shards, in the optimizer too
        self.trainable = {n: p for n, p in raw.named_parameters() if p.requires_grad}
        self.reference = par.prepare_reference(self.reference)
        # stepped after each applied optimizer step (so its step count is global_step); the decay's
        # horizon is config.epochs: a run resumed with more epochs stretches the rest of the decay
        self.total_optimizer_steps = cfg.epochs * self._optimizer_steps_per_epoch(self.rank)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            torch_optimizer(self.optimizer),
            lr_factor(cfg.lr_scheduler, cfg.lr_warmup_steps, self.total_optimizer_steps))
        if self.model is not raw and isinstance(self.reference, str):
            # wrapped (DDP, DeepSpeed): the sampler cannot switch the wrapper's adapters off; a module that runs
            # the raw model with its adapters off is the same reference policy
            self.reference = _AdaptersOff(raw)
        # EMA of the trained weights (float32 copies), updated after every optimizer step; under ZeRO-3 of
        # this rank's partitions, under FSDP of its shards
        self.ema = self.copy_weights() if cfg.ema_decay > 0 else None
        # float32 copies of the trained weights that checkpoints keep (by name) and resumes restore
        self.weight_copies: dict[str, dict[str, torch.Tensor]] = {"ema": self.ema} if self.ema is not None else {}
        self.weight_copies.update(self.extra_weight_copies())
        self.reward_fn = reward if reward is not None else self._build_reward()
        self.sampler = self.make_sampler(self.pipe)
        self.objective = self.objective_class(self)
        self.data = self.data_source_class(self)

        self.epoch = 0            # completed epochs
        self.global_step = 0      # optimizer steps
        self.nonfinite_streak = 0
        self.history: list[dict] = []
        self.last_batch: dict | None = None
        resumed_from = None
        if resume:
            ckpt = latest_checkpoint(self.ckpt_dir)
            if ckpt is not None:
                self.load_state(ckpt)
                resumed_from = self.epoch
        self.resumed_from = resumed_from
        self.metrics = (MetricsLog(self.output_dir / "metrics.jsonl", resume_after_epoch=resumed_from)
                        if acc.is_main_process else None)

    def _accelerator(self, accelerator):
        """``accelerator``, or one built from the config (CPU or the GPU, mixed precision, trackers)."""
        if accelerator is not None:
            return accelerator
        cfg = self.config
        from accelerate import Accelerator  # noqa: PLC0415
        from accelerate.state import AcceleratorState  # noqa: PLC0415

        cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        # accelerate keeps one process-wide state and refuses a second Accelerator with other
        # settings; a later trainer in the same process (tests, notebooks) re-creates it
        shared = AcceleratorState._shared_state
        if shared and (str(shared.get("_mixed_precision", cfg.mixed_precision)) != cfg.mixed_precision
                       or (cpu and shared.get("device") is not None and shared["device"].type != "cpu")):
            AcceleratorState._reset_state()
        trackers = _available_trackers(cfg.log_with)
        accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, log_with=trackers or None,
                                  project_dir=str(cfg.output_dir))
        if trackers:
            accelerator.init_trackers("diffrl", config={k: v for k, v in config_to_dict(cfg).items()
                                                        if isinstance(v, (int, float, str, bool))})
        return accelerator

    def _check_batch_split(self) -> None:
        """The ranks must make the same collective calls: the same number of optimizer steps (every
        gradient all-reduce), and under FSDP2 / ZeRO-3 the same number of model calls."""
        cfg = self.config
        if self.parallel.partitioned and cfg.prompts_per_epoch % self.world:
            raise ValueError(f"under {self.parallel.name} prompts_per_epoch ({cfg.prompts_per_epoch}) "
                             f"must be a multiple of the number of processes ({self.world})")
        steps = {self._optimizer_steps_per_epoch(r) for r in range(self.world)}
        if len(steps) > 1:  # DDP: every rank must join every gradient all-reduce, or the run hangs
            raise ValueError(f"prompts_per_epoch={cfg.prompts_per_epoch} over {self.world} processes gives the ranks "
                             f"different numbers of optimizer steps per epoch {sorted(steps)}; use a multiple of "
                             f"{self.world}")

    def _trained_model(self) -> torch.nn.Module:
        """The pipeline's denoiser made trainable (LoRA adapters, or all of it), everything else frozen;
        sets ``trainable`` and ``reference`` (the KL reference policy, when the objective needs one)."""
        cfg = self.config
        # freeze every component (text encoders, VAE, the denoiser's base weights); only the
        # adapters (or, for full fine-tuning, the denoiser) are switched back on below
        for comp in self.pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                comp.requires_grad_(False)
        raw = getattr(self.pipe, self.denoiser_name)
        needs_reference = self.objective_class.needs_reference(cfg)
        self.reference: Any = None
        if cfg.use_lora:
            from peft import LoraConfig  # noqa: PLC0415

            targets = list(cfg.lora_target_modules) or DEFAULT_LORA_TARGETS
            raw.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                       target_modules=targets))
            if needs_reference:
                from diffrl.samplers import DISABLE_ADAPTERS  # noqa: PLC0415

                self.reference = DISABLE_ADAPTERS  # the base weights are the reference policy
        else:
            if needs_reference:  # full fine-tuning: a frozen copy of the initial weights is the reference
                # (under ZeRO-3 a whole copy on every process: only the trained model is partitioned)
                self.reference = copy.deepcopy(raw).requires_grad_(False).eval()
            raw.requires_grad_(True)
            if any(p.dtype != torch.float32 for p in raw.parameters()):  # (diffusers warns on a no-op .to)
                raw.to(torch.float32)  # float32 master weights; autocast runs the compute in half precision
        if cfg.gradient_checkpointing and hasattr(raw, "enable_gradient_checkpointing"):
            raw.enable_gradient_checkpointing()
        # eval mode throughout: the log-probs recomputed for the loss must be those of sampling
        # (dropout would make the first PPO ratio differ from 1)
        raw.eval()
        self.trainable = {n: p for n, p in raw.named_parameters() if p.requires_grad}
        for p in self.trainable.values():  # adapters on a half-precision base are made in its dtype
            p.data = p.data.float()
        if not self.trainable:
            raise ValueError("nothing to train: no LoRA target module matched "
                             f"{list(cfg.lora_target_modules) or DEFAULT_LORA_TARGETS} in the {self.denoiser_name}")
        return raw

    # ---- hooks -------------------------------------------------------------------------------

    def make_sampler(self, pipe):
        raise NotImplementedError

    def sampling_window(self, epoch: int):
        """The ``sde_steps`` of ``epoch``'s rollouts (``"default"``: the sampler's own)."""
        return "default"

    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor, prompts: list[str],
                           heads: dict | None = None, rollout=None) -> torch.Tensor:
        """This rank's advantages [B] from this rank's rewards [B] (gathering across ranks inside); ``heads``:
        every head the reward returned, per sample; ``rollout``: the batch (its images, for a pairwise reward)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def extra_weight_copies(self) -> dict[str, dict[str, torch.Tensor]]:
        """A trainer's own named copies of the trained weights (from :meth:`copy_weights`), made before a
        resume so that checkpoints keep and restore them like the EMA."""
        return {}

    def load_extra_state(self, states: dict) -> None:
        pass

    # ---- setup helpers -----------------------------------------------------------------------

    def _load_prompts(self) -> list[str]:
        cfg = self.config
        prompts, self.prompt_metadata = read_prompts(cfg.prompts, cfg.prompts_file)
        if not prompts:
            raise ValueError("config: no training prompts (set prompts or prompts_file)")
        return prompts

    def _optimizer_steps_per_epoch(self, rank: int) -> int:
        """Optimizer steps of one epoch on ``rank`` (when no update is skipped), as train_epoch takes them:
        per PPO epoch, the rank's samples in minibatches of train_batch_size, every
        gradient_accumulation_steps of them (and the last, shorter group) one step."""
        cfg = self.config
        samples = len(range(rank, cfg.prompts_per_epoch, self.world)) * cfg.group_size
        minibatches = math.ceil(samples / cfg.train_batch_size)
        return cfg.inner_epochs * math.ceil(minibatches / cfg.gradient_accumulation_steps)

    def _build_reward(self):
        from diffrl.trainers.rewards_factory import build_rewards  # noqa: PLC0415

        reward = build_rewards(self.config.reward, self.config.reward_kwargs)
        if isinstance(reward, torch.nn.Module):  # the reward is frozen, like the rest of the pipeline
            reward.requires_grad_(False).eval().to(self.device)
        return reward

    # ---- one epoch -----------------------------------------------------------------------------

    def _generator(self, *keys: int) -> torch.Generator:
        """A CPU generator seeded by the run seed and ``keys`` (epoch, rank, purpose, ...)."""
        seed = self.config.seed
        for k in keys:
            seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def train_epoch(self, epoch: int, batch, advantages: torch.Tensor) -> dict[str, float]:
        """Inner epochs of minibatch updates over the batch (the loss: ``self.objective``); returns
        the mean stats, the number of applied and skipped (non-finite) optimizer steps."""
        cfg, obj, par = self.config, self.objective, self.parallel
        state = obj.prepare(epoch, batch, advantages)
        n_terms = obj.terms(state)
        sums: dict[str, float] = {}
        count = 0
        nonfinite = 0
        micro = 0  # minibatches accumulated into the pending optimizer step
        bad_pending = False
        for inner in range(cfg.inner_epochs):
            batches = obj.order(state, inner).split(cfg.train_batch_size)
            for b, idx in enumerate(batches):
                sub = batch[idx]
                last_micro = (micro + 1 == cfg.gradient_accumulation_steps) or b == len(batches) - 1
                # minibatches of this optimizer step: the step's gradient is their mean, also for a
                # last group shorter than gradient_accumulation_steps (not down-weighted)
                group = min(cfg.gradient_accumulation_steps, len(batches) - (b - micro))
                for j in range(n_terms):
                    sync = last_micro and j == n_terms - 1  # the last pass of the optimizer step
                    with par.accumulating(self.model, sync), self.accelerator.autocast():
                        loss, stats = obj.loss(state, sub, idx, j)
                    # backward even when non-finite: under DDP every rank must join the gradient
                    # all-reduce; the update is skipped below on every rank alike
                    par.backward(self.model, loss / (n_terms * group), sync=sync, finite=_finite(loss))
                    if not _finite(loss):
                        bad_pending = True
                        continue
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                micro += 1
                if last_micro:
                    bad_pending, grad_norm = par.step(self.model, list(self.trainable.values()), cfg.max_grad_norm,
                                                      bad_pending)
                    if bad_pending:  # skip the update: the weights stay those of the last good step
                        nonfinite += 1
                    else:
                        self.optimizer.step()  # (a no-op under DeepSpeed: the engine has stepped)
                        self.lr_scheduler.step()  # not on a skipped update: the schedule counts applied steps
                        self.global_step += 1
                        self._update_ema()
                        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                        sums["_updates"] = sums.get("_updates", 0.0) + 1
                    self.optimizer.zero_grad(set_to_none=True)
                    micro, bad_pending = 0, False
        upd = sums.pop("_updates", 0.0)
        res = {k: v / max(count, 1) for k, v in sums.items() if k != "grad_norm"}
        if upd:
            res["grad_norm"] = sums["grad_norm"] / upd
        res["skipped_updates"] = nonfinite
        res["optimizer_steps"] = int(upd)
        return res

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.config.ema_decay
        for n, p in self.trainable.items():
            self.ema[n].mul_(d).add_(self.parallel.local(p).detach().float(), alpha=1 - d)

    def copy_weights(self) -> dict[str, torch.Tensor]:
        """A float32 copy of this rank's parts of the trained weights (ZeRO-3: partitions; FSDP: shards)."""
        return {n: self.parallel.local(p).detach().float().clone() for n, p in self.trainable.items()}

    def ema_weights(self):
        """The EMA of the trained weights in place of the trained ones for the duration of the block
        (evaluation, export); the trained weights are put back after it. Needs ``ema_decay > 0``."""
        if self.ema is None:
            raise ValueError("ema_weights() needs a run with ema_decay > 0")
        return self.weights_of(self.ema)

    def sampling_weights(self):
        """The weights the rollouts are sampled with, for the block (default: the trained ones, as they are)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def weights_of(self, copy: dict[str, torch.Tensor]):
        """``copy`` (from :meth:`copy_weights`) in place of the trained weights for the block; the trained
        weights are put back after it."""
        local = self.parallel.local
        saved = {n: local(p).detach().clone() for n, p in self.trainable.items()}
        try:
            self._reshard()
            with torch.no_grad():
                for n, p in self.trainable.items():
                    local(p).copy_(copy[n].to(p.dtype))
            yield self
        finally:
            self._reshard()
            with torch.no_grad():
                for n, p in self.trainable.items():
                    local(p).copy_(saved[n])

    def _reshard(self) -> None:
        """Before this rank's parts of the trained model are written in place (EMA swap, resume)."""
        self.parallel.reshard(self.raw_model)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Epoch ``epoch`` (1-based): the data source's batch and advantages, then the objective's updates;
        returns its metrics record."""
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        lr = self.lr_scheduler.get_last_lr()[0]  # of the epoch's first step
        data = self.data.collect(epoch)
        t1 = time.perf_counter()
        rec: dict[str, Any] = {"epoch": epoch, "lr": lr, **data.record}
        if data.advantages is not None:
            rec.update(self.train_epoch(epoch, data.batch, data.advantages))
        else:  # no update from this batch (e.g. non-finite rewards: their advantages mean nothing)
            rec["skipped_updates"] = 1
            rec["optimizer_steps"] = 0
        t2 = time.perf_counter()
        rec["nonfinite"] = data.advantages is None or rec.get("skipped_updates", 0) > 0 or \
            not math.isfinite(rec.get("loss", 0.0))
        rec.update(global_step=self.global_step, time_train=t2 - t1, time_epoch=t2 - t0,
                   peak_memory_mb=_peak_memory_mb(self.device))
        return rec

    # ---- the run --------------------------------------------------------------------------------

    def train(self, epochs: int | None = None) -> list[dict]:
        """Train until ``epochs`` (default ``config.epochs``) epochs are complete; returns the records
        of the epochs run now. Raises :class:`NonFiniteError` after ``max_nonfinite`` bad epochs in a row."""
        cfg = self.config
        total = cfg.epochs if epochs is None else epochs
        budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else None
        t_start = time.perf_counter()
        bar = self._progress_bar(total, budget)
        records = []
        try:
            while self.epoch < total:
                if budget is not None and time.perf_counter() - t_start >= budget:
                    break
                epoch = self.epoch + 1
                rec = self.run_epoch(epoch)
                self.epoch = epoch
                self.nonfinite_streak = self.nonfinite_streak + 1 if rec["nonfinite"] else 0
                if cfg.eval_every and self.eval_prompts and epoch % cfg.eval_every == 0:
                    rec.update(self.evaluate(epoch))  # (before the record is written: it holds eval/reward)
                if self.metrics is not None:
                    self.metrics.write(rec)
                    if self.accelerator.trackers:  # TensorBoard / W&B: the numeric entries
                        self.accelerator.log({k: float(v) for k, v in rec.items() if isinstance(v, (int, float))
                                              and k != "epoch"}, step=epoch)
                records.append(rec)
                self.history.append(rec)
                if bar is not None:
                    if budget is None:
                        bar.update(1)
                    else:  # seconds, to the budget or to the expected end of the epochs
                        elapsed = time.perf_counter() - t_start
                        bar.total = min(budget, elapsed + elapsed / len(records) * (total - self.epoch))
                        bar.update(min(bar.total, elapsed) - bar.n)
                    bar.set_postfix(epoch=epoch, reward=f"{rec.get('reward_mean', float('nan')):.4g}",
                                    loss=f"{rec.get('loss', float('nan')):.3g}")
                if self.nonfinite_streak >= cfg.max_nonfinite:
                    last = latest_checkpoint(self.ckpt_dir)
                    raise NonFiniteError(
                        f"stopping after {self.nonfinite_streak} consecutive epochs with a non-finite reward, loss "
                        f"or gradient (max_nonfinite={cfg.max_nonfinite}); their updates were skipped. Last good "
                        f"checkpoint: {last if last is not None else 'none'}. Lower lr, check the reward, or "
                        "raise max_nonfinite.")
                # a non-finite epoch is not checkpointed: the last good checkpoint stays the newest
                if not rec["nonfinite"] and cfg.save_every and epoch % cfg.save_every == 0:
                    self.save_state()
        finally:
            if bar is not None:
                bar.close()
        return records

    def _progress_bar(self, total: int, budget: float | None):
        """A tqdm bar on the main process (None elsewhere, or without ``progress``): epochs, or with a time
        budget seconds (to the budget or to the expected end of the epochs)."""
        if not (self.progress and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm  # noqa: PLC0415

        name = self.kind or "train"
        if budget is None:
            return tqdm(total=total, initial=min(self.epoch, total), desc=f"{name} epochs", dynamic_ncols=True)
        return tqdm(total=round(budget), desc=f"{name} (<= {budget / 60:g} min)", unit="s", dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}")

    # ---- state -----------------------------------------------------------------------------------

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name (LoRA parameters, or the denoiser's state dict).

        Under FSDP / ZeRO-3 they are gathered from the shards, a collective that every rank must join;
        the main process gets the full tensors (on the CPU), the other ranks an empty dict."""
        src = self.trainable if self.config.use_lora else self.raw_model.state_dict(keep_vars=True)
        return self.parallel.whole(src)

    def save_state(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        path = None
        main = self.accelerator.is_main_process
        if main or self.parallel.collective_checkpoint:  # (FSDP / ZeRO: every rank joins the gathers)
            weights = self.trained_weights()
            optimizer = self.parallel.optimizer_state(self.optimizer, list(self.trainable.values()))
            copies = {k: self.parallel.whole(c, params=self.trainable) for k, c in self.weight_copies.items()}
        if main:
            states = {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler.state_dict(), **self.extra_state(),
                      **copies}
            meta = {"global_step": self.global_step, "nonfinite_streak": self.nonfinite_streak, "trainer": self.kind,
                    "use_lora": self.config.use_lora, "config": config_to_dict(self.config)}
            path = save_checkpoint(self.ckpt_dir, self.epoch, weights=weights, states=states,
                                   meta=meta, keep_last=self.config.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def load_state(self, path) -> None:
        ck = load_checkpoint(path)
        meta = ck["meta"]
        if meta.get("use_lora", self.config.use_lora) != self.config.use_lora:
            raise ValueError(f"{path}: checkpoint has use_lora={meta.get('use_lora')}, "
                             f"config has {self.config.use_lora}")
        self._reshard()
        target = self.trainable if self.config.use_lora else self.raw_model.state_dict(keep_vars=True)
        missing = set(target) - set(ck["weights"])
        extra = set(ck["weights"]) - set(target)
        if missing or extra:
            raise ValueError(f"{path}: checkpoint weights do not match the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}); was it written with another lora_rank / targets?")
        # this rank's parts of the whole tensors (FSDP: shards; ZeRO: partitions and its float32 master copy)
        self.parallel.load_weights(target, ck["weights"])
        self.parallel.load_optimizer_state(self.optimizer, list(self.trainable.values()), ck["states"]["optimizer"])
        if "lr_scheduler" in ck["states"]:
            self.lr_scheduler.load_state_dict(ck["states"]["lr_scheduler"])
        elif self.config.lr_scheduler != "constant" or self.config.lr_warmup_steps:
            raise ValueError(f"{path}: checkpoint has no LR scheduler state (written before schedules were "
                             f"saved), config has lr_scheduler={self.config.lr_scheduler!r}; resume it with "
                             "lr_scheduler=constant and lr_warmup_steps=0")
        self.load_extra_state(ck["states"])
        for key, copy in self.weight_copies.items():
            if key not in ck["states"]:
                what = "ema_decay > 0" if key == "ema" else f"a {key!r} weight copy"
                raise ValueError(f"{path}: config has {what} but the checkpoint has no {key!r} weights")
            for n, t in ck["states"][key].items():
                copy[n].copy_(self.parallel.cut(t, self.trainable[n], copy[n]))
        self.epoch = int(meta["epoch"])
        self.global_step = int(meta.get("global_step", 0))
        self.nonfinite_streak = int(meta.get("nonfinite_streak", 0))

    # ---- image grids -----------------------------------------------------------------------------

    def evaluate(self, epoch: int) -> dict[str, float]:
        """The held-out evaluation of ``epoch`` (:mod:`diffrl.trainers.evaluation`): grid and ``eval/*`` metrics."""
        from diffrl.trainers.evaluation import evaluate_policy  # noqa: PLC0415

        return evaluate_policy(self, epoch)

    def save_grid(self, epoch: int, images: torch.Tensor | None = None) -> Path | None:
        """One image per eval prompt as ``<output_dir>/grids/epoch-NNNNNN.png`` (a video: its frames side by
        side): ``images`` [N, 3, (F,) H, W], or sampled here with the training sampler from the same noise."""
        if not self.accelerator.is_main_process and not self.parallel.partitioned:  # (FSDP, ZeRO-3: all ranks join)
            return None
        from PIL import Image  # noqa: PLC0415

        cfg = self.config
        if images is None:
            with torch.no_grad(), self.accelerator.autocast():
                images = self.sampler.sample(list(self.eval_prompts), num_images_per_prompt=1,
                                             num_inference_steps=cfg.num_inference_steps,
                                             guidance_scale=cfg.guidance_scale, height=cfg.resolution,
                                             width=cfg.resolution, generator=torch.Generator().manual_seed(cfg.seed)
                                             ).images
        if not self.accelerator.is_main_process:
            return None
        if images.dim() == 5:  # videos [B, 3, F, H, W]: the frames in a row, [B, 3, H, F W]
            b, c, f, h, w = images.shape
            images = images.permute(0, 1, 3, 2, 4).reshape(b, c, h, f * w)
        imgs = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        n = len(imgs)
        cols = min(n, 4)
        rows = (n + cols - 1) // cols
        h, w = imgs.shape[1:3]
        grid = Image.new("RGB", (cols * w, rows * h))
        for i, im in enumerate(imgs):
            grid.paste(Image.fromarray(im), ((i % cols) * w, (i // cols) * h))
        path = self.output_dir / "grids" / f"epoch-{epoch:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path


class _AdaptersOff(torch.nn.Module):
    """``model`` with its peft adapters switched off for the duration of each call (the KL
    reference of a LoRA run whose trained model is wrapped by DDP)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    @property
    def dtype(self):
        return self.inner.dtype

    def forward(self, *args, **kwargs):
        from diffrl.samplers.lora import adapters_disabled  # noqa: PLC0415

        with adapters_disabled(self.inner):
            return self.inner(*args, **kwargs)
