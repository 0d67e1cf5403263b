"""Settings of the managers' API, read from LOOP_* environment variables (pydantic-settings)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

STORE_FILENAME = "loop.db"


class Settings(BaseSettings):
    """LOOP_API_TOKEN, LOOP_API_READ_TOKEN, LOOP_LABELSTUDIO_WEBHOOK_SECRET, LOOP_DATABASE_URL, LOOP_PROJECT_DIR, ..."""

    # a refused value is not echoed: it may be a token (review: a uvicorn factory would log it)
    model_config = SettingsConfigDict(env_prefix="LOOP_", extra="ignore", hide_input_in_errors=True)

    # Full access (reads, /predict). Unset: every protected endpoint answers 401 (never an open API by accident).
    api_token: SecretStr | None = None
    # Read-only: GET endpoints and the dashboard.
    api_read_token: SecretStr | None = None
    # Shared secret that Label Studio sends in the X-Loop-Webhook-Secret header; unset: webhook refused (403).
    labelstudio_webhook_secret: SecretStr | None = None
    project_dir: Path = Path(".")
    # Any SQLAlchemy URL; unset: the project's own SQLite store, sqlite:///<project_dir>/loop.db.
    database_url: str | None = None
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, gt=0, description="largest accepted image file in /predict")
    max_upload_files: int = Field(default=64, gt=0, description="most images in one /predict request")
    # A 12000x12000 PNG is 140 KB on the wire and 430 MB decoded: pixels are capped, not only bytes. The default is
    # what ingest and the round decode (PIL's decompression-bomb limit), so no frame the model was trained on is refused;
    # /predict decodes one image at a time.
    max_upload_pixels: int = Field(default=2 * PILImage.MAX_IMAGE_PIXELS, gt=0, description="most pixels of one image in /predict (PIL refuses more than its default anyway)")

    @field_validator("api_token", "api_read_token", "labelstudio_webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # LOOP_API_TOKEN= (set, but empty) locked everyone out: `loop serve` took it as chosen and made no tokens
        # and " abc" could never match: the token sent is stripped
        return (value.strip() or None) if isinstance(value, str) else value

    @field_validator("api_token", "api_read_token", "labelstudio_webhook_secret")
    @classmethod
    def _printable_ascii(cls, value: SecretStr | None) -> SecretStr | None:
        # review: a token with "ö" never matched: clients send header bytes as UTF-8, the server reads them as latin-1
        if value is not None and not all(" " < character < "\x7f" for character in value.get_secret_value()):
            raise ValueError("must be printable ASCII without spaces (letters, digits, punctuation): "
                             "HTTP headers carry other characters in encodings clients and servers disagree on, so it would never match")
        return value

    @field_validator("api_read_token")
    @classmethod
    def _read_token_differs(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # QA: the same value for both made the "read-only" token, printed in the dashboard URL to share, a full-access one
        full = info.data.get("api_token")
        if value is not None and full is not None and value.get_secret_value() == full.get_secret_value():
            raise ValueError("the read-only token equals LOOP_API_TOKEN, so it would give full access (/predict): choose another")
        return value

    @property
    def store_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.project_dir / STORE_FILENAME).resolve()}"

    @property
    def max_request_bytes(self) -> int:
        # Multipart framing adds a little per file; anything far above the per-file limit times the count is refused unread.
        return self.max_upload_files * (self.max_upload_bytes + 64 * 1024)
