"""One typed settings object, read from ``ROUTET2I_*`` environment variables once per process.

Every entry point (the CLI, ``api.create_app``, ``worker.create_celery``) builds a :class:`Settings` with
:meth:`Settings.from_env` and passes it down explicitly; nothing in the project reads the environment at
import time. Nested per-tier settings use a double underscore: ``ROUTET2I_CLOUD__MODEL=...``.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.tier_settings import TIER_NAME, CloudSettings, EdgeSettings, TierName, TierSettings

TIERS: tuple[TierName, ...] = ("edge", "cloud")
"""The default tiers, cheapest first (``ROUTET2I_TIERS``); each has its own queue, named after it."""

ROUTE_QUEUE = "route"
QUEUES: tuple[str, ...] = (ROUTE_QUEUE, *TIERS)
"""The default deployment's Celery queues: the router's, then one per tier (:attr:`Settings.queues`)."""

DEFAULT_DATABASE_URL = "sqlite:///./var/routet2i.db"
"""Embedded default: one SQLite file, so the demo needs no database server."""

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
"""Celery broker and shared router state (budget window, rate limits)."""


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

    tiers: str = ",".join(TIERS)
    """The tiers, comma-separated, cheapest first (their prices per image must not decrease along the list).
    ``edge`` and ``cloud`` have defaults of their own; any other tier is configured by ``ROUTET2I_<NAME>__*``
    variables (``ROUTET2I_MID__MODEL``, ``ROUTET2I_MID__PRICE_PER_IMAGE``, ...)."""
    extra_tiers: dict[str, TierSettings] = Field(default_factory=dict)
    """Settings of the tiers other than ``edge`` and ``cloud``, by name (read from ``ROUTET2I_<NAME>__*``)."""

    cloud_budget: float = Field(default=0.3, ge=0.0, le=1.0)
    """ρ: the largest share of requests that may go to the dearest tier (two tiers), or, with more tiers and no
    ``budget_usd_per_image``, the money budget of sending that share to the dearest tier and the rest to the
    cheapest."""
    budget_usd_per_image: float | None = Field(default=None, ge=0.0)
    """The mean price per image the router aims at over its window (None: the cheapest tier's price plus ρ times
    the price difference between the dearest and the cheapest, the same budget as ρ). With two tiers it is the
    share ``(B − p_cheapest) / (p_dearest − p_cheapest)`` sent to the dearer tier."""
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    """Consecutive failed generations (retries spent) after which a tier's circuit breaker opens: routing stops
    sending it jobs and its failed jobs go to their fallback tiers."""
    breaker_cooldown_s: float = Field(default=30.0, gt=0, le=86_400)
    """How long an open breaker stays open before it lets a probe job through; a probe that succeeds closes it."""
    latency_slo_s: float | None = Field(default=None, gt=0, le=86_400)
    """The latency promised from submission to done (None: routing is blind to load). When the tier the router
    chose would miss it for a job (its predicted wait from backlog, live workers and service time) and a dearer
    tier would not, the job spills there, paid from ``burst_budget_usd_per_period``; otherwise it may be
    degraded to ``slo_degrade_steps`` of its steps, or queued (docs/tiers.md). A job's own deadline also counts."""
    burst_budget_usd_per_period: float = Field(default=0.0, ge=0.0)
    """US dollars per spend period (``cloud_spend_period_s``) that jobs spilled to a dearer tier to keep the
    latency SLO may cost, beside the routing budget and inside the spend limit (0: no spilling)."""
    slo_degrade_steps: float = Field(default=0.5, ge=0.0, le=1.0)
    """Share of its denoising steps a job on the cheapest tier runs with when that alone lets it meet the SLO
    (0: never degrade)."""
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
    from live traffic (``routet2i learn``, ``routet2i data export``). Their cloud images are paid as
    ``shadow_paid_from`` says. ``routet2i learn`` lowers the share actually used as the router settles
    (``shadow_min_rate``)."""
    shadow_paid_from: Literal["window", "allowance"] = "allowance"
    """Where a shadow sample's cloud image is paid from: ``allowance``: beside ``cloud_budget``, as escalations
    are: an edge-routed job is shadow-sampled at the shadow rate whatever the budget window holds, its cloud
    image takes no place in the window, and it is paid within the spend limit (at most ρ + rate·(1 − ρ) of
    routed jobs get a cloud image); ``window``: from ``cloud_budget``, so an edge-routed job is shadow-sampled
    only when the window has room for one more cloud image, and the image takes that room from routed jobs."""
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

    @model_validator(mode="before")
    @classmethod
    def _extra_tiers_from_env(cls, data: Any) -> Any:
        """Read ``ROUTET2I_<NAME>__<FIELD>`` for every listed tier other than ``edge`` and ``cloud`` (their
        settings' names depend on ``tiers``, so no fixed field can hold them)."""
        if not isinstance(data, dict) or not isinstance(data.get("tiers", ""), str):
            return data
        names = [n.strip() for n in str(data.get("tiers") or ",".join(TIERS)).split(",")]
        given = dict(data.get("extra_tiers") or {})
        for name in names:
            if name in TIERS or name in given or not TIER_NAME.match(name):
                continue
            prefix = f"ROUTET2I_{name.upper()}__"
            found = {k[len(prefix) :].lower(): v for k, v in os.environ.items() if k.upper().startswith(prefix)}
            given[name] = found
        return {**data, "extra_tiers": given}

    @model_validator(mode="after")
    def _tiers_consistent(self) -> Settings:
        names = self.tier_names
        for name in names:
            if not TIER_NAME.match(name) or name == ROUTE_QUEUE:
                raise ValueError(
                    f"tiers: {name!r} is not a tier name (lower-case letters, digits and _, at most 32, not "
                    f"{ROUTE_QUEUE!r})"
                )
        if len(set(names)) != len(names) or len(names) < 2:
            raise ValueError(f"tiers: at least two distinct tiers are needed, got {self.tiers!r}")
        unused = sorted(set(self.extra_tiers) - set(names))
        if unused:
            raise ValueError(f"extra_tiers: {', '.join(unused)} not listed in tiers ({self.tiers})")
        prices = [self.tier(name).price_per_image for name in names]
        if any(later < earlier for earlier, later in itertools.pairwise(prices)):
            raise ValueError(
                f"tiers: list them cheapest first; their prices per image are {dict(zip(names, prices, strict=True))}"
            )
        for name in names:
            for target in self.fallback_chain(name):
                if target not in names:
                    raise ValueError(f"{name}.fallback: unknown tier {target!r}; expected one of {self.tiers}")
        if len(names) > 2 and self.router_model is None:
            raise ValueError(
                "router_model: a deployment with more than two tiers routes with a K-tier router artifact "
                "(routet2i train on a log with every tier's ratings); none is shipped"
            )
        if len(names) > 2:
            for field, value in (("shadow_rate", self.shadow_rate), ("escalation_rate", self.escalation_rate)):
                if value > 0:
                    raise ValueError(f"{field}: shadow labels and escalation need exactly two tiers, got {self.tiers}")
        return self

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
        for name, tier in data.pop("extra_tiers").items():
            put(f"ROUTET2I_{name.upper()}__", tier)
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

    @property
    def tier_names(self) -> tuple[str, ...]:
        """The configured tiers, cheapest first."""
        return tuple(name.strip() for name in self.tiers.split(","))

    @property
    def queues(self) -> tuple[str, ...]:
        """Every Celery queue of this deployment: the router's, then one per tier."""
        return (ROUTE_QUEUE, *self.tier_names)

    @property
    def cheapest(self) -> str:
        """The cheapest tier: where a job goes when the budget has no room for another."""
        return self.tier_names[0]

    @property
    def dearest(self) -> str:
        """The dearest tier."""
        return self.tier_names[-1]

    @property
    def prices(self) -> dict[str, float]:
        """Each tier's price per image, cheapest first."""
        return {name: self.tier(name).price_per_image for name in self.tier_names}

    @property
    def budget_usd(self) -> float:
        """The mean price per image the router aims at (``budget_usd_per_image``, or ρ's equivalent)."""
        if self.budget_usd_per_image is not None:
            return self.budget_usd_per_image
        low, high = self.tier(self.cheapest).price_per_image, self.tier(self.dearest).price_per_image
        return low + self.cloud_budget * (high - low)

    @property
    def dearest_share(self) -> float:
        """With two tiers: the share of jobs the money budget sends to the dearer one (ρ when no money budget is
        set); with more tiers the same reading of the budget between the cheapest and the dearest."""
        if self.budget_usd_per_image is None:
            return self.cloud_budget
        low, high = self.tier(self.cheapest).price_per_image, self.tier(self.dearest).price_per_image
        if high <= low:
            return 1.0
        return min(max((self.budget_usd_per_image - low) / (high - low), 0.0), 1.0)

    def fallback_chain(self, name: str) -> tuple[str, ...]:
        """The tiers a job of tier ``name`` is tried on, in order, when ``name`` fails it for good."""
        configured = self.tier(name).fallback.strip()
        if configured == "none":
            return ()
        if configured:
            return tuple(t.strip() for t in configured.split(",") if t.strip() and t.strip() != name)
        names = self.tier_names
        at = names.index(name)
        return (*names[at - 1 : at], *names[at + 1 :])

    def tier(self, name: str) -> TierSettings:
        if name not in self.tier_names:
            raise ValueError(f"unknown tier {name!r}; expected one of {self.tiers}")
        if name in self.extra_tiers:
            return self.extra_tiers[name]
        if name == "edge":
            return self.edge
        return self.cloud if name == "cloud" else self.edge
