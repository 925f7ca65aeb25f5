"""Proposers: anything that turns a prediction row into a proposed N'Ko text. One interface,
``propose(row) -> str``; none of them is ever shown the reference text.

* ``HttpProposer`` — the AGP lane's HTTP service: ``GET /health``, ``POST /propose`` with the
  row (reference removed) as JSON, answer ``{"proposal": "..."}``.
* ``ChatProposer`` — an OpenAI-compatible chat endpoint such as ``mlx_lm.server``
  (``POST /v1/chat/completions``), optionally naming a LoRA adapter; the prompt is the same
  user turn the corpus trains on (``agp.corpus.prompt_messages``).
* ``LexiconProposer`` — offline: on non-stable rows, each word not in the lexicon is replaced
  by the nearest lexicon word within ``max_distance`` edits.

The HTTP clients retry connection errors, timeouts, 429 and 5xx with exponential backoff and
raise ``LaneDown`` naming the URL and the last error when the service cannot be reached.
"""

from __future__ import annotations

import time
from typing import Iterable, Protocol, Sequence

import httpx

from agp.lexicon import Lexicon
from models.bundle import PredictionRow
from models.errors import NkoOpsError


class LaneDown(NkoOpsError, RuntimeError):
    """The proposer service could not be reached or kept failing."""


class ProposerError(NkoOpsError, RuntimeError):
    """The service answered, but not with a usable proposal (4xx, bad JSON)."""


class Proposer(Protocol):
    name: str

    def propose(self, row: PredictionRow) -> str: ...


def public_row(row: PredictionRow) -> dict:
    """What a proposer may see: the row without its reference or the scores derived from it."""
    d = row.as_dict()
    for key in ("reference_text", "cer_edits", "reference_chars"):
        d.pop(key, None)
    return d


def propose_all(proposer: Proposer, rows: Iterable[PredictionRow]) -> list[dict]:
    """``{"feat_id", "proposal", "proposer"}`` for each row."""
    return [{"feat_id": r.feat_id, "proposal": proposer.propose(r), "proposer": proposer.name} for r in rows]


class _HttpClient:
    def __init__(self, base_url: str, timeout: float, retries: int, backoff: float,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.client = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def request(self, method: str, path: str, json: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self.client.request(method, path, json=json)
            except httpx.TimeoutException as e:
                last = f"timed out ({type(e).__name__})"
                continue
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise ProposerError(f"{method} {url} -> HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                body = resp.json()
            except ValueError:
                raise ProposerError(f"{method} {url} answered non-JSON: {resp.text[:200]!r}") from None
            if not isinstance(body, dict):
                raise ProposerError(f"{method} {url} answered {type(body).__name__}, not a JSON object")
            return body
        raise LaneDown(f"AGP lane at {url} is down: {last} (after {self.retries + 1} attempts)")

    def close(self) -> None:
        self.client.close()


class HttpProposer:
    name = "agp-http"

    def __init__(self, base_url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 transport: httpx.BaseTransport | None = None):
        self.http = _HttpClient(base_url, timeout, retries, backoff, transport)

    def health(self) -> dict:
        return self.http.request("GET", "/health")

    def propose(self, row: PredictionRow) -> str:
        body = self.http.request("POST", "/propose", json=public_row(row))
        proposal = body.get("proposal")
        if not isinstance(proposal, str):
            raise ProposerError(f"POST {self.http.base_url}/propose for {row.feat_id}: "
                                f"answer has no string 'proposal': {str(body)[:200]}")
        return proposal

    def close(self) -> None:
        self.http.close()


class ChatProposer:
    """OpenAI-compatible chat completions (e.g. ``mlx_lm.server --model M [--adapter-path A]``).
    ``adapter`` is sent as mlx-lm's per-request ``adapters`` path, which the server honours
    only when ``model`` names the model by path. Greedy, bounded output."""

    name = "chat"

    def __init__(self, base_url: str, model: str = "default_model", adapter: str | None = None,
                 max_tokens: int = 256, timeout: float = 120.0, retries: int = 2, backoff: float = 1.0,
                 transport: httpx.BaseTransport | None = None):
        if adapter and model == "default_model":
            # mlx_lm.server maps "default_model" to its own --adapter-path and drops the
            # request's adapter without a word; name the served model path instead.
            raise ValueError("an adapter needs the model named by its path (the server's --model), "
                             "not 'default_model', or start mlx_lm.server with --adapter-path")
        self.http = _HttpClient(base_url, timeout, retries, backoff, transport)
        self.model = model
        self.adapter = adapter
        self.max_tokens = max_tokens

    def health(self) -> dict:
        return self.http.request("GET", "/health")

    def propose(self, row: PredictionRow) -> str:
        from agp.corpus import prompt_messages

        body: dict = {"model": self.model, "messages": prompt_messages(row), "temperature": 0.0,
                      "max_tokens": self.max_tokens, "stream": False}
        if self.adapter:
            body["adapters"] = self.adapter
        answer = self.http.request("POST", "/v1/chat/completions", json=body)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ProposerError(f"{self.http.base_url}/v1/chat/completions for {row.feat_id}: "
                                f"no choices[0].message.content in {str(answer)[:200]}") from None
        if content is None:  # the model produced no text (e.g. stopped at once): an empty proposal
            return ""
        if not isinstance(content, str):
            raise ProposerError(f"{row.feat_id}: message content is {type(content).__name__}, not text")
        return content.strip()

    def close(self) -> None:
        self.http.close()


class LexiconProposer:
    name = "lexicon"

    def __init__(self, lexicon: Lexicon, max_distance: int = 1, skip: Sequence[str] = ("stable",)):
        if max_distance < 1:
            raise ValueError("max_distance must be >= 1")
        self.lexicon = lexicon
        self.max_distance = max_distance
        self.skip = set(skip)

    def propose(self, row: PredictionRow) -> str:
        if row.partition in self.skip:
            return row.asr_text
        out = []
        for word in row.asr_text.split(" "):
            near = self.lexicon.nearest(word, self.max_distance) if word else None
            out.append(near if near is not None else word)
        return " ".join(out)
