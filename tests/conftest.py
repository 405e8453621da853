import os

import structlog
from hypothesis import HealthCheck, settings

from pipeline.logs import configure_logging

# Profiles for the fuzz tests (tests/test_fuzz_client_input.py): `brief` keeps `make test`
# quick; `make fuzz` sets SPEECHCAST_FUZZ=long for many more examples. Only the fuzz
# tests use them (FUZZ below); the other property tests keep hypothesis's defaults.
settings.register_profile(
    "fuzz-brief",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz-long",
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("fuzz-" + os.environ.get("SPEECHCAST_FUZZ", "brief"))


def pytest_configure(config):
    configure_logging("json")
    structlog.contextvars.clear_contextvars()
