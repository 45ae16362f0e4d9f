"""GRPO epoch time with and without ``overlap_scoring``, on a reward that takes as long as sampling.

The model is the tiny random-weight SD3 pipeline (``tiny:sd3``, 32 px, 4 SDE steps); one epoch is 4
prompts x 2 images in 4 sampler calls (``sample_batch_size=2``). A warm-up epoch with the JPEG reward
measures the sampling time per image; the benchmark's reward then sleeps that long per image before
returning the JPEG score (a stand-in for a remote reward model whose request is in flight: sleeping
releases the GIL, as a socket wait does). Without overlap an epoch is sample + reward + train; with it
each call's images are scored while the next call samples, so at best one call's reward remains.

``python -m bench.bench_overlap`` (about 20 s on 2 CPU cores) or ``python -m bench.run --ops overlap``.
"""

from __future__ import annotations

import statistics
import tempfile
import time

OP = "overlap"


class SleepyJpeg:
    """JPEG incompressibility after sleeping ``per_image`` seconds per image."""

    def __init__(self, per_image: float):
        from diffrl.rewards import JpegIncompressibility  # noqa: PLC0415

        self.inner, self.per_image = JpegIncompressibility(), per_image
        self.heads = self.inner.heads

    def __call__(self, images, prompts):
        time.sleep(self.per_image * len(prompts))
        return self.inner(images, prompts)


def _config(out_dir: str, epochs: int, overlap: bool):
    from diffrl.trainers import GRPOConfig  # noqa: PLC0415

    return GRPOConfig(pretrained="tiny:sd3", prompts=[f"object {i}" for i in range(8)],
                      resolution=32, num_inference_steps=4, guidance_scale=4.5, epochs=epochs, prompts_per_epoch=4,
                      group_size=2, sample_batch_size=2, train_batch_size=4, lora_rank=4, lora_alpha=8,
                      save_every=0, output_dir=out_dir, device="cpu", overlap_scoring=overlap)


def run(ctx) -> list[dict]:
    from diffrl.trainers import GRPOTrainer  # noqa: PLC0415

    epochs = 2 if ctx.quick else 4
    with tempfile.TemporaryDirectory() as out:
        warm = GRPOTrainer(_config(out, 1, False), progress=False)
        warm.run_epoch(1)  # (allocator and first-call costs)
        rec = warm.run_epoch(2)
        per_image = rec["time_sample"] / rec["samples"]
        ctx.log(f"  sampling: {rec['time_sample']:.3f} s for {rec['samples']} images; the reward sleeps "
                f"{per_image * 1e3:.1f} ms per image")
        rows = []
        for overlap in (False, True):
            tr = GRPOTrainer(_config(out, epochs, overlap), reward=SleepyJpeg(per_image), progress=False)
            recs = [tr.run_epoch(e) for e in range(1, epochs + 1)]
            med = {k: statistics.median(r[k] for r in recs) for k in ("time_epoch", "time_sample", "time_reward",
                                                                       "time_train")}
            ctx.log(f"  overlap_scoring={overlap}: epoch {med['time_epoch']:.3f} s (sample {med['time_sample']:.3f}, "
                    f"reward wait {med['time_reward']:.3f}, train {med['time_train']:.3f}), median of {epochs}")
            rows.append({"case": "tiny-sd3-32px", "overlap_scoring": overlap, "images": recs[0]["samples"],
                         "sampler_calls": 4, "reward_sleep_ms_per_image": round(per_image * 1e3, 2),
                         "epoch_s": round(med["time_epoch"], 3), "sample_s": round(med["time_sample"], 3),
                         "reward_wait_s": round(med["time_reward"], 3), "train_s": round(med["time_train"], 3),
                         "epochs": epochs})
    rows[1]["speedup"] = round(rows[0]["epoch_s"] / rows[1]["epoch_s"], 2)
    return rows


if __name__ == "__main__":
    import argparse
    from types import SimpleNamespace

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 epochs per setting instead of 4")
    args = ap.parse_args()
    for row in run(SimpleNamespace(quick=args.quick, log=print)):
        print(row)
