import structlog

from pipeline.logs import configure_logging


def pytest_configure(config):
    configure_logging("json")
    structlog.contextvars.clear_contextvars()
