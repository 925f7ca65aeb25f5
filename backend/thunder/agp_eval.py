"""AGP evaluation of a trained adapter on the corpus' held-out split, run on the host that
holds the adapter (rank 0):

    python -m backend.thunder.agp_eval --model M --adapter A --corpus C --rows R --out DIR

The held-out rows are the prediction rows (``--rows``, the file the corpus was built from)
whose feat_ids ``corpus.json`` lists under ``split_feat_ids.test``: the test split's error
pairs *and* the rows the ASR already got right, so an adapter that damages correct text shows
it. The rows file must be the one the corpus was built from (its sha256 is corpus.json's
``rows_sha256``) and the partition policy must give the corpus' ``partition_source``; either
mismatch is refused before anything runs. ``mlx_lm.server`` serves the model with
the adapter on 127.0.0.1; the AGP lane's chat proposer asks it for every row; the AGP gate
(lexicon from the corpus' *train* references only) decides; ``agp.evaluate`` scores CER
before -> after with only accepted edits applied. Writes proposals.jsonl, decisions.jsonl,
agp_eval.json and agp_eval.txt under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

from agp.evaluate import evaluate, format_table
from agp.gate import Gate, load_gate_policy
from agp.lexicon import Lexicon
from agp.partition import load_partition_policy
from agp.pipeline import gate_all
from agp.proposers import ChatProposer, propose_all
from agp.rows import write_jsonl
from models.bundle import PredictionRow, read_predictions
from models.files import atomic_write_json, atomic_write_text, sha256_file
from models.errors import NkoOpsError


class AgpEvalError(NkoOpsError, RuntimeError):
    pass


def heldout_rows(rows_path: Path | str, corpus_dir: Path | str, partition_policy: Path | str | None = None,
                 partition_source: str | None = None) -> tuple[list[PredictionRow], list[str], object, dict]:
    """(test rows, train references, partition policy, corpus manifest): every row of the
    corpus' test split, already-correct rows included."""
    manifest_path = Path(corpus_dir) / "corpus.json"
    if not manifest_path.exists():
        raise AgpEvalError(f"{manifest_path} not found: the corpus has no manifest naming its held-out split")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    rebuild = "; rebuild the corpus with `nko-ops agp build-corpus`"
    ids = manifest.get("split_feat_ids") or {}
    if not ids.get("test"):
        raise AgpEvalError(f"{manifest_path}: field 'split_feat_ids.test' is missing or empty; no held-out rows to "
                           f"evaluate{rebuild}")
    want_sha = manifest.get("rows_sha256")
    if not want_sha:
        raise AgpEvalError(f"{manifest_path}: field 'rows_sha256' is empty, so the eval rows cannot be checked "
                           f"against the rows the corpus was built from{rebuild} --rows ...")
    got_sha = sha256_file(Path(rows_path))
    if got_sha != want_sha:
        raise AgpEvalError(f"{rows_path}: sha256 {got_sha[:16]} differs from {manifest_path} field 'rows_sha256' "
                           f"{want_sha[:16]}: not the rows file the corpus was built from (eval.rows)")
    want_part = manifest.get("partition_source")
    if not want_part:
        raise AgpEvalError(f"{manifest_path}: field 'partition_source' is missing, so the partition policy cannot "
                           f"be checked against the corpus'{rebuild}")
    policy = load_partition_policy(partition_policy, partition_source)
    if policy.identity != want_part:
        raise AgpEvalError(f"partition policy {policy.path} gives partition_source {policy.identity!r}, but "
                           f"{manifest_path} field 'partition_source' is {want_part!r}: evaluate with the partition "
                           "policy the corpus was built with (eval.partition_policy / --partition-policy)")
    rows = policy.apply(read_predictions(rows_path, script="nko"))
    by_id = {r.feat_id: r for r in rows}
    missing = [f for f in ids["test"] if f not in by_id]
    if missing:
        raise AgpEvalError(f"{rows_path}: {len(missing)} held-out feat_id(s) of the corpus are not in the rows, "
                           f"e.g. {missing[:3]} (give the rows file the corpus was built from)")
    train_refs = [by_id[f].reference_text for f in ids.get("train", []) if f in by_id]
    return [by_id[f] for f in ids["test"]], train_refs, policy, manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: str, adapter: str, max_tokens: int, log: Path, startup_s: float = 600.0) -> Iterator[str]:
    """``mlx_lm.server`` for ``model`` + ``adapter`` on a free local port; yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--adapter-path", adapter,
           "--host", "127.0.0.1", "--port", str(port), "--max-tokens", str(max_tokens)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        end = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise AgpEvalError(f"mlx_lm.server exited with {proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-1500:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise AgpEvalError(f"mlx_lm.server did not answer /health within {startup_s:.0f}s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def damage_line(summary: dict) -> str:
    c = summary["already_correct"]
    return (f"already-correct rows: {c['rows']}, damaged by accepted edits: {c['worse']} "
            f"(CER {c['cer_before']:.4f} -> {c['cer_after']:.4f})")


def score(test_rows: list[PredictionRow], proposals: list[dict], lexicon: Lexicon, partition_source: str,
          gate_policy: str | None = None) -> tuple[dict, list[dict], str]:
    """Gate the proposals and score them: (summary, decisions, gate policy hash). The summary's
    ``already_correct`` scores the rows the ASR already got right on their own: any accepted
    change to one of them is damage."""
    gate = Gate(load_gate_policy(gate_policy), lexicon if len(lexicon) else None, partition_source)
    decisions = [d.as_dict() for d in gate_all(gate, test_rows, proposals)]
    summary = evaluate(test_rows, decisions, key=gate.key)
    correct = {r.feat_id for r in test_rows if r.asr_text == r.reference_text}
    summary["already_correct"] = evaluate([r for r in test_rows if r.feat_id in correct],
                                          [d for d in decisions if d["feat_id"] in correct], key=gate.key)["overall"]
    return summary, decisions, gate.policy_hash


def evaluate_adapter(model: str, adapter: str, corpus: str, rows: str, out: Path | str, max_tokens: int = 256,
                     gate_policy: str | None = None, partition_policy: str | None = None,
                     partition_source: str | None = None, acoustic_run: str | None = None) -> dict:
    """``acoustic_run``: the rows' ASR run directory (best.pt and its feature store): the
    proposals get their acoustic score (agp rule ``acoustic``); without it they carry none and
    the gate refuses them on the partitions that rule checks."""
    out = Path(out)
    adapter_file = Path(adapter) / "adapters.safetensors"
    if not adapter_file.exists():
        raise AgpEvalError(f"{adapter_file} not found")
    test_rows, train_refs, ppolicy, manifest = heldout_rows(rows, corpus, partition_policy, partition_source)
    out.mkdir(parents=True, exist_ok=True)
    lexicon = Lexicon.from_references(train_refs)
    t0 = time.monotonic()
    with serve(model, adapter, max_tokens, out / "server.log") as url:
        proposer = ChatProposer(url, max_tokens=max_tokens, timeout=600)
        try:
            proposals = propose_all(proposer, test_rows)
        finally:
            proposer.close()
    propose_s = time.monotonic() - t0
    if acoustic_run:
        from agp.pipeline import score_proposals

        score_proposals(proposals, test_rows, acoustic_run)
    summary, decisions, policy_hash = score(test_rows, proposals, lexicon, ppolicy.identity, gate_policy)
    summary.update({
        "split": "test", "model": model, "adapter": adapter, "adapter_sha256": sha256_file(adapter_file),
        "corpus": corpus, "corpus_files": manifest.get("files", {}), "rows": rows, "rows_sha256": manifest["rows_sha256"],
        "proposer": "chat (mlx_lm.server + adapter)", "max_tokens": max_tokens, "policy_hash": policy_hash,
        "partition_source": ppolicy.identity, "lexicon_words": len(lexicon), "propose_seconds": round(propose_s, 2),
        "acoustic_run": acoustic_run,
        "files": {n: str(out / n) for n in ("proposals.jsonl", "decisions.jsonl", "agp_eval.json", "agp_eval.txt")},
    })
    write_jsonl(out / "proposals.jsonl", proposals)
    write_jsonl(out / "decisions.jsonl", decisions)
    atomic_write_text(out / "agp_eval.txt", format_table(summary) + "\n" + damage_line(summary) + "\n")
    atomic_write_json(out / "agp_eval.json", summary, sort_keys=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="AGP eval of an adapter on the corpus' held-out split")
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True, help="adapter directory (adapters.safetensors + adapter_config.json)")
    ap.add_argument("--corpus", required=True, help="AGP corpus directory (corpus.json names the held-out split)")
    ap.add_argument("--rows", required=True, help="prediction rows the corpus was built from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--gate-policy")
    ap.add_argument("--partition-policy")
    ap.add_argument("--partition-source", choices=("model", "policy"))
    ap.add_argument("--acoustic-run", help="the rows' ASR run directory: score proposals with its best.pt")
    a = ap.parse_args(argv)
    try:
        summary = evaluate_adapter(a.model, a.adapter, a.corpus, a.rows, a.out, a.max_tokens, a.gate_policy,
                                   a.partition_policy, a.partition_source, a.acoustic_run)
    except Exception as e:
        print(f"agp eval failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_table(summary))
    print(damage_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
