"""POST /predict with the latest completed round's tiny ONNX model (grey -> good, red -> scratch, green -> spot)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.routes.predict import decide
from api_seed import SeededStore, make_settings, png_bytes
from tests.unit.png_files import png_with_data
from store.db import create_db_engine, session_scope
from store.models import LabelEvent, Prediction, Round


def _files(*items: tuple[str, bytes, str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", item) for item in items]


def test_predict_one_and_many(client: TestClient, full_headers: dict[str, str], seeded_store: SeededStore) -> None:
    response = client.post("/predict", headers=full_headers, files=_files(
        ("grey.png", png_bytes((128, 128, 128)), "image/png"),
        ("red.png", png_bytes((220, 40, 40), size=20), "image/png"),
        ("green.jpg", _jpeg((40, 200, 40)), "image/jpeg"),
    ))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["round_number"] == 2 and body["round_id"] == seeded_store.round_ids[2]  # R4 runs, R3 failed: R2 is the latest completed
    assert body["threshold"] == 0.4 and body["negative_class"] == "good" and body["class_names"] == ["good", "scratch", "spot"]
    assert (body["all_gates_passed"], body["failed_gates"]) == (True, [])
    # its FPR passed on an interval [0.004, 0.09] across the 3% gate: said, not hidden behind the pass (QA)
    assert body["unsettled_gates"] == ["negative_fpr"]
    grey, red, green = body["predictions"]
    assert [p["filename"] for p in body["predictions"]] == ["grey.png", "red.png", "green.jpg"]
    for prediction in body["predictions"]:
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction["p_defect"] == pytest.approx(1 - prediction["probabilities"]["good"], abs=1e-6)
    assert (grey["predicted_label"], grey["is_defect"]) == ("good", False)
    assert (red["predicted_label"], red["is_defect"]) == ("scratch", True)
    assert (green["predicted_label"], green["is_defect"]) == ("spot", True)
    single = client.post("/predict", headers=full_headers, files=_files(("red.png", png_bytes((220, 40, 40)), "image/png")))
    assert single.status_code == 200 and len(single.json()["predictions"]) == 1


def test_threshold_decides_not_argmax(client: TestClient, full_headers: dict[str, str]) -> None:
    # A faint red: "good" is the most probable class, yet P(defect) >= the round's threshold 0.4 -> the best defect class.
    body = client.post("/predict", headers=full_headers, files=_files(("faint.png", png_bytes((165, 110, 110)), "image/png"))).json()
    prediction = body["predictions"][0]
    probabilities = prediction["probabilities"]
    assert max(probabilities, key=probabilities.get) == "good"
    assert 0.4 <= prediction["p_defect"] < 0.5
    assert (prediction["predicted_label"], prediction["is_defect"]) == ("scratch", True)


def test_decide_rule() -> None:
    probabilities = np.array([[0.55, 0.25, 0.20], [0.7, 0.1, 0.2], [0.1, 0.3, 0.6]])
    names = ["good", "scratch", "spot"]
    assert decide(probabilities, class_names=names, negative_class="good", threshold=0.4) == [
        ("scratch", pytest.approx(0.45), True), ("good", pytest.approx(0.3), False), ("spot", pytest.approx(0.9), True)]
    # Without a threshold the cut is 0.5; without a negative class, the most probable class.
    assert [d[0] for d in decide(probabilities, class_names=names, negative_class="good", threshold=None)] == ["good", "good", "spot"]
    assert decide(probabilities, class_names=names, negative_class=None, threshold=0.4) == [("good", None, None), ("good", None, None), ("spot", None, None)]


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _gif() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("notes.txt", b"this is not an image", "is not an image PIL can read"),
        # only the formats ingest takes are opened (review: an EPS went to Ghostscript where it is installed)
        ("drawing.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n", "as PNG, JPEG, BMP, TIFF, WEBP"),
        ("still.gif", _gif(), "as PNG, JPEG, BMP, TIFF, WEBP"),
        ("empty.png", b"", "is empty"),
        ("cut.png", png_bytes((220, 40, 40), size=64)[:60], "could not be decoded"),
        # review: 92 bytes whose header says 13370x13370 were decoded (4.5 s, 780 MB) as a black part, answered 200
        ("bomb.png", png_with_data(width=13370, height=13370, bit_depth=8, colour_type=0, interlaced=False, data_bytes=13371),
         "is incomplete: its image data ends early"),
    ],
)
def test_non_image_is_422_with_reason(client: TestClient, full_headers: dict[str, str], name: str, data: bytes, reason: str) -> None:
    response = client.post("/predict", headers=full_headers, files=_files(("ok.png", png_bytes((1, 2, 3)), "image/png"), (name, data, "image/png")))
    assert response.status_code == 422
    assert name in response.json()["detail"] and reason in response.json()["detail"]


def test_upload_limits(client: TestClient, full_headers: dict[str, str]) -> None:
    big = png_bytes((1, 2, 3)) + b"\0" * 20_001  # the unit-test settings allow 20 000 bytes per file
    response = client.post("/predict", headers=full_headers, files=_files(("big.png", big, "image/png")))
    assert response.status_code == 413 and "upload limit of 20000 bytes" in response.json()["detail"]
    five = _files(*[(f"{i}.png", png_bytes((i, i, i)), "image/png") for i in range(5)])
    response = client.post("/predict", headers=full_headers, files=five)
    assert response.status_code == 413 and "at most 4" in response.json()["detail"]
    huge = client.post("/predict", headers={**full_headers, "Content-Length": "999999999", "Content-Type": "multipart/form-data; boundary=x"}, content=b"--x--")
    assert huge.status_code == 413


def test_missing_files_field_is_422(client: TestClient, full_headers: dict[str, str]) -> None:
    response = client.post("/predict", headers=full_headers, data={"other": "1"})
    assert response.status_code == 422


def test_project_without_completed_round_is_409(client: TestClient, full_headers: dict[str, str], seeded_store: SeededStore) -> None:
    response = client.post(f"/predict?project_id={seeded_store.empty_project_id}", headers=full_headers,
                           files=_files(("a.png", png_bytes((1, 2, 3)), "image/png")))
    assert response.status_code == 409 and "loop round" in response.json()["detail"]
    missing = client.post("/predict?project_id=999", headers=full_headers, files=_files(("a.png", png_bytes((1, 2, 3)), "image/png")))
    assert missing.status_code == 404


def test_missing_model_file_is_503(writable_store: SeededStore, full_headers: dict[str, str]) -> None:
    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        round_ = session.get(Round, writable_store.round_ids[2])
        round_.artifacts = {"model_onnx": "models/gone.onnx"}
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        response = client.post("/predict", headers=full_headers, files=_files(("a.png", png_bytes((1, 2, 3)), "image/png")))
    assert response.status_code == 503 and "gone.onnx" in response.json()["detail"]


def test_a_copied_project_without_its_model_file_never_serves_the_one_at_its_recorded_place(
        writable_store: SeededStore, full_headers: dict[str, str], seeded_store: SeededStore) -> None:
    # QA: a copy whose model.onnx was deleted answered with the model at the path its store recorded, in the folder it
    # was copied from, which by then held another project's model (a different class order: wrong labels at 0.90)
    (writable_store.project_dir / "models" / "round2.onnx").unlink()
    assert seeded_store.model_path.is_file()  # the recorded place still holds a model
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        response = client.post("/predict", headers=full_headers, files=_files(("a.png", png_bytes((1, 2, 3)), "image/png")))
    assert response.status_code == 503 and "round2.onnx" in response.json()["detail"], response.json()
    assert str(writable_store.project_dir) in response.json()["detail"]


def test_predict_writes_nothing_but_logs(writable_store: SeededStore, full_headers: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    engine = create_db_engine(writable_store.url)

    def counts() -> tuple[int, int]:
        with session_scope(engine) as session:
            return session.query(Prediction).count(), session.query(LabelEvent).count()

    before = counts()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client, caplog.at_level("INFO", logger="defect_loop.api.predict"):
        response = client.post("/predict", headers=full_headers, files=_files(("red.png", png_bytes((220, 40, 40)), "image/png")))
    assert response.status_code == 200
    assert counts() == before
    engine.dispose()
    assert any("file='red.png' label=scratch" in record.getMessage() for record in caplog.records)


def _brightness_model(path) -> str:  # noqa: ANN001
    """A 3-class ONNX model whose P(scratch) grows with the mean brightness (the tiny colour model cannot tell greys apart)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, 3), dtype=np.float32)
    weights[:, 1] = 1.0
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
         helper.make_node("Gemm", ["features", "weights", "bias"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "brightness", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(np.zeros(3, dtype=np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def test_an_upload_is_decoded_with_the_camera_bits_the_round_model_was_made_with(writable_store: SeededStore, full_headers: dict[str, str]) -> None:
    from PIL import Image as PILImage

    def p_scratch(client: TestClient, pixels: np.ndarray) -> float:
        buffer = io.BytesIO()
        PILImage.fromarray(pixels).save(buffer, format="PNG")
        response = client.post("/predict", headers=full_headers, files=_files(("frame.png", buffer.getvalue(), "image/png")))
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["probabilities"]["scratch"]

    # a dark 16-bit frame of a 12-bit camera, nothing above 255: "auto" keeps it as it is, the camera's 12 bits darken it
    dark_16 = np.full((8, 8), 200, dtype=np.uint16)
    engine = create_db_engine(writable_store.url)

    def set_round(bit_depth: int | None) -> None:
        with session_scope(engine) as session:
            round_ = session.get(Round, writable_store.round_ids[2])
            round_.artifacts = {**round_.artifacts, "model_onnx": _brightness_model(writable_store.project_dir / "models" / "brightness.onnx")}
            round_.details = {**round_.details, "preprocessing": {**round_.details["preprocessing"], "bit_depth": bit_depth}}

    set_round(None)
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        auto, as_200 = p_scratch(client, dark_16), p_scratch(client, np.full((8, 8), 200, dtype=np.uint8))
    set_round(12)
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        camera_12, as_12 = p_scratch(client, dark_16), p_scratch(client, np.full((8, 8), 12, dtype=np.uint8))  # 200 / 4095 * 255
    engine.dispose()
    assert auto == pytest.approx(as_200, abs=1e-6) and camera_12 == pytest.approx(as_12, abs=1e-6)
    assert camera_12 < auto - 0.1


def test_an_upload_without_a_full_token_is_refused_before_its_body_is_read_and_a_chunked_one_is_capped(
        client: TestClient, full_headers: dict[str, str], read_headers: dict[str, str]) -> None:
    # FastAPI reads (and spools to disk) a multipart body before any dependency checks the token: a request without
    # one could fill the disk; and a body sent chunked, without Content-Length, passed the size check unread
    sent: list[int] = []

    def body(n_chunks: int):  # noqa: ANN202
        for _ in range(n_chunks):
            sent.append(1)
            yield b"x" * 65536

    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401), (read_headers, 403)):
        sent.clear()
        response = client.post("/predict", content=body(100), headers={**multipart, **headers})
        assert response.status_code == status, response.text
        assert len(sent) <= 1  # refused from the headers (the client may hand over its first chunk)
    too_large = client.post("/predict", content=body(100), headers={**multipart, **full_headers})  # 6.5 MB, limit 0.34 MB
    assert too_large.status_code == 413 and "larger than the limit" in too_large.json()["detail"]


def test_an_image_with_too_many_pixels_is_413_and_one_too_small_to_be_a_part_is_422(writable_store: SeededStore, full_headers: dict[str, str]) -> None:
    # a 12000x12000 PNG is 140 KB on the wire and 430 MB decoded: six of them took the server from 1.1 to 4.5 GB
    with TestClient(create_app(make_settings(writable_store.project_dir, max_upload_pixels=1000))) as client:
        large = client.post("/predict", headers=full_headers, files=_files(("large.png", png_bytes((128, 128, 128), size=40), "image/png")))
        assert large.status_code == 413 and "40x40 pixels; at most 1000" in large.json()["detail"]
        fits = client.post("/predict", headers=full_headers, files=_files(("fits.png", png_bytes((128, 128, 128), size=30), "image/png")))
        assert fits.status_code == 200
        for size in (1, 7):
            tiny = client.post("/predict", headers=full_headers, files=_files(("tiny.png", png_bytes((0, 0, 0), size=size), "image/png")))
            assert tiny.status_code == 422 and "too small" in tiny.json()["detail"]


def test_an_image_over_pils_own_pixel_guard_is_413_too_whatever_the_setting(writable_store: SeededStore, full_headers: dict[str, str],
                                                                              monkeypatch) -> None:  # noqa: ANN001
    from PIL import Image as PILImage

    # PIL refuses twice its MAX_IMAGE_PIXELS before max_upload_pixels is read: that was a 422, so at the default setting
    # (that limit) no 413 was ever given. Scaled down: a guard of 2 x 500 pixels, a 40x40 image
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)
    with TestClient(create_app(make_settings(writable_store.project_dir, max_upload_pixels=10**9))) as client:
        bomb = client.post("/predict", headers=full_headers, files=_files(("bomb.png", png_bytes((128, 128, 128), size=40), "image/png")))
    assert bomb.status_code == 413 and "too many pixels" in bomb.json()["detail"]


def test_an_answer_says_when_the_model_serving_it_failed_its_gates(writable_store: SeededStore, full_headers: dict[str, str]) -> None:
    # QA: /predict serves the newest completed round's model whatever its gates said, and its answer did not say so
    from api.app import create_app
    from api_seed import make_settings
    from store.db import create_db_engine, session_scope
    from store.models import GateResult

    engine = create_db_engine(writable_store.url)
    with session_scope(engine) as session:
        for gate in session.query(GateResult).filter(GateResult.round_id == writable_store.round_ids[2], GateResult.name.in_(("macro_f1", "latency_ms"))):
            gate.passed = False
    engine.dispose()
    with TestClient(create_app(make_settings(writable_store.project_dir))) as client:
        response = client.post("/predict", headers=full_headers, files=_files(("grey.png", png_bytes((128, 128, 128)), "image/png")))
    assert response.status_code == 200, response.text
    assert (response.json()["all_gates_passed"], sorted(response.json()["failed_gates"])) == (False, ["latency_ms", "macro_f1"])


def test_requests_at_once_decode_no_more_full_size_images_at_once_than_the_cap(client: TestClient, full_headers: dict[str, str],
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # review: 40 requests at once could each hold a 179 MP frame (~780 MB) while decoding it
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from api.routes import predict

    real_decode, lock, state = predict.decode_image, threading.Lock(), {"now": 0, "most": 0}

    def slow_decode(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        try:
            return real_decode(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(predict, "decode_image", slow_decode)
    cap = predict.FULL_SIZE_DECODES._initial_value

    def one(index: int) -> int:
        return client.post("/predict", headers=full_headers, files=_files((f"{index}.png", png_bytes((index, 9, 9)), "image/png"))).status_code

    with ThreadPoolExecutor(max_workers=3 * cap) as pool:
        codes = list(pool.map(one, range(3 * cap)))
    assert codes == [200] * (3 * cap)
    assert 1 <= state["most"] <= cap


def test_predict_answers_without_loading_torch(seeded_store: SeededStore) -> None:
    # The API serves the ONNX file with ONNX Runtime; importing torch (through the session helper's module) cost the
    # first /predict 3 s and the serving process hundreds of MB for nothing
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    script = (
        "import sys; sys.path.insert(0, 'tests/unit/api')\n"
        "from pathlib import Path\n"
        "from fastapi.testclient import TestClient\n"
        "from api.app import create_app\n"
        "from api_seed import FULL_TOKEN, make_settings, png_bytes\n"
        f"with TestClient(create_app(make_settings(Path({str(seeded_store.project_dir)!r})))) as client:\n"
        "    response = client.post('/predict', headers={'Authorization': f'Bearer {FULL_TOKEN}'},\n"
        "                           files=[('files', ('grey.png', png_bytes((128, 128, 128)), 'image/png'))])\n"
        "print(response.status_code, 'torch' in sys.modules)\n"
    )
    answered = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert answered.stdout.split() == ["200", "False"], answered.stderr[-2000:]
