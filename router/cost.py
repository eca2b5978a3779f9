"""What images cost: the one place a tier's prices become US dollars.

A tier bills a price per image plus a price per second of generator device time
(``ROUTET2I_<TIER>__PRICE_PER_IMAGE``, ``__PRICE_PER_GPU_SECOND``). A routing decision that sends a job to the
cloud reserves the price per image from the spend limit at once (:mod:`router.budget`); the device time is only
known once the image exists, and is counted then, beyond the reservation.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.tier_settings import TierSettings


def image_cost_usd(tier: TierSettings, gpu_s: float) -> float:
    """Price of one image on ``tier`` that took ``gpu_s`` seconds of device time."""
    return tier.price_per_image + tier.price_per_gpu_second * gpu_s


def reserved_usd(tier: TierSettings) -> float:
    """What deciding one image of ``tier`` reserves from the spend limit before it exists: its price per image."""
    return tier.price_per_image


def beyond_reservation_usd(tier: TierSettings, gpu_seconds: Iterable[float]) -> float:
    """What images of ``tier`` that took ``gpu_seconds`` of device time cost beyond what their decisions
    reserved (:func:`reserved_usd`)."""
    return tier.price_per_gpu_second * sum(gpu_seconds)


PAID_PER_CALL = ("http", "openai")
"""Backends that are remote APIs: they charge for an image once called, whatever becomes of it."""


def wasted_when_discarded(tier: TierSettings) -> bool:
    """Whether an image of ``tier`` generated for a job cancelled (or expired) meanwhile still cost money: a
    remote API was paid for it, so it is billed as wasted; a tier's own GPU's image is not billed."""
    return tier.backend in PAID_PER_CALL
