"""The chat proposer against a real ``mlx_lm.server`` on 127.0.0.1 serving a tiny llama-style
model built here (config.json + safetensors via MLX + a tokenizer trained with ``tokenizers``),
with HF_HUB_OFFLINE=1: no hub, no network."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agp.corpus import SYSTEM_PROMPT, build_corpus, prompt_messages
from agp.gate import Gate, load_gate_policy
from agp.lexicon import Lexicon
from agp.proposers import ChatProposer, ProposerError, propose_all
from models.bundle import read_predictions
from agp.tiny_model import build_lora_adapter, build_tiny_llama
from agp_helpers import PAIRS, make_row, sample_rows, write_rows_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ROWS = [make_row(f"m{i}", ref, asr, "boundary") for i, (ref, asr) in enumerate(PAIRS)]


def tokenizer_texts() -> list[str]:
    texts = [SYSTEM_PROMPT]
    for r in ROWS:
        texts += [m["content"] for m in prompt_messages(r)] + [r.reference_text]
    return texts * 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, log: Path, adapter: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--max-tokens", "32"]
        if adapter:
            cmd += ["--adapter-path", str(adapter)]
        self.log = log
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlx_lm.server did not come up: {log.read_text()[-2000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llm")
    model = build_tiny_llama(root / "model", tokenizer_texts())
    adapter = build_lora_adapter(model, root / "adapter")
    return root, model, adapter


@pytest.fixture(scope="module")
def server(tiny):
    root, model, adapter = tiny
    t0 = time.monotonic()
    s = Server(model, root / "server.log", adapter=adapter)
    s.startup_s = time.monotonic() - t0
    yield s
    s.stop()


def test_tiny_model_files_are_local(tiny):
    _, model, adapter = tiny
    assert {p.name for p in model.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json"}
    assert json.loads((model / "config.json").read_text())["model_type"] == "llama"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapters.safetensors"}


def test_chat_proposer_against_mlx_lm_server(server, tiny):
    _, model, adapter = tiny
    with_adapter = ChatProposer(server.url, max_tokens=12, timeout=60)  # default_model = served with --adapter-path
    base = ChatProposer(server.url, model=str(model), max_tokens=12, timeout=60)
    assert with_adapter.health() == {"status": "ok"}
    t0 = time.monotonic()
    a = [with_adapter.propose(r) for r in ROWS]
    b = [base.propose(r) for r in ROWS]
    elapsed = time.monotonic() - t0
    assert all(isinstance(x, str) for x in a + b)
    assert a == [with_adapter.propose(r) for r in ROWS]  # greedy: deterministic
    assert a != b  # the adapter is really applied
    # per-request adapter, named with the model's path, gives the same as the server's --adapter-path
    per_request = ChatProposer(server.url, model=str(model), adapter=str(adapter), max_tokens=12, timeout=60)
    assert [per_request.propose(r) for r in ROWS] == a
    print(f"\nmlx_lm.server start {server.startup_s:.1f}s; {2 * len(ROWS)} chat proposals {elapsed:.2f}s")

    # a random tiny model writes noise: the gate must refuse all of it, without raising
    gate = Gate(load_gate_policy(), Lexicon.from_references([ref for ref, _ in PAIRS]), key=b"k" * 32)
    decisions = [gate.decide(r, p) for r, p in zip(ROWS, a + b)]
    assert not any(d.accepted for d in decisions)


def test_bad_adapter_is_a_clear_error(server, tiny):
    _, model, _ = tiny
    p = ChatProposer(server.url, model=str(model), adapter="/nonexistent/adapter", max_tokens=4, retries=0)
    with pytest.raises(ProposerError, match="adapter path does not exist"):
        p.propose(ROWS[0])
    with pytest.raises(ValueError, match="not 'default_model'"):
        ChatProposer(server.url, adapter="/some/adapter")


def test_lora_trained_on_the_agp_corpus_then_served(tmp_path, tiny):
    """Build the corpus, train a LoRA adapter on it with mlx_lm.lora, serve it, propose, gate."""
    _, model, _ = tiny
    rows = read_predictions(write_rows_file(tmp_path / "rows.jsonl", sample_rows(40)))
    build_corpus(rows, tmp_path / "corpus", synthetic_per_row=1)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "mlx_lm.lora", "--model", str(model), "--train", "--data",
                    str(tmp_path / "corpus"), "--iters", "4", "--batch-size", "1", "--num-layers", "2",
                    "--val-batches", "1", "--steps-per-eval", "4", "--adapter-path", str(tmp_path / "adapter"),
                    "--learning-rate", "1e-3", "--max-seq-length", "512"],
                   env=ENV, check=True, capture_output=True)
    trained = time.monotonic() - t0
    assert (tmp_path / "adapter" / "adapters.safetensors").exists()
    s = Server(model, tmp_path / "server.log", adapter=tmp_path / "adapter")
    try:
        proposals = propose_all(ChatProposer(s.url, max_tokens=16), rows[:6])
    finally:
        s.stop()
    assert len(proposals) == 6 and all(isinstance(p["proposal"], str) for p in proposals)
    gate = Gate(load_gate_policy(), Lexicon.from_references([ref for ref, _ in PAIRS]), key=b"k" * 32)
    decisions = [gate.decide(r, p["proposal"]) for r, p in zip(rows, proposals)]
    assert not any(d.accepted for d in decisions)  # four steps of LoRA on a random model: still noise
    print(f"\nmlx_lm.lora 4 iters: {trained:.1f}s; proposals {[p['proposal'][:20] for p in proposals]}")
