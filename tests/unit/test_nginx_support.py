"""Under CI=true a missing nginx fails the nginx tests; elsewhere it skips them."""

from __future__ import annotations

import pytest

import nginx_support


@pytest.fixture
def no_nginx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nginx_support, "NGINX", "/nonexistent/nginx")
    monkeypatch.setenv("PATH", "/nonexistent")


@pytest.mark.usefixtures("no_nginx")
def test_a_missing_nginx_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="nginx tests need nginx"):
        nginx_support.require_nginx()


@pytest.mark.usefixtures("no_nginx")
def test_a_missing_nginx_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install nginx-light"):
        nginx_support.require_nginx()


def test_the_template_leaves_no_placeholder_unfilled() -> None:
    with pytest.raises(AssertionError, match="placeholder"):
        nginx_support.render({"LISTEN": "1"})
