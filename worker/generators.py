"""Generation backends: turn a prompt into PNG bytes and say what it took.

``diffusers``  a local text-to-image pipeline (hub id, local path, or ``offline:<profile>``);
``http``       a remote image API: ``POST {url}`` with the job as JSON, answered with a PNG or ``{"b64_json"}``;
``openai``     any OpenAI-compatible images endpoint (``POST {url}/images/generations``);
``null``       a zero-cost generator (a flat image derived from the prompt) for load tests and benchmarks.

torch and diffusers are imported only by the diffusers backend, when it loads.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core.tier_settings import TierSettings, url_origin


class GenerationError(Exception):
    """A generation failed. ``retryable`` says whether trying again may succeed (timeouts, 5xx, 429);
    ``retry_after`` is the wait a remote API asked for, in seconds."""

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Answer:
    """A remote API's answer, read whole (within the size cap)."""

    status_code: int
    headers: Any
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def exchange(client: Any, method: str, url: str, *, settings: TierSettings, source: str, **kwargs: Any) -> Answer:
    """One request whose answer is read up to ``settings.max_image_bytes`` within ``settings.timeout_s`` in all
    (httpx's own timeouts bound each read, not their sum). Redirects are never followed.

    Raises:
        GenerationError: when the answer is larger (not retryable) or slower (retryable).
    """
    limit, deadline = settings.max_image_bytes, time.monotonic() + settings.timeout_s
    with client.stream(method, url, follow_redirects=False, **kwargs) as response:
        try:
            declared = int(response.headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        chunks, size = [], 0
        if declared <= limit:
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    break
                if time.monotonic() > deadline:
                    raise GenerationError(
                        f"{source} took longer than {settings.timeout_s:g}s to answer", retryable=True
                    )
                chunks.append(chunk)
        if declared > limit or size > limit:
            raise GenerationError(f"{source} answered more than {limit} bytes (max_image_bytes)")
        return Answer(response.status_code, response.headers, b"".join(chunks))


def bearer(settings: TierSettings) -> dict[str, str]:
    """The tier's API key as a header, for requests to its own API only."""
    return {} if settings.api_key is None else {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"}


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int
    steps: int
    width: int
    height: int


@dataclass(frozen=True)
class GenerationResult:
    png: bytes
    backend: str
    model_id: str
    device: str
    wall_s: float
    """Seconds from request to PNG bytes, including encoding."""
    gpu_s: float
    """Seconds of generator device time (for remote APIs: the request's duration, as billed time)."""


class Generator(Protocol):
    backend: str
    model_id: str
    device: str

    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        """Generate several requests; each failure is that request's outcome, in order."""
        ...


def generate_each(generator: Generator, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
    """:meth:`Generator.generate_batch` for backends that gain nothing from batches: one request at a time."""
    outcomes: list[GenerationResult | Exception] = []
    for request in requests:
        outcomes.append(_outcome(generator, request))
    return outcomes


def generate_concurrently(
    generator: Generator, requests: Sequence[GenerationRequest]
) -> list[GenerationResult | Exception]:
    """:meth:`Generator.generate_batch` for remote APIs: every request of the batch in flight at once."""
    if len(requests) <= 1:
        return generate_each(generator, requests)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="generate") as pool:
        return list(pool.map(lambda request: _outcome(generator, request), requests))


def _outcome(generator: Generator, request: GenerationRequest) -> GenerationResult | Exception:
    try:
        return generator.generate(request)
    except Exception as exc:  # the job's outcome; the task decides between retrying and failing it
        return exc


def encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_png(data: bytes, *, source: str) -> bytes:
    """Refuse anything that is not a decodable PNG image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            if image.format != "PNG":
                raise GenerationError(f"{source} returned {image.format}, expected PNG")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise GenerationError(f"{source} returned bytes that are not an image: {exc}") from exc
    return data


class DiffusersGenerator:
    """A diffusers text-to-image pipeline, loaded once per worker process."""

    backend = "diffusers"

    def __init__(self, settings: TierSettings, *, cache_dir: Path) -> None:
        import torch

        self.settings = settings
        self.model_id = settings.model
        self.device = settings.device
        self._torch = torch
        self.pipe: Any
        dtype = getattr(torch, settings.dtype)
        from worker import offline

        if offline.is_offline(settings.model):
            self.pipe = offline.build_pipeline(settings.model, cache_dir=cache_dir, dtype=dtype, device=self.device)
        else:
            from diffusers import AutoPipelineForText2Image

            try:
                self.pipe = AutoPipelineForText2Image.from_pretrained(settings.model, torch_dtype=dtype)
            except (OSError, ValueError) as exc:
                raise GenerationError(f"cannot load diffusers model {settings.model!r}: {exc}") from exc
            self.pipe = self.pipe.to(self.device)
            self.pipe.set_progress_bar_config(disable=True)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        (result,) = self._run([request])
        return result

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        """Requests of one size and step count go through the pipeline together (one denoising loop over a
        batch of latents, each with its own seed's generator, so each image is the one it would be alone);
        a call that fails is retried one request at a time, so only the request that fails alone fails."""
        outcomes: list[GenerationResult | Exception | None] = [None] * len(requests)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.steps, request.width, request.height), []).append(i)
        for indices in groups.values():
            chunk = [requests[i] for i in indices]
            try:
                results: list[GenerationResult | Exception] = list(self._run(chunk))
            except Exception as exc:  # that request's outcome, or find which of the batch fails alone
                results = [exc] if len(chunk) == 1 else generate_each(self, chunk)
            for i, result in zip(indices, results, strict=True):
                outcomes[i] = result
        return [outcome for outcome in outcomes if outcome is not None]

    def _run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One pipeline call for requests of the same size and step count; device time is shared equally."""
        torch = self._torch
        first = requests[0]
        started = time.perf_counter()
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        compute_start = time.perf_counter()
        with torch.inference_mode():
            output = self.pipe(
                [r.prompt for r in requests] if len(requests) > 1 else first.prompt,
                num_inference_steps=first.steps,
                width=first.width,
                height=first.height,
                guidance_scale=self.settings.guidance_scale,
                generator=generators if len(requests) > 1 else generators[0],
                output_type="pil",
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        gpu_s = (time.perf_counter() - compute_start) / len(requests)
        pngs = [encode_png(image) for image in output.images]
        wall_s = (time.perf_counter() - started) / len(requests)
        return [
            GenerationResult(
                png=png, backend=self.backend, model_id=self.model_id, device=self.device, wall_s=wall_s, gpu_s=gpu_s
            )
            for png in pngs
        ]


class HttpGenerator:
    """A remote image API. Sends ``{"prompt", "seed", "steps", "width", "height"}`` and expects a PNG."""

    backend = "http"

    def __init__(self, settings: TierSettings) -> None:
        import httpx

        assert settings.url is not None  # enforced by TierSettings
        self.settings = settings
        self.url = settings.url
        self.model_id = settings.model
        self.device = "remote"
        self._client = httpx.Client(timeout=settings.timeout_s, headers={"Accept": "image/png, application/json"})
        self._httpx = httpx

    def generate(self, request: GenerationRequest) -> GenerationResult:
        httpx = self._httpx
        body = {
            "prompt": request.prompt,
            "seed": request.seed,
            "steps": request.steps,
            "width": request.width,
            "height": request.height,
            "model": self.model_id,
        }
        started = time.perf_counter()
        try:
            response = exchange(
                self._client,
                "POST",
                self.url,
                settings=self.settings,
                source="image API",
                json=body,
                headers=bearer(self.settings),
            )
        except httpx.TimeoutException as exc:
            raise GenerationError(f"image API timed out: {exc}", retryable=True) from exc
        except httpx.TransportError as exc:
            raise GenerationError(f"image API unreachable: {exc}", retryable=True) from exc
        elapsed = time.perf_counter() - started
        if response.status_code == 429 or response.status_code >= 500:
            raise GenerationError(
                f"image API answered {response.status_code}: {response.text[:200]}",
                retryable=True,
                retry_after=_retry_after(response.headers),
            )
        if response.status_code >= 400:
            raise GenerationError(f"image API refused the request ({response.status_code}): {response.text[:200]}")
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("image/"):
            png = response.body
        else:
            try:
                png = base64.b64decode(json.loads(response.body)["b64_json"], validate=True)
            except (ValueError, KeyError, TypeError) as exc:
                raise GenerationError(f"image API answered neither a PNG nor {{'b64_json'}}: {exc}") from exc
        check_png(png, source="image API")
        return GenerationResult(
            png=png,
            backend=self.backend,
            model_id=self.model_id,
            device=self.device,
            wall_s=time.perf_counter() - started,
            gpu_s=elapsed,
        )

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        return generate_concurrently(self, requests)


class OpenAIGenerator:
    """Any OpenAI-compatible images endpoint (``POST {url}/images/generations``) as a tier.

    Asks for ``b64_json``. A ``url`` answer is fetched only from the API's own origin or an ``image_hosts`` one,
    never with the API key unless it is the API's own origin, within ``max_image_bytes`` and ``timeout_s``.
    429, 5xx and timeouts are retryable (honouring ``Retry-After``), other errors fail the job with the
    service's own message.
    """

    backend = "openai"

    def __init__(self, settings: TierSettings) -> None:
        import httpx

        assert settings.url is not None  # enforced by TierSettings
        self.settings = settings
        self.endpoint = settings.url.rstrip("/") + "/images/generations"
        self.origin = url_origin(self.endpoint)
        self.image_origins = settings.image_origins() | ({self.origin} if self.origin is not None else set())
        self.model_id = settings.model
        self.device = "remote"
        self._client = httpx.Client(timeout=settings.timeout_s)
        self._httpx = httpx

    @staticmethod
    def _error(answer: Answer) -> str:
        try:
            error = json.loads(answer.body)["error"]
            return f"{error.get('type') or 'error'}: {error.get('message')}" + (
                f" (param: {error['param']})" if error.get("param") else ""
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return answer.text[:200]

    def _fetch(self, url: Any) -> bytes:
        """The image behind a URL the API answered, if its origin is allowed (the key goes to the API's only)."""
        origin = url_origin(url) if isinstance(url, str) else None
        if origin is None or origin not in self.image_origins:
            where = f"{origin[0]}://{origin[1]}:{origin[2]}" if origin is not None else "an unusable URL"
            raise GenerationError(
                f"images API answered an image URL on {where}, which is neither its own origin nor one of "
                "image_hosts (ROUTET2I_<TIER>__IMAGE_HOSTS, HTTPS unless an entry names http)"
            )
        headers = bearer(self.settings) if origin == self.origin else {}
        fetched = exchange(self._client, "GET", url, settings=self.settings, source="image URL", headers=headers)
        if fetched.status_code != 200:
            raise GenerationError(f"image URL answered {fetched.status_code}", retryable=fetched.status_code >= 500)
        return fetched.body

    def _png(self, answer: Answer) -> bytes:
        """The image of a successful answer: decoded from ``b64_json``, or fetched from its ``url``."""
        try:
            item = json.loads(answer.body)["data"][0]
            if item.get("b64_json"):
                return base64.b64decode(item["b64_json"], validate=True)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise GenerationError(f"images API answered without usable data: {answer.text[:200]}") from exc
        if item.get("url"):
            return self._fetch(item["url"])
        raise GenerationError("images API answered neither b64_json nor url")

    def generate(self, request: GenerationRequest) -> GenerationResult:
        httpx = self._httpx
        body = {
            "model": self.model_id,
            "prompt": request.prompt,
            "n": 1,
            "size": f"{request.width}x{request.height}",
            "response_format": "b64_json",
        }
        started = time.perf_counter()
        try:
            answer = exchange(
                self._client,
                "POST",
                self.endpoint,
                settings=self.settings,
                source="images API",
                json=body,
                headers=bearer(self.settings),
            )
            if answer.status_code == 429 or answer.status_code >= 500:
                raise GenerationError(
                    f"images API answered {answer.status_code}: {self._error(answer)}",
                    retryable=True,
                    retry_after=_retry_after(answer.headers),
                )
            if answer.status_code >= 400:
                raise GenerationError(f"images API refused the request ({answer.status_code}): {self._error(answer)}")
            png = self._png(answer)
        except httpx.TimeoutException as exc:
            raise GenerationError(f"images API timed out: {exc}", retryable=True) from exc
        except httpx.TransportError as exc:
            raise GenerationError(f"images API unreachable: {exc}", retryable=True) from exc
        elapsed = time.perf_counter() - started
        check_png(png, source="images API")
        return GenerationResult(
            png=png, backend=self.backend, model_id=self.model_id, device=self.device, wall_s=elapsed, gpu_s=elapsed
        )

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        return generate_concurrently(self, requests)


class NullGenerator:
    """No model: a flat colour derived from the prompt and seed, after ``service_time_s`` (plus its tail) of sleep.
    Costs only what the settings say."""

    backend = "null"

    def __init__(self, settings: TierSettings) -> None:
        self.model_id = settings.model
        self.device = "none"
        self.service_time_s = settings.service_time_s
        self.service_time_tail_s = settings.service_time_tail_s

    def generate(self, request: GenerationRequest) -> GenerationResult:
        from PIL import Image

        started = time.perf_counter()
        digest = hashlib.sha256(f"{request.seed}:{request.prompt}".encode()).digest()
        seconds = self.service_time_s
        if self.service_time_tail_s:  # an exponential draw from the digest: the same job always takes as long
            uniform = (int.from_bytes(digest[8:16], "big") + 0.5) / 2**64
            seconds -= self.service_time_tail_s * math.log(uniform)
        if seconds:
            time.sleep(seconds)
        image = Image.new("RGB", (request.width, request.height), tuple(digest[:3]))
        png = encode_png(image)
        return GenerationResult(
            png=png,
            backend=self.backend,
            model_id=self.model_id,
            device=self.device,
            wall_s=time.perf_counter() - started,
            gpu_s=0.0,
        )

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        return generate_each(self, requests)


def create_generator(settings: TierSettings, *, cache_dir: Path) -> Generator:
    if settings.backend == "diffusers":
        return DiffusersGenerator(settings, cache_dir=cache_dir)
    if settings.backend == "http":
        return HttpGenerator(settings)
    if settings.backend == "openai":
        return OpenAIGenerator(settings)
    if settings.backend == "null":
        return NullGenerator(settings)
    raise ValueError(f"unknown generation backend {settings.backend!r}")
