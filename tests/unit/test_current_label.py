from types import SimpleNamespace

from store.queries import resolve_label


def event(label, source="annotator", who="ann1", action="set"):  # noqa: ANN001, ANN201
    return SimpleNamespace(label=label, source=source, annotator=who, action=action)


def test_annotator_answer_supersedes_the_import_and_is_not_a_vote_against_it() -> None:
    current = resolve_label([event("good", "import", "ingest:1"), event("scratch")])
    assert (current.label, current.source, current.status) == ("scratch", "annotator", "labeled")


def test_two_annotators_disagreeing_is_a_tie_kept_out_never_guessed() -> None:
    current = resolve_label([event("good", "import", "ingest:1"), event("scratch", who="a"), event("spot", who="b")])
    assert current.status == "tie" and current.label is None and current.agreement == 0.5


def test_majority_and_latest_answer_per_annotator() -> None:
    events = [event("spot", who="a"), event("scratch", who="b"), event("scratch", who="c"), event("scratch", who="a")]
    current = resolve_label(events)
    assert current.label == "scratch" and current.n_votes == 3 and current.agreement == 1.0


def test_deleted_annotation_falls_back_to_the_import() -> None:
    current = resolve_label([event("good", "import", "ingest:1"), event("scratch"), event(None, action="delete")])
    assert (current.label, current.source) == ("good", "import")


def test_no_events_left_is_unlabeled() -> None:
    assert resolve_label([event(None, "import", action="delete")]).status == "unlabeled"
