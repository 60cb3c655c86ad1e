"""API keys, admission and the usage ledger in the request path.

    authenticate  Authorization: Bearer <key>  -> the key, or 401
    admit         phase 1, before any work on the prompt: model allowed (403), then
                  one store transaction: concurrency counting every sequence (n),
                  requests per minute (429 rate_limit_exceeded); holds a reservation
    reserve       phase 2, once the prompt is tokenized: tokens per minute (429),
                  budget (429 insufficient_quota) for the exact prompt plus the
                  output cap; reserves the request's worst-case cost
    checkpoint    while it runs: counts so far on the reservation, billed as
                  "interrupted" if the server dies before settling
    settle        one ledger row with the exact counts and cost, the reservation
                  released, committed before the stream's usage chunk and [DONE]

Keys are needed once any key was ever made in the store, revoked or expired
ones included (or always, with --require-auth); until then requests run
without one and are metered under no key. The store is synchronous; every call
runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from starlette.requests import Request

from spigot.api.keyless import check_keyless
from spigot.errors import AuthenticationFailed, PermissionDenied, QuotaExceeded, RateLimited
from spigot.metering import Admission, ApiKey, LedgerEntry, Store, StoreError, cost
from spigot.metering.money import MAX_PUSD
from spigot.metering.prices import PriceTable

log = logging.getLogger("spigot.metering")

# Longer than any key spigot makes; longer values are refused without a lookup.
MAX_KEY_LENGTH = 256
# How long "does any key exist?" is trusted before asking the store again.
KEYS_EXIST_TTL = 2.0


@dataclass(frozen=True, slots=True)
class Reservation:
    """What admission granted one request; its headers go on the response (phase 2
    replaces phase 1's with the full set)."""

    key: ApiKey
    headers: dict[str, str]
    request_id: str


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
            # Once true, true for good: keys are never deleted, and the store says true
            # for a database that ever had one, so a revoked last key keeps auth on here
            # and after a restart alike.
            return known
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
        sequences: int = 1,
        endpoint: str | None = None,
    ) -> Reservation | None:
        """Phase 1, before any work on the prompt: the key may use the model, has room for
        ``sequences`` more in flight and a request left this minute; or refuse. Nothing is
        reserved from the budget yet (``reserve`` does that)."""
        if key is None:
            return None
        if not key.allows_model(model):
            raise PermissionDenied(
                f"This API key may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )
        admission = await asyncio.to_thread(
            self.store.admit,
            key,
            request_id=request_id,
            sequences=sequences,
            model=model,
            endpoint=endpoint,
        )
        headers = rate_limit_headers(admission)
        if not admission.ok:
            raise _refusal(admission, headers, sequences=sequences)
        return Reservation(key, headers, request_id)

    async def reserve(
        self,
        reservation: Reservation | None,
        *,
        model: str,
        prompt_tokens: int,
        max_completion_tokens: int,
    ) -> None:
        """Phase 2, with the exact prompt: reserve the request's worst case (every prompt
        token at the higher of the prompt and cached prices, every output token) or refuse;
        a refused request's reservation is gone. ``reservation.headers`` gets the
        x-ratelimit-* headers either way."""
        if reservation is None:
            return
        worst = self.prices.for_model(model).worst_case(prompt_tokens, max_completion_tokens)
        admission = await asyncio.to_thread(
            self.store.reserve,
            reservation.request_id,
            # No budget holds more: past it, the estimate only needs to be too large.
            reserve_pusd=min(worst, MAX_PUSD),
            tokens=prompt_tokens + max_completion_tokens,
        )
        headers = rate_limit_headers(admission)
        reservation.headers.clear()
        reservation.headers.update(headers)
        if not admission.ok:
            raise _refusal(admission, headers, max_tokens=max_completion_tokens)

    async def checkpoint(
        self,
        request_id: str,
        *,
        model: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
    ) -> bool:
        """Keeps a running request's counts so far (and their cost at this server's prices)
        on its reservation, so that a server killed before settling still bills them.
        Best effort: a store that fails is logged, and the stream goes on. False when
        nothing was recorded (no reservation: no key, or already settled)."""
        spent = self.cost(model, prompt_tokens, cached_tokens, completion_tokens)
        try:
            return await asyncio.to_thread(
                self.store.checkpoint,
                request_id,
                prompt_tokens=prompt_tokens,
                cached_tokens=cached_tokens,
                completion_tokens=completion_tokens,
                cost_pusd=min(spent, MAX_PUSD),
            )
        except StoreError as exc:
            log.warning("%s: checkpoint not recorded: %s", request_id, exc)
            return False

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


def _refusal(
    admission: Admission,
    headers: dict[str, str],
    *,
    max_tokens: int | None = None,
    sequences: int = 1,
) -> Exception:
    reason = admission.reason
    if reason == "revoked":
        return AuthenticationFailed("This API key has been revoked.")
    if reason == "expired":
        return AuthenticationFailed("This API key has expired.")
    if reason == "budget":
        cap = "" if max_tokens is None else f" {max_tokens}"
        return QuotaExceeded(
            "This API key's budget cannot cover this request (its prompt plus max_tokens"
            f"{cap} at the model's price). Lower max_tokens or raise the budget.",
            headers=headers,
        )
    if reason == "sequences":
        # No Retry-After: however long the client waits, the request stays too large.
        return RateLimited(
            f"This request runs {sequences} sequences at once (n choices for each prompt), "
            "more than this API key's max_concurrent allows; waiting will not help. Lower n.",
            param="n",
            headers=headers,
        )
    if reason == "tpm" and admission.retry_after is None:
        return RateLimited(
            "This request (its prompt plus max_tokens) needs more tokens than this API key "
            "may use in a minute. Lower max_tokens.",
            headers=headers,
        )
    messages = {
        "concurrency": "Too many requests in flight for this API key (each of n choices "
        "counts as one).",
        "rpm": "Rate limit reached for requests per minute on this API key.",
        "tpm": "Rate limit reached for tokens per minute (prompt plus max_tokens) on this API key.",
    }
    return RateLimited(
        messages.get(reason or "", "Rate limit reached."),
        retry_after=admission.retry_after if admission.retry_after is not None else 1.0,
        headers=headers,
    )


async def authorize(request: Request) -> ApiKey | None:
    """The request's API key (None when keys are off); 401 before anything else is read.

    Without keys, the checks that keep web pages out apply (``spigot.api.keyless``).
    """
    state = request.app.state.spigot
    metering: Metering | None = state.metering
    key = None
    if metering is not None:
        key = await metering.authenticate(request.headers.get("authorization"))
    if key is None:
        check_keyless(request, loopback_only=state.loopback_only)
    return key


async def admit(
    request: Request,
    key: ApiKey | None,
    *,
    model: str,
    sequences: int,
    endpoint: str | None = None,
) -> Reservation | None:
    """Phase 1, before any work on the prompt; None when metering is off or there is no key
    (then ``reserve`` and ``release`` do nothing). ``endpoint`` names the request in the
    ledger row written should the server die before settling it."""
    metering: Metering | None = request.app.state.spigot.metering
    if metering is None:
        return None
    return await metering.admit(
        key,
        request_id=request.state.request_id,
        model=model,
        sequences=sequences,
        endpoint=endpoint if endpoint is not None else request.url.path,
    )


async def reserve(
    request: Request,
    reservation: Reservation | None,
    *,
    model: str,
    prompt_tokens: int,
    max_completion_tokens: int,
) -> None:
    """Phase 2, once the prompt is tokenized: 429 (rate limit or budget) with the
    reservation dropped, or ``reservation.headers`` updated with every x-ratelimit-*."""
    metering: Metering | None = request.app.state.spigot.metering
    if metering is None or reservation is None:
        return
    await metering.reserve(
        reservation,
        model=model,
        prompt_tokens=prompt_tokens,
        max_completion_tokens=max_completion_tokens,
    )


async def release(request: Request, reservation: Reservation | None) -> None:
    metering: Metering | None = request.app.state.spigot.metering
    if metering is not None and reservation is not None:
        await metering.release(request.state.request_id)
