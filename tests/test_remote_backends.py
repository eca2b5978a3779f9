"""The ``openai`` and ``http`` backends against real HTTP servers: where their API key goes, which image URLs
they follow, and how much and how long they read.

Two fake servers: the upstream API (the tier's ``url``) and another host (``localhost`` on another port),
each recording the headers of every request it receives.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask, Response, jsonify, redirect, request
from PIL import Image

from core.tier_settings import TierSettings
from tests.servers import serve_wsgi
from worker.generators import GenerationError, GenerationRequest, HttpGenerator, OpenAIGenerator

KEY = "sk-upstream-secret-4711"
REQUEST = GenerationRequest(prompt="a lighthouse", seed=1, steps=2, width=64, height=64)
BIG = 2_000_000
CAP = 1_000_000


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 128, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Server:
    """A fake server's base URL, what it received, and (for the upstream API) what it answers next."""

    url: str = ""
    received: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    answer: Any = None

    def record(self) -> None:
        self.received.append((request.method, request.path, dict(request.headers)))

    def saw_key(self) -> bool:
        return any(KEY in value for _, _, headers in self.received for value in headers.values())


def images(server: Server) -> Flask:
    """Image files as a storage host serves them: small, large, large without a length, dripping slowly, moved."""
    app = Flask("images")

    @app.get("/files/<name>")
    def file(name: str) -> Any:
        server.record()
        if name == "moved.png":
            return redirect(request.args["to"], code=302)
        if name == "big.png":
            return Response(b"\0" * BIG, mimetype="image/png")
        if name == "chunked.png":
            return Response((b"\0" * 65536 for _ in range(BIG // 65536 + 1)), mimetype="image/png")
        if name == "slow.png":
            return Response((time.sleep(0.2) or b"\0" for _ in range(50)), mimetype="image/png")
        return Response(png(), mimetype="image/png")

    return app


def upstream(server: Server) -> Flask:
    """An OpenAI-compatible images API (and a plain image API) answering whatever ``server.answer`` says."""
    app = images(server)

    @app.post("/v1/images/generations")
    @app.post("/generate")
    def generate() -> Any:
        server.record()
        return server.answer() if callable(server.answer) else jsonify(server.answer)

    return app


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Server, Server]]:
    api, other = Server(), Server()
    with serve_wsgi(upstream(api)) as api_url, serve_wsgi(images(other)) as other_url:
        api.url, other.url = api_url, other_url.replace("127.0.0.1", "localhost")
        yield api, other


@pytest.fixture()
def api(servers: tuple[Server, Server]) -> Server:
    servers[0].received.clear()
    return servers[0]


@pytest.fixture()
def other(servers: tuple[Server, Server]) -> Server:
    servers[1].received.clear()
    return servers[1]


def openai_backend(api: Server, **settings: Any) -> OpenAIGenerator:
    values = {"backend": "openai", "url": f"{api.url}/v1", "api_key": KEY, "timeout_s": 5, "max_image_bytes": CAP}
    return OpenAIGenerator(TierSettings(**{**values, **settings}))


def answer_url(url: str) -> dict[str, Any]:
    return {"created": 1, "data": [{"url": url}]}


def test_the_key_goes_to_the_api_and_never_to_an_image_host_it_names(api: Server, other: Server) -> None:
    api.answer = answer_url(f"{other.url}/files/image.png")
    with pytest.raises(GenerationError, match="image_hosts") as refused:
        openai_backend(api).generate(REQUEST)
    assert not refused.value.retryable
    assert other.received == []  # not even asked
    (method, path, headers) = api.received[0]
    assert (method, path, headers["Authorization"]) == ("POST", "/v1/images/generations", f"Bearer {KEY}")


def test_a_listed_image_host_is_fetched_without_the_key(api: Server, other: Server) -> None:
    api.answer = answer_url(f"{other.url}/files/image.png")
    result = openai_backend(api, image_hosts=other.url).generate(REQUEST)
    assert result.png == png()
    assert [(m, p) for m, p, _ in other.received] == [("GET", "/files/image.png")]
    assert "Authorization" not in other.received[0][2] and not other.saw_key()


@pytest.mark.parametrize(
    "url",
    [
        "https://images.example.invalid/x.png",  # HTTPS, but not a listed host
        "{other}/files/image.png",  # listed below as host:port, which means HTTPS only: not this http URL
        "file:///etc/passwd",
        "not a url",
    ],
)
def test_unlisted_schemes_and_hosts_are_refused_before_any_request(api: Server, other: Server, url: str) -> None:
    api.answer = answer_url(url.format(other=other.url))
    backend = openai_backend(api, image_hosts=other.url.removeprefix("http://"))
    with pytest.raises(GenerationError, match="image_hosts"):
        backend.generate(REQUEST)
    assert other.received == []


def test_the_apis_own_origin_may_serve_the_image_with_the_key(api: Server) -> None:
    api.answer = answer_url(f"{api.url}/files/own.png")
    assert openai_backend(api).generate(REQUEST).png == png()
    assert [(m, p, h.get("Authorization")) for m, p, h in api.received] == [
        ("POST", "/v1/images/generations", f"Bearer {KEY}"),
        ("GET", "/files/own.png", f"Bearer {KEY}"),
    ]


def test_redirects_are_not_followed(api: Server, other: Server) -> None:
    api.answer = lambda: redirect(f"{other.url}/files/image.png", code=307)
    with pytest.raises(GenerationError):
        openai_backend(api).generate(REQUEST)
    # An image URL on the API's own origin (fetched with the key) that redirects elsewhere: not followed either.
    api.answer = answer_url(f"{api.url}/files/moved.png?to={other.url}/files/image.png")
    with pytest.raises(GenerationError, match="image URL answered 302"):
        openai_backend(api).generate(REQUEST)
    assert other.received == []


@pytest.mark.parametrize("name", ["big.png", "chunked.png"])
def test_an_image_larger_than_the_cap_fails_the_job(api: Server, name: str) -> None:
    api.answer = answer_url(f"{api.url}/files/{name}")
    with pytest.raises(GenerationError, match=f"more than {CAP} bytes") as refused:
        openai_backend(api).generate(REQUEST)
    assert not refused.value.retryable


def test_an_answer_larger_than_the_cap_fails_the_job(api: Server) -> None:
    api.answer = {"created": 1, "data": [{"b64_json": base64.b64encode(b"\0" * BIG).decode()}]}
    with pytest.raises(GenerationError, match=f"more than {CAP} bytes"):
        openai_backend(api).generate(REQUEST)


def test_a_dripping_image_is_cut_at_the_timeout(api: Server) -> None:
    api.answer = answer_url(f"{api.url}/files/slow.png")
    started = time.monotonic()
    with pytest.raises(GenerationError, match="longer than 1s") as slow:
        openai_backend(api, timeout_s=1).generate(REQUEST)
    assert slow.value.retryable
    assert time.monotonic() - started < 3  # the drip would last 10 s; httpx's per-read timeout never fires


def test_the_http_backend_sends_its_key_to_its_url_and_caps_the_answer(api: Server) -> None:
    settings = {"backend": "http", "url": f"{api.url}/generate", "api_key": KEY, "max_image_bytes": CAP}
    api.answer = lambda: Response(png(), mimetype="image/png")
    assert HttpGenerator(TierSettings(**settings)).generate(REQUEST).png == png()
    assert api.received[-1][2]["Authorization"] == f"Bearer {KEY}"
    api.answer = lambda: Response(b"\0" * BIG, mimetype="image/png")
    with pytest.raises(GenerationError, match=f"more than {CAP} bytes"):
        HttpGenerator(TierSettings(**settings)).generate(REQUEST)
