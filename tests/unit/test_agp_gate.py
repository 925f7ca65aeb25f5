import os
import random
import stat
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from rapidfuzz.distance import Levenshtein

from agp.gate import (RULE_IDS, Gate, GateError, from_json_float, load_gate_policy, load_witness_key, parse_gate_policy,
                      verify_witness, witness_key_path)
from agp.lexicon import Lexicon
from agp_helpers import PAIRS, make_row

POLICY = load_gate_policy()
LEXICON = Lexicon.from_references([ref for ref, _ in PAIRS])
GATE = Gate(POLICY, LEXICON, key=b"\x01" * 32)
ROWS = [make_row(f"r{i}_{part}", ref, asr, part)
        for i, (ref, asr) in enumerate(PAIRS) for part in ("stable", "boundary", "uncertain", "novelty")]
ROWS.append(make_row("empty_asr", "ߦߋ", "", "boundary"))


def violations(row, d, delta) -> list[str]:
    """An independent reading of configs/agp/gate.toml: what an accepted proposal must satisfy."""
    p, asr, out = d.proposal, row.asr_text, []
    if not p:
        out.append("empty")
    if p == asr:
        out.append("no_op")
    if not unicodedata.is_normalized("NFC", p) or p != p.strip() or "  " in p:
        out.append("not normalised")
    for ch in p:
        nko = "NKO" in unicodedata.name(ch, "") and unicodedata.category(ch) in ("Lo", "Lm", "Mn", "Nd")
        if not (nko or ch == " " or ch in POLICY.allowed_punctuation):
            out.append(f"char U+{ord(ch):04X}")

    def bases(t):
        """Each combining mark with the character it sits on (None at the start)."""
        out, base = [], None
        for ch in t:
            if unicodedata.category(ch) == "Mn":
                out.append((base, ch))
            else:
                base = ch
        return out

    def orphans(t):
        return sum(b is None or unicodedata.category(b) not in ("Lo", "Lm", "Nd") for b, _ in bases(t))

    def stacked(t):
        tones, count, base_at = 0, 0, -1
        for i, ch in enumerate(t):
            if unicodedata.category(ch) != "Mn":
                tones, base_at = 0, i
            elif "TONE" in unicodedata.name(ch) and base_at >= 0 and unicodedata.category(t[base_at]) in ("Lo", "Lm", "Nd"):
                tones += 1
                count += tones > 1
        return count

    if orphans(p) > orphans(asr):
        out.append("orphan mark")
    if stacked(p) > stacked(asr):
        out.append("stacked tone")
    if row.partition in ("stable", "novelty") and p != asr:
        out.append("changed a frozen/quarantined row")
    dist = Levenshtein.distance(asr, p)
    if dist != d.edit_distance:
        out.append("edit distance misreported")
    budget = POLICY.budgets.get(row.partition)
    if budget and dist > max(budget.floor, int(budget.relative * len(asr))):
        out.append("over budget")
    if not POLICY.length_min <= len(p) / max(len(asr), 1) <= POLICY.length_max:
        out.append("length ratio")
    if row.partition == "uncertain":
        new = {w.strip(POLICY.allowed_punctuation) for w in p.split(" ")} - set(asr.split(" ")) - {""}
        if any(w not in LEXICON for w in new):
            out.append("new word")
    if row.partition in ("boundary", "uncertain"):  # rule acoustic: scored, and delta >= -margin
        margin = dict(POLICY.acoustic_margins)[row.partition]
        if delta is None or delta != delta or delta < -margin:
            out.append("acoustic evidence")
        recorded = from_json_float(d.acoustic_delta)  # infinities are recorded as "inf" / "-inf" (JSON)
        if from_json_float(d.acoustic_margin) != margin or not (recorded == delta or recorded is delta is None
                                                                or (delta != delta and recorded is None)):
            out.append("acoustic fields misreported")
    return out


def check(row, proposal, delta=0.0):
    d = GATE.decide(row, proposal, delta)
    assert d.accepted == (not d.rules)
    assert set(d.rules) <= set(RULE_IDS)
    assert d.policy_hash == GATE.policy_hash and len(d.witness) == 64
    assert GATE.decide(row, proposal, delta) == d  # deterministic
    if d.accepted:
        assert violations(row, d, delta) == []
    return d


DELTAS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, -1e-9]))


NKO = [chr(c) for c in range(0x07C0, 0x0800)]
LATIN = list("abcdeɛɔŋABCZ'-.")
ARABIC = [chr(c) for c in range(0x0621, 0x064B)] + ["\u064e", "\u0650", "،", "؟"]
BIDI = ["\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068",
        "\u2069", "\u061c"]
CONTROL = [chr(c) for c in range(0, 32)] + ["\x7f", "\u0085", "\u200b", "\ufeff", "\u00ad", "\u2028"]
ALPHABET = NKO + LATIN + ARABIC + BIDI + CONTROL + [" "] * 8
row_st = st.sampled_from(ROWS)


@st.composite
def adversarial(draw):
    row = draw(row_st)
    asr = row.asr_text
    kind = draw(st.sampled_from(["random", "mutate", "mutate", "long", "lexicon", "wrap", "case"]))
    if kind == "random":
        p = draw(st.text(alphabet=st.sampled_from(ALPHABET), max_size=60))
    elif kind == "mutate":  # a few edits from the whole adversarial alphabet, near the ASR text
        chars = list(asr)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["ins", "del", "sub"]))
            i = draw(st.integers(0, len(chars)))
            ch = draw(st.sampled_from(ALPHABET))
            if op == "ins":
                chars.insert(i, ch)
            elif chars and i < len(chars):
                if op == "del":
                    del chars[i]
                else:
                    chars[i] = ch
        p = "".join(chars)
    elif kind == "long":
        p = " ".join([asr] * 10)
    elif kind == "lexicon":  # swap one word for a lexicon word: sometimes admissible
        words = asr.split(" ")
        i = draw(st.integers(0, max(len(words) - 1, 0)))
        words[i] = draw(st.sampled_from(sorted(LEXICON.counts)))
        p = " ".join(words)
    elif kind == "wrap":  # bidi overrides / controls around an otherwise plausible text
        p = draw(st.sampled_from(BIDI + CONTROL)) + asr + draw(st.sampled_from(BIDI + CONTROL))
    else:
        p = asr.upper() + draw(st.sampled_from(["", " ", "abc", "مرحبا"]))
    return row, p, draw(DELTAS)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adversarial())
def test_fuzz_no_exception_and_no_accepted_violation(case):
    row, proposal, delta = case
    decision = check(row, proposal, delta)  # check() asserts every invariant of the decision
    assert not decision.accepted or violations(row, decision, delta) == []


def test_random_mutations_hit_both_outcomes():
    rng = random.Random(7)
    accepted = rejected = 0
    lex_words = sorted(LEXICON.counts)
    for _ in range(3000):
        row = rng.choice(ROWS)
        words = row.asr_text.split(" ")
        r = rng.random()
        if r < 0.4 and words:
            words[rng.randrange(len(words))] = rng.choice(lex_words)
            p = " ".join(words)
        elif r < 0.7:
            chars = list(row.asr_text)
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(NKO))
            p = "".join(chars)
        else:
            p = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(40)))
        d = check(row, p, rng.choice([None, -0.5, -0.01, 0.0, 0.02, float("nan")]))
        accepted += d.accepted
        rejected += not d.accepted
    assert accepted > 100 and rejected > 100


def r(part, asr="ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ", ref="ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ"):
    return make_row(f"x_{part}", ref, asr, part)


@pytest.mark.parametrize("part,proposal,rules", [
    ("boundary", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", []),                          # one nasal mark: within budget
    ("boundary", "", ["empty"]),
    ("boundary", " \u200f ", ["empty"]),
    ("boundary", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ", ["no_op"]),
    ("boundary", "\u202eߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ\u202c", ["no_op"]),              # bidi stripped first
    ("boundary", "ߌ ߦߋ san ߖߏߟߌ ߦߋ", ["script", "budget"]),
    ("boundary", "ߌ ߦߋ ߛߊ\x00 ߖߏߟߌ ߦߋ", ["script"]),
    ("boundary", "ߌ ߦߋ ߛߊ ߲ߖߏߟߌ ߦߋ", ["orphan_mark"]),                 # nasal mark with no base
    ("boundary", "ߌ ߦߋ ߛߊ߸߲ ߖߏߟߌ ߦߋ", ["orphan_mark"]),                # a mark on punctuation
    ("boundary", "ߌ ߦߋ ߛߊ߫߬ ߖߏߟߌ ߦߋ", ["stacked_tone"]),               # two tones on one letter
    ("boundary", "ߌ ߦߋ ߛߊ߲߬ ߖߏߟߌ ߦߋ", []),                             # nasal + one tone is fine
    ("boundary", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ߿", ["script"]),                      # taman sign: not listed punctuation
    ("boundary", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ߸", []),                              # listed punctuation
    ("stable", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", ["frozen"]),
    ("novelty", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", ["quarantine"]),
    ("boundary", "ߌ ߦߋ ߛߊ߲߫ ߖߏߟߌ߬ ߦߋ", ["budget"]),                    # 3 edits > 2 allowed on 15 chars
    ("boundary", "ߌ ߦߋ ߛߊ", ["budget", "length_ratio"]),
    ("uncertain", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", []),                             # ߛߊ߲ is in the lexicon
    ("uncertain", "ߌ ߦߋ ߛߊߕ ߖߏߟߌ ߦߋ", ["new_word"]),                   # ߛߊߕ is in neither
    ("boundary", "ߌ ߦߋ ߛߊߕ ߖߏߟߌ ߦߋ", []),                              # boundary rows are not lexicon-checked
])
def test_rules_on_hand_built_cases(part, proposal, rules):
    d = check(r(part), proposal)
    assert list(d.rules) == rules


@pytest.mark.parametrize("part,delta,margin,accepted", [
    ("boundary", None, 0.0, False),            # not scored: rejected where the rule checks
    ("boundary", -0.01, 0.0, False),           # the audio prefers the ASR text
    ("boundary", -0.01, 0.02, True),           # ...by less than the margin
    ("boundary", -0.03, 0.02, False),
    ("uncertain", float("nan"), 1.0, False),
    ("uncertain", 5.0, float("-inf"), False),  # -inf: nothing passes there
    ("boundary", -9.0, float("inf"), True),    # inf: any scored proposal passes
])
def test_acoustic_rule(part, delta, margin, accepted):
    policy = POLICY.with_margins({part: margin})
    gate = Gate(policy, LEXICON, key=GATE.key)
    d = gate.decide(r(part), "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", delta)
    assert d.accepted == accepted and d.rules == (() if accepted else ("acoustic",))
    rec = d.as_dict()
    assert rec["acoustic_margin"] == (margin if abs(margin) != float("inf") else ("inf" if margin > 0 else "-inf"))
    assert verify_witness(GATE.key, rec)
    # the score and the margin are witnessed: raising a rejected delta does not verify
    assert not verify_witness(GATE.key, {**rec, "acoustic_delta": 1.0})
    assert not verify_witness(GATE.key, {**rec, "acoustic_margin": 100.0})
    assert (gate.policy_hash == GATE.policy_hash) == (margin == 0.0)  # the margins are part of the policy
    # stable / novelty rows are not acoustically checked: their own rules decide
    assert gate.decide(r("stable"), "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", None).rules == ("frozen",)


def test_acoustic_policy_errors():
    raw = POLICY.as_dict()
    with pytest.raises(GateError, match="acoustic.margin.uncertain.*needs a margin"):
        parse_gate_policy({**raw, "acoustic": {"checked": ["boundary", "uncertain"], "margin": {"boundary": 0.1}}})
    with pytest.raises(GateError, match="acoustic.margin.boundary"):
        parse_gate_policy({**raw, "acoustic": {"checked": ["boundary"], "margin": {"boundary": "lots"}}})
    off = parse_gate_policy({k: v for k, v in raw.items() if k != "acoustic"})
    assert off.acoustic_checked == () and Gate(off, LEXICON, key=GATE.key).decide(r("boundary"), "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ").accepted


def test_orphan_marks_the_asr_already_had_are_not_the_proposals_fault():
    row = make_row("o", "ߊ ߓߊ߲ ߞߊ", "ߊ ߲ߓ ߞߊ", "boundary")
    assert check(row, "ߊ ߲ߓ ߞߊ߫").accepted                     # keeps the ASR's malformed word
    assert check(row, "߲ߊ ߲ߓ ߞߊ").rules == ("orphan_mark",)    # adds another


def test_decision_fields_and_witness():
    d = GATE.decide(r("boundary"), "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ\u200f", 0.0)
    assert d.accepted and d.normalized and d.proposal == "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ" and d.edit_distance == 1
    rec = d.as_dict()
    assert set(rec) >= {"feat_id", "accepted", "rules", "edit_distance", "policy_hash", "witness"}
    assert verify_witness(GATE.key, rec)
    assert not verify_witness(b"\x02" * 32, rec)
    assert not verify_witness(GATE.key, {**rec, "proposal": rec["proposal"] + "ߊ"})
    assert not verify_witness(GATE.key, {**rec, "feat_id": "other"})
    refused = GATE.decide(r("stable"), "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ").as_dict()
    assert verify_witness(GATE.key, refused)
    # the verdict is witnessed too: a refused proposal edited into an accepted one fails
    assert not verify_witness(GATE.key, {**refused, "accepted": True, "rules": []})
    assert not verify_witness(GATE.key, {**refused, "partition": "boundary"})


def test_a_policy_cannot_unfreeze_stable_or_unquarantine_novelty():
    raw = POLICY.as_dict()
    budgets = {p: {"relative": 0.5, "floor": 5} for p in ("stable", "boundary", "uncertain", "novelty")}
    with pytest.raises(GateError, match="field 'frozen': must include 'stable'"):
        parse_gate_policy({**raw, "frozen": [], "budget": budgets}, "g.toml")
    with pytest.raises(GateError, match="field 'quarantine': must include 'novelty'"):
        parse_gate_policy({**raw, "quarantine": [], "budget": budgets}, "g.toml")


def test_block_symbols_need_listing_as_punctuation():
    raw = POLICY.as_dict()
    bare = Gate(parse_gate_policy({**raw, "allowed_punctuation": ""}), LEXICON, key=GATE.key)
    for sym in "߶߷߸߹߾߿":
        assert bare.decide(r("boundary"), "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ" + sym, 0.0).rules == ("script",), sym


def test_policy_hash_covers_policy_lexicon_and_partition_source(tmp_path):
    raw = POLICY.as_dict()
    stricter = parse_gate_policy({**raw, "budget": {**raw["budget"], "boundary": {"relative": 0.1, "floor": 1}}})
    hashes = {
        GATE.policy_hash,
        Gate(stricter, LEXICON, key=GATE.key).policy_hash,
        Gate(POLICY, Lexicon.from_references(["ߦߋ"]), key=GATE.key).policy_hash,
        Gate(POLICY, LEXICON, partition_source="policy:abc", key=GATE.key).policy_hash,
    }
    assert len(hashes) == 4
    assert Gate(POLICY, Lexicon.from_references([ref for ref, _ in PAIRS]), key=b"\x03" * 32).policy_hash == GATE.policy_hash


def test_policy_errors_name_the_key():
    raw = POLICY.as_dict()
    with pytest.raises(GateError, match="field 'budget.uncertain'.*needs an edit budget"):
        parse_gate_policy({**raw, "budget": {"boundary": raw["budget"]["boundary"]}}, "g.toml")
    with pytest.raises(GateError, match="field 'length_ratio'"):
        parse_gate_policy({**raw, "length_ratio": {"min": 2, "max": 3}}, "g.toml")
    with pytest.raises(GateError, match="field 'colour': unknown field"):
        parse_gate_policy({**raw, "colour": "red"}, "g.toml")


def test_row_from_another_partition_source_is_refused():
    row = make_row("p", "ߦߋ", "ߦߋ", "boundary")
    from dataclasses import replace
    with pytest.raises(GateError, match="partition source"):
        GATE.decide(replace(row, partition_source="policy:123"), "ߦߍ")


def test_witness_key_is_created_0600_outside_the_repo(agp_home):
    key = load_witness_key()
    path = witness_key_path()
    assert path.parent == agp_home and path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_witness_key() == key and len(key) == 32
    os.chmod(path, 0o644)
    with pytest.raises(GateError, match="must be 0600"):
        load_witness_key()


def test_witness_key_refused_inside_the_repo(monkeypatch):
    from agp.gate import REPO_ROOT
    monkeypatch.setenv("NKO_OPS_HOME", str(REPO_ROOT / "work"))
    with pytest.raises(GateError, match="inside the repository"):
        load_witness_key()
    assert not (REPO_ROOT / "work" / "agp_witness.key").exists()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(ALPHABET), max_size=40))
def test_fast_normalize_matches_a_plain_reference(text):
    import re
    import unicodedata

    from models.text import BIDI_CONTROLS, INVISIBLES, normalize

    nfc = unicodedata.normalize("NFC", text)
    plain = re.sub(r"\s+", " ", "".join(ch for ch in nfc if ch not in BIDI_CONTROLS | INVISIBLES)).strip()
    assert normalize(text) == plain


def test_script_classes_choose_what_else_a_proposal_may_contain():
    """The policy's `script_classes` (models.text validity classes) widen the script rule;
    absent, the gate accepts N'Ko only and its policy hash is unchanged."""
    assert "script_classes" not in POLICY.as_dict() and POLICY.script_classes == ()
    raw = {k: v for k, v in POLICY.as_dict().items() if k != "acoustic"}  # unscored proposals here
    strict_gate = Gate(parse_gate_policy(raw), LEXICON, key=GATE.key)
    asr = "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ"
    typo = Gate(parse_gate_policy({**raw, "script_classes": ["typographic"]}), LEXICON, key=GATE.key)
    assert typo.policy_hash != strict_gate.policy_hash
    for proposal, strict, widened in [("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ%", ("script",), ()),
                                      ("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ°", ("script",), ()),
                                      ("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦx", ("script",), ("script",)),
                                      ("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦ\x07", ("script",), ("script",))]:
        row = make_row("sc", asr, asr, "boundary")
        assert strict_gate.decide(row, proposal).rules == strict, proposal
        assert typo.decide(row, proposal).rules == widened, proposal
    for bad in (["control"], ["nko"], ["emoji"], "latin"):
        with pytest.raises(GateError, match="field 'script_classes'"):
            parse_gate_policy({**raw, "script_classes": bad}, "g.toml")
