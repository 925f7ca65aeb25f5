"""Feature extraction throughput on a GPU with Whisper large-v3 *dimensions* (random
weights: the timing does not depend on the values), bf16, padded and trimmed modes.

    python benchmarks/gpu_features_large_v3.py [--clips 1024] [--batch-size 32] [--dtype bfloat16]
    python benchmarks/gpu_features_large_v3.py --dims tiny-random --device cpu --dtype float32 --clips 16  # smoke

Reports, per mode: end-to-end utterances/s of models.features.featurize (log-mel on the
GPU, encoder, 4x mean-pool, copy to host as float16), and encoder-only utterances/s with
model FLOPs utilisation, MFU = encoder FLOPs / time / peak dense bf16 FLOP/s of the card.
Encoder FLOPs per clip (forward, multiply-add = 2): conv1 2*3*n_mels*d*T_mel,
conv2 2*3*d*d*T, and per layer 24*T*d^2 (q, k, v, out projections and the 4d MLP)
+ 4*T^2*d (scores and weighted sum), with T = T_mel / 2 encoder positions."""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from clips import load_clips, seconds
from models import features as Fe

PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100 NVL": 835.0e12, "H100": 989.4e12, "A100": 312.0e12,
             "L40S": 362.1e12}  # dense, no sparsity; vendor data sheets


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():  # ordered: "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


def encoder_flops(dims: dict, t_mel: int) -> float:
    d, m, layers = dims["n_audio_state"], dims["n_mels"], dims["n_audio_layer"]
    t = math.ceil(t_mel / 2)
    return 2 * 3 * m * d * t_mel + 2 * 3 * d * d * t + layers * (24 * t * d * d + 4 * t * t * d)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="large-v3", choices=sorted(Fe.ENCODER_DIMS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--clips", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--modes", default="padded,trimmed")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the card's peak (TFLOP/s)")
    args = ap.parse_args()
    device = torch.device(args.device)
    ids, waves, what = load_clips(args.clips)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    dims = Fe.ENCODER_DIMS[args.dims]
    t0 = time.perf_counter()
    encoder = Fe.random_encoder(dims, seed=0).to(device=device, dtype=getattr(torch, args.dtype))
    print(f"device {name}; encoder {args.dims} dims {dims}, {sum(p.numel() for p in encoder.parameters()) / 1e6:.0f}M "
          f"params, {args.dtype}, built in {time.perf_counter() - t0:.1f} s; clips: {what}, {seconds(waves):.0f} s audio; "
          f"peak {peak / 1e12 if peak else float('nan'):.1f} TFLOP/s")
    out = {"device": name, "dims": args.dims, "dtype": args.dtype, "clips": len(waves), "batch_size": args.batch_size,
           "torch": torch.__version__, "peak_tflops": peak / 1e12 if peak else None}
    for mode in args.modes.split(","):
        recipe = Fe.make_recipe("large-v3" if args.dims == "large-v3" else "tiny-random", mode=mode,
                                compute_dtype=args.dtype)
        Fe.featurize(recipe, waves[:args.batch_size], ids[:args.batch_size], encoder, args.batch_size, device)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        Fe.featurize(recipe, waves, ids, encoder, args.batch_size, device)
        sync(device)
        e2e = time.perf_counter() - t0
        # encoder alone, on mels prepared beforehand, batched the way featurize batches them
        with torch.inference_mode():
            mels = [Fe._mel(torch.from_numpy(w).to(device), recipe) for w in waves]
            groups: dict[int, list[int]] = {}
            for i, m in enumerate(mels):
                groups.setdefault(m.shape[-1], []).append(i)
            batches = [torch.stack([mels[i] for i in idx[s:s + args.batch_size]]).to(encoder.conv1.weight.dtype)
                       for _, idx in sorted(groups.items()) for s in range(0, len(idx), args.batch_size)]
            flops = sum(encoder_flops(dims, b.shape[-1]) * b.shape[0] for b in batches)
            run = (lambda x: encoder(x)) if mode == "padded" else (lambda x: Fe.encode(encoder, x))
            run(batches[0])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            for b in batches:
                run(b)
            sync(device)
            enc = time.perf_counter() - t0
        r = {"end_to_end_s": round(e2e, 3), "end_to_end_utt_per_s": round(len(waves) / e2e, 1),
             "encoder_s": round(enc, 3), "encoder_utt_per_s": round(len(waves) / enc, 1),
             "encoder_tflop": round(flops / 1e12, 2), "achieved_tflops": round(flops / enc / 1e12, 3),
             "mfu": round(flops / enc / peak, 3) if peak else None, "batches": len(batches)}
        if device.type == "cuda":
            r["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        out[mode] = r
        print(f"{mode:8s} end-to-end {r['end_to_end_utt_per_s']:8.1f} utt/s | encoder {r['encoder_utt_per_s']:8.1f} utt/s, "
              f"{r['achieved_tflops']} TFLOP/s, MFU {r['mfu']}")
    if "padded" in out and "trimmed" in out:
        out["encoder_speedup_trimmed"] = round(out["padded"]["encoder_s"] / out["trimmed"]["encoder_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
