"""One typed settings object, read from ``ROUTET2I_*`` environment variables once per process.

Every entry point (the CLI, ``api.create_app``, ``worker.create_celery``) builds a :class:`Settings` with
:meth:`Settings.from_env` and passes it down explicitly; nothing in the project reads the environment at
import time. Nested per-tier settings use a double underscore: ``ROUTET2I_CLOUD__MODEL=...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TierName = Literal["edge", "cloud"]
TIERS: tuple[TierName, ...] = ("edge", "cloud")
"""The tiers, cheapest first; each has its own queue, named after it."""

ROUTE_QUEUE = "route"
QUEUES: tuple[str, ...] = (ROUTE_QUEUE, *TIERS)
"""Every Celery queue: the router's, then one per tier."""

DEFAULT_DATABASE_URL = "sqlite:///./var/routet2i.db"
"""Embedded default: one SQLite file, so the demo needs no database server."""

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
"""Celery broker and shared router state (budget window, rate limits)."""


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
    """Retries of a failed generation (transient errors only) before the job fails."""
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
    max_batch: int = Field(default=4, ge=1, le=256)
    """Most jobs one worker process takes at once when several are waiting (never waiting for more): a
    diffusers pipeline generates those of one size and step count in one call, a remote API gets them all in
    flight at once, and their database work is one transaction each way. 1: one job at a time. A worker
    holds up to twice this many messages per process, which other workers of the tier cannot take meanwhile."""

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


class ScorerSettings(BaseModel):
    """The CLIP model that scores every generated image (``ROUTET2I_SCORER__*``).

    With no ``pretrained`` weights the model is built from its open_clip configuration with fixed-seed random
    weights: every code path runs and every process gets the same numbers, but the scores say nothing about
    quality. Set ``pretrained`` for real scores.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Score each generated image in the tier worker. Off: images are stored with no quality vector."""
    model: str = "ViT-B-32"
    """An open_clip architecture name (``open_clip.list_models()``), or ``local-dir:/path`` / ``hf-hub:org/repo``."""
    pretrained: str | None = None
    """An open_clip pretrained tag (e.g. ``openai``, needs the hub or its cache) or a local checkpoint file.
    None: random weights from the architecture's configuration."""
    metrics: str = "routet2i"
    """A built-in metric set name, or a ``.json``/``.toml`` file defining one."""
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(default=16, ge=1, le=1024)
    """Images per forward pass when several are scored together (CLI, benchmarks)."""


class Settings(BaseSettings):
    """Everything a RouteT2I process needs to know, with embedded defaults that run offline."""

    model_config = SettingsConfigDict(env_prefix="ROUTET2I_", env_nested_delimiter="__", extra="ignore", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    redis_url: str | None = None
    """Redis for shared router state; defaults to the broker URL."""
    image_dir: Path = Path("./var/images")
    cache_dir: Path = Path("./var/cache")
    """Files built once per machine: tokenizer files of offline models, the router encoder's exported ONNX
    graphs (``encoders/``) and the learned routers' prompt embeddings (``embeddings/``)."""
    reports_dir: Path = Path("./var/eval")
    """Evaluation plots (PNG files) the dashboard shows: where ``routet2i eval --suite`` writes them by default,
    or any ``routet2i eval --plot DIR/NAME.png``."""

    # One class per tier so that setting one field (ROUTET2I_CLOUD__STEPS) keeps the tier's other defaults.
    edge: EdgeSettings = Field(default_factory=EdgeSettings)
    cloud: CloudSettings = Field(default_factory=CloudSettings)
    scorer: ScorerSettings = Field(default_factory=ScorerSettings)

    cloud_budget: float = Field(default=0.3, ge=0.0, le=1.0)
    """ρ: the largest share of requests that may go to the cloud tier."""
    budget_window: int = Field(default=500, ge=10, le=100_000)
    """Number of recent decisions over which the cloud share is held to ``cloud_budget``."""
    budget_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)
    """How far below ``cloud_budget`` a full window's cloud share may fall: below it, requests go to the cloud
    whatever their score, unless the router predicts the edge at least as good or the spend limit is reached
    (1: no minimum share)."""
    budget_name: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Namespace of the shared budget window in Redis (deployments sharing a Redis keep separate budgets)."""
    cloud_spend_limit_usd: float | None = Field(default=None, ge=0.0)
    """Most US dollars the cloud images of one spend period may cost, across every router and tenant (None: no
    limit). Each cloud decision reserves the cloud tier's price per image; a price per GPU-second is added as
    it is billed. A job the period cannot pay for goes to the edge, whatever ``cloud_budget`` allows."""
    cloud_spend_period_s: int = Field(default=86_400, ge=60, le=31 * 86_400)
    """Length of a spend period in seconds, counted in UTC from the epoch (86,400: calendar days, UTC)."""
    shadow_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Largest share of routed jobs also generated (and scored) on the other tier, to collect training labels
    from live traffic (``routet2i learn``, ``routet2i data export``). Their cloud images are paid from the cloud
    budget. ``routet2i learn`` lowers the share actually used as the router settles (``shadow_min_rate``)."""
    shadow_min_rate: float = Field(default=0.02, ge=0.0, le=1.0)
    """The share ``routet2i learn`` lowers the shadow rate to once the router has ``shadow_settle_labels``
    labels and predicts well (never above ``shadow_rate``)."""
    shadow_settle_labels: int = Field(default=1000, ge=1)
    """Labels after which a router counts as settled, as far as its newness calls for labels."""
    router_refresh_s: float = Field(default=5.0, gt=0)
    """How often a route worker asks the model registry for a newly promoted champion (it switches to it
    between two batches, without a restart)."""
    learn_retrain_every: int = Field(default=50, ge=1)
    """New labels ``routet2i learn`` waits for before it trains a challenger again."""
    learn_promote_on: Literal["pgr", "apgr"] = "pgr"
    """What a challenger must be ahead on to be promoted: the share of the cloud's gain it recovers at
    ``cloud_budget`` (``pgr``), or over every budget (``apgr``)."""
    learn_min_gain: float = Field(default=0.0, ge=-100.0, le=1.0)
    """How far ahead on it, beyond ``learn_promote_z`` standard errors (a large negative value promotes every
    challenger not worse beyond noise)."""
    learn_promote_z: float = Field(default=2.0, ge=0.0)
    """Standard errors of the paired difference on the held-out labels a challenger (or, on the first labels,
    another prior than the deployed router) must be ahead by to replace the champion (0: any point estimate
    ahead by ``learn_min_gain``)."""
    learn_noise_z: float = Field(default=2.0, gt=0)
    """Standard errors of the paired difference beyond which a challenger counts as worse (never promoted)."""
    learn_warm_start: bool = True
    """Warm-start each challenger from the prior the loop started from (a blend whose prior weight is chosen on
    the labels); off: challengers learn from the labels alone."""
    escalation_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Largest share of routed edge images generated again on the cloud because they scored worst on
    ``escalation_metric``, held over every ``budget_window`` consecutive edge images by a budget controller of
    its own (0: no escalation). The user receives the cloud image. Escalations are paid beyond
    ``cloud_budget`` (at most ρ + rate·(1 − ρ) of routed jobs get a cloud image) and within the spend limit."""
    escalation_metric: str = Field(default="alignment", pattern=r"^[A-Za-z0-9_]{1,64}$")
    """The quality metric (of the scorer's metric set) an edge image is escalated on: lower is worse."""
    escalation_below: float | None = None
    """Only edge images scoring below this on ``escalation_metric`` are escalated (None: the rate alone)."""
    router: str = "routet2i"
    """Name of the routing policy used by the router worker (``routet2i``, a baseline, or a plug-in)."""
    route_batch: int = Field(default=32, ge=1, le=1024)
    """Most jobs a router worker process routes at once when several are waiting (it never waits for more):
    one transaction, one encoder pass and one budget transaction for all of them."""
    router_model: Path | None = None
    """Trained router artifact directory (``routet2i train``). None: the router's shipped artifact, if any
    (RouteT2I ships one trained on the carried AGIQA-3K ratings)."""

    encoder_model: Path | None = None
    """A transformers encoder directory the router and the learned baselines use instead of the packaged MiniLM
    (a BERT-style model with a fast tokenizer; token states are mean-pooled into the sentence embedding). A
    router artifact only loads on the encoder it was trained on, so it needs its own (``routet2i train``);
    there is no shipped one. None: the packaged MiniLM."""

    encoder_backend: Literal["onnx", "torch", "onnx-int8"] = "onnx"
    """Where the router's MiniLM encoder runs (router.embeddings.BACKENDS): ``onnx`` (ONNX Runtime, same
    numbers as ``torch`` to 1e-6 and faster), ``torch`` (the reference), or ``onnx-int8`` (int8 weights; its
    embeddings differ, so it needs a router artifact trained on it)."""

    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    """CPU threads each model process may use (None: torch's default, all cores). Set it when several
    model workers share a machine's CPU, or they slow each other down by oversubscription. A worker that
    consumes only the route queue uses 1 unless this is set."""

    worker_synchronous_commit: bool = True
    """PostgreSQL: False lets the route and tier workers' commits return before the WAL flush, several
    milliseconds less per step. A database crash can then lose their last fraction of a second of state
    changes, which the reconciler redoes (the API's acceptance of a job always waits for the flush)."""
    lease_s: float = Field(default=120.0, gt=0)
    """How long a generation's lease lasts unless renewed. The worker generating a job renews it every quarter of
    this while it works, so a generation of any length keeps its lease while its worker lives; the job of a
    worker that died is published again within this plus ``reconcile_interval_s``."""
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    """How often each worker records in Redis that it lives and which messages it holds."""
    worker_dead_after_s: float = Field(default=60.0, gt=0)
    """A worker whose last heartbeat is older than this is presumed dead: the messages it had taken (waiting in its
    prefetch or running) are published again by the next reconciler pass."""
    reconcile_in_workers: bool = True
    """Workers run the reconciler themselves, one pass per ``reconcile_interval_s`` across the deployment
    (whichever worker takes the turn), so no separate process is needed; ``routet2i reconcile`` also runs it."""
    reconcile_after_s: float = Field(default=120.0, gt=0)
    """A queued job untouched this long, and absent from its queue, is re-published by the reconciler."""
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    """Pause between reconciler passes (``routet2i reconcile``)."""
    max_attempts: int = Field(default=5, ge=1)
    """Generation attempts (deliveries that started generating) before a job is dead-lettered."""
    max_redeliveries: int = Field(default=5, ge=0)
    """Reconciler re-publications of one job before it is dead-lettered."""

    webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """How long a webhook receiver has to answer one delivery attempt."""
    webhook_max_attempts: int = Field(default=12, ge=1, le=100)
    """Attempts of one webhook delivery before it is given up (``failed``)."""
    webhook_retry_s: float = Field(default=2.0, gt=0)
    """Wait before the second attempt; it doubles with each attempt (12 attempts span about an hour)."""
    webhook_retry_max_s: float = Field(default=3600.0, gt=0)
    """The longest wait between two attempts."""
    webhook_poll_s: float = Field(default=1.0, gt=0, le=60)
    """How often ``routet2i webhooks`` looks for deliveries due when it has none in flight."""

    max_prompt_chars: int = Field(default=2000, ge=1)
    max_steps: int = Field(default=150, ge=1)
    min_size: int = Field(default=64, ge=8)
    max_size: int = Field(default=2048, ge=64)

    auth: Literal["required", "disabled"] = "required"
    """``disabled`` lets every request in as the admin of a tenant named ``local``: for local demos only."""
    auth_cache_s: float = Field(default=30.0, ge=0.0)
    """How long the API trusts a looked-up key before checking it again (revocation delay); 0 disables."""
    rate_limit_per_minute: int = Field(default=600, ge=0)
    """Job submissions per tenant per minute when the tenant has no limit of its own; 0: unlimited."""

    images_wait_s: float = Field(default=120.0, gt=0)
    """How long ``POST /v1/images/generations`` waits for its images before answering 504 (the jobs go on)."""
    images_waiters: int = Field(default=16, ge=1, le=1024)
    """Most ``POST /v1/images/generations`` requests one API process holds while they wait for their images;
    more are answered 503 with Retry-After. ``routet2i api`` gives each process this many threads on top of
    ``--threads``, so waits never take the threads of other requests and the health probes."""
    url_signing_key: SecretStr | None = None
    """Key of the signed image URLs the OpenAI-compatible endpoint returns. None: derived from ``secret_key``,
    else a random key kept in ``cache_dir/url-signing-key`` (mode 0600; API processes must share the folder)."""
    secret_key: SecretStr | None = None
    """The deployment's secret, from which keys such as the image URLs' signing key are derived (HMAC)."""
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request body the API reads (413 beyond). 4 MiB holds a batch of 100 jobs with 2,000-character
    prompts even when every character is written as a 12-byte JSON escape (``\\ud83d\\ude00``)."""
    metrics_token: SecretStr | None = None
    """``GET /metrics`` answers ``Authorization: Bearer <this token>`` (Prometheus' scrape credentials) or an
    admin's API key. None: admin API keys only (open when ``auth`` is ``disabled``)."""
    image_url_ttl_s: int = Field(default=3600, ge=60)
    """How long a signed image URL stays valid."""

    api_url: str = "http://127.0.0.1:8000"
    """Where CLI commands such as ``submit`` and ``status`` reach the API."""
    api_key: SecretStr | None = None
    """The key CLI commands send to the API (``Authorization: Bearer``)."""
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("escalation_rate")
    @classmethod
    def _escalation_needs_scores(cls, value: float, info: ValidationInfo) -> float:
        scorer = info.data.get("scorer")
        if value > 0 and scorer is not None and not scorer.enabled:
            raise ValueError(
                "escalation judges the edge image's score, so it needs the scorer (ROUTET2I_SCORER__ENABLED=true)"
            )
        return value

    @field_validator("worker_dead_after_s")
    @classmethod
    def _dead_after_heartbeats(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("heartbeat_interval_s")
        if interval is not None and value < 2 * interval:
            raise ValueError(f"must be at least twice heartbeat_interval_s ({interval}), got {value}")
        return value

    @field_validator("encoder_model")
    @classmethod
    def _model_directory(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a transformers model directory (it has no config.json)")
        return value

    @field_validator("database_url")
    @classmethod
    def _explicit_driver(cls, value: str) -> str:
        # SQLAlchemy would pick psycopg2 for a bare postgresql:// URL; the project ships psycopg 3.
        if value.startswith("postgresql://"):
            return "postgresql+psycopg://" + value.removeprefix("postgresql://")
        if value.startswith("postgres://"):
            return "postgresql+psycopg://" + value.removeprefix("postgres://")
        return value

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Read the environment once; keyword overrides win over the environment."""
        return cls(**overrides)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """These settings as ``ROUTET2I_*`` variables, to start another process with the same configuration."""
        env: dict[str, str] = {}

        def put(prefix: str, data: dict[str, object]) -> None:
            for key, value in data.items():
                name = f"{prefix}{key.upper()}"
                if isinstance(value, dict):
                    put(name + "__", value)
                elif isinstance(value, SecretStr):
                    env[name] = value.get_secret_value()
                elif isinstance(value, bool):
                    env[name] = str(value).lower()
                elif value is not None:
                    env[name] = str(value)

        data = self.model_dump()
        put("ROUTET2I_", data)
        return env

    @property
    def model_slot(self) -> str:
        """This deployment's router in the model registry: its budget name and its router, e.g.
        ``default/routet2i``. Its champion routes every job."""
        return f"{self.budget_name}/{self.router}"

    @property
    def state_redis_url(self) -> str:
        return self.redis_url or self.broker_url

    def tier(self, name: str) -> TierSettings:
        if name == "edge":
            return self.edge
        if name == "cloud":
            return self.cloud
        raise ValueError(f"unknown tier {name!r}; expected one of {', '.join(TIERS)}")
