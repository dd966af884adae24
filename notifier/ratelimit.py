"""Rate limits over Redis with the `limits` library (moving window), shared by every API process.

Three limits: each API key's request rate (its own, or RATE_LIMIT); a cap per recipient on
non-transactional mail (RECIPIENT_CAP), so a looping caller cannot flood one inbox; and wrong
operator passwords per client address (OPERATOR_AUTH_LIMIT), so that password cannot be guessed at
speed. If Redis cannot be reached the first two are not enforced: refusing every request would turn a
Redis outage into an outage of the API, which keeps accepting work while Redis is down. The third is
then counted by each process on its own (strict), so guesses never go free."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse, parse_many
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from limits.util import SINGLE_EXPR
from redis.exceptions import RedisError, ResponseError

from notifier.queues import driver_info
from notifier.resilience import refuses_writes

logger = logging.getLogger(__name__)

# How long a rate limit waits for Redis before it lets the request through (see Limiter).
LIMIT_TIMEOUT_SECONDS = 0.5
# Once Redis did not answer, how long a process lets its limits through without asking it again (strict
# ones are still asked): a batch of marketing mail asked it once per item for the recipient cap, each
# waiting its 0.5 s (a batch of 40 took 23 s while Redis hung).
AWAY_SECONDS = 2.0


# Beyond these Redis refuses the moving window's script (a number it cannot read, an expiry past its
# range), and a limit it cannot check is not enforced: "1/99999999999999999999 seconds" let everything
# through, each request logging that Redis was unreachable. Far inside what Redis takes.
MAX_RATE_AMOUNT = 10**12
MAX_RATE_PERIOD_SECONDS = 1000 * 360 * 86400  # a thousand of limits' years (360 days each)
MAX_RATE_LENGTH = 40  # what a key's rate_limit column holds


def check_rate(text: str) -> RateLimitItem:
    """A rate as a setting or a key may have it: exactly one, of 1 to MAX_RATE_AMOUNT per a period of
    at most MAX_RATE_PERIOD_SECONDS ("100/second"); raises ValueError otherwise. Of several (limits
    takes "10/minute;20/day") only the first would apply, and 0 would refuse everything."""
    if len(text) > MAX_RATE_LENGTH:
        raise ValueError(f"a rate of more than {MAX_RATE_LENGTH} characters: {text[:MAX_RATE_LENGTH]!r}...")
    rates = parse_many(text)
    if len(rates) != 1 or not 1 <= rates[0].amount <= MAX_RATE_AMOUNT:
        raise ValueError(f"not one rate of 1 to {MAX_RATE_AMOUNT:,}: {text!r}")
    multiples = SINGLE_EXPR.match(text).group(3)
    if multiples is not None and int(multiples) == 0:
        # limits reads "5/0 seconds" as 5/second; the key would show one rate and have another.
        raise ValueError(f"a rate per 0 periods: {text!r}")
    if rates[0].get_expiry() > MAX_RATE_PERIOD_SECONDS:
        raise ValueError(f"a rate's period is at most 1,000 years: {text!r}")
    return rates[0]


@lru_cache(maxsize=256)
def parse_rate(text: str) -> RateLimitItem:
    """"100/second", "20/hour", "1000 per minute": raises ValueError for anything else. Cached: the
    same few rates are asked for on every request."""
    return parse(text)


@lru_cache(maxsize=256)
def key_rate(stored: str | None, default: str) -> RateLimitItem:
    """The rate a key's requests are held to: its own, or default (RATE_LIMIT) when it has none, or
    one stored before rates were bounded, which the API cannot enforce as written: "0/second" refused
    every request, "fast" answered each with a 500, "2/minute;20/day" held only its first rate, and
    "10^20/second" was refused by Redis. Logged once per process and rate (`keys list` marks them)."""
    if stored is not None:
        try:
            return check_rate(stored)
        except ValueError:
            logger.error("a key's stored rate %r is out of bounds: RATE_LIMIT (%s) applies instead; "
                         "`keys list` names the key, `keys rate NAME RATE` changes it", stored[:MAX_RATE_LENGTH],
                         default)
    return parse_rate(default)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_seconds))
        return headers


class Limiter:
    """A moving-window limiter on one Redis."""

    def __init__(self, redis_url: str):
        # limits' own read timeout is 5 s: a hung Redis held every request that long before the limit
        # gave way (it is not enforced without Redis). Its two scripts take well under a millisecond.
        self._limiter = MovingWindowRateLimiter(storage_from_string(_storage_url(redis_url), socket_connect_timeout=1,
                                                                    socket_timeout=LIMIT_TIMEOUT_SECONDS,
                                                                    driver_info=driver_info()))
        self._local: MovingWindowRateLimiter | None = None  # made the first time a strict limit needs it
        self._away_until = 0.0  # time.monotonic() before which Redis is not asked (AWAY_SECONDS)
        self._away = ""  # why, as the warning that began that time said

    def hit(self, rate: RateLimitItem, *identifiers: str, strict: bool = False) -> Verdict:
        """Count one request against rate; say whether it is allowed and what is left. strict: while
        Redis does not answer, counted in this process rather than let through (see check)."""
        return self._verdict("hit", rate, identifiers, strict)

    def check(self, rate: RateLimitItem, *identifiers: str, strict: bool = False) -> Verdict:
        """Whether one more would be allowed, without counting it (for limits that count failures).
        strict: while Redis does not answer, by this process's own count: wrong operator passwords
        must not be free to guess while Redis is away (each process then allows the rate)."""
        return self._verdict("test", rate, identifiers, strict)

    def allows(self, rate: RateLimitItem, *identifiers: str) -> bool:
        """hit() for a limit whose window nobody is shown (the recipient cap): one round trip, not two."""
        if time.monotonic() < self._away_until:
            return True
        try:
            return self._limiter.hit(rate, "notifier", *identifiers)
        except (RedisError, ConnectionError, OSError) as exc:
            return self._given_way(exc, rate, identifiers, "hit", strict=False).allowed

    def _verdict(self, method: str, rate: RateLimitItem, identifiers: tuple[str, ...], strict: bool) -> Verdict:
        # A strict limit asks Redis every time: its count is there, and one slow reply to another
        # limit must not hand a locked-out guesser this process's own, empty window.
        if not strict and time.monotonic() < self._away_until:
            # Said once as the time began, not for every request in it: under load, or for the whole of
            # a Redis out of memory (which refuses the hit at once), a line per request.
            return self._without_redis(method, rate, identifiers, strict, self._away, told=True)
        try:
            return _ask(self._limiter, method, rate, identifiers)
        except (RedisError, ConnectionError, OSError) as exc:
            return self._given_way(exc, rate, identifiers, method, strict)

    def _given_way(self, exc: Exception, rate: RateLimitItem, identifiers: tuple[str, ...], method: str,
                   strict: bool) -> Verdict:
        """The verdict when Redis failed to answer a check with exc."""
        if isinstance(exc, ResponseError):
            if type(exc) is ResponseError and not refuses_writes(exc):
                # Redis refused the script's numbers (a rate stored before rates were bounded): no outage.
                # (MISCONF is a plain ResponseError too: it was taken for this, an ERROR line per request.)
                logger.error("rate limit not enforced, Redis refused its check: %s (`keys list` marks a key's rate "
                             "out of bounds; `keys rate NAME RATE` changes it)", type(exc).__name__)
                return Verdict(True, rate.amount, rate.amount, 0)
            # a read-only replica after a failover, out of memory: Redis cannot take the hit
            away = f"Redis unavailable: {type(exc).__name__}"
        else:
            away = f"Redis unreachable: {type(exc).__name__}"
        self._away_until, self._away = time.monotonic() + AWAY_SECONDS, away
        return self._without_redis(method, rate, identifiers, strict, away)

    def _without_redis(self, method: str, rate: RateLimitItem, identifiers: tuple[str, ...], strict: bool,
                       away: str, told: bool = False) -> Verdict:
        if not strict:
            if not told:
                logger.warning("rate limit not enforced, %s (nor for the next %g s)", away, AWAY_SECONDS)
            return Verdict(True, rate.amount, rate.amount, 0)
        logger.warning("rate limit counted in this process only, %s", away)
        if self._local is None:  # two threads making one each at once lose a count, nothing more
            self._local = MovingWindowRateLimiter(MemoryStorage())
        return _ask(self._local, method, rate, identifiers)


def _storage_url(redis_url: str) -> str:
    """REDIS_URL as limits names it: a unix socket is redis+unix:// to it (the API would not start)."""
    return "redis+" + redis_url if redis_url.startswith("unix://") else redis_url


def _ask(limiter: MovingWindowRateLimiter, method: str, rate: RateLimitItem, identifiers: tuple[str, ...]) -> Verdict:
    allowed = getattr(limiter, method)(rate, "notifier", *identifiers)
    stats = limiter.get_window_stats(rate, "notifier", *identifiers)
    reset = max(0, math.ceil(stats.reset_time - time.time()))
    return Verdict(allowed, rate.amount, max(0, stats.remaining), reset)
