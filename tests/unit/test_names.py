"""One rule for target names and hardware ids: the release tool refuses what the server would."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import same_passphrase
from otaguard.model import OperatorError, ReleaseInfo, Version, check_hardware_id
from otaguard.model.names import check_target_name
from otaguard.repo import ImageRepository
from otaguard.server._names import parse_blob_name
from sbom_support import sbom_beside

SHA = "ab" * 32
NAMES = [
    "fw-1.0.0.img",
    "Gateway_2.bin",
    "fw+beta-1.0.0.img",  # '+' was accepted by the tool and refused by the server
    ".hidden",
    "a/b.img",
    "..",
    "fw 1.img",
    "fw%2f.img",
    "x" * 200,
    "x" * 201,
    "",
]


@pytest.mark.parametrize("name", NAMES)
def test_tool_and_server_agree_on_every_name(name: str) -> None:
    try:
        check_target_name(name)
        tool_ok = True
    except ValueError:
        tool_ok = False
    server_ok = parse_blob_name(f"{SHA}.{name}") is not None
    assert tool_ok == server_ok, name


def test_release_tool_refuses_a_name_the_server_would_refuse(tmp_path: Path) -> None:
    repo = ImageRepository.init(
        tmp_path / "repo", keys_dir=tmp_path / "keys", passphrases=same_passphrase
    )
    image = tmp_path / "fw+beta.img"
    image.write_bytes(b"firmware" * 100)
    before = repo.read_files()
    with pytest.raises(OperatorError, match=r"invalid target name 'fw\+beta-1\.0\.0\.img'"):
        repo.add_release(
            image,
            sbom=sbom_beside(image),
            version="1.0.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
        )
    assert repo.read_files() == before, "a refused release changes nothing"


@pytest.mark.parametrize("hw", ["gw v1", "", "-gw", "gw/1", "x" * 129])
def test_invalid_hardware_ids_are_refused(hw: str) -> None:
    with pytest.raises(ValueError, match="invalid hardware id"):
        check_hardware_id(hw)
    with pytest.raises(ValueError, match="invalid hardware id"):
        ReleaseInfo(Version.parse("1.0.0"), 0, (hw,), "feature")
