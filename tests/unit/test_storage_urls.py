"""Database URLs: the driver chosen, the unsupported refused, the password never shown."""

from __future__ import annotations

import pytest

from otaguard.model.errors import ConfigError
from otaguard.server.storage.database import describe_error, mask_url, normalise_url

SECRET = "pa55-w0rd"


@pytest.mark.parametrize(
    "driver", ["postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"]
)
def test_postgresql_urls_use_psycopg_3(driver: str) -> None:
    parsed = normalise_url(f"{driver}://otaguard:{SECRET}@db:5432/otaguard")
    assert parsed.drivername == "postgresql+psycopg"
    assert mask_url(parsed) == "postgresql+psycopg://otaguard:***@db:5432/otaguard"


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        (f"mysql://root:{SECRET}@db/x", "unsupported database 'mysql'"),
        ("sqlite://", "must name a file"),
        ("sqlite:///:memory:", "must name a file"),
        (f"postgresql://u:{SECRET}@db:5432", "names no database"),
        ("::::", "malformed"),
    ],
)
def test_unusable_urls_are_configuration_errors(url: str, cause: str) -> None:
    with pytest.raises(ConfigError, match=cause) as e:
        normalise_url(url)
    assert SECRET not in str(e.value)


def test_mask_url() -> None:
    assert mask_url(f"postgresql://u:{SECRET}@h/d") == "postgresql://u:***@h/d"
    assert mask_url("postgresql://u@h/d") == "postgresql://u@h/d"
    assert mask_url("not a url") == "<invalid database URL>"


def test_a_driver_message_echoing_the_password_is_cut() -> None:
    class DriverError(Exception):
        pass

    error = DriverError(f'password authentication failed for "{SECRET}"\nDETAIL: more')
    text = describe_error(error, f"postgresql://u:{SECRET}@h/d")
    assert text == 'DriverError: password authentication failed for "***"'
