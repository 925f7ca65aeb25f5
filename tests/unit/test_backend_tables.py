"""Tables, bootstrap, claims, import and promotion on constructed run directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from backend import stats
from state import store
from backend.claims import (DISCLAIMER, INCONCLUSIVE, INSUFFICIENT, REFUTED, SUPPORTED, ClaimsError, check_claims, load_claims,
                            report)
from backend.matrix import parse_matrix
from backend.promote import PromoteError, promote
from backend.runs import import_run, verify_bundle
from models.bundle import BundleError
from backend.tables import write_tables
from cli.root import app
from backend_helpers import make_corpus, matrix_dict, noisy, write_bundle

runner = CliRunner()
REF = "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ"  # 16 code points
LATIN_REF = "i ye san joli ye"  # 16


# --------------------------------------------------------------------------- bootstrap

def test_paired_bootstrap_matches_the_hand_computed_two_utterance_case():
    # run: 1/10 and 2/10 edits; reference run: 3/10 and 2/10. Resampling 2 utterances gives
    # {u0,u0}: 0.1-0.3 = -0.2 (p 1/4), {u1,u1}: 0.2-0.2 = 0 (p 1/4), mixed: 3/20-5/20 = -0.1 (p 1/2).
    d = stats.paired_delta([1, 2], [10, 10], [3, 2], [10, 10], resamples=10_000, seed=7)
    assert d.delta == pytest.approx(-0.1)
    assert (d.lo, d.hi) == (pytest.approx(-0.2), pytest.approx(0.0, abs=1e-12))  # 2.5% / 97.5% quantiles
    assert d.p_improvement == pytest.approx(0.75, abs=0.02)  # P(Δ < 0) = 3/4
    # a distribution with no mass at or above 0: CI strictly negative, P(improvement) = 1
    d = stats.paired_delta([0, 1], [10, 10], [3, 2], [10, 10])
    assert d.hi < 0 and d.p_improvement == 1.0


def test_vectorised_totals_equal_a_per_resample_loop_on_the_same_draws():
    rng = np.random.default_rng(3)
    chars = rng.integers(1, 40, size=(4, 97))
    edits = rng.binomial(chars, 0.3)
    e_tot, c_tot = stats.resampled_totals(edits, chars, resamples=300, seed=11, chunk=64)
    bitgen = np.random.PCG64(11)
    rows = []
    for start in range(0, 300, 64):
        b = min(64, 300 - start)
        idx = stats.draw_indices(bitgen, 97, b * 97).reshape(b, 97)
        for i in range(b):  # one resample at a time, gathering rows
            rows.append(np.concatenate([edits[:, idx[i]].sum(axis=1), chars[:, idx[i]].sum(axis=1)]))
    loop = np.array(rows)
    assert np.array_equal(e_tot, loop[:, :4]) and np.array_equal(c_tot, loop[:, 4:])


def test_draw_indices_is_uniform_and_in_range():
    idx = stats.draw_indices(np.random.PCG64(0), 7, 70_000)
    assert idx.min() == 0 and idx.max() == 6
    counts = np.bincount(idx, minlength=7)
    assert np.all(np.abs(counts - 10_000) < 500)


# --------------------------------------------------------------------------- constructed matrix

@pytest.fixture()
def bundle(tmp_path):
    """A corpus of 200 utterances (20 test) and a matrix with six constructed runs."""
    corpus = make_corpus(tmp_path / "data", n=200)
    test = corpus["split_obj"].test
    refs_nko = {f: REF for f in test}
    refs_lat = {f: LATIN_REF for f in test}
    parts = {f: ("stable", "boundary", "uncertain", "novelty")[i % 4] for i, f in enumerate(test)}
    out = tmp_path / "runs"
    specs = [  # run id, script, mode, seed, edits per utterance (cycled)
        ("nko-traj-s1", "nko", "trajectory", 1, [0, 1]),
        ("nko-traj-s2", "nko", "trajectory", 2, [1, 1]),
        ("latin-traj-s1", "latin", "trajectory", 1, [4, 5]),
        ("latin-traj-s2", "latin", "trajectory", 2, [5, 5]),
        ("nko-base-s1", "nko", "baseline", 1, [0, 1]),
        ("nko-tar-s1", "nko", "tar", 1, [2, 2]),
    ]
    for rid, script, mode, seed, ks in specs:
        refs = refs_nko if script == "nko" else refs_lat
        hyps = {f: noisy(refs[f], ks[i % len(ks)]) for i, f in enumerate(test)}
        write_bundle(out / rid, corpus, rid, script, mode, seed, hyps, refs, parts,
                     best_val_loss=0.5 + 0.01 * len(rid), best_epoch=3)
    raw = matrix_dict(corpus, out, [{"run_id": rid, "script": s, "mode": m, "seed": sd}
                                    for rid, s, m, sd, _ in specs]
                      + [{"run_id": "nko-ttt-s1", "script": "nko", "mode": "ttt", "seed": 1}],
                      reference="nko-traj-s1")
    f = tmp_path / "matrix.json"
    f.write_text(json.dumps(raw))
    return {"tmp": tmp_path, "corpus": corpus, "matrix": f, "raw": raw, "out": out, "test": test}


def test_tables_are_byte_identical_on_rerun_and_carry_the_numbers(bundle):
    tmp = bundle["tmp"]
    a = write_tables(bundle["matrix"], tmp / "r1", None)
    first = {p.name: p.read_bytes() for p in a}
    b = write_tables(bundle["matrix"], tmp / "r1", None)
    assert {p.name: p.read_bytes() for p in b} == first
    c = write_tables(bundle["matrix"], tmp / "r2", None)  # another directory, same bytes
    assert {p.name: p.read_bytes() for p in c} == first
    names = set(first)
    assert {"m-tables.md", "m-tables.tex", "m-groups.csv", "m-runs.csv", "m-partitions.csv", "m-pairwise.csv",
            "m-cer.png", "m-curves.png"} <= names
    assert first["m-cer.png"][:8] == b"\x89PNG\r\n\x1a\n"
    md = first["m-tables.md"].decode()
    # nko-traj-s1: 0,1,0,1,... edits over 20 utterances of 16 chars = 10/320 = 3.125%
    assert "| nko-traj-s1 | N'Ko | trajectory | 1 | 3.12 |" in md
    # group N'Ko trajectory: mean of 3.125% and 6.25% = 4.6875 ± sd 2.21
    assert "| N'Ko | trajectory | 1, 2 | 4.69 ± 2.21 |" in md
    assert "`nko-ttt-s1`: not run yet" in md
    tex = first["m-tables.tex"].decode()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "N'Ko & trajectory & 1, 2 & 4.69 $\\pm$ 2.21" in tex
    rows = first["m-runs.csv"].decode().splitlines()
    assert rows[0].startswith("run_id,script,mode,seed,cer,toneless_cer")
    latin = next(r for r in rows if r.startswith("latin-traj-s1,"))
    assert ",0.281250," in latin  # (4+5)/2 per utterance over 16 chars
    parts = first["m-partitions.csv"].decode()
    assert "nko-traj-s1,stable,5,0.000000" in parts  # stable rows are the even ones: 0 edits
    pairs = first["m-pairwise.csv"].decode().splitlines()
    assert len(pairs) == 1 + 15  # 6 runs -> 15 pairs


def test_tampered_bundle_is_left_out_of_the_tables(bundle):
    p = bundle["out"] / "nko-tar-s1" / "test_predictions.jsonl"
    p.write_text(p.read_text().replace("x", "y", 1))
    md = write_tables(bundle["matrix"], bundle["tmp"] / "r", None)[0].read_text()
    assert "`nko-tar-s1`: test_predictions.jsonl: sha256" in md and "changed after the run completed" in md


def test_claims_verdicts_on_constructed_runs(bundle):
    claims = bundle["tmp"] / "claims.toml"
    claims.write_text("""
[[claim]]
id = "nko-vs-latin"
text = "N'Ko trajectory beats Latin trajectory"
better = { script = "nko", mode = "trajectory" }
than = { script = "latin", mode = "trajectory" }
min_seeds = 2
published = { better = 20.57, than = 32.81 }

[[claim]]
id = "latin-vs-nko"
text = "Latin trajectory beats N'Ko trajectory"
better = { script = "latin", mode = "trajectory" }
than = { script = "nko", mode = "trajectory" }
min_seeds = 2
published = { better = 32.81, than = 20.57 }

[[claim]]
id = "one-seed"
text = "TAR beats baseline"
better = { script = "nko", mode = "tar" }
than = { script = "nko", mode = "baseline" }

[[claim]]
id = "one-seed-allowed"
text = "baseline beats TAR, single seed accepted"
better = { script = "nko", mode = "baseline" }
than = { script = "nko", mode = "tar" }
min_seeds = 1

[[claim]]
id = "missing"
text = "TTT beats no TTT"
better = { script = "nko", mode = "ttt" }
than = { script = "nko", mode = "trajectory" }

[[claim]]
id = "equal"
text = "seed 1 baseline beats seed 1 trajectory (identical errors)"
better = { script = "nko", mode = "baseline" }
than = { script = "nko", mode = "trajectory", seeds = [1] }
min_seeds = 1
""")
    v = {x.id: x for x in check_claims(claims, bundle["matrix"], None)}
    assert v["nko-vs-latin"].verdict == SUPPORTED
    n = v["nko-vs-latin"].numbers
    assert n["delta"] == pytest.approx((0.03125 + 0.0625) / 2 - (0.28125 + 0.3125) / 2)
    assert n["ci_hi"] < 0 and n["p_improvement"] == 1.0 and n["better"]["seeds"] == [1, 2]
    assert v["latin-vs-nko"].verdict == REFUTED and "other way" in v["latin-vs-nko"].reasons[0]
    assert v["one-seed"].verdict == INSUFFICIENT
    assert "1 seed(s) for N'Ko tar; this claim needs 3" in v["one-seed"].reasons[0]  # min_seeds defaults to 3
    assert v["one-seed-allowed"].verdict == SUPPORTED
    assert v["missing"].verdict == INSUFFICIENT
    assert v["missing"].reasons[0] == "no completed run for N'Ko ttt"
    assert any("nko-ttt-s1 left out: not run yet" in r for r in v["missing"].reasons)
    assert v["equal"].verdict == INCONCLUSIVE and "includes 0" in v["equal"].reasons[0]
    text = str(v["nko-vs-latin"])
    assert text.startswith("SUPPORTED") and "95% CI" in text and "P(improvement) 1.000" in text
    assert "N'Ko trajectory 20.57 vs Latin trajectory 32.81 (Δ -12.24 pp); the demo agrees in direction" in text
    assert v["latin-vs-nko"].numbers["published"]["agrees"] is True  # both say Latin is worse
    rep = report(list(v.values()), DISCLAIMER)
    assert "hierarchical bootstrap" in rep and "agrees on 2 of 2 claims" in rep
    assert "proves nothing about the paper" in rep
    # through the CLI
    res = runner.invoke(app, ["claims", "check", "--claims", str(claims), "--matrix", str(bundle["matrix"]),
                              "--db", str(bundle["tmp"] / "none.db"), "--json"])
    assert res.exit_code == 0, res.output
    assert [x["verdict"] for x in json.loads(res.output)][:2] == [SUPPORTED, REFUTED]


def test_claim_is_insufficient_when_a_side_is_on_another_split(bundle, tmp_path):
    other = make_corpus(tmp_path / "other", n=200, seed=7)  # same rows, another split seed
    test = other["split_obj"].test
    for rid in ("latin-traj-s1", "latin-traj-s2"):
        d = bundle["out"] / rid
        for p in d.iterdir():
            p.unlink()
        write_bundle(d, other, rid, "latin", "trajectory", int(rid[-1]), {f: LATIN_REF for f in test},
                     {f: LATIN_REF for f in test})
    claims = tmp_path / "c.toml"
    claims.write_text('[[claim]]\nid = "c"\ntext = "t"\nbetter = { script = "nko", mode = "trajectory" }\n'
                      'than = { script = "latin", mode = "trajectory" }\nmin_seeds = 2\n')
    (v,) = check_claims(claims, bundle["matrix"], None)
    assert v.verdict == INSUFFICIENT
    assert v.reasons[0] == "no completed run for Latin trajectory"
    assert any("latin-traj-s1 left out" in r and "split_sha256" in r for r in v.reasons)


def test_bad_claims_file_is_a_clear_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[[claim]]\nid = "c"\ntext = "t"\nbetter = { script = "nko", mode = "trajectory" }\n'
                 'than = { script = "klingon", mode = "trajectory" }\nwhy = 1\n')
    with pytest.raises(ClaimsError) as e:
        load_claims(p)
    assert "claim[0] ('c'): field 'than.script'" in str(e.value) and "field 'why': is not a known setting" in str(e.value)


def test_repo_claims_file_loads():
    claims = load_claims(Path(__file__).resolve().parents[2] / "configs" / "claims.toml")
    assert {"nko-vs-latin-trajectory", "tar-vs-baseline-nko", "ttt-vs-no-ttt-nko"} <= {c.id for c in claims}


# --------------------------------------------------------------------------- import and promote

def test_import_checks_files_hashes_snapshot_and_split(bundle, tmp_path):
    db = store.open_db(tmp_path / "state.db")
    m = parse_matrix(bundle["raw"])
    from backend.matrix import resolve

    ident = resolve(m)
    src = bundle["out"] / "nko-base-s1"
    b = import_run(db, src, None, m, ident)
    row = store.get_run(db, "nko-base-s1")
    assert row["status"] == "completed" and row["executor"] == "import" and row["matrix_id"] == "m"
    assert row["test_cer"] == pytest.approx(b.results["test_cer"])
    assert db.execute("SELECT count(*) FROM artifacts WHERE run_id = 'nko-base-s1'").fetchone()[0] == 11
    assert store.curve(db, "nko-base-s1", "val_loss")[0][0] == 1

    # a changed file
    bad = bundle["out"] / "nko-tar-s1"
    (bad / "best.pt").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="best.pt: sha256 .* does not match the manifest"):
        import_run(db, bad, None, m, ident)
    assert store.get_run(db, "nko-tar-s1") is None  # nothing written
    # another snapshot than the matrix's
    other = make_corpus(tmp_path / "o", n=60)
    d = write_bundle(tmp_path / "foreign", other, "nko-traj-s2", "nko", "trajectory", 2,
                     {f: REF for f in other["split_obj"].test}, {f: REF for f in other["split_obj"].test})
    with pytest.raises(BundleError) as e:
        import_run(db, d, None, m, ident)
    assert "snapshot_sha256" in str(e.value) and "split_sha256" in str(e.value)
    # a missing file and no manifest
    d2 = write_bundle(tmp_path / "nomani", bundle["corpus"], "x", "nko", "baseline", 1,
                      {f: REF for f in bundle["test"]}, {f: REF for f in bundle["test"]}, manifest=False)
    (d2 / "vocab.json").unlink()
    b2 = verify_bundle(d2)
    assert "missing file(s): vocab.json" in b2.problems and "missing file: manifest.json" in b2.problems


def test_runs_import_cli_and_promote(bundle, tmp_path):
    dbp = tmp_path / "state.db"
    src = bundle["out"] / "nko-traj-s1"
    res = runner.invoke(app, ["runs", "import", str(src), "--matrix", str(bundle["matrix"]), "--db", str(dbp)])
    assert res.exit_code == 0, res.output
    assert "imported nko-traj-s1" in res.output and "verified against manifest.json" in res.output
    res = runner.invoke(app, ["runs", "import", str(tmp_path / "nowhere"), "--db", str(dbp)])
    assert res.exit_code == 2 and "run directory not found" in res.output and "Traceback" not in res.output

    out = tmp_path / "promotions"
    path = promote("nko-traj-s1", dbp, out)
    rec = json.loads(path.read_text())
    assert rec["run_id"] == "nko-traj-s1" and rec["snapshot_sha256"] == bundle["corpus"]["snapshot_sha256"]
    assert rec["split_sha256"] == bundle["corpus"]["split_sha256"]
    assert rec["metrics"]["test_cer"] == pytest.approx(0.03125)
    assert set(rec["manifest"]) >= {"results.json", "best.pt", "test_predictions.jsonl", "manifest.json"}
    assert rec["reproduce"]["train"].startswith(f"nko-ops train --config {out}/nko-traj-s1.config.json")
    assert json.loads((out / "nko-traj-s1.config.json").read_text()) == rec["config"]
    assert promote("nko-traj-s1", dbp, out) == path  # idempotent
    with pytest.raises(PromoteError, match="not completed|no run"):
        promote("nko-tar-s1", dbp, out)
    (src / "train.log").write_text("edited\n")
    with pytest.raises(PromoteError, match="does not verify"):
        promote("nko-traj-s1", dbp, out)
    db = store.open_db(dbp)
    assert db.execute("SELECT count(*) FROM promotions").fetchone()[0] == 1


def test_matrix_runs_satisfied_by_imports_including_one_without_manifest(bundle, tmp_path):
    import shutil

    from backend.executor import ExecutorError
    from backend.matrix_run import run_matrix

    bare = tmp_path / "published" / "nko-base-s1"  # like a run from before manifests existed
    shutil.copytree(bundle["out"] / "nko-base-s1", bare)
    (bare / "manifest.json").unlink()
    raw = dict(bundle["raw"], out_root=str(tmp_path / "runs2"), reference_run="nko-traj-s1", runs=[
        {"run_id": "nko-traj-s1", "script": "nko", "mode": "trajectory", "seed": 1,
         "import_from": str(bundle["out"] / "nko-traj-s1")},
        {"run_id": "nko-base-s1", "script": "nko", "mode": "baseline", "seed": 1, "import_from": str(bare)}])
    mpath = tmp_path / "m2.json"
    mpath.write_text(json.dumps(raw))
    dbp = tmp_path / "state.db"
    res = runner.invoke(app, ["runs", "import", str(bare), "--matrix", str(mpath), "--db", str(dbp)])
    assert res.exit_code == 2 and "missing file: manifest.json" in res.output
    res = runner.invoke(app, ["runs", "import", str(bare), "--matrix", str(mpath), "--db", str(dbp),
                              "--allow-no-manifest"])
    assert res.exit_code == 0 and "hashed (no manifest)" in res.output, res.output

    results = run_matrix(mpath, dbp, log=lambda s: None)  # nothing to train: no trainer started
    assert [(r.run_id, r.status, r.how) for r in results] == [("nko-traj-s1", "completed", "imported"),
                                                             ("nko-base-s1", "completed", "reused")]
    runs_csv = [p for p in write_tables(mpath, tmp_path / "rep", dbp) if p.name == "m-runs.csv"][0].read_text()
    assert "nko-base-s1,nko,baseline,1,0.031250" in runs_csv and runs_csv.count(",imported,") == 2
    rec = json.loads(promote("nko-base-s1", dbp, tmp_path / "promo").read_text())
    assert rec["manifest_source"].startswith("hashes recorded at import") and "manifest.json" not in rec["manifest"]

    (bare / "train.log").write_text("rewritten\n")  # the record catches a changed file
    with pytest.raises(ExecutorError, match="no longer verifies.*train.log: sha256"):
        run_matrix(mpath, dbp, log=lambda s: None)
    md = write_tables(mpath, tmp_path / "rep", dbp)[0].read_text()
    assert "`nko-base-s1`: train.log: sha256" in md and "state.db's record" in md


# --------------------------------------------------------------------------- seeds

def test_hierarchical_bootstrap_carries_seed_variance():
    # two groups of 3 seeds on 400 utterances; group b is 1 pp worse on average but its seeds
    # spread over ±6 pp: the utterance-only CI of the mean difference excludes 0, the
    # hierarchical one (seeds resampled too) does not.
    rng = np.random.default_rng(0)
    chars = np.full(400, 50)
    rates = [0.10, 0.10, 0.10, 0.05, 0.11, 0.17]
    edits = np.stack([rng.binomial(chars, p) for p in rates])
    c = np.stack([chars] * 6)
    cer_b = stats.resampled_cer(edits, c, resamples=4000, seed=1)
    utt_only = cer_b[:, :3].mean(axis=1) - cer_b[:, 3:].mean(axis=1)
    hier = (stats.hierarchical_means(cer_b, [0, 1, 2], [1, 2, 3], seed=1)
            - stats.hierarchical_means(cer_b, [3, 4, 5], [1, 2, 3], seed=1))
    lo_u, hi_u = stats.ci_from_samples(utt_only)
    lo_h, hi_h = stats.ci_from_samples(hier)
    assert hi_u < 0 < hi_h and lo_h < lo_u
    # one seed per group: the hierarchical bootstrap is the utterance bootstrap
    assert np.array_equal(stats.hierarchical_means(cer_b, [4], [7]), cer_b[:, 4])
    # the seed draw depends on the seed list only, so groups with the same seeds are paired
    assert np.array_equal(stats.seed_draws([3, 1, 2], 50), stats.seed_draws([1, 2, 3], 50))


def _three_seed_matrix(tmp_path, edits_by_run: dict, extra: dict | None = None):
    corpus = make_corpus(tmp_path / "data", n=200)
    test = corpus["split_obj"].test
    out = tmp_path / "runs"
    runs = []
    for (rid, script, mode, seed), ks in edits_by_run.items():
        refs = {f: REF for f in test}
        write_bundle(out / rid, corpus, rid, script, mode, seed,
                     {f: noisy(REF, ks[i % len(ks)]) for i, f in enumerate(test)}, refs,
                     **(extra or {}).get(rid, {}))
        runs.append({"run_id": rid, "script": script, "mode": mode, "seed": seed})
    f = tmp_path / "matrix.json"
    f.write_text(json.dumps(matrix_dict(corpus, out, runs, reference=runs[0]["run_id"])))
    return f


def test_three_seed_claims_are_always_decided_and_tables_flag_unfinished_runs(tmp_path):
    runs = {}
    for s in (1, 2, 3):
        runs[(f"traj-s{s}", "nko", "trajectory", s)] = [0, 1]
        runs[(f"base-s{s}", "nko", "baseline", s)] = [2, 3] if s != 2 else [0, 1]  # seed 2 as good as trajectory
        runs[(f"tar-s{s}", "nko", "tar", s)] = [3, 4]
    weights = {"name": "tiny.en model.bin", "sha256": "ab" * 32}
    extra = {"traj-s1": {"best_epoch": 4, "epochs": 4, "results_extra": {"stop_reason": "max_epochs",
                                                                         "feature_weights": weights}},
             "traj-s2": {"best_epoch": 2, "epochs": 4, "results_extra": {"stop_reason": "early_stop"}}}
    m = _three_seed_matrix(tmp_path, runs, extra)
    claims = tmp_path / "c.toml"
    claims.write_text('''
[[claim]]
id = "traj-base"
text = "trajectory beats baseline"
better = { script = "nko", mode = "trajectory" }
than = { script = "nko", mode = "baseline" }

[[claim]]
id = "traj-tar"
text = "trajectory beats TAR"
better = { script = "nko", mode = "trajectory" }
than = { script = "nko", mode = "tar" }

[[claim]]
id = "tar-traj"
text = "TAR beats trajectory"
better = { script = "nko", mode = "tar" }
than = { script = "nko", mode = "trajectory" }
''')
    v = {x.id: x for x in check_claims(claims, m, None)}
    assert v["traj-tar"].verdict == SUPPORTED and v["tar-traj"].verdict == REFUTED
    assert v["traj-base"].verdict == INCONCLUSIVE  # baseline seed 2 ties trajectory: seeds overlap
    assert all(x.verdict != INSUFFICIENT for x in v.values())
    assert v["traj-tar"].numbers["paired_seeds"] is True
    assert v["traj-tar"].numbers["still_improving"] == ["traj-s1"]
    assert "1 of 6 runs stopped at their epoch limit still improving" in str(v["traj-tar"])
    md = write_tables(m, tmp_path / "rep", None)[0].read_text()
    assert "hierarchical bootstrap" in md and "STILL IMPROVING" in md
    assert f"features from tiny.en model.bin (weights sha256 `{'ab' * 32}`)" in md
    assert "| traj-s1 | N'Ko | trajectory | 1 |" in md
    run_lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines()
                 if line.startswith("| ") and " | N'Ko | " in line}  # the "By run" table
    assert run_lines["traj-s1"].rstrip(" |").endswith("epoch limit 4, STILL IMPROVING")
    assert run_lines["traj-s2"].rstrip(" |").endswith("early stop @4")
    assert "| N'Ko | trajectory | 1, 2, 3 |" in md and "1/3 STILL IMPROVING" in md


def test_ttt_section_says_when_ttt_cannot_help(tmp_path):
    sel = {"split": "val", "grid": [{"lr": 1.0, "steps": 1, "val_cer": 0.12, "val_changed": 2},
                                    {"lr": 3.0, "steps": 1, "val_cer": 0.125, "val_changed": 5}],
           "no_ttt_val_cer": 0.12, "best_val_cer": 0.12, "chosen": {"lr": 1.0, "steps": 1}, "helps_on_val": False}
    ttt = {"lr": 1.0, "steps": 1, "selection": sel, "ttt_steps": 40, "ttt_guard_reverts": 0, "test_changed": 3,
           "test_changed_cer_before": 0.25, "test_changed_cer_after": 0.3125, "test_cer_no_ttt": 0.03}
    noop = dict(ttt, selection=None, test_changed=0, test_changed_cer_before=None, test_changed_cer_after=None)
    runs = {("traj-s1", "nko", "trajectory", 1): [0, 1], ("ttt-s1", "nko", "ttt", 1): [0, 1],
            ("ttt-s2", "nko", "ttt", 2): [0, 1]}
    m = _three_seed_matrix(tmp_path, runs, {"ttt-s1": {"results_extra": {"ttt": ttt}},
                                            "ttt-s2": {"results_extra": {"ttt": noop}}})
    md = write_tables(m, tmp_path / "rep", None)[0].read_text()
    assert "## Test-time training" in md
    assert "| ttt-s1 | 1 | 1 | val grid | 12.00 → 12.00 | 1×1: 12.00, 3×1: 12.50 | 3 / 20 | 25.00 → 31.25 | 0 |" in md
    assert ("- `ttt-s1`: TTT cannot help on this data: no setting of the grid lowered the validation CER "
            "(12.00% at best vs 12.00% without TTT).") in md
    assert "- `ttt-s2`: TTT cannot help on this data: it changed no test hypothesis (a no-op here)." in md
