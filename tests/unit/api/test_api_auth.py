"""Tokens and scopes: 401 without or with an unknown token, 403 for the read token on full-access endpoints."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api_seed import FULL_TOKEN, READ_TOKEN, make_settings

READ_PATHS = ["/version", "/projects", "/projects/1/rounds", "/projects/1/progress", "/projects/1/annotators", "/rounds/1", "/rounds/1/label-issues", "/rounds/1/selection"]


def test_health_is_open(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


@pytest.mark.parametrize("path", READ_PATHS + ["/dashboard", "/images/1"])
def test_no_token_is_401_with_json_body(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert "token" in response.json()["detail"]


@pytest.mark.parametrize("path", READ_PATHS)
def test_unknown_token_is_401(client: TestClient, path: str) -> None:
    response = client.get(path, headers={"Authorization": "Bearer not-a-token"})
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid token"}


@pytest.mark.parametrize("token", [READ_TOKEN, FULL_TOKEN])
@pytest.mark.parametrize("path", READ_PATHS)
def test_both_tokens_read(client: TestClient, path: str, token: str) -> None:
    assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_read_token_on_predict_is_403(client: TestClient, read_headers: dict[str, str]) -> None:
    response = client.post("/predict", headers=read_headers, files=[("files", ("a.png", b"x", "image/png"))])
    assert response.status_code == 403
    assert "full-access token" in response.json()["detail"]


def test_predict_without_token_is_401_before_looking_at_files(client: TestClient) -> None:
    response = client.post("/predict", files=[("files", ("a.txt", b"not an image", "text/plain"))])
    assert response.status_code == 401


def test_query_token_only_for_browser_pages(client: TestClient) -> None:
    # The dashboard and images take ?token= (a browser sends no header); the JSON API does not.
    assert client.get(f"/dashboard?token={READ_TOKEN}").status_code == 200
    assert client.get(f"/projects?token={READ_TOKEN}").status_code == 401
    assert client.get("/dashboard?token=wrong").status_code == 401
    # and a browser without any is told how a browser sends one
    assert "open the page with `?token=<read token>`" in client.get("/dashboard").json()["detail"]
    assert client.get("/projects").json()["detail"] == "missing token: send `Authorization: Bearer <token>`"


def test_server_without_tokens_refuses_everything_but_health(seeded_store) -> None:  # noqa: ANN001
    with TestClient(create_app(make_settings(seeded_store.project_dir, api_token=None, api_read_token=None))) as open_client:
        response = open_client.get("/projects", headers={"Authorization": "Bearer anything"})
        assert response.status_code == 401
        assert "LOOP_API_TOKEN" in response.json()["detail"]
        assert open_client.get("/health").status_code == 200


def test_settings_come_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    from api.settings import Settings

    monkeypatch.setenv("LOOP_API_TOKEN", "env-full")
    monkeypatch.setenv("LOOP_API_READ_TOKEN", "env-read")
    monkeypatch.setenv("LOOP_LABELSTUDIO_WEBHOOK_SECRET", "env-hook")
    monkeypatch.setenv("LOOP_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("LOOP_MAX_UPLOAD_BYTES", "1234")
    settings = Settings()
    assert settings.api_token.get_secret_value() == "env-full"
    assert settings.api_read_token.get_secret_value() == "env-read"
    assert settings.labelstudio_webhook_secret.get_secret_value() == "env-hook"
    assert settings.max_upload_bytes == 1234
    assert settings.store_url == f"sqlite:///{(tmp_path / 'loop.db').resolve()}"
    assert "env-full" not in repr(settings)  # secrets never printed
    monkeypatch.setenv("LOOP_DATABASE_URL", "postgresql://db.example/loop")
    assert Settings().store_url == "postgresql://db.example/loop"


def test_missing_store_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="loop init"):
        create_app(make_settings(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere" / "loop.db").exists()


def test_unknown_route_is_json_404(client: TestClient, read_headers: dict[str, str]) -> None:
    response = client.get("/no-such-thing", headers=read_headers)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


def test_an_empty_token_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # LOOP_API_TOKEN= took an empty token as chosen: `loop serve` made none, and every request was a 401
    from api.settings import Settings

    monkeypatch.setenv("LOOP_API_TOKEN", "")
    monkeypatch.setenv("LOOP_API_READ_TOKEN", "  ")
    monkeypatch.setenv("LOOP_LABELSTUDIO_WEBHOOK_SECRET", "")
    settings = Settings()
    assert (settings.api_token, settings.api_read_token, settings.labelstudio_webhook_secret) == (None, None, None)
    monkeypatch.setenv("LOOP_API_TOKEN", " chosen\n")  # the token sent is stripped: kept as is, it could never match
    assert Settings().api_token.get_secret_value() == "chosen"


@pytest.mark.parametrize("variable", ["LOOP_API_TOKEN", "LOOP_API_READ_TOKEN", "LOOP_LABELSTUDIO_WEBHOOK_SECRET"])
def test_a_token_a_header_cannot_carry_alike_everywhere_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    # review: "tökén-full-123456" never matched: curl sends the header as UTF-8, the server reads it as latin-1 (401)
    from pydantic import ValidationError

    from api.settings import Settings

    monkeypatch.setenv(variable, "tökén-full-123456")
    with pytest.raises(ValidationError, match="printable ASCII"):
        Settings()
    monkeypatch.setenv(variable, "plain-ASCII_token.123~!")
    assert getattr(Settings(), variable.removeprefix("LOOP_").lower()).get_secret_value() == "plain-ASCII_token.123~!"
