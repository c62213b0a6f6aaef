"""End-to-end tests of tollgate with the official `openai` Python SDK.

The suite builds nothing: it runs the binary at $TOLLGATE_BIN (default
`target/debug/tollgate` under the repository root) against a fresh SQLite database in a
temporary directory, configured with the built-in `mock` provider, and talks to it the way a
team's unchanged code would: `openai.OpenAI(base_url=..., api_key=<virtual key>)`.

Every request that tollgate forwards upstream is recorded in `Gateway.forwarded`, so the
ledger test can check that `/spend` and `/spend/logs` agree with what the clients saw.
Run with `tests/sdk/run.sh` (or `pytest -q tests/sdk` in a venv with `openai` and `pytest`).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import openai
import pytest

try:  # openai >= 3 is built on httpx2; older releases on httpx. Use whichever the SDK uses.
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[2]
MASTER_KEY = "sk-admin-test-0123"
START_TIMEOUT_S = 20.0

# USD per 1M tokens, as integer nano-dollars per 1M tokens (SPEC §5): (input, output).
PRICES_NANO_PER_MTOK = {
    "gpt-4o": (2_500_000_000, 10_000_000_000),
    "gpt-4o-mini": (150_000_000, 600_000_000),
    "text-embedding-3-small": (20_000_000, 0),
}

CHAT_PROMPT = "Name three colours of the rainbow."


def cost_nanos(model: str, prompt_tokens: int, completion_tokens: int) -> int:
    """The exact cost of a request in nano-dollars, rounded up once (no cached tokens here)."""
    inp, out = PRICES_NANO_PER_MTOK[model]
    return -(-(prompt_tokens * inp + completion_tokens * out) // 1_000_000)


def header_nanos(value: str | None) -> int:
    """Parses an `x-tollgate-cost-usd` header (a decimal USD string) into exact nano-dollars."""
    assert value is not None, "x-tollgate-cost-usd header is missing"
    nanos = Decimal(value) * Decimal(1_000_000_000)
    assert nanos == nanos.to_integral_value(), f"cost header {value!r} is finer than a nano-dollar"
    return int(nanos)


def json_usd_nanos(value: float) -> int:
    """A JSON `cost_usd` number (f64 of nanos/1e9) back to nano-dollars."""
    return int(round(Decimal(repr(value)) * Decimal(1_000_000_000)))


@dataclass
class Forwarded:
    """One request tollgate forwarded upstream (and so must be in the ledger)."""

    request_id: str
    key: str
    model: str  # the model served (x-tollgate-model)
    stream: bool
    cost_nanos: int | None  # from x-tollgate-cost-usd; None for streams


@dataclass
class Gateway:
    base_url: str  # http://127.0.0.1:PORT
    admin: httpx.Client
    workdir: Path
    team: str
    key: str
    key_id: str
    forwarded: list[Forwarded] = field(default_factory=list)

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key or self.key, max_retries=0, timeout=20.0)

    def create_team(self, name: str, **budget) -> dict:
        r = self.admin.post("/admin/teams", json={"name": name, **budget})
        assert r.status_code == 201, (r.status_code, r.text)
        return r.json()

    def create_key(self, team: str, name: str) -> dict:
        r = self.admin.post("/admin/keys", json={"team": team, "name": name})
        assert r.status_code == 201, (r.status_code, r.text)
        body = r.json()
        assert body["key"].startswith("tg-") and len(body["key"]) >= 35, body
        return body

    def record(self, raw, key: str, stream: bool) -> None:
        """Notes a forwarded request from the SDK's raw response."""
        h = raw.headers
        rid = h.get("x-tollgate-request-id")
        assert rid, f"x-tollgate-request-id missing: {dict(h)}"
        cost = None if stream else header_nanos(h.get("x-tollgate-cost-usd"))
        self.forwarded.append(Forwarded(rid, key, h.get("x-tollgate-model"), stream, cost))


def _config(workdir: Path) -> str:
    db = workdir / "tollgate.db"
    return f"""
listen = "127.0.0.1:0"
database_url = "sqlite://{db}"
master_key = "{MASTER_KEY}"
shutdown_grace_ms = 5000

[[models]]
name = "gpt-4o"
provider = "mock"

[[models]]
name = "gpt-4o-mini"
provider = "mock"

[[models]]
name = "text-embedding-3-small"
provider = "mock"

[routing]
downgrade = {{ "gpt-4o" = "gpt-4o-mini" }}
"""


@pytest.fixture(scope="session")
def gateway():
    binary = Path(os.environ.get("TOLLGATE_BIN", "target/debug/tollgate"))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not binary.exists():
        pytest.fail(f"tollgate binary not found at {binary}: run `cargo build` or set TOLLGATE_BIN")

    with tempfile.TemporaryDirectory(prefix="tollgate-sdk-") as tmp:
        workdir = Path(tmp)
        config = workdir / "tollgate.toml"
        config.write_text(_config(workdir))
        out_path, err_path = workdir / "stdout.log", workdir / "stderr.log"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [str(binary), "--config", str(config), "serve", "--listen", "127.0.0.1:0"],
                cwd=workdir,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        try:
            port = None
            deadline = time.monotonic() + START_TIMEOUT_S
            while port is None and time.monotonic() < deadline:
                for line in out_path.read_text(errors="replace").splitlines():
                    prefix = "tollgate listening on http://127.0.0.1:"
                    if line.startswith(prefix):
                        port = int(line[len(prefix):].strip().rstrip("/"))
                if port is None:
                    if proc.poll() is not None:
                        pytest.fail(f"tollgate exited with {proc.returncode}:\n{err_path.read_text(errors='replace')}")
                    time.sleep(0.05)
            if port is None:
                pytest.fail(f"tollgate did not print its address in {START_TIMEOUT_S}s:\n{err_path.read_text(errors='replace')}")

            base_url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=20.0) as admin:
                team = "sdk-team"
                gw = Gateway(base_url=base_url, admin=admin, workdir=workdir, team=team, key="", key_id="")
                gw.create_team(team)
                created = gw.create_key(team, "web")
                gw.key, gw.key_id = created["key"], created["id"]
                yield gw
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    pytest.fail("tollgate did not exit within 15 s of SIGTERM")
                assert rc == 0, f"tollgate exited {rc} on SIGTERM:\n{err_path.read_text(errors='replace')[-4000:]}"


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> openai.OpenAI:
    return gateway.client()


def _chat_messages(prompt: str = CHAT_PROMPT):
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": prompt}]


# ---------------------------------------------------------------------------------------------
# 1. chat completions, non-streaming


def test_chat_completion_cost_header_matches_price(gateway: Gateway, client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=_chat_messages())
    gateway.record(raw, gateway.key, stream=False)
    completion = raw.parse()

    assert isinstance(completion, openai.types.chat.ChatCompletion)
    content = completion.choices[0].message.content
    assert content and content.strip()
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    assert raw.headers.get("x-tollgate-model") == "gpt-4o"
    assert raw.headers.get("x-tollgate-downgraded-from") is None
    expected = cost_nanos("gpt-4o", usage.prompt_tokens, usage.completion_tokens)
    header = raw.headers.get("x-tollgate-cost-usd")
    assert Decimal(header) == Decimal(expected) / Decimal(1_000_000_000), (header, usage)


# ---------------------------------------------------------------------------------------------
# 2. chat completions, streaming


def test_chat_stream_matches_non_streaming_and_hides_injected_usage(gateway: Gateway, client: openai.OpenAI):
    plain = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=_chat_messages())
    gateway.record(plain, gateway.key, stream=False)
    expected_text = plain.parse().choices[0].message.content

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=_chat_messages(), stream=True)
    gateway.record(raw, gateway.key, stream=True)
    assert raw.headers.get("x-tollgate-model") == "gpt-4o"
    assert raw.headers.get("content-type", "").startswith("text/event-stream")

    chunks = list(raw.parse())
    assert chunks, "the stream had no chunks"
    for c in chunks:
        assert isinstance(c, openai.types.chat.ChatCompletionChunk)
        # The client did not ask for usage: tollgate must have removed the usage chunk it injected.
        assert c.choices != [], f"usage chunk leaked to a client that did not ask for it: {c}"
        assert c.usage is None, f"usage leaked to a client that did not ask for it: {c}"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected_text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_raw_sse_ends_with_done(gateway: Gateway):
    """The SDK ignores a missing `data: [DONE]`, so check the wire: the stream ends normally."""
    body = {"model": "gpt-4o", "messages": _chat_messages(), "stream": True}
    headers = {"Authorization": f"Bearer {gateway.key}"}
    with httpx.Client(base_url=gateway.base_url, timeout=20.0) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            gateway.forwarded.append(
                Forwarded(r.headers["x-tollgate-request-id"], gateway.key, r.headers.get("x-tollgate-model"), True, None)
            )
            data_lines = [line[len("data:"):].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert data_lines and data_lines[-1] == "[DONE]", data_lines[-3:]
    assert data_lines.count("[DONE]") == 1
    for payload in data_lines[:-1]:
        event = json.loads(payload)
        assert event["choices"] != [], f"usage chunk leaked: {payload}"


def test_chat_stream_with_include_usage(gateway: Gateway, client: openai.OpenAI):
    plain = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=_chat_messages())
    gateway.record(plain, gateway.key, stream=False)
    expected = plain.parse()

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=_chat_messages(), stream=True, stream_options={"include_usage": True}
    )
    gateway.record(raw, gateway.key, stream=True)
    chunks = list(raw.parse())
    assert len(chunks) >= 2
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens == expected.usage.prompt_tokens
    assert last.usage.completion_tokens == expected.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content


# ---------------------------------------------------------------------------------------------
# 3. embeddings


def test_embeddings_base64_default_and_float(gateway: Gateway, client: openai.OpenAI):
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
    gateway.record(raw, gateway.key, stream=False)
    # The SDK asks for base64 by default and decodes it; check it asked, then what it decoded.
    sent = json.loads(raw.http_request.content)
    assert sent.get("encoding_format") == "base64"
    res = raw.parse()
    assert len(res.data) == 2
    v0, v1 = res.data[0].embedding, res.data[1].embedding
    assert len(v0) == len(v1) > 0
    assert all(isinstance(x, float) for x in v0)
    assert v0 != v1
    assert [d.index for d in res.data] == [0, 1]
    assert res.usage.prompt_tokens > 0
    assert raw.headers.get("x-tollgate-model") == "text-embedding-3-small"
    assert header_nanos(raw.headers.get("x-tollgate-cost-usd")) == cost_nanos(
        "text-embedding-3-small", res.usage.prompt_tokens, 0
    )

    raw_f = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
    )
    gateway.record(raw_f, gateway.key, stream=False)
    floats = raw_f.parse()
    assert len(floats.data) == 2
    assert len(floats.data[0].embedding) == len(v0)
    # The mock is deterministic: the float and base64 encodings carry the same vectors.
    assert floats.data[0].embedding == pytest.approx(v0, rel=1e-6, abs=1e-7)
    assert floats.data[1].embedding == pytest.approx(v1, rel=1e-6, abs=1e-7)


def test_embeddings_base64_wire_format(gateway: Gateway):
    """The base64 body is little-endian float32, as OpenAI sends it."""
    headers = {"Authorization": f"Bearer {gateway.key}"}
    body = {"model": "text-embedding-3-small", "input": "a", "encoding_format": "base64"}
    r = httpx.post(f"{gateway.base_url}/v1/embeddings", json=body, headers=headers, timeout=20.0)
    assert r.status_code == 200, r.text
    gateway.forwarded.append(
        Forwarded(r.headers["x-tollgate-request-id"], gateway.key, r.headers.get("x-tollgate-model"), False,
                  header_nanos(r.headers.get("x-tollgate-cost-usd")))
    )
    b64 = r.json()["data"][0]["embedding"]
    assert isinstance(b64, str)
    raw_bytes = base64.b64decode(b64)
    assert len(raw_bytes) > 0 and len(raw_bytes) % 4 == 0


# ---------------------------------------------------------------------------------------------
# 4. legacy completions


def test_legacy_completions(gateway: Gateway, client: openai.OpenAI):
    raw = client.completions.with_raw_response.create(model="gpt-4o-mini", prompt="Say hi")
    gateway.record(raw, gateway.key, stream=False)
    res = raw.parse()
    assert isinstance(res, openai.types.Completion)
    assert res.choices and res.choices[0].text.strip()
    assert raw.headers.get("x-tollgate-model") == "gpt-4o-mini"
    assert res.usage is not None and res.usage.prompt_tokens > 0
    assert header_nanos(raw.headers.get("x-tollgate-cost-usd")) == cost_nanos(
        "gpt-4o-mini", res.usage.prompt_tokens, res.usage.completion_tokens
    )


# ---------------------------------------------------------------------------------------------
# 5. models


def test_models_list(client: openai.OpenAI):
    models = list(client.models.list())
    ids = {m.id for m in models}
    assert {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"} <= ids, ids
    assert all(m.object == "model" for m in models)


# ---------------------------------------------------------------------------------------------
# 6. errors map to the SDK's exception classes


def test_bad_key_is_authentication_error(gateway: Gateway):
    bad = gateway.client(key="tg-" + "x" * 40)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="gpt-4o", messages=_chat_messages())
    e = info.value
    assert e.status_code == 401
    assert e.code == "invalid_api_key"
    assert e.response.json()["error"]["code"] == "invalid_api_key"
    assert e.type == "invalid_request_error"


def test_unknown_model_is_not_found(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-does-not-exist", messages=_chat_messages())
    e = info.value
    assert e.status_code == 404
    assert e.code == "model_not_found"
    assert e.response.json()["error"]["code"] == "model_not_found"


def test_max_tokens_above_model_max_is_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=_chat_messages(), max_tokens=16385)
    e = info.value
    assert e.status_code == 400
    assert e.param == "max_tokens"
    assert e.response.json()["error"]["param"] == "max_tokens"
    assert e.type == "invalid_request_error"


# ---------------------------------------------------------------------------------------------
# 7. the ledger agrees with what the clients saw


def _get(gateway: Gateway, path: str, key: str | None = None, **params) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    r = gateway.admin.get(path, params=params, headers=headers)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


def _all_logs(gateway: Gateway, key: str | None = None) -> list[dict]:
    records: list[dict] = []
    before = None
    for _ in range(100):
        params = {"limit": 1000}
        if before:
            params["before"] = before
        page = _get(gateway, "/spend/logs", key=key, **params)
        records.extend(page["data"])
        before = page.get("next_before")
        if not before:
            return records
    raise AssertionError("/spend/logs paging did not end")


def test_ledger_agrees_with_responses(gateway: Gateway, client: openai.OpenAI):
    # Make sure there is something of each kind even when this test runs alone.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=_chat_messages("ledger"))
    gateway.record(raw, gateway.key, stream=False)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=_chat_messages("ledger stream"), stream=True
    )
    gateway.record(raw, gateway.key, stream=True)
    assert list(raw.parse())

    forwarded = list(gateway.forwarded)
    logs = {r["request_id"]: r for r in _all_logs(gateway)}

    total_nanos = 0
    for f in forwarded:
        rec = logs.get(f.request_id)
        assert rec is not None, f"forwarded request {f.request_id} is not in /spend/logs"
        assert rec["status"] == 200, rec
        assert rec["served_model"] == f.model, rec
        assert rec["usage_source"] == "reported", rec
        assert rec["cached_input_tokens"] == 0, rec
        priced = cost_nanos(rec["served_model"], rec["input_tokens"], rec["output_tokens"])
        assert json_usd_nanos(rec["cost_usd"]) == priced, rec
        if f.cost_nanos is not None:
            assert f.cost_nanos == priced, (f, rec)
            total_nanos += f.cost_nanos
        else:
            total_nanos += priced

    # The master key sees everything; refused requests (auth, validation, budget) are not there.
    spend = _get(gateway, "/spend")
    assert spend["total"]["requests"] == len(forwarded), (spend["total"], len(forwarded))
    assert len(logs) == len(forwarded)
    assert json_usd_nanos(spend["total"]["cost_usd"]) == total_nanos, (spend["total"], total_nanos)
    assert spend["total"]["input_tokens"] == sum(logs[f.request_id]["input_tokens"] for f in forwarded)
    assert spend["total"]["output_tokens"] == sum(logs[f.request_id]["output_tokens"] for f in forwarded)

    grouped = _get(gateway, "/spend", group_by="team,model")
    assert sum(g["requests"] for g in grouped["groups"]) == len(forwarded)
    assert sum(json_usd_nanos(g["cost_usd"]) for g in grouped["groups"]) == total_nanos
    for g in grouped["groups"]:
        mine = [f for f in forwarded if logs[f.request_id]["team"] == g["team"] and logs[f.request_id]["model"] == g["model"]]
        assert g["requests"] == len(mine), g


def test_spend_with_virtual_key_is_isolated(gateway: Gateway, client: openai.OpenAI):
    # The first key has spend of its own even when this test runs alone.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=_chat_messages("mine"))
    gateway.record(raw, gateway.key, stream=False)

    second = gateway.create_key(gateway.team, "second")
    other = gateway.client(key=second["key"])
    raw = other.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=_chat_messages("isolation"))
    gateway.record(raw, second["key"], stream=False)
    second_cost = gateway.forwarded[-1].cost_nanos

    # The second key sees its one request only.
    own = _get(gateway, "/spend", key=second["key"])
    assert own["total"]["requests"] == 1, own
    assert json_usd_nanos(own["total"]["cost_usd"]) == second_cost
    own_logs = _all_logs(gateway, key=second["key"])
    assert [r["request_id"] for r in own_logs] == [raw.headers["x-tollgate-request-id"]]
    assert own_logs[0]["key_id"] == second["id"]

    # The first key does not see it.
    first = [f for f in gateway.forwarded if f.key == gateway.key]
    mine = _get(gateway, "/spend", key=gateway.key)
    assert mine["total"]["requests"] == len(first), (mine, len(first))
    assert json_usd_nanos(mine["total"]["cost_usd"]) == sum(
        json_usd_nanos(r["cost_usd"]) for r in _all_logs(gateway, key=gateway.key)
    )
    first_logs = _all_logs(gateway, key=gateway.key)
    assert {r["key_id"] for r in first_logs} == {gateway.key_id}
    assert raw.headers["x-tollgate-request-id"] not in {r["request_id"] for r in first_logs}

    # A virtual key cannot widen its view with filters.
    filtered = gateway.admin.get(
        "/spend", params={"key": gateway.key_id}, headers={"Authorization": f"Bearer {second['key']}"}
    )
    if filtered.status_code == 200:
        assert filtered.json()["total"]["requests"] in (0, 1), filtered.json()
    else:
        assert filtered.status_code in (400, 403, 404), filtered.text


# ---------------------------------------------------------------------------------------------
# 8. budgets, through the SDK


def test_budget_downgrades_then_refuses(gateway: Gateway):
    team = f"tiny-{uuid.uuid4().hex[:8]}"
    limit_usd = 0.004
    gateway.create_team(team, limit_usd=limit_usd, period="monthly", downgrade_at=0.5)
    key = gateway.create_key(team, "budget")
    sdk = gateway.client(key=key["key"])
    # A long prompt makes input dominate, so a few gpt-4o calls cross the threshold and
    # the gpt-4o-mini calls after them exhaust the budget within a bounded number of requests.
    prompt = "Summarise this: " + "the quick brown fox jumps over the lazy dog " * 50

    served: list[tuple[str, str | None]] = []
    refusal = None
    for _ in range(60):
        try:
            raw = sdk.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=_chat_messages(prompt), max_tokens=50
            )
        except openai.RateLimitError as e:
            refusal = e
            break
        gateway.record(raw, key["key"], stream=False)
        res = raw.parse()
        model = raw.headers.get("x-tollgate-model")
        served.append((model, raw.headers.get("x-tollgate-downgraded-from")))
        assert res.usage.completion_tokens <= 50
        assert header_nanos(raw.headers.get("x-tollgate-cost-usd")) == cost_nanos(
            model, res.usage.prompt_tokens, res.usage.completion_tokens
        )
    assert refusal is not None, f"never refused after {len(served)} requests: {served}"

    assert refusal.status_code == 429
    assert refusal.code == "budget_exceeded", refusal.body
    assert refusal.type == "insufficient_quota", refusal.body
    assert refusal.response.json()["error"]["code"] == "budget_exceeded"
    assert refusal.response.headers.get("x-should-retry") == "false"
    retry_after = refusal.response.headers.get("retry-after")
    assert retry_after is not None and int(retry_after) > 0

    assert served, "the first request was already refused"
    assert served[0] == ("gpt-4o", None), served
    downgraded = [s for s in served if s == ("gpt-4o-mini", "gpt-4o")]
    assert downgraded, f"no response was downgraded before the refusal: {served}"
    # Once downgraded, never back to the expensive model (spend only grows).
    first_down = served.index(("gpt-4o-mini", "gpt-4o"))
    assert all(s == ("gpt-4o-mini", "gpt-4o") for s in served[first_down:]), served
    assert all(s == ("gpt-4o", None) for s in served[:first_down]), served

    info = _get(gateway, f"/admin/teams/{team}")
    assert info["limit_usd"] == pytest.approx(limit_usd)
    assert 0 < info["spent_usd"] <= limit_usd, info
    assert info["reserved_usd"] == 0, info
    mine = [f for f in gateway.forwarded if f.key == key["key"]]
    assert json_usd_nanos(info["spent_usd"]) == sum(f.cost_nanos for f in mine), info

    # Still refused: nothing is left for even the cheaper model.
    with pytest.raises(openai.RateLimitError) as again:
        sdk.chat.completions.create(model="gpt-4o", messages=_chat_messages(prompt), max_tokens=50)
    assert again.value.code == "budget_exceeded"
