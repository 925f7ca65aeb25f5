"""The admissibility gate: decides, deterministically, which proposed N'Ko repairs may be
applied. The program's ungated corrector made CER worse (0.3106 -> 0.4701 on 500 rows);
this is the safety. Rules and their ids are documented in ``configs/agp/gate.toml``.

The gate sees the row's ASR text, partition and the lexicon (training references only),
never the reference text. Each decision carries the rule ids that fired (empty iff
accepted), the edit distance, the policy hash and a witness: HMAC-SHA256 over the row id,
policy hash and normalised proposal *and the verdict* (accepted, rules, edit distance,
partition, ASR text), with a per-install key kept outside the repository with mode 0600
(``witness_key_path``): a decision file edited to accept a refused proposal no longer
verifies.

Which rows may change is not left to the policy file: CONTRACTS §4 freezes stable rows and
quarantines novelty rows, and a policy that says otherwise is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import field_validator
from rapidfuzz.distance import Levenshtein

from agp.lexicon import Lexicon
from models.bundle import PARTITIONS, PredictionRow
from models.text import normalize
from models.errors import NkoOpsError
from models.text import VALIDITY_CLASSES, char_class
from models.tomlfile import read_toml
from models.validation import ConfigModel, validate

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "configs" / "agp" / "gate.toml"
REPO_ROOT = Path(__file__).resolve().parents[1]
RULE_IDS = ("empty", "no_op", "script", "orphan_mark", "stacked_tone", "frozen", "quarantine", "budget",
            "length_ratio", "new_word", "acoustic")
NKO_LETTERS = "\u07ca-\u07ea\u07f4\u07f5\u07fa"  # letters, tone apostrophes, lajanyalan
NKO_BASES = "\u07c0-\u07ea\u07f4\u07f5"  # what a mark may sit on: letters, digits (ordinals), apostrophes
NKO_TONES = "\u07eb-\u07f1"  # tone marks: at most one per letter
NKO_MARKS = "\u07eb-\u07f3\u07fd"  # the block's combining marks (tone, nasal, double dot, dantayalan)
NKO_DIGITS = "\u07c0-\u07c9"
MUST_FREEZE, MUST_QUARANTINE = "stable", "novelty"  # CONTRACTS §4
_TONE = re.compile(f"[{NKO_TONES}]")


class GateError(NkoOpsError, ValueError):
    pass


@dataclass(frozen=True)
class Budget:
    relative: float
    floor: int

    def allowed(self, asr_chars: int) -> int:
        return max(self.floor, int(self.relative * asr_chars))


@dataclass(frozen=True)
class GatePolicy:
    version: int
    allowed_punctuation: str
    frozen: tuple[str, ...]
    quarantine: tuple[str, ...]
    lexicon_checked: tuple[str, ...]
    length_min: float
    length_max: float
    budgets: dict[str, Budget]
    path: str = ""
    script_classes: tuple[str, ...] = ()  # validity classes accepted beyond N'Ko (models.text)
    # rule `acoustic`: on these partitions accept only when delta >= -margin[partition]
    # (delta: per-frame CTC log-likelihood of the proposal minus the ASR text's, models/score.py)
    acoustic_checked: tuple[str, ...] = ()
    acoustic_margins: tuple[tuple[str, float], ...] = ()

    def margin(self, partition: str) -> float | None:
        return dict(self.acoustic_margins).get(partition) if partition in self.acoustic_checked else None

    def as_dict(self) -> dict:
        return {
            "version": self.version, "allowed_punctuation": "".join(sorted(set(self.allowed_punctuation))),
            "frozen": sorted(self.frozen), "quarantine": sorted(self.quarantine),
            "lexicon_checked": sorted(self.lexicon_checked),
            "length_ratio": {"min": self.length_min, "max": self.length_max},
            "budget": {p: {"relative": b.relative, "floor": b.floor} for p, b in sorted(self.budgets.items())},
            **({"acoustic": {"checked": sorted(self.acoustic_checked),
                             "margin": {p: json_float(m) for p, m in sorted(self.acoustic_margins)}}}
               if self.acoustic_checked else {}),
        } | ({"script_classes": sorted(self.script_classes)} if self.script_classes else {})

    def with_margins(self, margins: dict[str, float]) -> "GatePolicy":
        """The same policy with new acoustic margins (calibration)."""
        from dataclasses import replace

        merged = dict(self.acoustic_margins) | margins
        return replace(self, acoustic_margins=tuple(sorted(merged.items())))


def json_float(x: float | None) -> float | str | None:
    """JSON has no infinities: they are written as the strings "inf" / "-inf"."""
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"


def from_json_float(x) -> float | None:
    return float(x) if isinstance(x, str) else x


class _BudgetEntry(ConfigModel):
    relative: float
    floor: int

    @field_validator("relative")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError("must be between 0 and 1")
        return v

    @field_validator("floor")
    @classmethod
    def _floor(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be an integer >= 0")
        return v


class _LengthRatio(ConfigModel):
    min: float
    max: float


class _Acoustic(ConfigModel):
    checked: list[str]
    margin: dict[str, Any]  # partition -> float, or the strings "inf" / "-inf" (checked below)


def _partition_list(v: list[str]) -> list[str]:
    if any(p not in PARTITIONS for p in v):
        raise ValueError(f"must be a list of partitions from {', '.join(PARTITIONS)}")
    return v


class GatePolicyFile(ConfigModel):
    """The schema of ``configs/agp/gate.toml`` (structure and types); the rules that tie
    fields together (CONTRACTS §4, budgets of editable partitions, margins) are checked by
    ``parse_gate_policy``."""

    version: int
    allowed_punctuation: str
    frozen: list[str]
    quarantine: list[str]
    lexicon_checked: list[str]
    length_ratio: _LengthRatio
    budget: dict[str, _BudgetEntry]
    script_classes: list[str] = []
    acoustic: _Acoustic | None = None

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != 1:
            raise ValueError("this gate understands version 1")
        return v

    @field_validator("allowed_punctuation")
    @classmethod
    def _punct(cls, v: str) -> str:
        if any(ch.isspace() or ch.isalnum() for ch in v):
            raise ValueError("must be a string of punctuation characters (no letters, digits, spaces)")
        return v

    _partitions = field_validator("frozen", "quarantine", "lexicon_checked")(_partition_list)

    @field_validator("script_classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        choosable = [c for c in VALIDITY_CLASSES if c not in ("nko", "control")]
        if any(c not in choosable for c in v):
            raise ValueError(f"must be a list of validity classes from {', '.join(choosable)} "
                             "(N'Ko is always accepted; controls never are)")
        return v


def parse_gate_policy(data: dict, path: str = "") -> GatePolicy:
    """A gate policy from a parsed TOML document; errors name ``path`` and the field."""
    def fail(key: str, message: str) -> GateError:
        return GateError(f"{path}: field '{key}': {message}" if path else f"field '{key}': {message}")

    f = validate(GatePolicyFile, data, path, GateError)
    lr = f.length_ratio
    if not 0 < lr.min <= 1 <= lr.max:
        raise fail("length_ratio", "must be {min, max} with 0 < min <= 1 <= max")
    for part in f.budget:
        if part not in PARTITIONS:
            raise fail(f"budget.{part}", "not a partition")
    if MUST_FREEZE not in f.frozen:
        raise fail("frozen", f"must include {MUST_FREEZE!r}: stable rows are kept unchanged (CONTRACTS §4)")
    if MUST_QUARANTINE not in f.quarantine:
        raise fail("quarantine", f"must include {MUST_QUARANTINE!r}: novelty rows get no rewriting (CONTRACTS §4)")
    for p in PARTITIONS:
        if p not in f.frozen and p not in f.quarantine and p not in f.budget:
            raise fail(f"budget.{p}", f"partition {p!r} may be edited, so it needs an edit budget")
    budgets = {part: Budget(float(b.relative), b.floor) for part, b in f.budget.items()}
    checked, margins = _parse_acoustic(f.acoustic, fail)
    return GatePolicy(1, f.allowed_punctuation, tuple(f.frozen), tuple(f.quarantine), tuple(f.lexicon_checked),
                      float(lr.min), float(lr.max), budgets, path, tuple(sorted(set(f.script_classes))),
                      checked, margins)


def _parse_acoustic(table: _Acoustic | None, fail) -> tuple[tuple[str, ...], tuple[tuple[str, float], ...]]:
    """``[acoustic] checked = [...]`` with ``[acoustic.margin] <partition> = float`` (may be inf/-inf:
    -inf accepts nothing there, inf accepts any scored proposal). Absent: the rule is off."""
    if table is None:
        return (), ()
    if any(p not in PARTITIONS for p in table.checked):
        raise fail("acoustic.checked", f"must be a list of partitions from {', '.join(PARTITIONS)}")
    margins = {}
    for part, m in table.margin.items():
        m = from_json_float(m) if m in ("inf", "-inf") else m
        if part not in PARTITIONS or not isinstance(m, (int, float)) or isinstance(m, bool) or math.isnan(m):
            raise fail(f"acoustic.margin.{part}", "must be a partition with a number (inf / -inf allowed)")
        margins[part] = float(m)
    for part in table.checked:
        if part not in margins:
            raise fail(f"acoustic.margin.{part}", f"partition {part!r} is acoustically checked, so it needs a margin")
    return tuple(table.checked), tuple(sorted(margins.items()))


def load_gate_policy(path: Path | str | None = None) -> GatePolicy:
    path = Path(path) if path else DEFAULT_POLICY
    return parse_gate_policy(read_toml(path, GateError, "gate policy"), str(path))


# --------------------------------------------------------------------------- witness key


def witness_key_path() -> Path:
    """$NKO_OPS_HOME/agp_witness.key, else $XDG_CONFIG_HOME (or ~/.config)/nko-ops/agp_witness.key."""
    home = os.environ.get("NKO_OPS_HOME")
    if home:
        return Path(home).expanduser() / "agp_witness.key"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "nko-ops" / "agp_witness.key"


def load_witness_key(path: Path | None = None) -> bytes:
    """The per-install witness key, created (32 random bytes, hex, mode 0600) on first use.
    Refuses a key inside the repository or one readable by group/others."""
    path = Path(path) if path else witness_key_path()
    resolved = path.expanduser().resolve()
    if resolved == REPO_ROOT or REPO_ROOT in resolved.parents:
        raise GateError(f"witness key {resolved} is inside the repository {REPO_ROOT}; "
                        "set NKO_OPS_HOME to a directory outside it")
    if not resolved.exists():
        resolved.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = resolved.with_name(f".{resolved.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, resolved)  # atomic; loses cleanly to a concurrent creator
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    mode = stat.S_IMODE(resolved.stat().st_mode)
    if mode & 0o077:
        raise GateError(f"witness key {resolved} has mode {mode:o}; it must be 0600 (chmod 600 {resolved})")
    text = resolved.read_text().strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise GateError(f"witness key {resolved} is not 64 hex characters")
    return bytes.fromhex(text)


WITNESSED = ("feat_id", "policy_hash", "proposal", "accepted", "rules", "edit_distance", "partition", "asr_text")
ACOUSTIC_WITNESSED = ("acoustic_delta", "acoustic_margin")  # JSON-safe (json_float)


def witness(key: bytes, decision: dict) -> str:
    """HMAC-SHA256 (hex) over the decision's ``WITNESSED`` fields: the row id, policy hash and
    proposal, and the verdict on them."""
    values = [decision[k] for k in WITNESSED]
    values[WITNESSED.index("rules")] = list(values[WITNESSED.index("rules")])
    acoustic = [decision.get(k) for k in ACOUSTIC_WITNESSED]
    if any(v is not None for v in acoustic):  # decisions of a gate without the rule keep their old witness
        values.append(acoustic)
    msg = json.dumps(values, ensure_ascii=False).encode()
    return hmac.digest(key, msg, "sha256").hex()


def verify_witness(key: bytes, decision: dict) -> bool:
    """Was this decision, verdict included, made by a gate holding ``key``?"""
    try:
        expected = witness(key, decision)
    except (KeyError, TypeError):
        return False
    return hmac.compare_digest(str(decision.get("witness", "")), expected)


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Decision:
    feat_id: str
    accepted: bool
    rules: tuple[str, ...]
    edit_distance: int
    policy_hash: str
    witness: str
    partition: str
    partition_source: str
    asr_text: str
    proposal: str  # normalised; what would be applied
    normalized: bool  # normalisation changed the proposal as submitted
    acoustic_delta: float | None = None  # the proposal's acoustic score, as given to the gate
    acoustic_margin: float | str | None = None  # margin of the row's partition when rule `acoustic` checks it

    def as_dict(self) -> dict:
        d = {"feat_id": self.feat_id, "accepted": self.accepted, "rules": list(self.rules),
             "edit_distance": self.edit_distance, "policy_hash": self.policy_hash, "witness": self.witness,
             "partition": self.partition, "partition_source": self.partition_source,
             "asr_text": self.asr_text, "proposal": self.proposal, "normalized": self.normalized}
        if self.acoustic_delta is not None or self.acoustic_margin is not None:
            d["acoustic_delta"] = self.acoustic_delta
            d["acoustic_margin"] = self.acoustic_margin
        return d


class Gate:
    def __init__(self, policy: GatePolicy, lexicon: Lexicon | None = None, partition_source: str = "model",
                 key: bytes | None = None):
        self.policy = policy
        self.lexicon = lexicon
        self.partition_source = partition_source
        self.key = key if key is not None else load_witness_key()
        ident = {"gate": policy.as_dict(), "lexicon": lexicon.sha256 if lexicon is not None else None,
                 "partition_source": partition_source}
        self.policy_hash = hashlib.sha256(json.dumps(ident, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        punct = "".join(re.escape(ch) for ch in sorted(set(policy.allowed_punctuation)))
        self._bad_char = re.compile(f"[^{NKO_LETTERS}{NKO_MARKS}{NKO_DIGITS} {punct}]")
        # a mark whose base (the character before its run of marks) is not an N'Ko letter or digit
        self._orphan = re.compile(f"(?:^|[^{NKO_BASES}{NKO_MARKS}])([{NKO_MARKS}]+)")
        self._cluster_tones = re.compile(f"[{NKO_BASES}]([{NKO_MARKS}]+)")  # the marks on one base
        self._strip = policy.allowed_punctuation
        self._classes = set(policy.script_classes)
        self._frozen = set(policy.frozen)
        self._quarantine = set(policy.quarantine)
        self._lexicon_checked = set(policy.lexicon_checked)
        self._margins = {p: policy.margin(p) for p in policy.acoustic_checked}

    def _orphans(self, text: str) -> int:
        return sum(len(m) for m in self._orphan.findall(text))

    def _stacked_tones(self, text: str) -> int:
        """Tone marks beyond the first on each base."""
        return sum(max(0, len(_TONE.findall(marks)) - 1) for marks in self._cluster_tones.findall(text))

    def _words(self, text: str) -> set[str]:
        return {w.strip(self._strip) for w in text.split(" ")} - {""}

    def decide(self, row: PredictionRow, proposal: str, acoustic_delta: float | None = None) -> Decision:
        """``acoustic_delta``: the proposal's score from models/score.py (None: not scored)."""
        if row.partition_source and row.partition_source != self.partition_source:
            raise GateError(f"{row.feat_id}: row partition source {row.partition_source!r} is not the gate's "
                            f"{self.partition_source!r}")
        asr = normalize(row.asr_text)
        p = normalize(proposal)
        rules: list[str] = []
        dist = 0
        part = row.partition
        if not p:
            rules.append("empty")
            dist = len(asr)
        elif p == asr:
            rules.append("no_op")
        else:
            dist = Levenshtein.distance(asr, p)
            if any(char_class(m.group()) not in self._classes for m in self._bad_char.finditer(p)):
                rules.append("script")
            # misplaced marks the ASR text already had are not the proposal's doing
            if self._orphans(p) > self._orphans(asr):
                rules.append("orphan_mark")
            if self._stacked_tones(p) > self._stacked_tones(asr):
                rules.append("stacked_tone")
            if part in self._frozen:
                rules.append("frozen")
            if part in self._quarantine:
                rules.append("quarantine")
            budget = self.policy.budgets.get(part)
            if budget is not None and dist > budget.allowed(len(asr)):
                rules.append("budget")
            ratio = len(p) / max(len(asr), 1)
            if not self.policy.length_min <= ratio <= self.policy.length_max:
                rules.append("length_ratio")
            if part in self._lexicon_checked:
                new = self._words(p) - self._words(asr)
                if any(self.lexicon is None or w not in self.lexicon for w in new):
                    rules.append("new_word")
            margin = self._margins.get(part)
            if margin is not None and (acoustic_delta is None or not acoustic_delta >= -margin):
                rules.append("acoustic")  # no score, NaN, or the audio prefers the ASR text by more than the margin
        delta = json_float(acoustic_delta) if acoustic_delta is None or not math.isnan(acoustic_delta) else None
        margin_out = json_float(self._margins.get(part))
        verdict = {"feat_id": row.feat_id, "policy_hash": self.policy_hash, "proposal": p, "accepted": not rules,
                   "rules": rules, "edit_distance": dist, "partition": part, "asr_text": asr,
                   "acoustic_delta": delta, "acoustic_margin": margin_out}
        return Decision(row.feat_id, not rules, tuple(rules), dist, self.policy_hash, witness(self.key, verdict),
                        part, self.partition_source, asr, p, p != proposal, delta, margin_out)
