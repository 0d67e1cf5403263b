"""Images are served by store id only: the path comes from the store row, never from the request."""
from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from api_seed import READ_TOKEN, SeededStore, make_settings
from store.db import create_db_engine, session_scope
from store.models import Image


def test_image_by_id(client: TestClient, read_headers: dict[str, str], seeded_store: SeededStore) -> None:
    image_id = seeded_store.image_ids[0]
    response = client.get(f"/images/{image_id}", headers=read_headers)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == (seeded_store.project_dir / "images" / "img01.png").read_bytes()
    assert client.get(f"/images/{image_id}?token={READ_TOKEN}").status_code == 200  # an <img> in the dashboard


def test_no_path_traversal(client: TestClient, read_headers: dict[str, str]) -> None:
    for path in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/../../etc/passwd", "/images/%2Fetc%2Fpasswd", "/images/1%2F..%2F2"):
        response = client.get(path, headers=read_headers)
        assert response.status_code in (404, 422), path
        assert b"root:" not in response.content
    assert client.get("/images/999", headers=read_headers).status_code == 404


def test_changed_or_missing_file_is_refused(writable_store: SeededStore, read_headers: dict[str, str], tmp_path: Path) -> None:
    changed = tmp_path / "changed.png"
    changed.write_bytes(b"original")
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        first = session.get(Image, writable_store.image_ids[0])
        first.path, first.sha256 = str(changed), hashlib.sha256(b"original").hexdigest()
        second = session.get(Image, writable_store.image_ids[1])
        second.path = str(tmp_path / "moved-away.png")
    engine.dispose()
    changed.write_bytes(b"tampered")
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        response = client.get(f"/images/{writable_store.image_ids[0]}", headers=read_headers)
        assert response.status_code == 409 and "changed on disk" in response.json()["detail"]
        response = client.get(f"/images/{writable_store.image_ids[1]}", headers=read_headers)
        assert response.status_code == 404 and "file is missing" in response.json()["detail"]


def test_display_view_shows_tiff_and_16_bit_files_as_the_model_sees_them(writable_store: SeededStore, read_headers: dict[str, str],
                                                                           tmp_path: Path) -> None:
    # no browser shows a TIFF, and a 12-bit frame in 16 bits shows nearly black: the dashboard's thumbnails were blank
    import io

    import numpy as np
    from PIL import Image as PILImage

    frame = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)
    files = {"frame.tif": "TIFF", "frame16.png": "PNG"}
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        for (name, kind), image_id in zip(files.items(), writable_store.image_ids[:2]):
            PILImage.fromarray(frame).save(tmp_path / name, format=kind)
            row = session.get(Image, image_id)
            row.path, row.sha256 = str(tmp_path / name), hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    engine.dispose()
    plain_id, damaged_id = writable_store.image_ids[2], writable_store.image_ids[3]
    damaged = tmp_path / "damaged16.png"
    buffer = io.BytesIO()
    PILImage.fromarray(frame).save(buffer, format="PNG")
    damaged.write_bytes(buffer.getvalue()[:60] + b"\x00" * 40 + buffer.getvalue()[100:])  # a broken chunk: PIL raises SyntaxError
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        row = session.get(Image, damaged_id)
        row.path, row.sha256 = str(damaged), hashlib.sha256(damaged.read_bytes()).hexdigest()
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        broken = client.get(f"/images/{damaged_id}?view=display", headers=read_headers)
        assert broken.status_code == 200 and broken.content == damaged.read_bytes()  # the file as it is, not a 500
        for (name, _kind), image_id in zip(files.items(), writable_store.image_ids[:2]):
            as_stored = client.get(f"/images/{image_id}", headers=read_headers)
            assert as_stored.content == (tmp_path / name).read_bytes()  # the file, byte for byte, unless asked
            shown = client.get(f"/images/{image_id}?view=display", headers=read_headers)
            assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
            pixels = np.asarray(PILImage.open(io.BytesIO(shown.content)))
            assert pixels.shape == (64, 64, 3) and pixels.max() == 255  # scaled over 12 bits, not clipped or dark
        unchanged = client.get(f"/images/{plain_id}?view=display", headers=read_headers)
        assert unchanged.content == client.get(f"/images/{plain_id}", headers=read_headers).content  # an 8-bit PNG as it is


def test_the_display_view_uses_the_camera_bits_of_the_latest_model(writable_store: SeededStore, read_headers: dict[str, str], tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image as PILImage

    from store.models import Round

    frame = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)  # a 12-bit frame, read as a 16-bit camera's
    PILImage.fromarray(frame).save(tmp_path / "frame16.png")
    image_id = writable_store.image_ids[0]
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        row = session.get(Image, image_id)
        row.path, row.sha256 = str(tmp_path / "frame16.png"), hashlib.sha256((tmp_path / "frame16.png").read_bytes()).hexdigest()
        round_ = session.get(Round, writable_store.round_ids[2])  # the latest completed round
        round_.details = {**round_.details, "preprocessing": {**round_.details["preprocessing"], "bit_depth": 16}}
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        shown = client.get(f"/images/{image_id}?view=display", headers=read_headers)
    assert shown.status_code == 200 and np.asarray(PILImage.open(io.BytesIO(shown.content))).max() == 16  # 4095 / 65535 * 255


def test_a_fifo_in_place_of_an_image_is_404_not_a_worker_blocked_for_ever(writable_store: SeededStore, read_headers: dict[str, str], tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "part.png"
    os.mkfifo(fifo)
    image_id = writable_store.image_ids[0]
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        session.get(Image, image_id).path = str(fifo)
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        assert client.get(f"/images/{image_id}", headers=read_headers).status_code == 404


def test_an_image_carries_its_content_hash_as_etag_and_a_browser_that_has_it_gets_304(client: TestClient, read_headers: dict[str, str],
                                                                                       seeded_store: SeededStore) -> None:
    image_id = seeded_store.image_ids[0]
    first = client.get(f"/images/{image_id}", headers=read_headers)
    etag = first.headers["etag"]
    again = client.get(f"/images/{image_id}", headers={**read_headers, "If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    display = client.get(f"/images/{image_id}?view=display", headers=read_headers)
    assert display.headers["etag"] != etag  # another representation: another tag (it follows the decoding)
    assert client.get(f"/images/{image_id}?view=display", headers={**read_headers, "If-None-Match": etag}).status_code == 200
    assert client.get(f"/images/{seeded_store.image_ids[1]}", headers={**read_headers, "If-None-Match": etag}).status_code == 200
    # a list, a weak tag and `*` match; a tag inside other text does not (QA: a substring test gave 304 to xx"<sha>"xx)
    for header, status in ((f'"other", {etag}', 304), (f"W/{etag}", 304), ("*", 304), (f"xx{etag}xx", 200), (etag[:-1], 200)):
        assert client.get(f"/images/{image_id}", headers={**read_headers, "If-None-Match": header}).status_code == status, header


def test_every_get_route_answers_head_with_its_headers_and_no_body(client: TestClient, seeded_store: SeededStore,
                                                                   read_headers: dict[str, str]) -> None:
    # QA: HEAD on /dashboard, /rounds and /images answered 405 (uptime probes and link checkers ask with HEAD)
    assert client.head("/health").status_code == 200
    for path in ("/dashboard", f"/projects/{seeded_store.project_id}/rounds", f"/rounds/{seeded_store.round_ids[1]}",
                 f"/images/{seeded_store.image_ids[0]}"):
        got, head = client.get(path, headers=read_headers), client.head(path, headers=read_headers)
        assert (head.status_code, head.content) == (200, b""), path
        assert (head.headers["content-type"], head.headers.get("etag")) == (got.headers["content-type"], got.headers.get("etag")), path
        assert head.headers["content-length"] == str(len(got.content)), path
    assert client.head("/dashboard").status_code == 401  # the token is checked as for GET
    assert client.head("/predict", headers=read_headers).status_code == 405
    # an export's HEAD says what a download would be without writing it (review: a link checker's HEAD wrote a whole
    # export and held the one-at-a-time lock, so a manager's download meanwhile got 429)
    from api.routes import projects

    export = f"/projects/{seeded_store.project_id}/export?format=jsonl"
    got = client.get(export, headers=read_headers)
    with projects._EXPORTING:  # an export being written
        head = client.head(export, headers=read_headers)
        assert client.get(export, headers=read_headers).status_code == 429
    assert (head.status_code, head.content) == (200, b"")
    assert (head.headers["content-type"], head.headers["content-disposition"]) == (got.headers["content-type"], got.headers["content-disposition"])
