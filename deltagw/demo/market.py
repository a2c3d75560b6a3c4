"""A deterministic option market: index ticks, option chains, Black–Scholes.

The demo storage and analytics services serve this market. It is generated
from a fixed seed and fixed timestamps — never from the wall clock — so the
same request gets byte-for-byte the same answer on every machine and in every
test run. Only the standard library is used (``math`` and
``random.Random``), keeping the demo free of numeric dependencies.

Spot follows a geometric random walk, one tick a minute through five NSE
sessions (09:15–15:29 IST). Option prices come from Black–Scholes with a
volatility smile (:func:`smile_volatility`); analytics recovers the implied
volatilities from those prices with :func:`implied_volatility`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal

OptionKind = Literal["call", "put"]

DEFAULT_SEED = 20250106
"""The seed of the published demo market; change it and every answer changes."""

RISK_FREE_RATE = 0.065
"""Continuously compounded annual rate used for pricing (about the Indian T-bill)."""

SESSION_START = datetime(2025, 1, 6, 3, 45, tzinfo=UTC)
"""First tick: Monday 6 January 2025, 09:15 IST."""

SESSIONS = 5
MINUTES_PER_SESSION = 375
"""An NSE session runs 09:15–15:30 IST: 375 one-minute ticks."""

EXPIRY_TIME_UTC = time(10, 0, tzinfo=UTC)
"""Options expire at 15:30 IST (10:00 UTC) on their expiry date."""

WEEKLY_EXPIRIES = 4
STRIKES_EACH_SIDE = 15
"""Strikes listed on each side of the at-the-money strike.

Kept narrow enough that every listed option has a vega of at least ~100, so
prices published to the paisa pin the implied volatility to well under 1e-4.
"""

SECONDS_PER_YEAR = 365.0 * 86400.0
TRADING_MINUTES_PER_YEAR = 252.0 * MINUTES_PER_SESSION
PRICE_TICK = 0.05
"""Exchange tick size for bids and offers (rupees)."""

_THURSDAY = 3


@dataclass(frozen=True)
class ProductSpec:
    """How one index and its options behave.

    Attributes:
        name: Index symbol, as used in URLs.
        start_price: Spot at the first tick.
        strike_step: Distance between listed strikes.
        lot_size: Contract size; open interest and volume are whole lots.
        walk_volatility: Annualised volatility of the spot random walk.
        atm_volatility: Implied volatility at the money, at expiry zero.
        term_slope: Added to the at-the-money volatility per sqrt(year).
        skew: Linear smile coefficient in standardised moneyness.
        curvature: Quadratic smile coefficient in standardised moneyness.
    """

    name: str
    start_price: float
    strike_step: int
    lot_size: int
    walk_volatility: float
    atm_volatility: float
    term_slope: float
    skew: float
    curvature: float


PRODUCT_SPECS: tuple[ProductSpec, ...] = (
    ProductSpec("NIFTY", 23600.0, 50, 75, 0.13, 0.12, 0.03, -0.10, 0.05),
    ProductSpec("BANKNIFTY", 50000.0, 100, 30, 0.16, 0.14, 0.03, -0.12, 0.06),
    ProductSpec("FINNIFTY", 23000.0, 50, 65, 0.15, 0.13, 0.03, -0.11, 0.05),
)


@dataclass(frozen=True)
class Tick:
    """One spot observation.

    Attributes:
        product: Index symbol.
        price: Spot, rounded to the paisa.
        timestamp: Seconds since the epoch (UTC).
    """

    product: str
    price: float
    timestamp: float

    @property
    def iso_timestamp(self) -> str:
        """The timestamp as ISO-8601 UTC with a ``Z`` suffix."""
        moment = datetime.fromtimestamp(self.timestamp, tz=UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class OptionQuote:
    """One option of a chain.

    Attributes:
        strike: Strike price.
        last_price: Black–Scholes price, to the paisa (finer than the
            exchange tick on purpose: it is what implied volatility is
            recovered from).
        bid: Best bid, on the exchange tick.
        ask: Best offer, on the exchange tick.
        volume: Contracts traded today, in units of the underlying.
        open_interest: Open contracts, in units of the underlying.
        iv: The volatility the price was generated with.
    """

    strike: int
    last_price: float
    bid: float
    ask: float
    volume: int
    open_interest: int
    iv: float


@dataclass(frozen=True)
class ExpiryChain:
    """All options of one product and one expiry.

    Attributes:
        expiry: Expiry date.
        time_to_expiry: Years from the market's as-of time to expiry.
        forward: Forward price of the index for this expiry.
        calls: Calls, by ascending strike.
        puts: Puts, by ascending strike (same strikes as ``calls``).
    """

    expiry: date
    time_to_expiry: float
    forward: float
    calls: tuple[OptionQuote, ...]
    puts: tuple[OptionQuote, ...]


@dataclass(frozen=True)
class ProductMarket:
    """Everything known about one index.

    Attributes:
        spec: The generating parameters.
        ticks: Spot history, oldest first.
        strikes: Listed strikes, ascending (the same for every expiry).
        chains: Option chains, nearest expiry first.
    """

    spec: ProductSpec
    ticks: tuple[Tick, ...]
    strikes: tuple[int, ...]
    chains: tuple[ExpiryChain, ...]

    @property
    def spot(self) -> float:
        """The latest spot: the chains are priced against it."""
        return self.ticks[-1].price

    @property
    def as_of(self) -> float:
        """Time of the latest tick (epoch seconds): the chains' valuation time."""
        return self.ticks[-1].timestamp

    def chain(self, expiry: date) -> ExpiryChain | None:
        """Return the chain expiring on ``expiry``, or None if none does."""
        for chain in self.chains:
            if chain.expiry == expiry:
                return chain
        return None


@dataclass(frozen=True)
class Market:
    """The whole demo market.

    Attributes:
        rate: Risk-free rate the options are priced with.
        products: Products by symbol, in listing order.
    """

    rate: float
    products: Mapping[str, ProductMarket]


def _norm_cdf(x: float) -> float:
    # erfc keeps full relative precision in the far tails, where
    # 0.5 * (1 + erf(x)) would cancel to zero.
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _norm_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _d1(spot: float, strike: float, t: float, rate: float, sigma: float) -> float:
    return (math.log(spot / strike) + (rate + 0.5 * sigma * sigma) * t) / (
        sigma * math.sqrt(t)
    )


def black_scholes_price(
    kind: OptionKind,
    spot: float,
    strike: float,
    t: float,
    rate: float,
    sigma: float,
) -> float:
    """Price a European option on a non-dividend-paying index.

    Args:
        kind: ``"call"`` or ``"put"``.
        spot: Current index level.
        strike: Strike price.
        t: Years to expiry (> 0).
        rate: Continuously compounded risk-free rate.
        sigma: Annualised volatility (> 0).

    Returns:
        The option's fair value.

    Raises:
        ValueError: If ``kind`` is neither call nor put.
    """
    d1 = _d1(spot, strike, t, rate, sigma)
    d2 = d1 - sigma * math.sqrt(t)
    discounted_strike = strike * math.exp(-rate * t)
    if kind == "call":
        return spot * _norm_cdf(d1) - discounted_strike * _norm_cdf(d2)
    if kind == "put":
        return discounted_strike * _norm_cdf(-d2) - spot * _norm_cdf(-d1)
    raise ValueError(f"unknown option kind {kind!r}")


def black_scholes_vega(
    spot: float, strike: float, t: float, rate: float, sigma: float
) -> float:
    """Sensitivity of the price to volatility (the same for calls and puts).

    Args:
        spot: Current index level.
        strike: Strike price.
        t: Years to expiry (> 0).
        rate: Continuously compounded risk-free rate.
        sigma: Annualised volatility (> 0).

    Returns:
        d(price)/d(sigma).
    """
    return spot * _norm_pdf(_d1(spot, strike, t, rate, sigma)) * math.sqrt(t)


def implied_volatility(
    price: float,
    kind: OptionKind,
    spot: float,
    strike: float,
    t: float,
    rate: float,
    *,
    low: float = 1e-6,
    high: float = 5.0,
    tolerance: float = 1e-12,
    max_iterations: int = 100,
) -> float | None:
    """Invert Black–Scholes: find the volatility that reproduces ``price``.

    Newton's method converges quadratically near the answer but can jump out
    of range where vega is tiny (far from the money, short expiries). The
    price is increasing in volatility, so every evaluation also narrows a
    bracket ``[low, high]`` around the root; whenever a Newton step would
    leave the bracket (or vega vanishes) a bisection step is taken instead,
    which always converges.

    Args:
        price: Observed option price.
        kind: ``"call"`` or ``"put"``.
        spot: Current index level.
        strike: Strike price.
        t: Years to expiry (> 0).
        rate: Continuously compounded risk-free rate.
        low: Smallest volatility searched.
        high: Largest volatility searched.
        tolerance: Stop once the volatility moves by less than this.
        max_iterations: Upper bound on price evaluations.

    Returns:
        The implied volatility, or None when no volatility in ``[low, high]``
        gives ``price`` (it violates the no-arbitrage bounds, or needs an
        extreme volatility).
    """
    discounted_strike = strike * math.exp(-rate * t)
    if kind == "call":
        floor, ceiling = max(0.0, spot - discounted_strike), spot
    else:
        floor, ceiling = max(0.0, discounted_strike - spot), discounted_strike
    if not floor < price < ceiling:
        return None
    if black_scholes_price(kind, spot, strike, t, rate, high) < price:
        return None
    if black_scholes_price(kind, spot, strike, t, rate, low) > price:
        return None

    sigma = min(max(0.3, low), high)
    for _ in range(max_iterations):
        error = black_scholes_price(kind, spot, strike, t, rate, sigma) - price
        if error == 0.0:
            return sigma
        if error > 0.0:
            high = sigma
        else:
            low = sigma
        vega = black_scholes_vega(spot, strike, t, rate, sigma)
        if vega > 0.0 and low < (newton := sigma - error / vega) < high:
            candidate = newton
        else:
            candidate = 0.5 * (low + high)
        if abs(candidate - sigma) < tolerance:
            return candidate
        sigma = candidate
    return sigma


def smile_volatility(
    spec: ProductSpec, forward: float, strike: float, t: float
) -> float:
    """The volatility the demo prices an option with.

    At-the-money volatility rises with the square root of time; across
    strikes it follows a quadratic in standardised moneyness
    ``ln(K/F) / (atm * sqrt(t))``, with a negative skew (puts dearer than
    calls, as on Indian indices).

    Args:
        spec: The product's smile parameters.
        forward: Forward price for the expiry.
        strike: Strike price.
        t: Years to expiry (> 0).

    Returns:
        Annualised volatility.
    """
    atm = _atm_volatility(spec, t)
    moneyness = _moneyness(spec, forward, strike, t)
    return atm * (1.0 + spec.skew * moneyness + spec.curvature * moneyness**2)


def _atm_volatility(spec: ProductSpec, t: float) -> float:
    return spec.atm_volatility + spec.term_slope * math.sqrt(t)


def _moneyness(spec: ProductSpec, forward: float, strike: float, t: float) -> float:
    """Log-moneyness in standard deviations of the at-the-money distribution."""
    return math.log(strike / forward) / (_atm_volatility(spec, t) * math.sqrt(t))


def _to_tick(price: float) -> float:
    return round(round(price / PRICE_TICK) * PRICE_TICK, 2)


def _walk(spec: ProductSpec, rng: random.Random) -> tuple[Tick, ...]:
    step_sigma = spec.walk_volatility / math.sqrt(TRADING_MINUTES_PER_YEAR)
    drift = -0.5 * step_sigma * step_sigma
    level = spec.start_price
    ticks = []
    for session in range(SESSIONS):
        opening = SESSION_START + timedelta(days=session)
        for minute in range(MINUTES_PER_SESSION):
            moment = opening + timedelta(minutes=minute)
            ticks.append(Tick(spec.name, round(level, 2), moment.timestamp()))
            level *= math.exp(drift + step_sigma * rng.gauss(0.0, 1.0))
    return tuple(ticks)


def _last_thursday(year: int, month: int) -> date:
    first_of_next = date(year + month // 12, month % 12 + 1, 1)
    last_day = first_of_next - timedelta(days=1)
    return last_day - timedelta(days=(last_day.weekday() - _THURSDAY) % 7)


def expiries_after(moment: datetime) -> tuple[date, ...]:
    """The expiries listed at ``moment``: weekly Thursdays, then a monthly.

    Args:
        moment: Valuation time.

    Returns:
        ``WEEKLY_EXPIRIES`` consecutive Thursdays strictly after ``moment``'s
        date, then the last Thursday of the following month.
    """
    today = moment.date()
    first = today + timedelta(days=(_THURSDAY - today.weekday()) % 7 or 7)
    weeklies = [first + timedelta(weeks=k) for k in range(WEEKLY_EXPIRIES)]
    month_after = first.month % 12 + 1
    year = first.year + (1 if month_after == 1 else 0)
    return (*weeklies, _last_thursday(year, month_after))


def _quote(
    kind: OptionKind,
    spec: ProductSpec,
    spot: float,
    strike: int,
    chain_time: tuple[float, float],
    rate: float,
    rng: random.Random,
) -> OptionQuote:
    t, forward = chain_time
    sigma = smile_volatility(spec, forward, strike, t)
    last = round(black_scholes_price(kind, spot, strike, t, rate, sigma), 2)
    half_spread = max(PRICE_TICK, 0.005 * last)
    # Open interest peaks at the money and sits mostly in out-of-the-money
    # strikes, where option writers concentrate on Indian indices.
    moneyness = _moneyness(spec, forward, strike, t)
    out_of_the_money = (strike > forward) == (kind == "call")
    weight = math.exp(-0.5 * (moneyness / 1.5) ** 2)
    weight *= 1.5 if out_of_the_money else 0.6
    lots = int(2000 * weight * rng.uniform(0.6, 1.4)) + 1
    traded_lots = int(lots * rng.uniform(0.3, 2.0)) + 1
    return OptionQuote(
        strike=strike,
        last_price=last,
        bid=max(PRICE_TICK, _to_tick(last - half_spread)),
        ask=_to_tick(last + half_spread),
        volume=traded_lots * spec.lot_size,
        open_interest=lots * spec.lot_size,
        iv=sigma,
    )


def _product(spec: ProductSpec, seed: int, rate: float) -> ProductMarket:
    # A string seed is hashed with SHA-512 by random.Random, so each product
    # gets its own stream, independent of PYTHONHASHSEED and of the others.
    rng = random.Random(f"deltastream-demo:{seed}:{spec.name}")
    ticks = _walk(spec, rng)
    spot = ticks[-1].price
    as_of = datetime.fromtimestamp(ticks[-1].timestamp, tz=UTC)
    at_the_money = round(spot / spec.strike_step) * spec.strike_step
    strikes = tuple(
        at_the_money + k * spec.strike_step
        for k in range(-STRIKES_EACH_SIDE, STRIKES_EACH_SIDE + 1)
    )
    chains = []
    for expiry in expiries_after(as_of):
        close = datetime.combine(expiry, EXPIRY_TIME_UTC)
        t = (close - as_of).total_seconds() / SECONDS_PER_YEAR
        chain_time = (t, spot * math.exp(rate * t))
        calls = tuple(
            _quote("call", spec, spot, k, chain_time, rate, rng) for k in strikes
        )
        puts = tuple(
            _quote("put", spec, spot, k, chain_time, rate, rng) for k in strikes
        )
        chains.append(ExpiryChain(expiry, t, chain_time[1], calls, puts))
    return ProductMarket(spec, ticks, strikes, tuple(chains))


def build_market(seed: int = DEFAULT_SEED, rate: float = RISK_FREE_RATE) -> Market:
    """Generate the demo market.

    Args:
        seed: Seed of every random choice; the same seed gives an identical
            market on any machine.
        rate: Risk-free rate for pricing.

    Returns:
        The market for all of :data:`PRODUCT_SPECS`.
    """
    return Market(
        rate=rate,
        products={spec.name: _product(spec, seed, rate) for spec in PRODUCT_SPECS},
    )
