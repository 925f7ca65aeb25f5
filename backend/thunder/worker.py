"""One rank of a Thunder run: ``python -m backend.thunder.worker --config RUN_DIR/attemptK.json``,
started on every host by ``mlx.launch --backend ring``.

It trains a LoRA adapter with mlx-lm's own training loop (``mlx_lm.lora.train_model``) and
reports through a ``TrainingCallback`` that appends JSON lines to
``RUN_DIR/metrics.rank<R>.jsonl`` on its host; mlx-lm's console UI is not read by anything.
Each line: ``{"kind", "rank", "attempt", "time", "iteration", ...}`` with kind one of
start, loaded, train (train_loss, learning_rate, iterations_per_second, tokens_per_second,
trained_tokens, peak_memory), val (val_loss, val_time), done, error.

Rank 0 saves the adapter (adapters.safetensors, adapter_config.json, and a checkpoint every
``save_every`` iterations) in the attempt's adapter directory. Iterations are global: a
resumed attempt starts counting at the checkpoint it resumed from.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

# Nothing heavy at module level: the pid file and the "start" line are written before mlx-lm
# (and transformers) are imported, so the monitor sees a rank as soon as it runs.


class JsonlLog:
    """Appends one JSON object per report to ``path`` (flushed and fsync'd, so a tail on
    another machine sees whole lines as soon as they are written)."""

    def __init__(self, path: Path, rank: int, attempt: int, start_iteration: int = 0):
        self.path = Path(path)
        self.rank = rank
        self.attempt = attempt
        self.start = start_iteration
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, **fields) -> None:
        line = {"kind": kind, "rank": self.rank, "attempt": self.attempt, "time": time.time(), **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())


def training_callback(log: JsonlLog):
    """mlx-lm's ``TrainingCallback`` writing train and val reports (iterations made global)."""
    from mlx_lm.tuner.callbacks import TrainingCallback

    class JsonlCallback(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            log.emit("train", **{**info, "iteration": log.start + int(info["iteration"])})

        def on_val_loss_report(self, info: dict) -> None:
            log.emit("val", **{**info, "iteration": log.start + int(info["iteration"])})

    return JsonlCallback()


def lora_args(cfg: dict, world_size: int, adapter_dir: str) -> SimpleNamespace:
    """mlx-lm's LoRA arguments (its defaults overridden by the run's shape)."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    t = cfg["train"]
    args = {**CONFIG_DEFAULTS}
    args.update({
        "model": cfg["model"], "data": cfg["data"], "train": True, "test": False, "fine_tune_type": "lora",
        "optimizer": "adam", "seed": t["seed"], "num_layers": t["num_layers"],
        # mlx-lm's batch is global and split across ranks; the config's is per rank.
        "batch_size": t["batch_size"] * world_size,
        "iters": cfg["iters"], "val_batches": t["val_batches"], "learning_rate": t["learning_rate"],
        "steps_per_report": t["steps_per_report"], "steps_per_eval": t["steps_per_eval"],
        "save_every": t["save_every"], "max_seq_length": t["max_seq_length"],
        "grad_checkpoint": t["grad_checkpoint"], "mask_prompt": t["mask_prompt"],
        "lora_parameters": {"rank": t["lora_rank"], "dropout": t["lora_dropout"], "scale": t["lora_scale"]},
        "resume_adapter_file": cfg.get("resume_adapter_file"), "adapter_path": adapter_dir,
        "report_to": None,
    })
    return SimpleNamespace(**args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="attempt JSON written by `nko-ops thunder launch`")
    opts = ap.parse_args(argv)
    cfg = json.loads(Path(opts.config).read_text(encoding="utf-8"))

    # mlx.launch tells each rank its rank; use it before the ring is up (joining the ring
    # waits for every peer, and a rank stuck there must still be findable and stoppable).
    rank = int(os.environ.get("MLX_RANK", "0"))
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")
    start = cfg.get("start_iteration", 0)
    rep = JsonlLog(run_dir / f"metrics.rank{rank}.jsonl", rank, cfg["attempt"], start)
    rep.emit("start", host=socket.gethostname(), pid=os.getpid(), iteration=start)
    try:
        import mlx.core as mx

        world = mx.distributed.init(strict=cfg["world_size"] > 1)
        if (world.rank(), world.size()) != (rank, cfg["world_size"]):
            raise RuntimeError(f"ring says rank {world.rank()} of {world.size()}; expected rank {rank} "
                               f"of {cfg['world_size']}")
        size = world.size()
        for field in ("model", "data"):
            if not Path(cfg[field]).is_dir():
                # mlx-lm would take a missing local path for a hub id and try to download it
                raise FileNotFoundError(f"{field} directory not found on {socket.gethostname()}: {cfg[field]}")
        from mlx_lm.lora import train_model
        from mlx_lm.tuner.datasets import load_dataset
        from mlx_lm.utils import load

        # Only rank 0's adapter directory gets weights; the others hold mlx-lm's config copy.
        adapter_dir = cfg["adapter_dir"] if rank == 0 else str(run_dir / f"rank{rank}-scratch")
        args = lora_args(cfg, size, adapter_dir)
        model, tokenizer = load(cfg["model"])
        train_set, valid_set, _ = load_dataset(args, tokenizer)
        rep.emit("loaded", train=len(train_set), valid=len(valid_set), world_size=size, iteration=start)
        train_model(args, model, train_set, valid_set, training_callback=training_callback(rep))
        rep.emit("done", iteration=start + cfg["iters"],
                 adapter_dir=adapter_dir if rank == 0 else None)
        return 0
    except BaseException as e:
        rep.emit("error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        raise


if __name__ == "__main__":
    sys.exit(main())
