"""When an answer Label Studio lists again is a new answer: saved again after the loop recorded it (an annotator
confirming the label it was asked about), not the same save seen twice or a late webhook of an older save."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from labeling.labelstudio_backend import _saved_again
from store.models import LabelEvent

SAVED = datetime(2026, 12, 5, 22, 0, 0, 123456, tzinfo=timezone.utc)


def _event(saved_at: datetime | None) -> LabelEvent:
    return LabelEvent(image_id=1, label="scratch", source="annotator", action="set", annotator="ls-user-2", external_id="7",
                      external_updated_at=saved_at)


def test_only_a_later_save_is_a_new_answer() -> None:
    event = _event(SAVED)
    assert _saved_again(event, SAVED) is False  # listed again
    assert _saved_again(event, SAVED - timedelta(seconds=5)) is False  # a webhook of an older save, arriving late
    assert _saved_again(event, None) is False  # nothing to compare: not an answer
    assert _saved_again(event, SAVED + timedelta(seconds=2)) is True
    # SQLite hands the stored time back without its zone (stored in UTC)
    assert _saved_again(_event(SAVED.replace(tzinfo=None)), SAVED + timedelta(seconds=2)) is True
    assert _saved_again(_event(SAVED.replace(tzinfo=None)), SAVED) is False


def test_a_row_from_before_the_store_kept_the_time_gets_it_and_tells_the_next_save() -> None:
    legacy = _event(None)
    assert _saved_again(legacy, SAVED) is False  # cannot tell a re-save from the save it recorded
    assert legacy.external_updated_at == SAVED
    assert _saved_again(legacy, SAVED + timedelta(seconds=2)) is True
