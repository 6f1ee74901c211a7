"""Bad and hostile input against the deployed stack: a schemathesis fuzz of the OpenAPI schema
finds no 500 and no crash; corrupted, truncated, oversized and foreign state imports are refused
and change nothing; session ids made to escape a path or a Redis key never reach one."""

from __future__ import annotations

import io
import os
import pickle
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch

from server.stores.base import SESSION_ID_RE, valid_session_id
from tests.deploy.support import Cluster, HopeServer, chat_body, decode_state

# ---- the fuzz ----------------------------------------------------------------------------------------

# per operation and pass: about 500 requests, the same ones every run; HOPE_FUZZ_EXAMPLES=200 (say)
# runs a longer fuzz with fresh random examples
FUZZ_EXAMPLES = int(os.environ.get("HOPE_FUZZ_EXAMPLES", "25"))
FUZZ_DERANDOMIZE = "HOPE_FUZZ_EXAMPLES" not in os.environ


@pytest.fixture
def fuzz_server(cluster: Cluster, checkpoint: Path, tmp_path: Path) -> Iterator[HopeServer]:
    """A third replica on the cluster's Redis (a key prefix of its own), with small generation
    limits so that the fuzzer's max_tokens cannot make it generate for long."""
    pytest.importorskip("schemathesis", reason="pip install schemathesis (.ci/run installs it)")
    store = f"{cluster.redis.url}?prefix=fuzz-{uuid.uuid4().hex[:6]}"
    server = HopeServer(checkpoint, store, tmp_path / "fuzz.log", HOPE_MAX_TOKENS_LIMIT="16",
                        HOPE_DEFAULT_MAX_TOKENS="4", HOPE_MAX_PROMPT_TOKENS="2048", HOPE_BUSY_POLICY="reject",
                        HOPE_LOCK_TTL_S="2").start()
    yield server
    server.stop()


def failures_by_reason(base_url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        m = re.match(r'hope_request_failure_total\{reason="([^"]+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_openapi_fuzz_finds_no_server_error(fuzz_server: HopeServer) -> None:
    schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (.ci/run installs it)")
    import requests
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis.errors import Unsatisfiable

    base = fuzz_server.base_url
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    calls: Counter[int] = Counter()
    unsendable: list[str] = []
    server_errors: list[str] = []

    def with_served_model(case):
        """Random model names are all 404: one positive pass names the served model, so that the
        fuzzed bodies reach the engine and the sessions."""
        if isinstance(case.body, dict):
            case.body["model"] = "hope"
        return case

    def fuzz_test(strategy, label: str):
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=FUZZ_DERANDOMIZE,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        @given(case=strategy)
        def fuzz(case) -> None:
            try:
                response = case.call(base_url=base, timeout=30)
            except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError, ValueError):
                unsendable.append(label)  # the client library refuses to send it (a header with a newline...)
                return
            calls[response.status_code] += 1
            body = response.content
            if response.status_code >= 500 or b'"internal_error"' in body:
                server_errors.append(f"{label}: {response.status_code} {body[:300]!r}\n  {case.as_curl_command()}")

        return fuzz

    passes = [(mode, False) for mode in schemathesis.GenerationMode] + [(schemathesis.GenerationMode.POSITIVE, True)]
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, served_model in passes:
            strategy = operation.as_strategy(generation_mode=mode)
            if served_model:
                if operation.method.upper() != "POST" or "completions" not in operation.path:
                    continue
                strategy = strategy.map(with_served_model)
            try:
                fuzz_test(strategy, f"{operation.label} [{mode.value}{', served model' if served_model else ''}]")()
            except Unsatisfiable:  # nothing to make invalid (GET /healthz has no input at all)
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label

    print(f"\nfuzz: {sum(calls.values())} requests, statuses {dict(sorted(calls.items()))}, "
          f"{len(unsendable)} not sendable by the client")
    assert not server_errors, "\n".join(server_errors[:10])
    assert fuzz_server.alive, "the server died under the fuzz"
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    assert failures_by_reason(base).get("internal", 0) == 0
    assert sum(calls.values()) >= 100


# ---- state imports -------------------------------------------------------------------------------------

def resave(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


class Unpickled:
    """If anything ever unpickled an import, this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def hostile_states(blob: bytes, foreign_blob: bytes, other_arch_blob: bytes, marker: Path) -> dict[str, bytes]:
    n = int.from_bytes(blob[:8], "little")
    meta, tensors = decode_state(blob)
    floats = [k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1]

    def changed(**edits) -> bytes:
        t = dict(tensors)
        m = dict(meta)
        for k, v in edits.items():
            if k == "meta":
                m.update(v)
            elif v is None:
                del t[k]
            else:
                t[k] = v
        return resave(t, m)

    nan = tensors[floats[0]].clone()
    nan.view(-1)[0] = float("nan")
    inf = tensors[floats[-1]].clone()
    inf.view(-1)[-1] = float("inf")
    buf = io.BytesIO()
    torch.save({floats[0]: tensors[floats[0]]}, buf)
    _, other_tensors = decode_state(other_arch_blob)
    return {
        "garbage": b"this is not a session state",
        "empty": b"",
        "truncated to 4 bytes": blob[:4],
        "truncated inside the header": blob[:8 + n // 2],
        "truncated after the header": blob[:8 + n],
        "truncated to half": blob[:len(blob) // 2],
        "truncated by one byte": blob[:-1],
        "corrupted header length": (2**40).to_bytes(8, "little") + blob[8:],
        "corrupted header JSON": blob[:8] + blob[8:8 + n].replace(b'"', b"'", 4) + blob[8 + n:],
        "corrupted: NaN in a memory": changed(**{floats[0]: nan}),
        "corrupted: inf in a memory": changed(**{floats[-1]: inf}),
        "corrupted: counters out of range": changed(n_open=torch.tensor(10**6, dtype=tensors["n_open"].dtype)),
        "corrupted: token ids out of the vocabulary": changed(
            open_tokens=torch.full_like(tensors["open_tokens"], 10**9)),
        "corrupted: negative update counters": changed(updates=-torch.ones_like(tensors["updates"])),
        "wrong dtype": changed(**{floats[0]: tensors[floats[0]].half()}),
        "wrong shape": changed(**{floats[0]: tensors[floats[0]].reshape(-1)[:-1]}),
        "a tensor missing": changed(**{floats[0]: None}),
        "an extra tensor": changed(extra=torch.zeros(3)),
        "another format": changed(meta={"format": "hope-session-state/999"}),
        "version not a number": changed(meta={"version": "latest"}),
        "a torch.save pickle": buf.getvalue(),
        "a malicious pickle": pickle.dumps(Unpickled(marker)),
        "foreign checkpoint": foreign_blob,
        "foreign checkpoint, fingerprint forged": resave(other_tensors, {**decode_state(other_arch_blob)[0],
                                                                          "fingerprint": meta["fingerprint"]}),
    }


@pytest.fixture(scope="module")
def foreign_states(foreign_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A state of another checkpoint of the same architecture, and one of another architecture."""
    from hope_core.checkpoint import load_checkpoint
    from hope_core.engine import Engine
    from tests.server.support import make_checkpoint

    other = make_checkpoint(tmp_path_factory.mktemp("other-architecture"), seed=2, d_model=32, mem_hidden=4)
    out = []
    for path in (foreign_checkpoint, other):
        engine = Engine(load_checkpoint(path))
        session = engine.new_session()
        engine.absorb(session, engine.tokenizer.encode("a state made elsewhere") * 3)
        out.append(session.to_bytes())
    return out[0], out[1]


def test_state_imports_refused(cluster: Cluster, client: httpx.Client, foreign_states, tmp_path: Path) -> None:
    sid = f"imp-{uuid.uuid4().hex[:8]}"
    for text in ("First.", "Second."):
        r = client.post(f"{cluster.url}/v1/chat/completions", headers={"X-Session-Id": sid},
                        json=chat_body(cluster.model, text))
        assert r.status_code == 200, r.text
    url = f"{cluster.url}/v1/sessions/{sid}"
    meta, blob = client.get(url).json(), client.get(f"{url}/state").content
    marker = tmp_path / "unpickled"
    cases = hostile_states(blob, *foreign_states, marker)

    answers = {}
    for name, body in cases.items():
        r = client.put(f"{url}/state", content=body)
        answers[name] = (r.status_code, r.json()["error"]["code"])
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_state", (name, r.text)
        # a refused import into a session that does not exist creates nothing
        fresh = f"imp-new-{uuid.uuid4().hex[:8]}"
        assert client.put(f"{cluster.url}/v1/sessions/{fresh}/state", content=body).status_code == 400
        assert client.get(f"{cluster.url}/v1/sessions/{fresh}").status_code == 404

    # oversized: one byte over HOPE_MAX_STATE_BYTES (64 MiB), with a length and chunked
    limit = 64 * 1024 * 1024
    r = client.put(f"{url}/state", content=b"\0" * (limit + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text[:300]
    answers["oversized"] = (r.status_code, r.json()["error"]["code"])
    r = client.put(f"{url}/state", content=(b"\0" * (1 << 20) for _ in range(65)))
    assert r.status_code == 413, r.text[:300]
    answers["oversized, chunked"] = (r.status_code, r.json()["error"]["code"])

    assert not marker.exists(), "an import was unpickled"
    assert client.get(url).json() == meta, "a refused import changed the session"
    assert client.get(f"{url}/state").content == blob
    print("\n" + "\n".join(f"  {name}: {status} {code}" for name, (status, code) in answers.items()))

    # the refusals are not blanket refusals: the real export imports into a new session and serves
    copy = f"imp-copy-{uuid.uuid4().hex[:8]}"
    r = client.put(f"{cluster.url}/v1/sessions/{copy}/state", content=blob)
    assert r.status_code == 200 and r.json()["tokens_absorbed"] == meta["tokens_absorbed"], r.text
    r = client.post(f"{cluster.url}/v1/chat/completions", headers={"X-Session-Id": copy},
                    json=chat_body(cluster.model, "Third."))
    assert r.status_code == 200 and r.json()["session"]["version"] == 2


# ---- session ids -----------------------------------------------------------------------------------------

HOSTILE_IDS = [
    "..", ".", ".hidden", "../../etc/passwd", "a/b", "a\\b", "a:b", "default:victim", "{default:victim}",
    "x}:state", "x:*", "a*", "a?", "a b", "a\tb", "a\nb", "a\r\nX-Injected: 1", "a\x00b", "%2e%2e%2f",
    "..%2f..%2f", "é", "ünïcode", "a;b", "a|b", "$(id)", "`id`", "'; DROP TABLE sessions;--", "a" * 129,
    "trailing\n", "trailing\r\n",
]


def test_hostile_session_ids_refused(cluster: Cluster, client: httpx.Client) -> None:
    real = f"ids-{uuid.uuid4().hex[:8]}"
    r = client.post(f"{cluster.url}/v1/chat/completions", headers={"X-Session-Id": real},
                    json=chat_body(cluster.model, "Hello."))
    assert r.status_code == 200
    blob = client.get(f"{cluster.url}/v1/sessions/{real}/state").content
    statuses: Counter[str] = Counter()

    def expect(r: httpx.Response, allowed: set[int], what: str) -> None:
        statuses[f"{what} {r.status_code}"] += 1
        assert r.status_code in allowed, (what, r.status_code, r.text[:300])

    for bad in HOSTILE_IDS:
        assert not valid_session_id(bad)
        chat = f"{cluster.url}/v1/chat/completions"
        r = client.post(chat, json=chat_body(cluster.model, "hi", session_id=bad))
        expect(r, {400}, "body session_id")
        assert r.json()["error"]["code"] == "invalid_session_id"
        # OpenAI's `user` is any string: one that is no session id names a session by its hash
        r = client.post(chat, json=chat_body(cluster.model, "hi", user=bad))
        expect(r, {200}, "body user")
        assert re.fullmatch(r"user-[0-9a-f]{32}", r.json()["session"]["id"])
        r = client.post(f"{cluster.url}/v1/completions", json={"model": "hope", "prompt": "x", "max_tokens": 1,
                                                               "session_id": bad})
        expect(r, {400}, "completions session_id")
        try:
            r = client.post(chat, json=chat_body(cluster.model, "hi"), headers={"X-Session-Id": bad.encode()})
        except (httpx.LocalProtocolError, ValueError):
            statuses["header not sendable"] += 1  # HTTP itself forbids it (a newline, a NUL)
        else:
            expect(r, {400}, "header")
        # every character escaped, dots too (a bare "." or ".." would be resolved away by the client)
        path = f"{cluster.url}/v1/sessions/{quote(bad, safe='').replace('.', '%2E')}"
        expect(client.get(path), {400, 404}, "GET path")
        expect(client.delete(path), {400, 404, 405}, "DELETE path")
        expect(client.get(f"{path}/state"), {400, 404}, "export path")
        expect(client.put(f"{path}/state", content=blob), {400, 404, 405}, "import path")
        expect(client.post(f"{path}/fork", json={"new_id": "fine"}), {400, 404}, "fork from")
        r = client.post(f"{cluster.url}/v1/sessions/{real}/fork", json={"new_id": bad})
        expect(r, {400}, "fork to")
        expect(client.get(f"{cluster.url}/v1/sessions", params={"after": bad}), {400}, "list after")

    # nothing reached Redis but well-formed keys of well-formed ids
    valid_id = SESSION_ID_RE.pattern.strip("^$")
    key = re.compile(rf"^{re.escape(cluster.prefix)}:(\{{default:{valid_id}\}}:(meta|state|hist|lock|fence)"
                     rf"|(idx|exp):\{{default\}})$")
    keys = [k.decode("utf-8", "replace") for k in cluster.redis.client().scan_iter(match=f"{cluster.prefix}:*")]
    assert keys and all(key.match(k) for k in keys), [k for k in keys if not key.match(k)]
    assert client.get(f"{cluster.url}/v1/sessions/{real}").json()["version"] == 1
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))



def test_vanishing_temperature_or_top_p_is_greedy(cluster: Cluster, client: httpx.Client) -> None:
    """Found by the fuzz: temperature 1e-203 made the logits infinite, and top_p 5e-324 rounds to 0
    in float32 and dropped every token; the sampler raised (500). Below 1e-6 either is now greedy:
    the same reply as temperature 0."""
    replies = []
    for sampling in ({"temperature": 0}, {"temperature": 1e-300}, {"temperature": 1e-7},
                     {"temperature": 1, "top_p": 5e-324}, {"top_p": 1e-9}):
        for path in ("chat", "completions"):
            if path == "chat":
                r = client.post(f"{cluster.url}/v1/chat/completions",
                                json=chat_body(cluster.model, "Say something.", max_tokens=8, **sampling))
            else:
                r = client.post(f"{cluster.url}/v1/completions",
                                json={"model": "hope", "prompt": "Say", "max_tokens": 8, **sampling})
            assert r.status_code == 200, (sampling, r.text)
            if path == "chat":
                replies.append(r.json()["choices"][0]["message"]["content"])
    assert len(set(replies)) == 1, replies
