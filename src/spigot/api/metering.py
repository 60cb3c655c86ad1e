"""API keys, admission and the usage ledger in the request path.

    authenticate  Authorization: Bearer <key>  -> the key, or 401
    admit         model allowed (403), then one store transaction: concurrency,
                  requests and tokens per minute (429 rate_limit_exceeded), budget
                  (429 insufficient_quota); reserves the request's worst-case cost
    settle        one ledger row with the exact counts and cost, the reservation
                  released, committed before the stream's usage chunk and [DONE]

Keys are needed once any key exists in the store (or with --require-auth);
until then requests run without one and are metered under no key. The store
is synchronous; every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from starlette.requests import Request

from spigot.errors import AuthenticationFailed, PermissionDenied, QuotaExceeded, RateLimited
from spigot.metering import Admission, ApiKey, LedgerEntry, Store, cost
from spigot.metering.prices import PriceTable

log = logging.getLogger("spigot.metering")

# Longer than any key spigot makes; longer values are refused without a lookup.
MAX_KEY_LENGTH = 256
# How long "does any key exist?" is trusted before asking the store again.
KEYS_EXIST_TTL = 2.0


@dataclass(frozen=True, slots=True)
class Reservation:
    """What admission granted one request; its headers go on the response."""

    key: ApiKey
    headers: dict[str, str]


class Metering:
    def __init__(self, store: Store, prices: PriceTable, *, require_auth: bool) -> None:
        self.store = store
        self.prices = prices
        self.require_auth = require_auth
        self._keys_exist: tuple[bool, float] = (False, 0.0)

    async def _auth_required(self) -> bool:
        if self.require_auth:
            return True
        known, checked = self._keys_exist
        if known or time.monotonic() - checked < KEYS_EXIST_TTL:
            return known  # once keys exist, auth stays on (a revoked last key included)
        known = await asyncio.to_thread(self.store.has_keys)
        self._keys_exist = (known, time.monotonic())
        return known

    async def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The request's key; None when keys are not required (any key sent is ignored)."""
        if not await self._auth_required():
            return None
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthenticationFailed(
                "The Authorization header must be 'Bearer YOUR_KEY'.", code="invalid_api_key"
            )
        key = None
        if len(secret) <= MAX_KEY_LENGTH and secret.isascii():
            key = await asyncio.to_thread(self.store.authenticate, secret)
        if key is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if key.revoked:
            raise AuthenticationFailed("This API key has been revoked.")
        if key.expired():
            raise AuthenticationFailed("This API key has expired.")
        return key

    async def admit(
        self,
        key: ApiKey | None,
        *,
        request_id: str,
        model: str,
        prompt_tokens: int,
        max_completion_tokens: int,
    ) -> Reservation | None:
        """Reserve the request's worst case (no cached tokens, every output token) or refuse."""
        if key is None:
            return None
        if not key.allows_model(model):
            raise PermissionDenied(
                f"This API key may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )
        worst = cost(self.prices.for_model(model), prompt_tokens, 0, max_completion_tokens)
        admission = await asyncio.to_thread(
            self.store.admit,
            key,
            request_id=request_id,
            reserve_pusd=worst,
            tokens=prompt_tokens + max_completion_tokens,
        )
        headers = rate_limit_headers(admission)
        if not admission.ok:
            raise _refusal(admission, headers, max_completion_tokens)
        return Reservation(key, headers)

    async def release(self, request_id: str) -> None:
        """A request admitted but never started (the queue was full)."""
        await asyncio.to_thread(self.store.release, request_id)

    async def settle(self, entry: LedgerEntry) -> None:
        await asyncio.to_thread(self.store.settle, entry)

    def cost(self, model: str, prompt: int, cached: int, completion: int) -> int:
        return cost(self.prices.for_model(model), prompt, cached, completion)


def rate_limit_headers(admission: Admission) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the limits the key has."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        limit = getattr(admission, f"limit_{kind}")
        if limit is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(getattr(admission, f"remaining_{kind}"))
        headers[f"x-ratelimit-reset-{kind}"] = f"{getattr(admission, f'reset_{kind}'):.3f}s"
    return headers


def _refusal(admission: Admission, headers: dict[str, str], max_tokens: int) -> Exception:
    reason = admission.reason
    if reason == "revoked":
        return AuthenticationFailed("This API key has been revoked.")
    if reason == "expired":
        return AuthenticationFailed("This API key has expired.")
    if reason == "budget":
        return QuotaExceeded(
            "This API key's budget cannot cover this request (its prompt plus max_tokens "
            f"{max_tokens} at the model's price). Lower max_tokens or raise the budget.",
            headers=headers,
        )
    if reason == "tpm" and admission.retry_after is None:
        return RateLimited(
            "This request (its prompt plus max_tokens) needs more tokens than this API key "
            "may use in a minute. Lower max_tokens.",
            headers=headers,
        )
    messages = {
        "concurrency": "Too many requests in flight for this API key.",
        "rpm": "Rate limit reached for requests per minute on this API key.",
        "tpm": "Rate limit reached for tokens per minute (prompt plus max_tokens) on this API key.",
    }
    return RateLimited(
        messages.get(reason or "", "Rate limit reached."),
        retry_after=admission.retry_after if admission.retry_after is not None else 1.0,
        headers=headers,
    )


async def authorize(request: Request) -> ApiKey | None:
    """The request's API key (None when keys are off); 401 before anything else is read."""
    metering: Metering | None = request.app.state.spigot.metering
    if metering is None:
        return None
    return await metering.authenticate(request.headers.get("authorization"))


async def admit(
    request: Request,
    key: ApiKey | None,
    *,
    model: str,
    prompt_tokens: int,
    max_completion_tokens: int,
) -> Reservation | None:
    metering: Metering | None = request.app.state.spigot.metering
    if metering is None:
        return None
    return await metering.admit(
        key,
        request_id=request.state.request_id,
        model=model,
        prompt_tokens=prompt_tokens,
        max_completion_tokens=max_completion_tokens,
    )


async def release(request: Request, reservation: Reservation | None) -> None:
    metering: Metering | None = request.app.state.spigot.metering
    if metering is not None and reservation is not None:
        await metering.release(request.state.request_id)
