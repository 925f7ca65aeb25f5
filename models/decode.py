"""Greedy CTC decoding, per-utterance summaries, the partition policy and the row-level
records of CONTRACTS §4.

Every test utterance is decoded on its own (batch of one, no padding), in fp32, so its
output does not depend on batch composition: that is what lets ``nko-ops evaluate``
reproduce ``test_predictions.jsonl`` byte for byte, and ``ttt.steps = 0`` reproduce the
non-TTT output exactly.

``trajectory_scalars`` in a record: mean/std/min/max of each of the 7 trajectory scalars
(models/trajectory.py) over the utterance's final encoder states — for every mode, before
any test-time adaptation — plus CTC confidence summaries of the logits that produced
``asr_text``: per-frame max posterior (mean, min), the same over non-blank frames (0 when
there are none), the blank fraction and the frame count.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import torch

from models import text as T
from models.bundle import PARTITIONS
from models.config import RunConfig
from models.data import Utterance
from models.model import CTCModel
from models.summary_keys import SCALARS, SUMMARY_KEYS
from models.trajectory import trajectory_scalars
from models.ttt import ttt_logits
from models.vocab import Vocab

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "configs" / "partition.toml"


def greedy(logits: torch.Tensor, vocab: Vocab) -> str:
    """Best path: argmax per frame, merge repeats, drop blanks; NFC and whitespace folded."""
    ids = logits.argmax(-1).tolist()
    out = [i for j, i in enumerate(ids) if i != vocab.blank and (j == 0 or i != ids[j - 1])]
    return T.normalize(vocab.decode(out))


def summarise(hidden: torch.Tensor, logits: torch.Tensor, blank: int = 0) -> dict:
    """The ``trajectory_scalars`` dict for one utterance: hidden [T, D], logits [T, V]."""
    z = trajectory_scalars(hidden[None].float(), torch.ones(1, hidden.shape[0], dtype=torch.bool))[0].double()
    out: dict = {}
    for k, name in enumerate(SCALARS):
        col = z[:, k]
        out[f"{name}_mean"] = col.mean().item()
        out[f"{name}_std"] = col.std(unbiased=False).item()
        out[f"{name}_min"] = col.min().item()
        out[f"{name}_max"] = col.max().item()
    probs = logits.double().softmax(-1)
    conf, arg = probs.max(-1)
    nonblank = arg != blank
    out["ctc_confidence_mean"] = conf.mean().item()
    out["ctc_confidence_min"] = conf.min().item()
    out["ctc_nonblank_confidence_mean"] = conf[nonblank].mean().item() if nonblank.any() else 0.0
    out["ctc_nonblank_confidence_min"] = conf[nonblank].min().item() if nonblank.any() else 0.0
    out["ctc_blank_fraction"] = 1 - nonblank.double().mean().item()
    out = {k: round(v, 6) for k, v in out.items()}
    out["ctc_frames"] = int(logits.shape[0])
    return out


# ---------------------------------------------------------------- partition policy


def load_policy(path: str | Path = DEFAULT_POLICY) -> dict:
    """Read and check a partition policy (see configs/partition.toml)."""
    path = Path(path)
    with open(path, "rb") as f:
        policy = tomllib.load(f)
    return check_policy(policy, str(path))


def check_policy(policy: dict, source: str = "partition policy") -> dict:
    for key in ("name", "order", "fallback"):
        if key not in policy:
            raise ValueError(f"{source}: missing field '{key}'")
    if policy["fallback"] not in PARTITIONS:
        raise ValueError(f"{source}: fallback {policy['fallback']!r} is not one of {PARTITIONS}")
    for part in policy["order"]:
        if part not in PARTITIONS:
            raise ValueError(f"{source}: order lists {part!r}, not one of {PARTITIONS}")
        rule = policy.get(part)
        if not isinstance(rule, dict) or rule.get("match") not in ("any", "all"):
            raise ValueError(f"{source}: [{part}] needs match = \"any\" or \"all\"")
        for key, bound in rule.items():
            if key == "match":
                continue
            if key not in SUMMARY_KEYS:
                raise ValueError(f"{source}: [{part}] {key} is not a summary key ({', '.join(SUMMARY_KEYS)})")
            if not isinstance(bound, dict) or not bound or set(bound) - {"min", "max"}:
                raise ValueError(f"{source}: [{part}] {key} must be a table with 'min' and/or 'max'")
    return policy


def policy_sha256(policy: dict) -> str:
    return hashlib.sha256(json.dumps(policy, sort_keys=True).encode()).hexdigest()


def partition(summary: dict, policy: dict) -> str:
    """First partition in ``policy['order']`` whose conditions hold (any/all), else the fallback.
    A condition ``key = {min = a, max = b}`` holds when a <= summary[key] <= b."""
    for part in policy["order"]:
        rule = policy[part]
        hits = []
        for key, bound in rule.items():
            if key == "match":
                continue
            v = summary[key]
            hits.append(("min" not in bound or v >= bound["min"]) and ("max" not in bound or v <= bound["max"]))
        if hits and (any(hits) if rule["match"] == "any" else all(hits)):
            return part
    return policy["fallback"]


# ---------------------------------------------------------------- records


def decode_utterances(model: CTCModel, store, utts: list[Utterance], cfg: RunConfig, vocab: Vocab,
                      device: torch.device, policy: dict, use_ttt: bool,
                      split: str = "test") -> tuple[list[dict], dict]:
    """One §4 record per utterance (in ``utts`` order, from ``split``) and decode stats."""
    model.eval()
    rows, stats = [], {"ttt_steps": 0, "ttt_guard_reverts": 0}
    if use_ttt:  # what TTT changed: hypotheses that differ from the same model's output without TTT
        stats.update(changed=0, changed_edits_before=0, changed_edits_after=0, changed_chars=0,
                     no_ttt_edits=0, chars=0)
    for u in utts:
        x = torch.from_numpy(store.get(u.feat_id)).float()[None].to(device)
        n = torch.tensor([x.shape[1]], device=device)
        with torch.no_grad():
            out = model(x, n)
        logits = out.logits[0]
        if use_ttt:
            before = greedy(logits.float().cpu(), vocab)
            logits, s = ttt_logits(model, x, n, cfg.ttt, vocab.blank)
            stats["ttt_steps"] += s["steps"]
            stats["ttt_guard_reverts"] += s["guard_reverts"]
        logits, hidden = logits.float().cpu(), out.hidden[0].float().cpu()
        hyp = greedy(logits, vocab)
        edits, chars = T.row_edits(u.reference_text, hyp)
        if use_ttt:
            edits_before = T.row_edits(u.reference_text, before)[0]
            stats["no_ttt_edits"] += edits_before
            stats["chars"] += chars
            if before != hyp:
                stats["changed"] += 1
                stats["changed_edits_before"] += edits_before
                stats["changed_edits_after"] += edits
                stats["changed_chars"] += chars
        summary = summarise(hidden, logits, vocab.blank)
        rows.append({"feat_id": u.feat_id, "audio_id": u.audio_id, "split": split, "script": cfg.script,
                     "mode": cfg.mode, "asr_text": hyp, "reference_text": u.reference_text, "cer_edits": edits,
                     "reference_chars": chars, "trajectory_scalars": summary,
                     "partition": partition(summary, policy)})
    return rows, stats


def metrics_by_partition(rows: list[dict], policy: dict) -> dict:
    def block(sel: list[dict]) -> dict:
        refs = [r["reference_text"] for r in sel]
        hyps = [r["asr_text"] for r in sel]
        cer = T.corpus_cer(refs, hyps)
        tl = T.corpus_cer(refs, hyps, tone_free=True)
        return {"rows": len(sel), "reference_chars": cer.reference_chars, "edits": cer.edits,
                "cer": cer.value if cer.reference_chars else None,
                "toneless_reference_chars": tl.reference_chars, "toneless_edits": tl.edits,
                "toneless_cer": tl.value if tl.reference_chars else None}

    return {"policy": policy["name"], "policy_sha256": policy_sha256(policy),
            "partitions": {p: block([r for r in rows if r["partition"] == p]) for p in PARTITIONS},
            "overall": block(rows)}
