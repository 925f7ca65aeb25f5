"""Builders for the Thunder tests: a tiny llama-style model and an AGP corpus made here (no
hub), and cluster configs whose hosts are this machine (``kind = "local"``; in the ring
hostfile they are 127.0.0.1, which mlx.launch starts without ssh)."""

from __future__ import annotations

import sys
from pathlib import Path

from agp.corpus import SYSTEM_PROMPT, build_corpus, prompt_messages
from agp.pipeline import lane_rows
from agp.tiny_model import build_tiny_llama
from agp_helpers import PAIRS, row_dict, sample_rows, write_rows_file
from backend.localssh import free_port_pair
from backend.thunder.config import ClusterConfig, parse_config
from models.files import sha256_file

REPO = Path(__file__).resolve().parents[1]


def correct_rows(n: int = 4) -> list[dict]:
    """Rows the ASR already got right, each its own recording."""
    return [row_dict(f"bam_right_{i:02d}", PAIRS[i % len(PAIRS)][0], PAIRS[i % len(PAIRS)][0], "boundary",
                     audio_id=f"aud_right_{i:02d}") for i in range(n)]


def build_corpus_like_the_cli(rows_path: Path, out: Path, **kw) -> dict:
    """``nko-ops agp build-corpus``: rows through the lane's partition policy, rows sha256 recorded."""
    rows, _ = lane_rows(rows_path)
    return build_corpus(rows, out, rows_sha256=sha256_file(rows_path), **kw)


def build_fixture(root: Path) -> dict:
    """rows.jsonl (error pairs and already-correct rows), corpus/ (train/valid/test.jsonl +
    corpus.json) and model/ under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rows_path = write_rows_file(root / "rows.jsonl", sample_rows(40) + correct_rows())
    rows, _ = lane_rows(rows_path)
    build_corpus_like_the_cli(rows_path, root / "corpus", seed=42)
    texts = [SYSTEM_PROMPT] + [m["content"] for r in rows for m in prompt_messages(r)] + [r.reference_text for r in rows]
    model = build_tiny_llama(root / "model", texts * 3, vocab_size=300, hidden_size=32, layers=2)
    return {"rows": rows_path, "corpus": root / "corpus", "model": model}


def local_cluster(fx: dict, run_root: Path, local_root: Path, hosts: list[dict] | None = None, **over) -> ClusterConfig:
    train = {"iters": 6, "steps_per_report": 2, "steps_per_eval": 3, "save_every": 3, "val_batches": -1,
             "num_layers": 2, "lora_rank": 4, "learning_rate": 1e-3, "max_seq_length": 256}
    train.update(over.pop("train", {}))
    data = {
        "name": "test", "python": sys.executable, "workdir": str(REPO), "model": str(fx["model"]),
        "data": str(fx["corpus"]), "run_root": str(run_root), "local_root": str(local_root),
        "starting_port": free_port_pair(),
        "hosts": hosts or [{"name": "a", "kind": "local", "ip": "127.0.0.1"},
                           {"name": "b", "kind": "local", "ip": "127.0.0.1"}],
        "train": train,
        "watchdog": {"window_s": 60, "poll_s": 0.5, "stop_grace_s": 3},
        "eval": {"rows": str(fx["rows"]), "max_tokens": 16, "timeout_s": 300},
    }
    data.update(over)
    return parse_config(data, "test cluster")
