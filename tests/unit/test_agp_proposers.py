import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from agp.lexicon import Lexicon
from agp.proposers import HttpProposer, LaneDown, LexiconProposer, ProposerError, public_row, propose_all
from agp_helpers import make_row, sample_rows, write_rows_file
from cli.root import app


class Service:
    """A local /propose service whose failures the test scripts: fail the next N requests with
    a status, or answer slowly."""

    def __init__(self):
        self.fail_next = 0
        self.fail_status = 503
        self.delay = 0.0
        self.bodies: list[dict] = []
        self.requests = 0
        svc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, obj):
                data = json.dumps(obj, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _common(self):
                svc.requests += 1
                if svc.delay:
                    time.sleep(svc.delay)
                if svc.fail_next:
                    svc.fail_next -= 1
                    self._send(svc.fail_status, {"error": "scripted failure"})
                    return True
                return False

            def do_GET(self):
                if self._common():
                    return
                if self.path == "/health":
                    self._send(200, {"status": "ok", "model": "test"})
                else:
                    self._send(404, {"error": "no such path"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._common():
                    return
                svc.bodies.append(body)
                if self.path == "/propose":
                    self._send(200, {"feat_id": body["feat_id"], "proposal": body["asr_text"] + "߫"})
                else:
                    self._send(404, {"error": "no such path"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = Service()
    yield s
    s.close()


ROW = make_row("bam_test_0001", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ", "boundary", audio_id="a1")


def test_health_and_propose_never_send_the_reference(service):
    p = HttpProposer(service.url, timeout=5, retries=0)
    assert p.health()["status"] == "ok"
    assert p.propose(ROW) == "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ߫"
    (body,) = service.bodies
    assert body == public_row(ROW)
    assert "reference_text" not in body and "cer_edits" not in body and "reference_chars" not in body
    assert body["partition"] == "boundary" and body["trajectory_scalars"]


def test_5xx_is_retried_with_backoff_then_succeeds(service):
    service.fail_next = 2
    p = HttpProposer(service.url, timeout=5, retries=3, backoff=0.05)
    t0 = time.monotonic()
    assert p.propose(ROW).endswith("߫")
    assert service.requests == 3
    assert time.monotonic() - t0 >= 0.05 + 0.1  # backoff 0.05 then 0.1


def test_persistent_5xx_means_lane_down(service):
    service.fail_next = 10
    p = HttpProposer(service.url, timeout=5, retries=2, backoff=0.01)
    with pytest.raises(LaneDown, match=r"AGP lane at .*/propose is down: HTTP 503.*after 3 attempts"):
        p.propose(ROW)
    assert service.requests == 3


def test_timeout_is_retried_then_lane_down(service):
    service.delay = 1.0
    p = HttpProposer(service.url, timeout=0.2, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(LaneDown, match="timed out"):
        p.health()
    assert time.monotonic() - t0 < 1.5
    service.delay = 0.0
    assert HttpProposer(service.url, timeout=5, retries=0).health()["status"] == "ok"


def test_4xx_is_not_retried(service):
    service.fail_next, service.fail_status = 1, 422
    with pytest.raises(ProposerError, match="HTTP 422"):
        HttpProposer(service.url, timeout=5, retries=3, backoff=0.01).propose(ROW)
    assert service.requests == 1


def test_nothing_listening_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = HttpProposer(f"http://127.0.0.1:{port}", timeout=1, retries=1, backoff=0.01)
    with pytest.raises(LaneDown, match=rf"AGP lane at http://127.0.0.1:{port}/health is down: ConnectError"):
        p.health()


def test_cli_propose_over_http_and_when_down(service, tmp_path):
    rows = write_rows_file(tmp_path / "rows.jsonl", sample_rows(4))
    out = tmp_path / "proposals.jsonl"
    res = CliRunner().invoke(app, ["agp", "propose", "--rows", str(rows), "--out", str(out), "--proposer", "http",
                                   "--url", service.url, "--retries", "0"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [p["proposer"] for p in lines] == ["agp-http"] * 4
    service.fail_next = 100
    out2 = tmp_path / "p2.jsonl"
    res = CliRunner().invoke(app, ["agp", "propose", "--rows", str(rows), "--out", str(out2), "--proposer", "http",
                                   "--url", service.url, "--retries", "1"])
    assert res.exit_code == 2
    assert "is down" in res.output and not out2.exists()


def test_lexicon_proposer_nearest_word_non_stable_only():
    lex = Lexicon.from_references(["ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߛߊ߲ ߦߋ", "ߛߊߣ ߞߊ"])
    assert lex.counts["ߛߊ߲"] == 2
    p = LexiconProposer(lex, max_distance=1)
    # ߛߊ is one edit from both ߛߊ߲ (2x) and ߛߊߣ (1x): the more frequent wins
    assert p.propose(make_row("a", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ", "boundary")) == "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ"
    assert p.propose(make_row("b", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ", "stable")) == "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ"
    # too far from anything: left alone
    assert p.propose(make_row("c", "ߕߐߜߐ", "ߕߐߜߐ", "uncertain")) == "ߕߐߜߐ"
    # one edit from ߞߊ: "corrected" even when the ASR was right; the gate and eval judge that
    got = propose_all(p, [make_row("d", "ߛߊ߲ ߞߊ߬", "ߛߊ߲ ߞߊ߬", "uncertain")])
    assert got == [{"feat_id": "d", "proposal": "ߛߊ߲ ߞߊ", "proposer": "lexicon"}]


def test_lexicon_round_trip(tmp_path):
    lex = Lexicon.from_references(["ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ߸", "ߛߊ߲ ߦߋ"])
    assert "ߦߋ" in lex and "ߦߋ߸" not in lex  # punctuation is not part of a word
    lex.save(tmp_path / "lex.tsv")
    again = Lexicon.load(tmp_path / "lex.tsv")
    assert again.counts == lex.counts and again.sha256 == lex.sha256
