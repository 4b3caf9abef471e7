"""The running server against its own ``/openapi.json`` (schemathesis, bounded).

Every operation the schema lists is called with schema-generated requests over real HTTPS,
with valid operator credentials (the bearer token) and a valid device certificate (mutual
TLS). Schemathesis's checks then hold the server to its schema: no 5xx, every response
within the schema, no schema-valid request refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import World

# Work in progress (issue 12 item 4): on this loaded machine one example per operation did
# not finish within 8 minutes, and what it reports is not triaged yet. Run it by hand with
# OTAGUARD_SCHEMATHESIS=1 until it is bounded and clean; then it joins make test.
pytestmark = pytest.mark.skipif(
    os.environ.get("OTAGUARD_SCHEMATHESIS") != "1",
    reason="work in progress: set OTAGUARD_SCHEMATHESIS=1 (issue 12 item 4)",
)

#: examples per operation: bounded so CI stays short; raise it by hand to look harder
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "5"))


@pytest.fixture
def api(world: World) -> Iterator[tuple[World, requests.Session, object]]:
    dev = world.device("schema-dev")
    assert world.server.ca_cert is not None
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the server CA
    session.verify = str(world.server.ca_cert)
    session.cert = (str(dev.paths.device_cert), str(dev.paths.device_key))
    session.headers["Authorization"] = f"Bearer {world.server.operator_token}"
    raw = session.get(f"{world.server.base_url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    yield world, session, schema
    session.close()


def test_every_operation_honours_the_schema(api: tuple[World, requests.Session, object]) -> None:
    world, session, schema = api
    failures: list[str] = []
    for result in schema.get_all_operations():  # type: ignore[attr-defined]
        operation = result.ok()

        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def call(case: object) -> None:
            case.call_and_validate(base_url=world.server.base_url, session=session)  # type: ignore[attr-defined]

        try:
            call()
        except Exception as e:  # noqa: BLE001 - collect every operation's failure, report all
            first = " / ".join(str(e).splitlines()[:3])
            failures.append(f"{operation.method.upper()} {operation.path}: {first}")
    assert not failures, "\n".join(failures)
