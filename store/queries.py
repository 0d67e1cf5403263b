"""Queries shared by the loop, the labeling backends and the API."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.models import Image, LabelEvent, LabelIssue, Project, Round, Selection

ANNOTATOR_SOURCES = ("annotator", "oracle")
# Selections that draw a random sample of the pool (or re-ask for an already labeled image): what they label stands
# for the pool the way imported labels do. Every other strategy picks by the model's scores.
SAMPLING_SELECTION_STRATEGIES = ("random", "label_quality")


@dataclass(frozen=True)
class CurrentLabel:
    label: str | None  # None: unlabeled, or annotators tied
    source: str | None  # import | annotator | oracle
    status: str  # labeled | tie | unlabeled
    n_votes: int = 0
    agreement: float | None = None  # share of annotators agreeing with the majority


def one_project_per_store(session: Session, *, store: str) -> None:
    """A store holds one project (get_project takes the first): raise ValueError naming them when it holds more, which
    two `loop init` on one database URL made before init refused that; every command would act on the first."""
    projects = session.scalars(select(Project).order_by(Project.id)).all()
    if len(projects) > 1:
        listed = ", ".join(f"{p.name!r} (folder {p.root_dir})" for p in projects)
        raise ValueError(f"the store at {store} holds {len(projects)} projects: {listed}; defect-loop keeps one project per store "
                         f"and would act on {projects[0].name!r} alone. Give each project its own database")


def get_project(session: Session, name: str | None = None) -> Project:
    query = select(Project) if name is None else select(Project).where(Project.name == name)
    project = session.scalars(query.order_by(Project.id)).first()
    if project is None:
        store = session.get_bind().url.render_as_string(hide_password=True)
        raise LookupError(f"no project {name!r} in the store at {store}" if name else
                          f"no project in the store at {store}: run `loop init` first (a project made with LOOP_DATABASE_URL set needs it set again)")
    return project


def class_but_for_case(label: str, classes: list[str] | set[str]) -> str | None:
    """The class `label` names but for case ('Free' for free), for the hint beside its refusal (QA); None if none."""
    return next((name for name in classes if name.casefold() == label.casefold()), None)


def resolve_label(events: list[LabelEvent]) -> CurrentLabel:
    """The current label from one image's events, oldest first.

    An annotator's answer supersedes the imported label (it is not a vote against it). Each annotator counts
    once, with their latest answer; several annotators -> majority; a tie is kept out of training, never guessed.
    """
    imported: str | None = None
    votes: dict[str, str | None] = {}
    vote_source: dict[str, str] = {}
    for event in events:
        if event.action == "skip":
            continue
        value = event.label if event.action == "set" else None
        if event.source in ANNOTATOR_SOURCES:
            key = f"{event.source}:{event.annotator or ''}"
            votes[key] = value
            vote_source[key] = event.source
        else:
            imported = value
    live_votes = {who: label for who, label in votes.items() if label is not None}
    if live_votes:
        counts = Counter(live_votes.values()).most_common()
        top_label, top_count = counts[0]
        agreement = top_count / len(live_votes)
        if len(counts) > 1 and counts[1][1] == top_count:
            return CurrentLabel(None, "annotator", "tie", len(live_votes), agreement)
        source = "oracle" if all(vote_source[w] == "oracle" for w in live_votes) else "annotator"
        return CurrentLabel(top_label, source, "labeled", len(live_votes), agreement)
    if imported is not None:
        return CurrentLabel(imported, "import", "labeled")
    return CurrentLabel(None, None, "unlabeled")


def current_labels(session: Session, project_id: int) -> dict[int, CurrentLabel]:
    """image id -> current label, for every image of the project that has any label event."""
    rows = session.execute(
        select(LabelEvent).join(Image, Image.id == LabelEvent.image_id).where(Image.project_id == project_id).order_by(LabelEvent.id)
    ).scalars()
    events_by_image: dict[int, list[LabelEvent]] = defaultdict(list)
    for event in rows:
        events_by_image[event.image_id].append(event)
    return {image_id: resolve_label(events) for image_id, events in events_by_image.items()}


def images_by_id(session: Session, project_id: int, *, only_ok: bool = True) -> dict[int, Image]:
    query = select(Image).where(Image.project_id == project_id)
    if only_ok:
        query = query.where(Image.status == "ok")
    return {image.id: image for image in session.scalars(query.order_by(Image.id))}


def latest_completed_round(session: Session, project_id: int) -> Round | None:
    return session.scalars(
        select(Round).where(Round.project_id == project_id, Round.status == "completed").order_by(Round.number.desc())
    ).first()


def next_round_number(session: Session, project_id: int) -> int:
    last = session.scalars(select(Round.number).where(Round.project_id == project_id).order_by(Round.number.desc())).first()
    return (last or 0) + 1


def actively_selected_image_ids(session: Session, project_id: int) -> set[int]:
    """Images some round selected by a strategy that ranks by the model (uncertainty, rarity, diversity), not at
    random: their labels are not a random sample of the pool, which the defect threshold has to allow for."""
    return set(session.scalars(
        select(Selection.image_id).join(Round, Round.id == Selection.round_id)
        .where(Round.project_id == project_id, Selection.strategy.not_in(SAMPLING_SELECTION_STRATEGIES))
    ))


def rename_label(session: Session, project_id: int, old: str, new: str) -> tuple[int, int]:
    """Every label event of the project's images saying `old` now says `new` (a class renamed, or merged into another):
    (events changed, images they label), and every label issue naming `old` as the label given or suggested. Predictions
    and selections of past rounds keep the names they were made with.
    The project row keeps the rename (record_class_rename): answers given later under `old` are taken as `new`."""
    events = session.scalars(select(LabelEvent).join(Image, Image.id == LabelEvent.image_id)
                             .where(Image.project_id == project_id, LabelEvent.label == old)).all()
    for event in events:
        event.label = new
    # the label issues name the labels they question: renamed with them, or a rename read as a relabel (QA: the export
    # and dashboard took the renamed suspects as answered, and the next round asked again about images asked before)
    rounds = select(Round.id).where(Round.project_id == project_id).scalar_subquery()
    for column in (LabelIssue.given_label, LabelIssue.suggested_label):
        session.execute(update(LabelIssue).where(LabelIssue.round_id.in_(rounds), column == old).values({column: new})
                        .execution_options(synchronize_session=False))
    project = session.get(Project, project_id)
    if project is not None:
        record_class_rename(project, old, new)
    return len(events), len({event.image_id for event in events})


def record_class_rename(project: Project, old: str, new: str) -> None:
    """Keep in the project row that `old` was renamed to `new` (see renamed_classes). Chains are resolved here, as
    they happen: a name renamed into `old` before now means `new` (a -> b, then b -> c: a -> c), and `new` itself is a
    class again, so an earlier rename away from it no longer holds. Every name kept maps straight to the class it
    became, never through a name that may later be made a class of its own again (loop.toml reusing it)."""
    if old == new:
        return
    renames = {str(k): (new if str(v) == old else str(v)) for k, v in (project.class_renames or {}).items() if str(k) != new}
    renames[old] = new
    project.class_renames = renames  # a new dict: SQLAlchemy sees a JSON column change only on assignment


def renamed_classes(project: Project) -> dict[str, str]:
    """Old class name -> the class of the project it means now, for every class `loop rename-class` renamed away: an
    answer naming it (a draft saved before the rename and submitted after, an editor left open during it) is an answer
    for that class. record_class_rename keeps each name pointing at the class it was last renamed into (a -> b, then
    b -> c: a means c, even when b is made a class again later); a name that is a class of the project again means
    itself (left out), and one whose class is no class any more (removed since) is left out."""
    classes = set(project.classes or [])
    return {str(old): str(new) for old, new in (project.class_renames or {}).items() if str(old) not in classes and str(new) in classes}


def requeue_newest_asks(session: Session, project_id: int, image_ids: set[int]) -> int:
    """The newest pushed ask of each image whose waiting task is gone from the annotation tool (deleted there, or in a
    Label Studio project that is no longer the store's), pending again: the next push asks in a new task."""
    if not image_ids:
        return 0
    newest: dict[int, Selection] = {}
    for selection in session.scalars(select(Selection).join(Round, Round.id == Selection.round_id).where(
            Round.project_id == project_id, Selection.image_id.in_(sorted(image_ids)), Selection.push_status == "pushed").order_by(Selection.id)):
        newest[selection.image_id] = selection
    for selection in newest.values():
        selection.push_status = "pending"
    return len(newest)


def _newest_event_per_answer(session: Session, image_ids: list[int], *, actions: tuple[str, ...]) -> dict[tuple[int, str], tuple[str, datetime]]:
    """(image id, answer id) -> the action and time of that answer's newest event among `actions`, annotators' and the
    oracle's; an event without an answer id (the oracle's) is an answer of its own."""
    newest: dict[tuple[int, str], tuple[str, datetime]] = {}
    for chunk in range(0, len(image_ids), 500):  # SQLite limits the variables of one statement
        for event_id, image_id, external_id, action, created_at in session.execute(
                select(LabelEvent.id, LabelEvent.image_id, LabelEvent.external_id, LabelEvent.action, LabelEvent.created_at).where(
                    LabelEvent.image_id.in_(image_ids[chunk:chunk + 500]), LabelEvent.action.in_(actions),
                    LabelEvent.source.in_(ANNOTATOR_SOURCES)).order_by(LabelEvent.id)):
            newest[(image_id, external_id if external_id is not None else f"event {event_id}")] = (action, created_at)
    return newest


def _times_by_image(newest: dict[tuple[int, str], tuple[str, datetime]], *, actions: tuple[str, ...]) -> dict[int, list[datetime]]:
    times: dict[int, list[datetime]] = defaultdict(list)
    for (image_id, _answer), (action, when) in newest.items():
        if action in actions and when is not None:
            times[image_id].append(when)
    return dict(times)


def standing_skip_times(session: Session, image_ids: list[int]) -> dict[int, list[datetime]]:
    """Image id -> when each annotator's skip that still stands was recorded: the skip is its answer id's newest event
    (not deleted in the annotation tool since, with its task say, nor replaced by an answer)."""
    return _times_by_image(_newest_event_per_answer(session, image_ids, actions=("set", "skip", "delete")), actions=("skip",))


def standing_answer_times(session: Session, image_ids: list[int], *, deletions_count: bool = False) -> dict[int, list[datetime]]:
    """Image id -> when each of its annotators' (or the oracle's) answers that still stand was recorded: the newest save
    of each answer id; an answer deleted since is none, a skip answers nothing (it replaces no answer), an event
    without an answer id (the oracle's) is an answer of its own. deletions_count: a deletion's time counts too (a change
    that settles a tie). Times as the store gives them (SQLite: without their zone, UTC)."""
    newest = _newest_event_per_answer(session, image_ids, actions=("set", "delete"))
    return _times_by_image(newest, actions=("set", "delete") if deletions_count else ("set",))
