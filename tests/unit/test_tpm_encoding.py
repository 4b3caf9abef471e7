"""The version code kept in the TPM's version counter: monotone, cheap steps, exact refusals.

Runs without a TPM or tpm2-pytss: the encoding is pure.
"""

from __future__ import annotations

import itertools

import pytest

from otaguard.agent.config import DeviceConfig
from otaguard.agent.tpm import decode_version, encode_version
from otaguard.model import ConfigError, Version

VERSIONS = sorted(
    Version.parse(f"{a}.{b}.{c}{pre}")
    for a, b, c, pre in itertools.product(
        (0, 1, 2), (0, 1, 14, 15, 16, 40), (0, 1, 14, 15, 16, 99), ("", "-rc.1", "-0")
    )
)


def test_encoding_is_monotone() -> None:
    codes = [encode_version(v) for v in VERSIONS]
    assert codes == sorted(codes)


def test_decoded_bound_refuses_exactly_the_versions_with_a_smaller_code() -> None:
    for floor in VERSIONS:
        bound = decode_version(encode_version(floor))
        assert bound <= floor
        assert encode_version(bound) == encode_version(floor)
        for v in VERSIONS:
            assert (v < bound) == (encode_version(v) < encode_version(floor)), (floor, v)


def test_steps_are_cheap() -> None:
    def step(a: str, b: str) -> int:
        return encode_version(Version.parse(b)) - encode_version(Version.parse(a))

    assert step("1.4.2", "1.4.3") == 1
    assert step("1.4.2", "1.5.0") <= 16
    assert step("1.15.0", "2.0.0") == 16
    assert step("1.0.0", "2.0.0") == 256


@pytest.mark.parametrize(
    "tcti", ["", "swtpm: host=x", "device:/dev/tpmrm0\n", "Swtpm", 5, "x" * 300]
)
def test_config_refuses_a_bad_tcti(tcti: object) -> None:
    with pytest.raises(ConfigError, match="TCTI"):
        DeviceConfig(
            server_url="https://x",
            serial="dev-1",
            hardware_id="hw",
            unsafe_no_health_check=True,
            tpm=tcti,
        )  # type: ignore[arg-type]


def test_config_accepts_a_tcti() -> None:
    for tcti in ("device:/dev/tpmrm0", "swtpm:host=127.0.0.1,port=2321", "tabrmd"):
        assert (
            DeviceConfig(
                server_url="https://x",
                serial="dev-1",
                hardware_id="hw",
                unsafe_no_health_check=True,
                tpm=tcti,
            ).tpm
            == tcti
        )


def test_the_agent_runs_without_tpm2_pytss() -> None:
    """Only the TPM backend imports tpm2-pytss, and only when it talks to a TPM."""
    import subprocess
    import sys

    code = (
        "import sys, otaguard.agent, otaguard.agent.tpm, otaguard.cli;"
        "assert 'tpm2_pytss' not in sys.modules, 'tpm2_pytss imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
