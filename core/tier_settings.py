"""How a tier is configured: one :class:`TierSettings` per tier (``ROUTET2I_<TIER>__*``), with the ``edge`` and
``cloud`` tiers' own defaults."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

TierName = str
"""A tier's name: lower-case letters, digits and underscores (it names the tier's queue and its settings)."""
TIER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class TierSettings(BaseModel):
    """How one tier generates images and what each image costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["diffusers", "http", "openai", "null"] = "diffusers"
    """``diffusers``: a local pipeline; ``http``: a remote image API; ``openai``: any OpenAI-compatible images
    endpoint (``url`` is its base URL, e.g. ``https://api.openai.com/v1``); ``null``: a zero-cost generator."""
    model: str = "offline:edge"
    """A hub id or local path for ``diffusers``; ``offline:<profile>`` builds a random-weight architecture."""
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    steps: int = Field(default=20, ge=1, le=500)
    """Denoising steps when a job does not ask for a number."""
    width: int = Field(default=128, ge=64, le=4096)
    height: int = Field(default=128, ge=64, le=4096)
    guidance_scale: float = Field(default=7.0, ge=0.0)
    price_per_image: float = Field(default=0.0, ge=0.0)
    """US dollars charged per delivered image (API price or amortised serving cost)."""
    price_per_gpu_second: float = Field(default=0.0, ge=0.0)
    """US dollars per second of accelerator time spent generating."""
    url: str | None = None
    """Endpoint of the ``http`` backend, base URL of the ``openai`` backend."""
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=20)
    """Retries of a failed generation (transient errors only) before the job falls back to another tier (its
    ``fallback``) or fails."""
    image_hosts: str = ""
    """``openai`` backend: hosts (comma-separated, ``host`` or ``host:port``) whose image URLs it may fetch when
    the API answers a ``url`` instead of ``b64_json``; over HTTPS only, unless an entry names its scheme
    (``http://host:port``). The API's own origin is always allowed. The API key is sent to that origin only."""
    max_image_bytes: int = Field(default=20_000_000, ge=1024)
    """Largest answer the ``http`` and ``openai`` backends read (a PNG, a JSON body, a fetched image URL);
    a larger one fails the job instead of filling the worker's memory."""
    service_time_s: float = Field(default=0.0, ge=0.0, le=3600.0)
    """``null`` backend only: seconds it spends on each image (it sleeps), to stand in for a model's generation
    time in load tests, benchmarks and fault tests without using the CPU."""
    service_time_tail_s: float = Field(default=0.0, ge=0.0, le=3600.0)
    """``null`` backend only: the mean of an exponential tail added to ``service_time_s`` (drawn from the job's
    prompt and seed, so a job always takes as long), for a service time distribution with a tail."""
    max_batch: int = Field(default=4, ge=1, le=256)
    """Most jobs one worker process takes at once when several are waiting (never waiting for more): a
    diffusers pipeline generates those of one size and step count in one call, a remote API gets them all in
    flight at once, and their database work is one transaction each way. 1: one job at a time. A worker
    holds up to twice this many messages per process, which other workers of the tier cannot take meanwhile."""
    fallback: str = ""
    """Where a job goes when this tier fails it for good (its retries spent, or the tier's circuit breaker open):
    tier names, comma-separated, tried in order. Empty: the next cheaper tier, then the dearer ones, cheapest
    first; ``none``: no fallback (the job fails)."""

    @model_validator(mode="after")
    def _http_needs_url(self) -> TierSettings:
        if self.backend in ("http", "openai") and not self.url:
            raise ValueError(f"backend {self.backend!r} needs a url (ROUTET2I_<TIER>__URL)")
        return self

    @field_validator("image_hosts")
    @classmethod
    def _image_origins(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",")):
            if entry and url_origin(entry if "://" in entry else f"https://{entry}", strict=True) is None:
                raise ValueError(f"{entry!r} is not a host, host:port or http(s)://host:port")
        return value

    def image_origins(self) -> frozenset[tuple[str, str, int]]:
        """``image_hosts`` as (scheme, host, port) origins."""
        entries = (e.strip() for e in self.image_hosts.split(","))
        origins = (url_origin(e if "://" in e else f"https://{e}", strict=True) for e in entries if e)
        return frozenset(o for o in origins if o is not None)


def url_origin(url: str, *, strict: bool = False) -> tuple[str, str, int] | None:
    """The (scheme, lower-case host, port) of an http(s) URL; None if it is not one (``strict``: nor a bare
    origin, with no path, query or credentials)."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if port is None or not parts.hostname or parts.scheme not in ("http", "https"):
        return None
    if strict and (parts.path not in ("", "/") or parts.query or parts.fragment or parts.username):
        return None
    return parts.scheme, parts.hostname.lower(), port


class EdgeSettings(TierSettings):
    """Edge tier defaults. Price from Table 1 of the paper: SD 1.6 at 9K$ per million images."""

    model: str = "offline:edge"
    price_per_image: float = Field(default=0.009, ge=0.0)


class CloudSettings(TierSettings):
    """Cloud tier defaults. Price from Table 1 of the paper: SD 3 at 65K$ per million images."""

    model: str = "offline:cloud"
    price_per_image: float = Field(default=0.065, ge=0.0)
