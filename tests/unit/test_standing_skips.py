"""A skip counts as "seen" for the annotators' queue (loop round's queue_limit) only while it stands."""
from __future__ import annotations

from pathlib import Path

from small_store import small_store
from store import session_scope
from store.models import LabelEvent
from store.queries import standing_skip_times


def test_a_skip_stands_until_its_answer_is_deleted_or_given(tmp_path: Path) -> None:
    engine, _project_id, (skipped, deleted, answered, import_only) = small_store(tmp_path, n_images=4)
    with session_scope(engine) as session:
        session.add_all([
            LabelEvent(image_id=skipped, action="skip", source="annotator", annotator="labelstudio:1", external_id="1"),
            # its task deleted in Label Studio: the pull records the skip's deletion
            LabelEvent(image_id=deleted, action="skip", source="annotator", annotator="labelstudio:1", external_id="2"),
            LabelEvent(image_id=deleted, action="delete", source="annotator", annotator="labelstudio:1", external_id="2"),
            # skipped, then answered in the same annotation
            LabelEvent(image_id=answered, action="skip", source="annotator", annotator="labelstudio:2", external_id="3"),
            LabelEvent(image_id=answered, label="scratch", source="annotator", annotator="labelstudio:2", external_id="3"),
            LabelEvent(image_id=import_only, label="good", source="import", annotator="ingest:1"),
        ])
    with session_scope(engine) as session:
        standing = standing_skip_times(session, [skipped, deleted, answered, import_only])
    assert set(standing) == {skipped} and len(standing[skipped]) == 1
