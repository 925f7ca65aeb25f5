"""Train one run and write its bundle (CONTRACTS §3–§4).

    train(cfg) -> run directory

``_train`` reads in one sitting, split the way icefall's recipes are: ``make_plan`` (batches
and schedule), ``setup`` (seeded model, optimiser, RNG, resume), then per epoch
``train_one_epoch`` (``compute_loss`` per batch), ``validation_loss`` and ``end_epoch``
(early stopping, ``best.pt``, metrics, ``save_checkpoint``), then ``finish`` (decode the test
set, write the bundle: models/bundle.py names its files and rows). The loop is nanoGPT's:
AdamW (decay on matrices only), linear warmup then cosine per step, grad clipping,
SpecAugment-style masks, validation CTC loss after every epoch, early stopping with
patience, ``best.pt`` on improvement and ``last.pt`` after every epoch. ``last.pt`` holds model, optimiser, step/epoch counters, early-stopping state,
the RNG states and the byte offsets of ``train.log``/``metrics.jsonl``; resuming truncates
the logs to those offsets and continues, so on CPU a run killed at any point after epoch k
and resumed ends exactly like an uninterrupted one. Batches are fixed length-sorted
buckets whose order is reshuffled each epoch from (seed, epoch).

On CUDA the forward pass runs under bf16 autocast (CTC loss in fp32). With ``WORLD_SIZE>1``
(torchrun) the model is wrapped in DDP, each rank takes every WORLD_SIZE-th batch,
validation is all-reduced, and rank 0 alone writes files and decodes the test set.

A run directory is complete iff ``manifest.json`` exists; it is written last, right after
``results.json`` says "complete". A failure writes ``error.json`` (and keeps the logs and
checkpoints), never a manifest, and turns an existing results.json to "failed".
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.bundle import BUNDLE_FILES, MANIFEST, METRICS_BY_PARTITION, PREDICTIONS, REFERENCES, jsonl_bytes
from models.config import RunConfig
from models.data import RunData, collate, make_batches, padding_waste, prepare, spec_augment
from models.decode import DEFAULT_POLICY, decode_utterances, load_policy, metrics_by_partition, policy_sha256
from models.files import atomic_write_bytes, atomic_write_json, sha256_file
from models.errors import NkoOpsError
from models.model import CTCModel, Dims
from models.trajectory import tar_loss

TAR_DEFINITION = ("L = L_CTC + tar.weight * mean_t ||A(h_t) - sg(z_{t+1})||^2/7 + tar.smooth_weight * "
                  "mean_t ||h_{t+1} - h_t||^2/d_model; h = final encoder states, z = trajectory scalars of h, "
                  "A = linear anticipation head (models/trajectory.py)")


class RunError(NkoOpsError, RuntimeError):
    pass


# ---------------------------------------------------------------- small helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device: {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``base`` to ``base * min_ratio``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=1)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


class Logs:
    """train.log / run.log (human) and metrics.jsonl (machine); rank 0 only."""

    def __init__(self, out: Path, enabled: bool = True, echo: bool = True):
        self.out, self.enabled, self.echo = out, enabled, echo
        self._files = {}
        if enabled:
            for name in ("train.log", "run.log", "metrics.jsonl"):
                self._files[name] = open(out / name, "a", encoding="utf-8")

    def _line(self, name: str, text: str) -> None:
        if not self.enabled:
            return
        f = self._files[name]
        f.write(text + "\n")
        f.flush()

    def run(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self._line("run.log", line)
        if self.echo and self.enabled:
            print(line, file=sys.stderr, flush=True)

    def train(self, msg: str) -> None:
        self._line("train.log", msg)
        if self.echo and self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def metric(self, record: dict) -> None:
        self._line("metrics.jsonl", json.dumps({**record, "time": round(time.time(), 3)}))

    def offsets(self) -> dict:
        return {n: self._files[n].tell() for n in ("train.log", "metrics.jsonl")} if self.enabled else {}

    def truncate(self, offsets: dict) -> None:
        for name, pos in offsets.items():
            if name in self._files:
                self._files[name].close()
                with open(self.out / name, "r+b") as f:
                    f.truncate(pos)
                self._files[name] = open(self.out / name, "a", encoding="utf-8")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files, self.enabled = {}, False


def build_model(dims: Dims, mode: str) -> CTCModel:
    return CTCModel(dims, trajectory=mode in ("trajectory", "ttt"), anticipation=mode == "tar")


def load_model(path: Path, device: torch.device) -> tuple[CTCModel, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(Dims(**ckpt["dims"]), ckpt["mode"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def ctc_losses(logits: torch.Tensor, out_lengths: torch.Tensor, labels: torch.Tensor,
               label_lengths: torch.Tensor) -> torch.Tensor:
    """Per-utterance CTC loss divided by label length (fp32)."""
    lp = logits.float().log_softmax(-1).transpose(0, 1)
    loss = F.ctc_loss(lp, labels, out_lengths, label_lengths, blank=0, reduction="none", zero_infinity=True)
    return loss / label_lengths.clamp_min(1).to(loss.dtype)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def validation_loss(model: CTCModel, data: RunData, utts, batches, device: torch.device, world: int,
                    rank: int) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for idx in batches[rank::world]:
        x, n, y, yl = collate(data.store, utts, idx)
        with _autocast(device):
            out = model(x.to(device), n.to(device))
        total[0] += ctc_losses(out.logits, out.lengths, y.to(device), yl.to(device)).double().sum()
        total[1] += len(idx)
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def _rng_state(aug: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "aug": aug.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, aug: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    aug.set_state(state["aug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- entry point


def train(cfg: RunConfig, stop_after_epoch: int | None = None, echo: bool = True) -> Path:
    """Run (or resume, or finish) ``cfg``; returns the run directory. ``stop_after_epoch``
    ends the process's work after that epoch's checkpoint, as a kill would (tests)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    master = rank == 0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        done = json.loads((out / "results.json").read_text(encoding="utf-8"))["config"]
        diff = config_diff(done, cfg.to_json())
        if diff:
            raise RunError(f"{out} holds a completed run with a different config (differs in: {', '.join(diff)}); "
                           f"completed runs are immutable, use another out_dir")
        if master and echo:
            print(f"{out}: run already complete (manifest.json present); nothing to do", file=sys.stderr)
        return out
    lock = None
    if master:
        lock = open(out / ".lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RunError(f"{out}: another process is running this run") from None
    logs = Logs(out, master, echo)
    stage = {"name": "setup", "epoch": 0}
    try:
        return _train(cfg, out, logs, stage, world, rank, stop_after_epoch)
    except BaseException as e:
        if master:
            logs.run(f"FAILED in {stage['name']}: {type(e).__name__}: {e}")
            logs.run(traceback.format_exc().rstrip())
            logs.metric({"kind": "status", "status": "failed", "stage": stage["name"], "epoch": stage["epoch"],
                         "error": f"{type(e).__name__}: {e}"})
            _mark_results_failed(out)
            write_json(out / "error.json", {"run_id": cfg.run_id, "status": "failed", "stage": stage["name"],
                                            "epoch": stage["epoch"], "error_type": type(e).__name__,
                                            "message": str(e), "traceback": traceback.format_exc(),
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        raise
    finally:
        logs.close()
        if lock is not None:
            lock.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _mark_results_failed(out: Path) -> None:
    """A results.json without manifest.json is not a finished run: say so in the file too."""
    path = out / "results.json"
    if path.exists() and not (out / "manifest.json").exists():
        results = json.loads(path.read_text(encoding="utf-8"))
        write_json(path, {**results, "status": "failed", "error": "see error.json"})


@dataclass
class Plan:
    """The run's batches (fixed length-sorted buckets) and its step schedule."""

    train_utts: list
    val_utts: list
    batches: list[list[int]]
    val_batches: list[list[int]]
    waste: float
    waste_unbucketed: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass
class Trainer:
    """What one process's training loop works on; ``state`` is what last.pt saves."""

    cfg: RunConfig
    out: Path
    logs: Logs
    stage: dict
    world: int
    rank: int
    device: torch.device
    data: RunData
    plan: Plan
    raw: CTCModel
    model: torch.nn.Module  # ``raw``, or ``raw`` wrapped in DDP
    opt: torch.optim.Optimizer
    aug: torch.Generator
    state: dict

    @property
    def master(self) -> bool:
        return self.rank == 0


def _train(cfg: RunConfig, out: Path, logs: Logs, stage: dict, world: int, rank: int,
           stop_after_epoch: int | None) -> Path:
    """setup -> (train_one_epoch -> validate -> end_epoch) per epoch -> finish (rank 0)."""
    t0 = time.time()
    device = _device(cfg, world)
    ckpt = _load_last(cfg, out, logs, device, world)
    stage["name"] = "data"
    data = prepare(cfg, log=logs.run)
    plan = make_plan(cfg, data, world, logs)
    t = setup(cfg, out, logs, stage, world, rank, device, data, plan, ckpt)

    stage["name"] = "train"
    for epoch in range(t.state["epoch"] + 1, cfg.train.epochs + 1):
        if t.state["done"]:
            break
        stage["epoch"] = epoch
        t_epoch = time.time()
        sums, lr, frames, n_batches = train_one_epoch(t, epoch)
        stage["name"] = "validate"
        val = validation_loss(t.raw, data, plan.val_utts, plan.val_batches, device, world, rank)
        stage["name"] = "train"
        end_epoch(t, epoch, val, sums, lr, frames, n_batches, t_epoch)
        if stop_after_epoch is not None and epoch >= stop_after_epoch and not t.state["done"]:
            logs.run(f"stopping after epoch {epoch} as asked (resume with the same command)")
            return out
    if not t.master:
        return out

    stage["name"] = "decode"
    return finish(cfg, out, data, device, logs, t.state, t0, {"padding_waste": plan.waste,
                                                             "padding_waste_unbucketed": plan.waste_unbucketed,
                                                             "steps_per_epoch": plan.steps_per_epoch,
                                                             "batches": len(plan.batches)})


def _device(cfg: RunConfig, world: int) -> torch.device:
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _load_last(cfg: RunConfig, out: Path, logs: Logs, device: torch.device, world: int) -> dict | None:
    """last.pt of an interrupted run of the same config (logs truncated to its offsets), or
    None for a fresh start."""
    if not (out / "last.pt").exists():
        logs.run(f"starting {cfg.run_id}: script={cfg.script} mode={cfg.mode} seed={cfg.seed} device={device}"
                 f" world_size={world}")
        logs.run("config " + json.dumps(cfg.to_json(), ensure_ascii=False))
        return None
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    diff = config_diff(ckpt["config"], cfg.to_json())
    if diff:
        raise RunError(f"{out}/last.pt belongs to a run with a different config (differs in: {', '.join(diff)}); "
                       f"use another out_dir or the original config")
    logs.truncate(ckpt["log_offsets"])
    logs.run(f"resuming {cfg.run_id} after epoch {ckpt['state']['epoch']} (step {ckpt['state']['step']})")
    return ckpt


def make_plan(cfg: RunConfig, data: RunData, world: int, logs: Logs) -> Plan:
    """Batches, padding waste (against an unbucketed shuffle) and the step schedule, logged."""
    train_utts = [u for u in data.parts["train"] if u.feasible]
    val_utts = [u for u in data.parts["val"] if u.feasible]
    batches = make_batches(train_utts, cfg.train.batch_size, cfg.train.max_batch_frames)
    val_batches = make_batches(val_utts, cfg.train.batch_size, cfg.train.max_batch_frames)
    waste = padding_waste(train_utts, batches)
    shuffled = torch.randperm(len(train_utts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    naive = [shuffled[i:i + cfg.train.batch_size] for i in range(0, len(shuffled), cfg.train.batch_size)]
    waste_unbucketed = padding_waste(train_utts, naive)
    steps_per_epoch = len(batches) // world
    if steps_per_epoch == 0:
        raise RunError(f"train: {len(batches)} batch(es) for {world} rank(s); lower train.batch_size")
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.train.warmup_epochs * steps_per_epoch)
    logs.run(f"data: snapshot {data.snapshot_sha256[:12]} split {data.split.sha256[:12]} features "
             f"{data.store.recipe.get('name')} {data.store.recipe_hash[:12]} dim {data.store.dim}; "
             + ", ".join(f"{p} {len(us)}" for p, us in data.parts.items())
             + f"; ctc-infeasible {data.infeasible()}")
    rate = data.store.recipe.get("frame_rate")
    if rate:
        logs.run(f"frames: features at {rate:g} fps, conv stride {data.dims.conv_stride} -> "
                 f"{rate / data.dims.conv_stride:g} encoder frames per second")
    logs.run(f"batches: {len(batches)} train / {len(val_batches)} val, padding waste {waste:.1%} "
             f"(unbucketed {waste_unbucketed:.1%}); {steps_per_epoch} steps/epoch, warmup {warmup_steps} steps")
    return Plan(train_utts, val_utts, batches, val_batches, waste, waste_unbucketed, steps_per_epoch, total_steps,
                warmup_steps)


def setup(cfg: RunConfig, out: Path, logs: Logs, stage: dict, world: int, rank: int, device: torch.device,
          data: RunData, plan: Plan, ckpt: dict | None) -> Trainer:
    """Seeded model, AdamW (decay on matrices only), augmentation RNG and loop state; restored
    from ``ckpt`` (last.pt) when resuming."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(cfg.seed)
    raw = build_model(data.dims, cfg.mode).to(device)
    logs.run(f"model: {raw.num_params():,} parameters, dims {asdict(data.dims)}")
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr)
    aug = torch.Generator().manual_seed(cfg.seed + 1)
    state = {"epoch": 0, "step": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "done": False,
             "stop_reason": None, "train_time_s": 0.0}
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        _set_rng_state(ckpt["rng"], aug)
        logs.metric({"kind": "status", "status": "resumed", "epoch": state["epoch"], "step": state["step"]})
    else:
        logs.metric({"kind": "status", "status": "started", "epoch": 0, "step": 0,
                     "steps_per_epoch": plan.steps_per_epoch, "padding_waste": round(plan.waste, 6)})
    model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda"
                                                      else None) if world > 1 else raw
    return Trainer(cfg, out, logs, stage, world, rank, device, data, plan, raw, model, opt, aug, state)


def compute_loss(t: Trainer, x: torch.Tensor, n: torch.Tensor, y: torch.Tensor, yl: torch.Tensor,
                 sums: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, its CTC part) for one batch; TAR adds its terms (and their parts to ``sums``)."""
    with _autocast(t.device):
        o = t.model(x, n)
        loss_ctc = ctc_losses(o.logits, o.lengths, y, yl).mean()
        loss = loss_ctc
        if t.cfg.mode == "tar":
            l_tar, parts = tar_loss(o.hidden, o.mask, t.raw.anticipation, t.cfg.tar.weight, t.cfg.tar.smooth_weight)
            loss = loss + l_tar
            for k, v in parts.items():
                sums[k] += v
    return loss, loss_ctc


def train_one_epoch(t: Trainer, epoch: int) -> tuple[dict, float, int, int]:
    """One pass over this rank's share of the epoch's batches (order from (seed, epoch));
    returns the loss sums, the last lr, the frames seen and the number of batches."""
    cfg, state, plan = t.cfg, t.state, t.plan
    t.model.train()
    order = torch.randperm(len(plan.batches), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    mine = order.tolist()[t.rank::t.world][:plan.steps_per_epoch]
    sums, window, frames = {"ctc": 0.0, "total": 0.0, "tar_anticipation": 0.0, "tar_smooth": 0.0}, [], 0
    for b in mine:
        x, n, y, yl = collate(t.data.store, plan.train_utts, plan.batches[b])
        x = spec_augment(x, n, cfg.train.specaugment, t.aug)
        x, n, y, yl = x.to(t.device), n.to(t.device), y.to(t.device), yl.to(t.device)
        lr = lr_at(state["step"], plan.total_steps, plan.warmup_steps, cfg.train.lr, cfg.train.min_lr_ratio)
        for group in t.opt.param_groups:
            group["lr"] = lr
        loss, loss_ctc = compute_loss(t, x, n, y, yl, sums)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(t.raw.parameters(), cfg.train.grad_clip).item()
        t.opt.step()
        state["step"] += 1
        sums["ctc"] += loss_ctc.item()
        sums["total"] += loss.item()
        window.append(loss_ctc.item())
        frames += int(n.sum())
        if state["step"] % cfg.train.log_every == 0:
            t.logs.metric({"kind": "step", "epoch": epoch, "step": state["step"],
                           "train_loss": round(sum(window) / len(window), 6), "lr": lr,
                           "grad_norm": round(grad_norm, 6)})
            t.logs.train(f"epoch {epoch} step {state['step']}: loss {sum(window) / len(window):.4f} "
                         f"lr {lr:.2e} grad_norm {grad_norm:.3f}")
            window = []
    return sums, lr, frames, len(mine)


def end_epoch(t: Trainer, epoch: int, val: float, sums: dict, lr: float, frames: int, n_batches: int,
              t_epoch: float) -> None:
    """Early-stopping bookkeeping, best.pt on improvement, the epoch's metrics and log lines,
    then last.pt (save_checkpoint)."""
    cfg, state = t.cfg, t.state
    improved = val < state["best_val_loss"]
    if improved:
        state.update(best_val_loss=val, best_epoch=epoch, bad_epochs=0)
        if t.master:
            _atomic_save({"model": t.raw.state_dict(), "dims": asdict(t.data.dims), "mode": cfg.mode,
                          "script": cfg.script, "epoch": epoch, "val_loss": val, "config": cfg.to_json(),
                          "vocab": list(t.data.vocab.symbols)}, t.out / "best.pt")
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    state["train_time_s"] += time.time() - t_epoch
    if state["bad_epochs"] >= cfg.train.patience:
        state.update(done=True, stop_reason="early_stop")
    elif epoch == cfg.train.epochs:
        state.update(done=True, stop_reason="max_epochs")
    n_b = max(1, n_batches)
    record = {"kind": "epoch", "epoch": epoch, "step": state["step"], "train_loss": round(sums["ctc"] / n_b, 6),
              "val_loss": round(val, 6), "lr": lr, "best_val_loss": round(state["best_val_loss"], 6),
              "best_epoch": state["best_epoch"], "improved": improved, "padding_waste": round(t.plan.waste, 6),
              "epoch_time_s": round(time.time() - t_epoch, 3),
              "frames_per_s": round(frames / max(1e-9, time.time() - t_epoch), 1)}
    if cfg.mode == "tar":
        record.update(train_total_loss=round(sums["total"] / n_b, 6),
                      tar_anticipation=round(sums["tar_anticipation"] / n_b, 6),
                      tar_smooth=round(sums["tar_smooth"] / n_b, 6))
    t.logs.metric(record)
    t.logs.train(f"epoch {epoch}: train_loss {record['train_loss']:.4f} val_loss {val:.4f}"
                 f"{' *' if improved else ''} best {state['best_val_loss']:.4f}@{state['best_epoch']} "
                 f"({record['epoch_time_s']:.1f}s)")
    if state["done"]:
        t.logs.run(f"training stopped after epoch {epoch}: {state['stop_reason']} "
                   f"(best val loss {state['best_val_loss']:.6f} at epoch {state['best_epoch']})")
        t.logs.metric({"kind": "status", "status": state["stop_reason"], "epoch": epoch, "step": state["step"]})
    save_checkpoint(t)


def save_checkpoint(t: Trainer) -> None:
    """last.pt (rank 0): model, optimiser, loop state, RNG states and the log offsets a resume
    truncates to; every rank waits for it."""
    if t.master:
        _atomic_save({"model": t.raw.state_dict(), "optimizer": t.opt.state_dict(), "state": t.state,
                      "rng": _rng_state(t.aug), "config": t.cfg.to_json(), "log_offsets": t.logs.offsets()},
                     t.out / "last.pt")
    if t.world > 1:
        dist.barrier()


def decode_test(cfg: RunConfig, data: RunData, model: CTCModel, device: torch.device, policy: dict,
                use_ttt: bool | None = None, split: str = "test") -> tuple[list[dict], dict]:
    use_ttt = cfg.mode == "ttt" if use_ttt is None else use_ttt
    return decode_utterances(model, data.store, data.parts[split], cfg, data.vocab, device, policy, use_ttt, split)


def _cer(edits: int, chars: int) -> float | None:
    return edits / chars if chars else None


def choose_ttt(cfg: RunConfig, data: RunData, model: CTCModel, device: torch.device, policy: dict,
               log=lambda msg: None) -> tuple[RunConfig, dict]:
    """Pick TTT's lr and steps on the validation split: decode val with TTT at every point of
    ``ttt.grid_lr`` × ``ttt.grid_steps`` and keep the lowest val CER (ties: the earlier point,
    i.e. the smaller lr, then fewer steps). Returns the config to decode test with and the
    record for results.json (every point, the no-TTT val CER, the choice)."""
    grid = []
    for lr in sorted(cfg.ttt.grid_lr):
        for steps in sorted(cfg.ttt.grid_steps):
            c = cfg.model_copy(update={"ttt": cfg.ttt.model_copy(update={"lr": lr, "steps": steps})})
            t = time.time()
            rows, st = decode_test(c, data, model, device, policy, use_ttt=True, split="val")
            edits, chars = sum(r["cer_edits"] for r in rows), sum(r["reference_chars"] for r in rows)
            point = {"lr": lr, "steps": steps, "val_cer": _cer(edits, chars), "val_changed": st["changed"],
                     "guard_reverts": st["ttt_guard_reverts"], "seconds": round(time.time() - t, 3)}
            no_ttt = _cer(st["no_ttt_edits"], st["chars"])
            grid.append(point)
            log(f"ttt grid on val: lr {lr:g} steps {steps}: val CER {point['val_cer']:.4f} (no TTT {no_ttt:.4f}), "
                f"{st['changed']}/{len(rows)} hypotheses changed, {st['ttt_guard_reverts']} guard reverts "
                f"({point['seconds']:.1f}s)")
    best = min(grid, key=lambda p: p["val_cer"])  # min keeps the first of equal values
    chosen = cfg.model_copy(update={"ttt": cfg.ttt.model_copy(update={"lr": best["lr"], "steps": best["steps"]})})
    record = {"split": "val", "grid": grid, "no_ttt_val_cer": no_ttt, "best_val_cer": best["val_cer"],
              "chosen": {"lr": best["lr"], "steps": best["steps"]},
              "helps_on_val": best["val_cer"] < no_ttt}
    log(f"ttt: chose lr {best['lr']:g} steps {best['steps']} (val CER {best['val_cer']:.4f} vs {no_ttt:.4f} without"
        f" TTT)" + ("" if record["helps_on_val"] else "; no grid point lowered the val CER: TTT cannot help here"))
    return chosen, record


def finish(cfg: RunConfig, out: Path, data: RunData, device: torch.device, logs: Logs, state: dict, t0: float,
           batching: dict) -> Path:
    """Decode the test set with best.pt and write the bundle; manifest.json last."""
    policy = load_policy(DEFAULT_POLICY)
    model, best = load_model(out / "best.pt", device)
    dcfg, selection = cfg, None
    if cfg.mode == "ttt" and cfg.ttt.grid_lr and cfg.ttt.grid_steps:
        t_sel = time.time()
        dcfg, selection = choose_ttt(cfg, data, model, device, policy, logs.run)
        selection["seconds"] = round(time.time() - t_sel, 3)
    t_dec = time.time()
    rows, dstats = decode_test(dcfg, data, model, device, policy)
    logs.run(f"decoded {len(rows)} test utterances with best.pt (epoch {best['epoch']}) in {time.time() - t_dec:.1f}s")
    ttt_record = _ttt_record(cfg, dcfg, dstats, selection, len(rows), logs) if cfg.mode == "ttt" else None
    by_part = write_test_files(cfg, out, data, rows, policy)
    overall = by_part["overall"]
    logs.run(f"test CER {overall['cer']:.4f} toneless {overall['toneless_cer']:.4f} over {overall['rows']} rows; "
             + ", ".join(f"{p} {v['rows']}" for p, v in by_part["partitions"].items()))
    results = _results(cfg, data, model, device, state, t0, batching, by_part, policy, ttt_record)
    missing = [a for a in BUNDLE_FILES if a != "results.json" and not (out / a).is_file()]
    if missing:
        raise RunError(f"bundle incomplete, missing {missing}")
    logs.metric({"kind": "status", "status": "complete", "epoch": state["epoch"], "step": state["step"],
                 "test_cer": overall["cer"], "best_val_loss": state["best_val_loss"]})
    logs.run(f"complete: {out}")
    (out / "error.json").unlink(missing_ok=True)
    # results.json says "complete" only from here on; if the manifest is not written after
    # it, the failure handler in train() turns it to "failed" (a kill leaves it for the rerun).
    write_json(out / "results.json", results)
    write_manifest(cfg, out)
    return out


def _ttt_record(cfg: RunConfig, dcfg: RunConfig, dstats: dict, selection: dict | None, n_rows: int,
                logs: Logs) -> dict:
    """results.json's ``ttt``: the adaptation used on test, what it changed and the val choice."""
    record = {**dcfg.ttt.model_dump(), "ttt_steps": dstats["ttt_steps"],
              "ttt_guard_reverts": dstats["ttt_guard_reverts"], "selection": selection,
              "test_changed": dstats["changed"],
              "test_changed_cer_before": _cer(dstats["changed_edits_before"], dstats["changed_chars"]),
              "test_changed_cer_after": _cer(dstats["changed_edits_after"], dstats["changed_chars"]),
              "test_cer_no_ttt": _cer(dstats["no_ttt_edits"], dstats["chars"])}
    logs.run(f"ttt (lr {dcfg.ttt.lr:g}, steps {dcfg.ttt.steps}) changed {dstats['changed']} of {n_rows} test "
             f"hypotheses" + (f": CER on those {record['test_changed_cer_before']:.4f} -> "
                              f"{record['test_changed_cer_after']:.4f}" if dstats["changed"] else
                              " (a no-op on this test set)"))
    return record


def write_test_files(cfg: RunConfig, out: Path, data: RunData, rows: list[dict], policy: dict) -> dict:
    """split.json, vocab.json, the test predictions and references and the per-partition
    metrics (returned) of the bundle."""
    shutil.copyfile(data.split_path, out / "split.json")
    data.vocab.save(out / "vocab.json")
    atomic_write_bytes(out / PREDICTIONS, jsonl_bytes(rows))
    refs = [{"feat_id": u.feat_id, "audio_id": u.audio_id, "split": "test", "script": cfg.script,
             "reference_text": u.reference_text, "nko": u.nko, "latin": u.latin} for u in data.parts["test"]]
    atomic_write_bytes(out / REFERENCES, jsonl_bytes(refs))
    by_part = metrics_by_partition(rows, policy)
    write_json(out / METRICS_BY_PARTITION, by_part)
    return by_part


def _results(cfg: RunConfig, data: RunData, model: CTCModel, device: torch.device, state: dict, t0: float,
             batching: dict, by_part: dict, policy: dict, ttt_record: dict | None) -> dict:
    """results.json of a completed run."""
    overall = by_part["overall"]
    return {
        "run_id": cfg.run_id, "status": "complete", "script": cfg.script, "mode": cfg.mode, "seed": cfg.seed,
        "config": cfg.to_json(),
        "resolved_paths": {"snapshot": str(data.snapshot_path.resolve()), "split": str(data.split_path.resolve()),
                           "features": str(Path(cfg.features).resolve())},
        "snapshot_sha256": data.snapshot_sha256, "split_sha256": data.split.sha256,
        "feature_recipe": data.store.recipe.get("name"), "feature_recipe_hash": data.store.recipe_hash,
        "feature_weights": data.store.weights,  # {"name", "sha256"} of the encoder weights, or None
        "model_dims": asdict(data.dims), "params": model.num_params() - (0 if model.anticipation is None else
                                                                          sum(p.numel() for p in model.anticipation.parameters())),
        "best_epoch": state["best_epoch"], "best_val_loss": state["best_val_loss"], "epochs_run": state["epoch"],
        "stop_reason": state["stop_reason"], "early_stopped": state["stop_reason"] == "early_stop",
        "still_improving": state["stop_reason"] == "max_epochs" and state["best_epoch"] == state["epoch"],
        "steps": state["step"],
        "test_cer": overall["cer"], "test_toneless_cer": overall["toneless_cer"], "test_rows": overall["rows"],
        "test_reference_chars": overall["reference_chars"], "test_edits": overall["edits"],
        "partition_rows": {p: v["rows"] for p, v in by_part["partitions"].items()},
        "partition_policy": policy, "partition_policy_sha256": policy_sha256(policy),
        "utterances": {p: len(us) for p, us in data.parts.items()}, "ctc_infeasible": data.infeasible(),
        "skipped": data.skipped, "out_of_vocabulary": data.out_of_vocabulary,
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in batching.items()},
        "ttt": ttt_record,
        "tar": {**cfg.tar.model_dump(), "definition": TAR_DEFINITION} if cfg.mode == "tar" else None,
        "train_time_s": round(state["train_time_s"], 3), "wall_time_s": round(time.time() - t0, 3),
        "git_commit": git_commit(), "torch_version": torch.__version__, "python_version": platform.python_version(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_manifest(cfg: RunConfig, out: Path) -> None:
    """manifest.json: every file of the run directory with its sha256 and size, written last."""
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name != MANIFEST)
    write_json(out / MANIFEST, {"run_id": cfg.run_id, "files": {
        name: {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size} for name in files}})


def evaluate_run(run_dir: str | Path, out_path: str | Path | None = None, device: str | None = None,
                 ttt: dict | None = None, split: str = "test") -> dict:
    """Re-decode a completed run's test set from its best.pt. Without ``ttt`` overrides the
    result must equal the run's test_predictions.jsonl byte for byte (same device type).
    With overrides (e.g. {"steps": 3}) it is a TTT ablation of the same checkpoint; rows of a
    trajectory run then say mode "ttt".

    ``split="val"`` decodes the validation set instead into ``out_path`` (required): §4 rows
    saying split "val", the material for calibrating the AGP partition policy without
    looking at test rows (``nko-ops agp calibrate-partition``)."""
    from models.config import parse_config

    run_dir = Path(run_dir)
    if split not in ("test", "val"):
        raise RunError(f"split must be 'test' or 'val' (got {split!r})")
    if split == "val" and not out_path:
        raise RunError("decoding the val split needs an output path (--out)")
    if not (run_dir / "manifest.json").exists():
        raise RunError(f"{run_dir}: not a completed run (no manifest.json)")
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    data_cfg = dict(results["config"], snapshot=results["resolved_paths"]["snapshot"],
                    features=results["resolved_paths"]["features"])
    if device:
        data_cfg["device"] = device
    chosen = ((results.get("ttt") or {}).get("selection") or {}).get("chosen")
    if chosen:  # the test predictions were decoded with the lr/steps chosen on val
        data_cfg["ttt"] = {**data_cfg["ttt"], **chosen}
    if ttt:
        data_cfg["ttt"] = {**data_cfg["ttt"], **ttt}
        if data_cfg["mode"] == "trajectory":
            data_cfg["mode"] = "ttt"
    cfg = parse_config(data_cfg, f"{run_dir}/results.json config")
    data = prepare(cfg, split_path=run_dir / "split.json", log=lambda msg: None)
    if data.snapshot_sha256 != results["snapshot_sha256"]:
        raise RunError(f"snapshot changed since the run: {data.snapshot_path} is {data.snapshot_sha256[:12]}, "
                       f"the run used {results['snapshot_sha256'][:12]}")
    if data.store.recipe_hash != results["feature_recipe_hash"]:
        raise RunError(f"feature store {cfg.features} has recipe {data.store.recipe_hash[:12]}, "
                       f"the run used {results['feature_recipe_hash'][:12]}")
    dev = resolve_device(cfg.device)
    model, _ = load_model(run_dir / "best.pt", dev)
    policy = results["partition_policy"]
    rows, stats = decode_test(cfg, data, model, dev, policy, use_ttt=cfg.mode == "ttt" or bool(ttt), split=split)
    blob = jsonl_bytes(rows)
    if out_path:
        atomic_write_bytes(Path(out_path), blob)
    if split == "val":
        overall = metrics_by_partition(rows, policy)["overall"]
        return {"run": str(run_dir), "split": "val", "rows": len(rows), "out": str(out_path),
                "cer": overall["cer"], "toneless_cer": overall["toneless_cer"],
                "ttt": {**cfg.ttt.model_dump(), **stats} if (cfg.mode == "ttt" or ttt) else None}
    reference = (run_dir / "test_predictions.jsonl").read_bytes()
    ref_rows = [json.loads(line) for line in reference.decode("utf-8").splitlines()]
    overall = metrics_by_partition(rows, policy)["overall"]
    return {"run": str(run_dir), "identical": blob == reference, "rows": len(rows),
            "differing_rows": sum(a != b for a, b in zip(rows, ref_rows)) + abs(len(rows) - len(ref_rows)),
            "asr_text_changed": sum(a["asr_text"] != b["asr_text"] for a, b in zip(rows, ref_rows)),
            "cer": overall["cer"], "toneless_cer": overall["toneless_cer"], "run_cer": results["test_cer"],
            "ttt": {**cfg.ttt.model_dump(), **stats} if (cfg.mode == "ttt" or ttt) else None}
