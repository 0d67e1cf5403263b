"""labeling.labelstudio_client against a real Label Studio: tokens, project setup, local files, tasks."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from PIL import Image as PILImage

from labeling import labelstudio_client as lsc
from labeling import labelstudio_server as lss

pytestmark = pytest.mark.labelstudio

CLASSES = ["good", "scratch", "spot"]


def test_connect_accepts_legacy_token_and_personal_access_token(labelstudio) -> None:
    legacy = lsc.connect(labelstudio.url, labelstudio.token)
    assert legacy.users.whoami().email == labelstudio.server.username

    # A personal access token (a JWT refresh token) of annotator B: the SDK exchanges it for a Bearer token.
    pat = labelstudio.as_annotator("annotator-b@example.com").tokens.create().token
    assert pat.count(".") == 2 and pat != labelstudio.annotator_tokens["annotator-b@example.com"]
    assert lsc.connect(labelstudio.url, pat).users.whoami().email == "annotator-b@example.com"


def test_connect_names_the_setting_for_a_wrong_token_and_reports_an_unreachable_server(labelstudio) -> None:
    with pytest.raises(lsc.LabelStudioAuthError) as wrong:
        lsc.connect(labelstudio.url, "0" * 40)
    assert "LABEL_STUDIO_API_KEY" in str(wrong.value) and "[annotator] labelstudio_api_key" in str(wrong.value)
    with pytest.raises(lsc.LabelStudioAuthError, match="LABEL_STUDIO_API_KEY"):
        lsc.connect(labelstudio.url, "")
    with pytest.raises(lsc.LabelStudioConfigError, match="LABEL_STUDIO_URL"):
        lsc.connect(None, labelstudio.token)
    closed_port = lss.free_port()  # nothing listens there
    with pytest.raises(lsc.LabelStudioUnavailable, match="unreachable"):
        lsc.connect(f"http://127.0.0.1:{closed_port}", labelstudio.token)


def test_label_config_has_one_required_choice_per_class_with_descriptions_as_hints() -> None:
    config = lsc.label_config_for(["good", "scratch & dent"], {"scratch & dent": 'a "bright" line'})
    assert '<Image name="image" value="$image"' in config
    assert '<Choice value="good"/>' in config
    assert '<Choice value="scratch &amp; dent" hint=\'a "bright" line\'/>' in config
    assert 'required="true"' in config and 'choice="single-radio"' in config
    instructions = lsc.instructions_for(["good", "scratch & dent"], {"scratch & dent": "a bright line"})
    assert "<b>scratch &amp; dent</b>: a bright line" in instructions
    with pytest.raises(ValueError, match="at least two classes"):
        lsc.label_config_for(["only"])


def test_a_long_title_taken_by_another_store_still_gets_a_project_of_its_own(labelstudio, tmp_path: Path) -> None:
    client = lsc.connect(labelstudio.url, labelstudio.token)
    title = f"defect-loop {tmp_path.name}-{'x' * 60}"  # past Label Studio's 50 characters
    key_a, key_b = "a" * 8 + tmp_path.name[-8:].rjust(8, "0"), "b" * 8 + tmp_path.name[-8:].rjust(8, "0")
    first = lsc.ensure_project(client, title=title, classes=CLASSES, key=key_a)
    second = lsc.ensure_project(client, title=title, classes=CLASSES, key=key_b)
    assert first != second and client.projects.get(id=second).title.endswith(f" ({key_b[:8]})")
    assert len(client.projects.get(id=second).title) <= lsc.PROJECT_TITLE_MAX
    assert lsc.ensure_project(client, title=title, classes=CLASSES, key=key_b) == second  # found again by its key
    # a stored id that holds another store's project (a new server whose ids started over) is not taken
    assert lsc.ensure_project(client, title=title, classes=CLASSES, key=key_b, known_project_id=first) == second


def test_ensure_project_reuses_by_title_and_storage_serves_images_in_place(labelstudio, tmp_path: Path) -> None:
    client = lsc.connect(labelstudio.url, labelstudio.token)
    title = f"client-{tmp_path.name}"[-50:]
    first = lsc.ensure_project(client, title=title, classes=CLASSES, descriptions={"spot": "a round stain"})
    again = lsc.ensure_project(client, title=title, classes=[*CLASSES, "dent"], descriptions={"spot": "a round stain"})
    assert first == again
    project = client.projects.get(id=first)
    assert '<Choice value="dent"/>' in project.label_config  # the reused project follows the classes
    assert "a round stain" in project.expert_instruction

    folder = tmp_path / "imgs"
    folder.mkdir()
    image = folder / "part 1.png"  # a space: the URL must be quoted
    PILImage.new("RGB", (9, 9), (10, 20, 30)).save(image)
    storage = lsc.ensure_local_storage(client, project_id=first, path=str(folder))
    assert lsc.ensure_local_storage(client, project_id=first, path=str(folder)) == storage
    url = lsc.local_files_url(str(image), document_root=str(labelstudio.document_root))
    assert url.startswith("/data/local-files/?d=") and "part%201.png" in url
    with pytest.raises(ValueError, match="document root"):
        lsc.local_files_url("/elsewhere/x.png", document_root=str(labelstudio.document_root))

    served = httpx.get(labelstudio.url + url, headers={"Authorization": f"Token {labelstudio.token}"})
    assert served.status_code == 200 and served.content == image.read_bytes()
    assert httpx.get(labelstudio.url + url).status_code in (401, 403)  # a browser without a session gets nothing

    task_ids = lsc.import_tasks_with_predictions(
        client, project_id=first,
        tasks=[{"data": {"image": url, "why": "test"}, "predictions": [{"model_version": "round-1", "score": 0.8, "result": lsc.choice_result("spot")}]}],
    )  # fmt: skip
    assert len(task_ids) == 1
    assert lsc.list_annotated_tasks(client, project_id=first) == []
    client.annotations.create(id=task_ids[0], result=lsc.choice_result("good"), lead_time=4.5)
    (row,) = lsc.list_annotated_tasks(client, project_id=first)
    assert row["task_id"] == task_ids[0] and row["choices"] == ["good"] and row["predicted"] == ["spot"]
    assert row["lead_time"] == 4.5 and row["was_cancelled"] is False and row["updated_at"]
    json.dumps(row)  # plain values only
