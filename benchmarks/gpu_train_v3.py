"""Full-size V3 training throughput on one GPU, and what an epoch and a run would cost.

    python benchmarks/gpu_train_v3.py                      # H100/H200: bf16 autocast, both modes
    python benchmarks/gpu_train_v3.py --mode trajectory --batch 32 --frames 375 --steps 50
    python benchmarks/gpu_train_v3.py --device cpu --preset tiny --steps 2   # code-path smoke test

Runs the trainer's own step (models.model.CTCModel, AdamW, grad clip, bf16 autocast, CTC
loss in fp32) on synthetic features shaped like the program's: 375 frames x 1280 dims per
clip (Whisper-large-v3 encoder output mean-pooled 1500 -> 375), labels of ``--label-len``
characters. Reports steps/s, input frames ("tokens") per second, model FLOPs utilisation
(analytic FLOPs: 3 x forward matmuls and attention, against the card's dense bf16 peak),
and forecasts: one epoch over 232,476 clips (plus a validation pass over 29,060 clips at
the measured forward speed) and a run of ``--epochs`` epochs, in hours and in dollars at
``--price`` per GPU-hour. Data loading is not included (features come from the feature
store's memory-mapped shards; see store_epoch_read.py).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from models.model import CTCModel, make_dims, output_lengths

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s.
PEAKS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "A100": 312.0, "L40S": 362.0,
         "RTX 4090": 165.2}
TRAIN_CLIPS, VAL_CLIPS = 232_476, 29_060


def peak_tflops(name: str) -> float | None:
    for key, value in PEAKS.items():
        if all(part.lower() in name.lower() for part in key.split()):
            return value
    return None


def forward_flops(dims, batch: int, frames: int) -> float:
    """Matmul + attention FLOPs of one forward pass (2 per multiply-add)."""
    t = int(output_lengths(torch.tensor([frames]), dims))
    d, ff = dims.d_model, dims.d_ff
    per_clip = (frames * dims.n_input * d + t * d * d * dims.conv_kernel
                + dims.n_layers * (t * (4 * d * d + 2 * d * ff) + 2 * t * t * d)
                + t * d * dims.n_vocab)
    return 2.0 * per_clip * batch


def measure(args, mode: str, device: torch.device) -> dict:
    dims = make_dims(args.preset, n_input=args.dim)
    torch.manual_seed(0)
    model = CTCModel(dims, trajectory=mode == "trajectory").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    x = torch.randn(args.batch, args.frames, args.dim, device=device)
    n = torch.full((args.batch,), args.frames, device=device)
    t_out = int(output_lengths(torch.tensor([args.frames]), dims))
    label_len = min(args.label_len, t_out)
    y = torch.randint(1, dims.n_vocab, (args.batch * label_len,), device=device)
    yl = torch.full((args.batch,), label_len, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                  enabled=False)

    def step():
        with amp:
            o = model(x, n)
            lp = o.logits.float().log_softmax(-1).transpose(0, 1)
            loss = (F.ctc_loss(lp, y, o.lengths, yl, reduction="none", zero_infinity=True) / yl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    train_s = (time.perf_counter() - t0) / args.steps

    model.eval()
    with torch.no_grad():
        for _ in range(2):
            with amp:
                model(x, n)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            with amp:
                model(x, n)
        sync()
        fwd_s = (time.perf_counter() - t0) / args.steps

    flops = 3 * forward_flops(dims, args.batch, args.frames)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name)
    steps_per_epoch = -(-TRAIN_CLIPS // args.batch)
    epoch_s = steps_per_epoch * train_s + -(-VAL_CLIPS // args.batch) * fwd_s
    run_h = args.epochs * epoch_s / 3600
    return {
        "mode": mode, "device": name, "params": model.num_params(), "batch": args.batch, "frames": args.frames,
        "encoder_frames": t_out, "label_len": label_len, "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "steps_per_s": 1 / train_s, "tokens_per_s": args.batch * args.frames / train_s,
        "encoder_tokens_per_s": args.batch * t_out / train_s,
        "achieved_tflops": flops / train_s / 1e12, "peak_tflops": peak,
        "mfu": flops / train_s / 1e12 / peak if peak else None,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "epoch_forecast_h": epoch_s / 3600, "run_epochs": args.epochs, "run_forecast_h": run_h,
        "run_cost_usd": run_h * args.price, "price_per_h": args.price,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["baseline", "trajectory", "both"], default="both")
    ap.add_argument("--preset", default="v3")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--frames", type=int, default=375)
    ap.add_argument("--label-len", type=int, default=60)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=46, help="epochs per run for the forecast (Paper 4 stopped at 46)")
    ap.add_argument("--price", type=float, default=0.60, help="$ per GPU-hour")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    modes = ["baseline", "trajectory"] if args.mode == "both" else [args.mode]
    print(json.dumps([measure(args, m, device) for m in modes], indent=1))


if __name__ == "__main__":
    main()
