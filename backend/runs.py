"""Run directories: verify a run's artifact bundle (CONTRACTS §3–§5) and register it in the
state store, whether the local executor just produced it or it is imported from elsewhere
(`nko-ops runs import DIR`).

A bundle is complete when the nine files exist, ``manifest.json`` lists each with the sha256
and size the file has now, ``results.json`` names the snapshot, split and feature recipe,
``split.json`` hashes to the split named there, and the prediction rows cover exactly the
split's test utterances (or, for a sanity run, a subset of them). A directory with
``error.json`` and no manifest, or whose results.json status is not "complete", is a failed
run: refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import NkoOpsError
from models.jsonl import iter_objects
from models.runid import run_id_problem
from models.snapshot import sha256_file

BUNDLE_FILES = ("results.json", "train.log", "run.log", "split.json", "vocab.json", "best.pt",
                "test_predictions.jsonl", "test_references.jsonl", "test_metrics_by_partition.json")
MANIFEST = "manifest.json"
PREDICTION_KEYS = ("feat_id", "audio_id", "split", "script", "mode", "asr_text", "reference_text",
                   "cer_edits", "reference_chars", "trajectory_scalars", "partition")
PARTITIONS = ("stable", "boundary", "uncertain", "novelty")


class BundleError(NkoOpsError, ValueError):
    pass


@dataclass
class Bundle:
    dir: Path
    results: dict = field(default_factory=dict)
    files: list[dict] = field(default_factory=list)  # name, path, sha256, size
    test_ids: list[str] = field(default_factory=list)
    manifest: str = "verified"  # "absent" (import with allow_no_manifest), "recorded" (checked against state.db)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def run_id(self) -> str | None:
        return self.results.get("run_id")

    @property
    def snapshot_sha256(self) -> str | None:
        return self.results.get("snapshot_sha256")

    @property
    def split_sha256(self) -> str | None:
        return self.results.get("split_sha256")

    @property
    def recipe_hash(self) -> str | None:
        return self.results.get("feature_recipe_hash")

    def raise_if_bad(self) -> "Bundle":
        if self.problems:
            raise BundleError(f"{self.dir}: incomplete or inconsistent run bundle\n  " + "\n  ".join(self.problems))
        return self


def _manifest_entries(data: object) -> dict[str, dict] | None:
    """{name: {"sha256", "size"}} from manifest.json (models/train.py writes
    ``{"run_id", "files": {name: {"sha256", "size"}}}``), or None when it has another shape."""
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    return files


def _read_jsonl(path: Path, problems: list[str], label: str) -> list[dict]:
    rows = []
    for lineno, row, problem in iter_objects(path):
        if problem:
            problems.append(f"{label} line {lineno}: {problem}")
        else:
            rows.append(row)
    return rows


def verify_bundle(run_dir: str | Path, snapshot_sha256: str | None = None, split_sha256: str | None = None,
                  recipe_hash: str | None = None, test_ids: list[str] | None = None, subset: bool = False,
                  allow_no_manifest: bool = False, recorded: dict[str, dict] | None = None) -> Bundle:
    """Check a run directory; problems are collected on the result (``.raise_if_bad()``).

    ``test_ids``: the split's test ids the predictions must cover exactly (``subset``: a
    non-empty subset of them, as a sanity run on a subset writes). ``recorded``: for a run
    imported without manifest.json, the hashes state.db recorded at import
    (``recorded_hashes``), checked in its place."""
    from models.split import Split

    d = Path(run_dir)
    b = Bundle(d)
    if not d.is_dir():
        b.problems.append(f"run directory not found: {d}")
        return b
    # The trainer removes error.json before it writes manifest.json, so next to a manifest it
    # is a stale copy of an earlier attempt (e.g. fetched from Vast); without one, a failure.
    if (d / "error.json").is_file() and not (d / MANIFEST).is_file():
        try:
            err = json.loads((d / "error.json").read_text(encoding="utf-8"))
            why = f" (stage {err.get('stage')}: {err.get('message')})" if isinstance(err, dict) else ""
        except ValueError:
            why = ""
        b.problems.append(f"error.json present: the run failed{why}; a failed run is not a bundle")
    missing = [n for n in BUNDLE_FILES if not (d / n).is_file()]
    if missing:
        b.problems.append(f"missing file(s): {', '.join(missing)}")
    present = [n for n in BUNDLE_FILES if n not in missing]

    # manifest: every bundle file listed, and each listed file as recorded
    actual = {n: {"sha256": sha256_file(d / n), "size": (d / n).stat().st_size} for n in present}
    entries, source = None, "the manifest"
    if (d / MANIFEST).is_file():
        try:
            entries = _manifest_entries(json.loads((d / MANIFEST).read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            b.problems.append(f"{MANIFEST}: not valid JSON ({e})")
        if entries is None and not any(p.startswith(MANIFEST) for p in b.problems):
            b.problems.append(f"{MANIFEST}: no 'files' listing")
    elif recorded is not None:
        entries, source, b.manifest = {k: v for k, v in recorded.items() if k != MANIFEST}, "state.db's record", \
            "recorded"
    elif allow_no_manifest:
        b.manifest = "absent"
    else:
        b.problems.append(f"missing file: {MANIFEST}")
    if entries is not None:
        for n in present:
            if n not in entries:
                b.problems.append(f"{source} does not list {n}")
        for n, e in sorted(entries.items()):
            p = d / n
            if not p.is_file():
                b.problems.append(f"{source} lists {n}, which is missing")
                continue
            got = actual.get(n) or {"sha256": sha256_file(p), "size": p.stat().st_size}
            actual[n] = got
            if e.get("sha256") != got["sha256"]:
                b.problems.append(f"{n}: sha256 {got['sha256'][:16]}… does not match {source} "
                                  f"({str(e.get('sha256'))[:16]}…): the file changed after the run completed")
            elif e.get("size") is not None and e.get("size") != got["size"]:
                b.problems.append(f"{n}: size {got['size']} does not match {source} ({e.get('size')})")
    b.files = [{"name": n, "path": str((d / n).resolve()), **actual[n]} for n in sorted(actual)]
    if (d / MANIFEST).is_file():
        b.files.append({"name": MANIFEST, "path": str((d / MANIFEST).resolve()),
                        "sha256": sha256_file(d / MANIFEST), "size": (d / MANIFEST).stat().st_size})

    # results.json and the identities it names
    if "results.json" in present:
        try:
            b.results = json.loads((d / "results.json").read_text(encoding="utf-8"))
            if not isinstance(b.results, dict):
                raise ValueError("not a JSON object")
        except json.JSONDecodeError as e:
            b.problems.append(f"results.json: not valid JSON, truncated or corrupt ({e})")
            b.results = {}
        except ValueError as e:
            b.problems.append(f"results.json: not a JSON object ({e})")
            b.results = {}
        if b.results.get("status", "complete") != "complete":
            b.problems.append(f"results.json: status {b.results['status']!r}, not 'complete'")
        for key in ("run_id", "script", "mode", "snapshot_sha256", "split_sha256", "feature_recipe_hash", "test_cer"):
            if b.results and b.results.get(key) is None:
                b.problems.append(f"results.json: field '{key}' missing")
        for key, want in (("snapshot_sha256", snapshot_sha256), ("split_sha256", split_sha256),
                          ("feature_recipe_hash", recipe_hash)):
            have = b.results.get(key)
            if want is not None and have is not None and have != want:
                b.problems.append(f"results.json: {key} {str(have)[:16]}… differs from the expected {want[:16]}…")
    split = None
    if "split.json" in present:
        try:
            split = Split.load(d / "split.json")
        except (ValueError, KeyError) as e:
            b.problems.append(f"split.json: {e}")
        if split is not None:
            if b.split_sha256 and split.sha256 != b.split_sha256:
                b.problems.append(f"split.json hashes to {split.sha256[:16]}…, results.json names {b.split_sha256[:16]}…")
            if split.snapshot_sha256 and b.snapshot_sha256 and split.snapshot_sha256 != b.snapshot_sha256:
                b.problems.append(f"split.json was made from snapshot {split.snapshot_sha256[:16]}…, "
                                  f"results.json names {b.snapshot_sha256[:16]}…")
    for name in ("vocab.json", "test_metrics_by_partition.json"):
        if name in present:
            try:
                json.loads((d / name).read_text(encoding="utf-8"))
            except ValueError as e:
                b.problems.append(f"{name}: not valid JSON ({e})")

    # prediction rows: CONTRACTS §4 schema, one per test utterance
    if "test_predictions.jsonl" in present:
        rows = _read_jsonl(d / "test_predictions.jsonl", b.problems, "test_predictions.jsonl")
        seen: set[str] = set()
        for i, r in enumerate(rows, 1):
            lacking = [k for k in PREDICTION_KEYS if k not in r]
            if lacking:
                b.problems.append(f"test_predictions.jsonl row {i}: missing field(s) {', '.join(lacking)}")
                break
            if r["feat_id"] in seen:
                b.problems.append(f"test_predictions.jsonl row {i}: duplicate feat_id {r['feat_id']}")
                break
            seen.add(r["feat_id"])
            if r["partition"] not in PARTITIONS:
                b.problems.append(f"test_predictions.jsonl row {i}: partition {r['partition']!r} is not one of "
                                  f"{', '.join(PARTITIONS)}")
                break
        b.test_ids = [r["feat_id"] for r in rows]
        want_ids = test_ids if test_ids is not None else (split.test if split is not None else None)
        if want_ids is not None and not any("test_predictions" in p for p in b.problems):
            want, got = set(want_ids), set(b.test_ids)
            if subset:
                if not got or not got <= want:
                    b.problems.append(f"test_predictions.jsonl: {len(got - want)} of {len(got)} rows are not "
                                      f"test utterances of the split")
            elif got != want:
                b.problems.append(f"test_predictions.jsonl: {len(got)} rows, the split's test part has {len(want)} "
                                  f"({len(want - got)} missing, {len(got - want)} not in the split)")
        if "test_references.jsonl" in present:
            refs = _read_jsonl(d / "test_references.jsonl", b.problems, "test_references.jsonl")
            ref_ids = {r.get("feat_id") for r in refs}
            if ref_ids != set(b.test_ids):
                b.problems.append(f"test_references.jsonl: its {len(ref_ids)} feat_ids differ from the "
                                  f"{len(b.test_ids)} prediction rows")
    return b


# --------------------------------------------------------------------------- state store

def register_bundle(db, bundle: Bundle, run_id: str, executor: str, matrix_id: str | None = None,
                    flags: dict | None = None, message: str = "bundle verified") -> None:
    """Record a verified bundle: run row (completed, metrics from results.json), snapshot and
    split rows, artifacts, the run's learning curve from metrics.jsonl, and an event."""
    from state import store

    r = bundle.results
    cfg = r.get("config") if isinstance(r.get("config"), dict) else {}
    fields = dict(
        matrix_id=matrix_id, script=r.get("script"), mode=r.get("mode"), seed=r.get("seed", cfg.get("seed")),
        out_dir=str(bundle.dir.resolve()), executor=executor, finished_at=store.now(),
        best_val_loss=r.get("best_val_loss"), best_epoch=r.get("best_epoch"), test_cer=r.get("test_cer"),
        test_cer_toneless=r.get("test_toneless_cer"), snapshot_sha256=bundle.snapshot_sha256,
        split_sha256=bundle.split_sha256, recipe_hash=bundle.recipe_hash, error=None,
    )
    if flags is not None:
        fields["flags"] = flags
    if matrix_id is None:
        fields.pop("matrix_id")
    curve = []
    metrics_file = bundle.dir / "metrics.jsonl"
    if metrics_file.is_file():
        curve = [row for row in _read_jsonl(metrics_file, [], "metrics.jsonl")]
    with store.transaction(db):
        store.set_run_status(db, run_id, "completed", message, **fields)
        store.record_artifacts(db, run_id, bundle.files)
        if curve:
            store.add_metrics(db, run_id, curve)
        store.add_metrics(db, run_id, [{"kind": "final", **{k: v for k, v in r.items()
                                                             if k in ("test_cer", "test_toneless_cer",
                                                                      "best_val_loss", "best_epoch")}}])
        if bundle.snapshot_sha256:
            db.conn.execute("INSERT OR IGNORE INTO snapshots(sha256) VALUES (?)", (bundle.snapshot_sha256,))
        split_file = bundle.dir / "split.json"
        if bundle.split_sha256 and split_file.is_file():
            from models.split import Split

            s = Split.load(split_file)
            db.conn.execute("INSERT OR IGNORE INTO splits(sha256, snapshot_sha256, seed, train, val, test) "
                            "VALUES (?,?,?,?,?,?)", (s.sha256, s.snapshot_sha256 or bundle.snapshot_sha256,
                                                     s.seed, len(s.train), len(s.val), len(s.test)))


def recorded_hashes(db, run_id: str) -> dict[str, dict] | None:
    """For a run imported without manifest.json: {name: {sha256, size}} as state.db recorded
    them at import (verify_bundle's ``recorded``); None for every other run."""
    from state import store

    row = store.get_run(db, run_id)
    if not row or json.loads(row["flags"] or "{}").get("manifest") != "absent":
        return None
    return {a["name"]: {"sha256": a["sha256"], "size": a["size"]} for a in db.query(
        "SELECT name, sha256, size FROM artifacts WHERE owner_kind = 'run' AND run_id = ?", [run_id])}


def import_run(db, run_dir: str | Path, run_id: str | None = None, matrix=None, identity=None,
               allow_no_manifest: bool = False) -> Bundle:
    """Verify ``run_dir`` (against the matrix's snapshot/split/recipe when given) and register
    it as a completed run. Raises BundleError listing every problem; writes nothing then."""
    from state import store

    want = identity
    b = verify_bundle(run_dir, snapshot_sha256=getattr(want, "snapshot_sha256", None),
                      split_sha256=getattr(want, "split_sha256", None),
                      recipe_hash=getattr(want, "recipe_hash", None), allow_no_manifest=allow_no_manifest)
    rid = run_id or b.run_id
    if matrix is not None and rid is not None:
        try:
            spec = matrix.run(rid)
        except ValueError as e:
            b.problems.append(str(e))
        else:
            for key in ("script", "mode"):
                if b.results.get(key) is not None and b.results.get(key) != getattr(spec, key):
                    b.problems.append(f"results.json: {key} {b.results.get(key)!r}, but matrix run {rid!r} "
                                      f"is {getattr(spec, key)!r}")
    if not rid:
        b.problems.append("no run id: results.json has no 'run_id'; pass --run-id" if b.results else
                          "no run id: results.json could not be read (above); pass --run-id")
    elif run_id_problem(rid):
        b.problems.append(f"run id {rid!r}" + (" (--run-id)" if run_id else " (results.json's run_id)")
                          + f": {run_id_problem(rid)}")
    b.raise_if_bad()
    existing = store.get_run(db, rid)
    if existing and existing["status"] == "completed" and existing["out_dir"] != str(b.dir.resolve()):
        raise BundleError(f"run {rid!r} is already registered as completed from {existing['out_dir']}; "
                          "runs are immutable, import this one under another --run-id")
    flags = {"imported_from": str(b.dir.resolve()), "manifest": b.manifest}
    register_bundle(db, b, rid, executor="import", matrix_id=getattr(matrix, "matrix_id", None), flags=flags,
                    message=f"imported from {b.dir}" + (" (no manifest: hashes recorded at import)"
                                                        if b.manifest == "absent" else ""))
    return b
