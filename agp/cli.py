"""``nko-ops agp ...``: the AGP corrective lane from the command line. Bad input or a down
service (``NkoOpsError``) reaches the CLI root: one clear line on stderr, exit 2, nothing
half-written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

agp_app = typer.Typer(help="AGP corrective lane: partitions, corpus, proposals, gate, eval, reviews.",
                      no_args_is_help=True)

_PARTITION_POLICY = typer.Option(None, "--partition-policy", help="Partition policy TOML (default configs/agp/partition.toml).")
_PARTITION_SOURCE = typer.Option(None, "--partition-source", help="model (keep the run's partition) or policy (re-partition); overrides the policy file.")


def _default_run_id(rows: Path) -> str:
    return rows.resolve().parent.name


@agp_app.command("partition")
def partition_cmd(
    rows: Path = typer.Option(..., "--rows", help="Prediction rows (test_predictions.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Where to write the rows with their effective partition."),
    policy: Optional[Path] = _PARTITION_POLICY,
    source: Optional[str] = _PARTITION_SOURCE,
) -> None:
    """Keep or re-partition rows; each row records model_partition and partition_source."""
    from agp.partition import load_partition_policy, partition_counts
    from agp.rows import write_rows
    from models.bundle import read_predictions

    p = load_partition_policy(policy, source)
    new = p.apply(read_predictions(rows))
    write_rows(out, new)
    typer.echo(json.dumps({"partition_source": p.identity, **partition_counts(new)}, ensure_ascii=False))


@agp_app.command("calibrate-partition")
def calibrate_partition_cmd(
    rows: Path = typer.Option(..., "--rows", help="Validation rows: `nko-ops evaluate --run RUN --split val --out F`."),
    out: Path = typer.Option(..., "--out", help="Where to write the calibrated policy TOML."),
    base: Optional[Path] = typer.Option(None, "--base", help="Policy whose rules and keys are kept "
                                                            "(default configs/agp/partition.toml)."),
    novelty_quantile: float = typer.Option(0.98, "--novelty-quantile", help="Novelty: beyond this quantile of "
                                                                             "the validation rows."),
    stable_cer_ratio: float = typer.Option(0.5, "--stable-cer-ratio", help="Stable: CER at most this x the "
                                                                           "validation CER."),
    uncertain_cer_ratio: float = typer.Option(1.5, "--uncertain-cer-ratio", help="Uncertain: CER at least this x "
                                                                                 "the validation CER."),
    min_share: float = typer.Option(0.05, "--min-share", help="Stable and uncertain thresholds hold at least "
                                                              "this share of the rows."),
) -> None:
    """Set the partition thresholds from validation rows, never test rows (agp/calibrate.py);
    use the result with --partition-policy OUT on the gate and eval commands."""
    from agp.calibrate import Targets, calibrate, report, write

    c = calibrate(rows, base, Targets(novelty_quantile, stable_cer_ratio, uncertain_cer_ratio, min_share))
    identity = write(c, out)
    typer.echo(report(c))
    typer.echo(f"wrote {out} ({identity})")


@agp_app.command("lexicon")
def lexicon_cmd(
    out: Path = typer.Option(..., "--out", help="Lexicon TSV to write (word<TAB>count)."),
    snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="Snapshot dir or pairs.jsonl (with --split)."),
    split: Optional[Path] = typer.Option(None, "--split", help="split.json: only its *train* feat_ids are read."),
    text: Optional[Path] = typer.Option(None, "--text", help="Or: a text file of training references, one per line."),
) -> None:
    """Build the lexicon from training references only."""
    from agp.lexicon import Lexicon

    if (snapshot is None) == (text is None) or (snapshot is not None and split is None):
        raise typer.BadParameter("give either --snapshot with --split, or --text")
    if text is not None:
        refs = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from agp.pipeline import train_references

        refs = train_references(snapshot, split)
    lex = Lexicon.from_references(refs)
    lex.save(out)
    typer.echo(f"{len(lex)} words from {len(refs)} training references -> {out} (sha256 {lex.sha256[:16]})")


@agp_app.command("build-corpus")
def build_corpus_cmd(
    rows: Path = typer.Option(..., "--rows", help="Prediction rows (test_predictions.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Directory for train/valid/test.jsonl and corpus.json."),
    seed: int = typer.Option(42, help="Split and perturbation seed."),
    valid_fraction: float = typer.Option(0.1, help="Share of error pairs for valid.jsonl."),
    test_fraction: float = typer.Option(0.1, help="Share of error pairs for test.jsonl."),
    synthetic: int = typer.Option(0, "--synthetic", help="Add N synthetic N'Ko-aware perturbations per train reference (labelled synthetic). Off by default."),
    policy: Optional[Path] = _PARTITION_POLICY,
    source: Optional[str] = _PARTITION_SOURCE,
) -> None:
    """mlx-lm chat corpus from real ASR error pairs."""
    from agp.corpus import build_corpus
    from agp.pipeline import lane_rows
    from models.files import sha256_file

    rs, _ = lane_rows(rows, policy, source)
    manifest = build_corpus(rs, out, seed=seed, valid_fraction=valid_fraction, test_fraction=test_fraction,
                            synthetic_per_row=synthetic, rows_sha256=sha256_file(rows))
    counts = manifest["counts"]
    typer.echo(f"{manifest['error_pairs']} error pairs ({manifest['skipped_correct_rows']} correct rows skipped): "
               + ", ".join(f"{k} {v['lines']}" + (f" ({v['synthetic']} synthetic)" if v["synthetic"] else "")
                           for k, v in counts.items()) + f" -> {out}")


@agp_app.command("propose")
def propose_cmd(
    rows: Path = typer.Option(..., "--rows", help="Prediction rows (test_predictions.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Proposals JSONL to write ({feat_id, proposal, proposer})."),
    proposer: str = typer.Option("lexicon", help="lexicon | nbest (CTC beam search + char LM, needs --run) | http "
                                                 "(AGP lane /propose) | chat (OpenAI-compatible, e.g. mlx_lm.server)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (best.pt): score every proposal "
                                                           "acoustically (rule acoustic needs it); the nbest "
                                                           "proposer searches its posteriors."),
    device: Optional[str] = typer.Option(None, help="Scoring device (default cuda when available, else cpu)."),
    snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="nbest: snapshot whose *train* references "
                                                                     "(with --split) train the LM."),
    split: Optional[Path] = typer.Option(None, "--split", help="nbest: split.json (default RUN/split.json)."),
    lm_text: Optional[str] = typer.Option(None, "--lm-text", help="nbest: public Bambara text directory "
                                                                  "(NLLB-Seed files; default ../shared/data/"
                                                                  "bambara-text or $NKO_OPS_BAMBARA_TEXT), or "
                                                                  "'none' for the training references alone."),
    alpha: float = typer.Option(0.5, help="nbest: LM weight."),
    beta: float = typer.Option(1.0, help="nbest: per-character bonus."),
    beam: int = typer.Option(16, help="nbest: beam width."),
    lexicon: Optional[Path] = typer.Option(None, help="Lexicon TSV (lexicon proposer)."),
    max_distance: int = typer.Option(1, help="Lexicon proposer: largest edit distance to a lexicon word."),
    url: str = typer.Option("http://127.0.0.1:8080", help="Service URL (http / chat proposers)."),
    model: str = typer.Option("default_model", help="Chat proposer: model name the server knows."),
    adapter: Optional[str] = typer.Option(None, help="Chat proposer: LoRA adapter path sent to mlx_lm.server."),
    max_tokens: int = typer.Option(256, help="Chat proposer: longest answer in tokens."),
    timeout: float = typer.Option(60.0, help="Per-request timeout in seconds."),
    retries: int = typer.Option(3, help="Retries (with exponential backoff) on timeouts, connection errors and 5xx."),
    policy: Optional[Path] = _PARTITION_POLICY,
    source: Optional[str] = _PARTITION_SOURCE,
) -> None:
    """Propose repairs for every row (the proposer never sees references)."""
    from agp.lexicon import Lexicon
    from agp.pipeline import lane_rows
    from agp.proposers import ChatProposer, HttpProposer, LexiconProposer, propose_all
    from agp.rows import write_jsonl

    rs, _ = lane_rows(rows, policy, source)
    if proposer == "lexicon":
        if lexicon is None:
            raise typer.BadParameter("the lexicon proposer needs --lexicon (see `nko-ops agp lexicon`)")
        p = LexiconProposer(Lexicon.load(lexicon), max_distance=max_distance)
    elif proposer == "http":
        p = HttpProposer(url, timeout=timeout, retries=retries)
        p.health()
    elif proposer == "chat":
        p = ChatProposer(url, model=model, adapter=adapter, max_tokens=max_tokens, timeout=timeout, retries=retries)
    elif proposer == "nbest":
        if run is None:
            raise typer.BadParameter("the nbest proposer needs --run (its best.pt gives the posteriors)")
        from agp.nbest import NbestProposer
        from agp.pipeline import make_lm, train_references
        from models.score import Scorer

        if snapshot is None:
            raise typer.BadParameter("the nbest proposer needs --snapshot (its train references train the LM)")
        scorer = Scorer.from_run(run, device=device)
        refs = train_references(snapshot, split or run / "split.json")
        text = True if lm_text is None else (None if lm_text == "none" else Path(lm_text))
        p = NbestProposer(scorer, make_lm(refs, scorer.vocab.symbols, text, lambda m: typer.echo(m, err=True)),
                          alpha=alpha, beta=beta, beam=beam)
        p.prime(rs)
    else:
        raise typer.BadParameter(f"--proposer must be lexicon, nbest, http or chat; got {proposer!r}")
    props = propose_all(p, rs)
    scored = ""
    if run is not None:
        from agp.pipeline import score_proposals

        score_proposals(props, rs, run, device=device, scorer=getattr(p, "scorer", None))
        scored = f", scored with {props[0]['acoustic']['model'] if props else run}"
    n = write_jsonl(out, props)
    typer.echo(f"{n} proposals ({p.name}{scored}) -> {out}")


@agp_app.command("score")
def score_cmd(
    rows: Path = typer.Option(..., "--rows", help="Prediction rows the proposals are for."),
    proposals: Path = typer.Option(..., "--proposals", help="Proposals JSONL (from any proposer)."),
    run: Path = typer.Option(..., "--run", help="The rows' run directory (best.pt, vocab.json, results.json)."),
    out: Path = typer.Option(..., "--out", help="Proposals JSONL with 'acoustic' added to each line."),
    device: Optional[str] = typer.Option(None, help="cpu / cuda (default cuda when available)."),
    features: Optional[Path] = typer.Option(None, help="Feature store (default: the one results.json names)."),
    policy: Optional[Path] = _PARTITION_POLICY,
    source: Optional[str] = _PARTITION_SOURCE,
) -> None:
    """Acoustic score of each proposal: delta = (log p(proposal) - log p(ASR text)) / frames
    under the run's own CTC model (models/score.py); the gate's rule acoustic reads it."""
    from agp.pipeline import lane_rows, load_proposals, score_proposals
    from agp.rows import write_jsonl

    rs, _ = lane_rows(rows, policy, source)
    props = load_proposals(proposals, rs)
    for p in props:
        p.pop("_line", None)
    score_proposals(props, rs, run, device=device, features=features)
    n = write_jsonl(out, props)
    missing = sum(p["acoustic"]["delta"] is None for p in props)
    typer.echo(f"{n} proposals scored ({missing} without a score) -> {out}")


@agp_app.command("calibrate-gate")
def calibrate_gate_cmd(
    rows: Path = typer.Option(..., "--rows", help="Validation rows: `nko-ops evaluate --run RUN --split val --out F`."),
    proposals: Path = typer.Option(..., "--proposals", help="Scored proposals for those rows (agp propose --run / agp score)."),
    out: Path = typer.Option(..., "--out", help="Gate policy TOML to write, with the calibrated margins."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Base gate policy (default configs/agp/gate.toml)."),
    lexicon: Optional[Path] = typer.Option(None, help="Lexicon TSV (as for agp gate)."),
    partition_policy: Optional[Path] = _PARTITION_POLICY,
    partition_source: Optional[str] = _PARTITION_SOURCE,
) -> None:
    """Acoustic margins from validation rows, never test rows: per partition, the margin with
    the largest validation CER gain that leaves no validation partition worse."""
    from agp.gate import load_gate_policy
    from agp.lexicon import Lexicon
    from agp.pipeline import calibrate_gate, lane_rows, load_proposals, margin_comments, write_gate_policy

    rs, ppolicy = lane_rows(rows, partition_policy, partition_source)
    props = load_proposals(proposals, rs)
    base = load_gate_policy(policy)
    new, report = calibrate_gate(rs, props, Lexicon.load(lexicon) if lexicon else None, base, ppolicy.identity)
    comments = [f"AGP gate policy: acoustic margins calibrated on {len(rs)} validation rows ({rows}), never test rows.",
                f"base: {base.path}"] + margin_comments(report)
    write_gate_policy(new, out, comments)
    for p, c in report["margins"].items():
        typer.echo(f"{p}: margin {c['margin']} ({c['accepted']} of {c['candidates']} scored candidates, "
                   f"val gain {c['gain_edits']} edits)")
    v = report["val_overall"]
    typer.echo(f"validation CER {v['cer_before']:.4f} -> gated {v['cer_after']:.4f} (ungated {v['cer_ungated']:.4f})")
    typer.echo(f"wrote {out}")


@agp_app.command("gate")
def gate_cmd(
    rows: Path = typer.Option(..., "--rows", help="Prediction rows (test_predictions.jsonl)."),
    proposals: Path = typer.Option(..., "--proposals", help="Proposals JSONL: {feat_id, proposal[, proposer]} per line."),
    out: Path = typer.Option(..., "--out", help="Decisions JSONL to write."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Gate policy TOML (default configs/agp/gate.toml)."),
    lexicon: Optional[Path] = typer.Option(None, help="Lexicon TSV from training references (without it, every new word on a lexicon-checked row is rejected)."),
    partition_policy: Optional[Path] = _PARTITION_POLICY,
    partition_source: Optional[str] = _PARTITION_SOURCE,
    db: Optional[Path] = typer.Option(Path("state.db"), help="State store for proposals and decisions."),
    no_db: bool = typer.Option(False, "--no-db", help="Do not record in the state store."),
    run_id: Optional[str] = typer.Option(None, help="Run id to record (default: the rows file's directory name)."),
) -> None:
    """Decide every proposal; write decisions and record them in state.db."""
    from agp.gate import Gate, load_gate_policy
    from agp.lexicon import Lexicon
    from agp.pipeline import gate_all, lane_rows, load_proposals
    from agp.rows import write_jsonl

    rs, ppolicy = lane_rows(rows, partition_policy, partition_source)
    props = load_proposals(proposals, rs)
    gate = Gate(load_gate_policy(policy), Lexicon.load(lexicon) if lexicon else None, ppolicy.identity)
    decisions = gate_all(gate, rs, props)
    accepted = sum(d.accepted for d in decisions)
    where = ""
    if not no_db:  # first, in one transaction: a failure leaves neither the records nor the file
        from agp.records import record_decisions
        from state.store import open_db

        conn = open_db(db)
        try:
            record_decisions(conn, run_id or _default_run_id(rows), props, decisions,
                             {r.feat_id: r.reference_text for r in rs})
        finally:
            conn.close()
        where = f", recorded in {db}"
    write_jsonl(out, (d.as_dict() for d in decisions))
    typer.echo(f"{len(decisions)} decisions, {accepted} accepted (policy {gate.policy_hash[:16]}) -> {out}{where}")


@agp_app.command("eval")
def eval_cmd(
    rows: Path = typer.Option(..., "--rows", help="Prediction rows (test_predictions.jsonl), with references."),
    decisions: Path = typer.Option(..., "--decisions", help="Decisions JSONL from `nko-ops agp gate`."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON here."),
    verify: bool = typer.Option(True, help="Check every decision's witness with this install's key."),
    frontier: Optional[Path] = typer.Option(None, "--frontier", help="Also draw the acoustic-margin frontier "
                                                                     "(accept rate vs ΔCER) to this PNG."),
    partition_policy: Optional[Path] = _PARTITION_POLICY,
    partition_source: Optional[str] = _PARTITION_SOURCE,
) -> None:
    """CER before -> after (accepted edits only), per partition and overall."""
    from agp.evaluate import evaluate, format_table
    from agp.gate import load_witness_key
    from agp.pipeline import lane_rows, load_decisions
    from models.files import atomic_write_json

    ds = load_decisions(decisions)
    used = sorted({d.get("partition_source", "model") for d in ds})
    if partition_source is None and used:  # evaluate with the partitions the gate saw
        partition_source = "model" if used == ["model"] else "policy"
    rs, ppolicy = lane_rows(rows, partition_policy, partition_source)
    if used and used != [ppolicy.identity]:
        raise typer.BadParameter(f"the decisions were made with partition source {', '.join(used)}; "
                                 f"this policy gives {ppolicy.identity} (pass the gate's --partition-policy)")
    summary = evaluate(rs, ds, key=load_witness_key() if verify else None, source=decisions.name)
    typer.echo(format_table(summary))
    if frontier is not None:
        if "frontier" not in summary:
            raise typer.BadParameter("the decisions carry no acoustic margins: there is no frontier to draw")
        from agp.frontier import plot_frontier

        typer.echo(f"frontier -> {plot_frontier(summary, frontier)}")
    if json_out:
        atomic_write_json(json_out, summary, sort_keys=True)
        typer.echo(f"-> {json_out}")


@agp_app.command("review")
def review_cmd(
    decision: Optional[int] = typer.Option(None, "--decision", help="Gate decision id (see --pending)."),
    verdict: Optional[str] = typer.Option(None, "--verdict", help="agree | override"),
    note: str = typer.Option("", "--note", help="Why (required for override)."),
    reviewer: Optional[str] = typer.Option(None, "--reviewer", help="Who (default: the login name)."),
    pending: bool = typer.Option(False, "--pending", help="List decisions nobody has reviewed."),
    limit: int = typer.Option(20, help="With --pending: how many."),
    run_id: Optional[str] = typer.Option(None, help="With --pending: only this run."),
    db: Path = typer.Option(Path("state.db"), help="State store."),
) -> None:
    """Record a human verdict on a gate decision, or list pending ones."""
    from agp.records import pending_reviews
    from state.agp import add_review
    from state.store import open_db, user

    conn = open_db(db, read_only=pending)  # listing only reads
    try:
        if pending:
            found = pending_reviews(conn, run_id, limit)
            if not found:
                typer.echo(f"no gate decisions waiting for a review in {db}")
            for d in found:
                state = "ACCEPT" if d["accepted"] else "reject " + ",".join(json.loads(d["rules"]))
                acoustic = "" if d["acoustic_delta"] is None else f"  Δ={d['acoustic_delta']:+.4f}"
                if d["acoustic_margin"] is not None:
                    acoustic += f" margin={d['acoustic_margin']:.4f}"
                typer.echo(f"#{d['id']}  {d['feat_id']}  [{d['partition']}]  {state}  d={d['edit_distance']}{acoustic}\n"
                           f"    asr:      {d['asr_text']}\n    proposal: {d['proposal']}")
            return
        if decision is None or verdict is None:
            raise typer.BadParameter("give --decision and --verdict (or --pending)")
        rid = add_review(conn, decision, verdict, note, reviewer or user())
        typer.echo(f"review {rid}: decision {decision} -> {verdict}")
    finally:
        conn.close()


@agp_app.command("export-reviews")
def export_reviews_cmd(
    out: Path = typer.Option(..., "--out", help="JSONL to write (one review with its decision per line)."),
    db: Path = typer.Option(Path("state.db"), help="State store."),
    run_id: Optional[str] = typer.Option(None, help="Only this run."),
) -> None:
    """Write review verdicts with their decisions, for tuning the gate policy."""
    from agp.records import export_reviews
    from state.store import open_db

    conn = open_db(db, read_only=True)
    try:
        n = export_reviews(conn, out, run_id)
    finally:
        conn.close()
    typer.echo(f"{n} reviews -> {out}")
