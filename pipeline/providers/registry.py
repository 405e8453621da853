"""The configured providers of one daemon, each with its circuit breaker and the outcome
of its last health check.

The router asks it for a provider by name and has it check a provider (Initialize, start-up);
`speaking` asks whether a provider is usable now (its circuit is closed, or its cool-down
has passed and a probe succeeded) and reports each piece's success or failure. `/readyz`
asks `not_ready_reason`, so it says the same as what the router and speaker decide.
"""

from __future__ import annotations

import structlog
import trio

from pipeline.commands import TTSProvider
from pipeline.config import Settings
from pipeline.errors import ProviderError, ProviderUnavailable
from pipeline.providers.base import Provider
from pipeline.providers.breaker import CircuitBreaker

log = structlog.get_logger()


class ProviderSet:
    """Providers by name plus one CircuitBreaker each.

    Error handling: `usable` never raises; a failed probe keeps the circuit open. Only
    failures the provider is to blame for (`ProviderError.provider_fault`) count toward
    its circuit: a text that one voice cannot speak must not silence it for everyone.
    """

    def __init__(self, providers: dict[TTSProvider, Provider], settings: Settings) -> None:
        self._providers = providers
        self._breakers = {
            name: CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown) for name in providers
        }
        # Why each provider failed its last health check (None: it passed); a provider
        # never checked is absent, and one being checked says so.
        self._health: dict[TTSProvider, str | None] = {}

    def get(self, name: TTSProvider) -> Provider:
        return self._providers[name]

    def unavailable_reason(self, name: TTSProvider) -> str | None:
        """Why `name` cannot be chosen at all (not configured), or None."""
        provider = self._providers.get(name)
        if provider is None:
            return f"{name.value} is not configured in this daemon"
        return provider.unavailable_reason()

    async def usable(self, name: TTSProvider) -> bool:
        """True when `name` may be used for the next piece (probing it after a cool-down)."""
        if self.unavailable_reason(name) is not None:
            return False
        breaker = self._breakers[name]
        if not breaker.allow():
            return False
        if breaker.needs_probe:
            try:
                await self._providers[name].check()
            except ProviderError as e:
                breaker.record_failure()
                log.warning("provider.probe_failed", provider=name.value, error=e.message)
                return False
            breaker.record_success()
            log.info("provider.probe_succeeded", provider=name.value)
        return True

    async def check(self, name: TTSProvider, timeout: float) -> None:
        """Check `name` within `timeout` seconds and remember the outcome for `/readyz`.

        Error handling: raises ProviderUnavailable saying why (not configured, the check
        failed, or it took longer than `timeout`).
        """
        if reason := self.unavailable_reason(name):
            raise ProviderUnavailable(reason)
        self._health[name] = f"{name.value} is being checked"
        try:
            with trio.fail_after(timeout):
                await self._providers[name].check()
        except trio.TooSlowError:
            reason = self._health[name] = f"{name.value} did not get ready within {timeout:g} s"
            raise ProviderUnavailable(reason) from None
        except ProviderError as e:
            self._health[name] = e.message
            raise ProviderUnavailable(e.message) from e
        self._health[name] = None

    def not_ready_reason(self, name: TTSProvider) -> str | None:
        """Why `name` cannot speak now (not configured, being checked, failed its last
        check, or its circuit is open), or None."""
        if reason := self.unavailable_reason(name):
            return reason
        if reason := self._health.get(name):
            return reason
        breaker = self._breakers[name]
        if not breaker.allow():
            return (f"{name.value} failed {breaker.failures} times in a row; it is skipped for "
                    f"{breaker.cooldown_left():.0f} s more (breaker_cooldown)")
        return None

    def record_success(self, name: TTSProvider) -> None:
        self._breakers[name].record_success()

    def record_failure(self, name: TTSProvider, failure: ProviderError) -> None:
        if failure.provider_fault:
            self._breakers[name].record_failure()

    async def aclose(self) -> None:
        """Release every provider (Close, shutdown)."""
        for provider in self._providers.values():
            await provider.aclose()


def default_providers(settings: Settings) -> ProviderSet:
    """Every provider, configured from `settings` (the HTTP ones open their client lazily)."""
    from pipeline.providers.openai_compat import kokoros_provider, openai_provider
    from pipeline.providers.piper import PiperProvider

    return ProviderSet(
        {
            TTSProvider.PIPER: PiperProvider(
                settings.piper_speed, workers=settings.piper_workers, memory_mb=settings.piper_worker_memory_mb
            ),
            TTSProvider.KOKOROS: kokoros_provider(settings),
            TTSProvider.OPENAI: openai_provider(settings),
        },
        settings,
    )
