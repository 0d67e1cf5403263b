"""Thin functions over label-studio-sdk 2.x: connect, project + storage setup, task import, annotation listing.

Plain values in, plain values (ids, dicts) out, so the backend and the tests never depend on the SDK's
pydantic types, which differ by caller role (in `tasks.list` annotations come as dicts, predictions as models).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

URL_SETTING = "LABEL_STUDIO_URL / loop.toml [annotator] labelstudio_url"
API_KEY_SETTING = "LABEL_STUDIO_API_KEY / loop.toml [annotator] labelstudio_api_key"
IMAGE_NAME = "image"  # the <Image> object tag: task data key holding the image URL
CHOICES_NAME = "label"  # the <Choices> control tag: from_name of every result we read or write
WHY_NAME = "why"  # the <Text> tag showing why the image was picked
PROJECT_TITLE_MAX = 50  # Label Studio refuses longer project titles
WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")
REOPENED_FROM_OVERLAP = "reopened_from_overlap"  # task data key: set while a reopened task waits for its answer


class LabelStudioError(Exception):
    """Anything Label Studio related that the loop reports as one clear line."""


class LabelStudioConfigError(LabelStudioError, ValueError):
    """URL or token not configured."""


class LabelStudioAuthError(LabelStudioError, ValueError):
    """Label Studio refused the token: a configuration error, never retried."""


class LabelStudioUnavailable(LabelStudioError, ConnectionError):
    """Label Studio did not answer: the loop goes on locally and retries next round."""


def connect(url: str | None, api_key: str | None, *, timeout_s: float = 30.0) -> LabelStudio:
    """A client whose token was checked: legacy tokens and personal access tokens (JWT refresh tokens) both work.

    Raises LabelStudioConfigError (nothing configured), LabelStudioUnavailable (no answer from url) or
    LabelStudioAuthError (token refused), each naming the setting to fix.
    """
    if not url:
        raise LabelStudioConfigError(f"no Label Studio URL: set {URL_SETTING}")
    if not api_key:
        raise LabelStudioAuthError(f"no Label Studio API token: set {API_KEY_SETTING}")
    url = url.rstrip("/")
    try:
        health = httpx.get(f"{url}/health", timeout=min(timeout_s, 10.0))
    except httpx.HTTPError as error:
        raise LabelStudioUnavailable(f"Label Studio at {url} is unreachable ({error}); check {URL_SETTING}") from error
    if health.status_code >= 500:
        raise LabelStudioUnavailable(f"Label Studio at {url} answered /health with HTTP {health.status_code}")
    try:
        # The SDK tells the token kinds apart itself: a JWT refresh token (PAT) is exchanged for a Bearer
        # access token, anything else is sent as `Token <key>`. An expired PAT raises already here.
        client = LabelStudio(base_url=url, api_key=api_key, timeout=timeout_s)
        client.users.whoami()
    except ApiError as error:
        if error.status_code in (401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {url} refused the API token ({_detail(error)}): set a valid token in {API_KEY_SETTING} "
                "(a legacy token from Account & Settings, or a personal access token)"
            ) from error
        raise LabelStudioUnavailable(f"Label Studio at {url} answered HTTP {error.status_code}: {_detail(error)}") from error
    except httpx.HTTPError as error:
        raise LabelStudioUnavailable(f"Label Studio at {url} is unreachable ({error}); check {URL_SETTING}") from error
    return client


def _detail(error: ApiError) -> str:
    body = error.body
    if isinstance(body, Mapping):
        return str(body.get("detail") or body)
    return str(body)


# ---------------------------------------------------------------------------------------------------------
# project


def label_config_for(classes: Sequence[str], descriptions: Mapping[str, str] | None = None) -> str:
    """Label Studio's labeling config: the image, why it was picked, and one required single choice per class.

    A class description becomes its choice's hint (tooltip); the full instructions go in the project's
    expert_instruction (see instructions_for).
    """
    if len(classes) < 2:
        raise ValueError(f"a labeling config needs at least two classes, got {list(classes)}")
    descriptions = descriptions or {}
    choices = []
    for name in classes:
        hint = descriptions.get(name)
        hint_attr = f" hint={quoteattr(hint)}" if hint else ""
        choices.append(f"    <Choice value={quoteattr(name)}{hint_attr}/>")
    return "\n".join(
        [
            "<View>",
            # Why first (context), then the image kept short enough that the choices stay on screen.
            f'  <Text name="{WHY_NAME}" value="${WHY_NAME}"/>',
            f'  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}" zoom="true" maxHeight="60vh"/>',
            f'  <Choices name="{CHOICES_NAME}" toName="{IMAGE_NAME}" choice="single-radio" required="true" showInline="true">',
            *choices,
            "  </Choices>",
            "</View>",
        ]
    )


def instructions_for(classes: Sequence[str], descriptions: Mapping[str, str] | None = None) -> str:
    """Annotator instructions (HTML, shown by Label Studio before labeling) from the class descriptions."""
    descriptions = descriptions or {}
    items = "".join(
        f"<li><b>{escape(name)}</b>{': ' + escape(descriptions[name]) if descriptions.get(name) else ''}</li>" for name in classes
    )
    return (
        "<p>Pick the one class that fits the whole image. The model's guess is pre-selected: "
        "change it when it is wrong; skip when you cannot tell.</p>"
        f"<ul>{items}</ul>"
    )


def project_title_for(name: str) -> str:
    return f"defect-loop {name}"[:PROJECT_TITLE_MAX]


def find_project(client: LabelStudio, *, title: str) -> int | None:
    for project in client.projects.list(title=title):
        if project.title == title:
            return int(project.id)
    return None


PROJECT_KEY_PREFIX = "defect-loop project key: "


def ensure_project(
    client: LabelStudio,
    *,
    title: str,
    classes: Sequence[str],
    descriptions: Mapping[str, str] | None = None,
    model_version: str | None = None,
    key: str | None = None,
    known_project_id: int | None = None,
) -> int:
    """The id of this defect-loop project's Label Studio project: `known_project_id` (where its tasks already are) while
    it exists, else the one titled `title` that carries `key` in its description, else a new one (showing
    model_version's predictions). Its config is updated to the classes; its model version is changed by
    show_predictions_of once such predictions exist.

    A project of that title that belongs to another defect-loop store (another key, or tasks without a key: two
    project folders of the same name on one server) is never shared: answers to its tasks would be taken for this
    store's images. The title then gets the key's start, "defect-loop NAME (1a2b3c4d)"."""
    label_config = label_config_for(classes, descriptions)
    instructions = instructions_for(classes, descriptions)
    marker = f"{PROJECT_KEY_PREFIX}{key}" if key else None
    project_id = None
    if known_project_id is not None:
        try:
            known = client.projects.get(id=known_project_id)
            # another store's project under that id (a new server whose ids started over) is not ours; one without any
            # key was made before keys were kept, by this store, which has tasks there
            if marker is None or marker in (known.description or "") or PROJECT_KEY_PREFIX not in (known.description or ""):
                project_id = known_project_id
        except ApiError as error:
            if error.status_code != 404:
                raise
    # a long title is cut before its suffix, so the suffixed titles stay apart
    titles = [title[:PROJECT_TITLE_MAX]] + ([f"{title[:PROJECT_TITLE_MAX - len(suffix)]}{suffix}" for suffix in (f" ({key[:8]})", f" ({key})")]
                                           if key else [])
    for candidate in ([] if project_id is not None else titles):
        found = find_project(client, title=candidate)
        if found is None:
            created = client.projects.create(
                title=candidate,
                label_config=label_config,
                description="Images picked by defect-loop's active learning; answers flow back at the next round."
                            + (f"\n{marker}" if marker else ""),
                expert_instruction=instructions,
                show_instruction=True,
                show_skip_button=True,
                # Pre-annotations: the model's guess is pre-selected for the annotator.
                show_collab_predictions=True,
                **({"model_version": model_version} if model_version else {}),
            )
            return int(created.id)
        existing = client.projects.get(id=found)
        description = existing.description or ""
        if marker is None or marker in description:
            project_id = found
            break
        if PROJECT_KEY_PREFIX not in description and not (getattr(existing, "task_number", None) or 0):
            client.projects.update(id=found, description=f"{description}\n{marker}".strip())  # empty and unclaimed: ours now
            project_id = found
            break
    if project_id is None:
        raise LabelStudioConfigError(f"the Label Studio projects titled {', '.join(map(repr, titles))} all belong to other defect-loop "
                                     "stores: rename or delete one of them in Label Studio")
    current = client.projects.get(id=project_id)
    changes: dict[str, Any] = {}
    if (current.label_config or "").strip() != label_config.strip():
        # Label Studio 1.23 takes it even with answers choosing a label it drops (checked): the pull rejects those
        changes["label_config"] = label_config
    if (getattr(current, "expert_instruction", None) or "") != instructions:
        changes["expert_instruction"] = instructions
    if changes:
        client.projects.update(id=project_id, **changes)
    return project_id


def show_predictions_of(client: LabelStudio, *, project_id: int, model_version: str) -> None:
    """Annotators see this model version's predictions as pre-annotations. Label Studio refuses a version no task has
    a prediction of yet (HTTP 400), so call it after importing them."""
    current = client.projects.get(id=project_id)
    if getattr(current, "model_version", None) != model_version:
        client.projects.update(id=project_id, model_version=model_version)


def ensure_local_storage(client: LabelStudio, *, project_id: int, path: str, title: str | None = None) -> int:
    """A local-files storage covering path (an absolute directory under the server's document root).

    Label Studio serves /data/local-files/?d=... only for files inside the path of a storage of a project the
    logged-in user may see, so this is what lets the annotator's browser load the image. Never synced: tasks
    are imported by the backend, one per image, with predictions.
    """
    normalized = path.rstrip("/") or "/"
    for storage in client.import_storage.local.list(project=project_id):
        existing = (storage.path or "").rstrip("/")
        if existing and (normalized == existing or normalized.startswith(existing + "/")):
            return int(storage.id)
    created = client.import_storage.local.create(
        project=project_id, path=normalized, title=(title or normalized)[-256:], use_blob_urls=True, synchronizable=False
    )
    return int(created.id)


def local_files_url(path: str, *, document_root: str) -> str:
    """`/data/local-files/?d=<path relative to the document root>` for an absolute image path under it."""
    root = document_root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{path} is not under Label Studio's document root {document_root}")
    return f"/data/local-files/?d={quote(path[len(root) + 1:])}"


# ---------------------------------------------------------------------------------------------------------
# tasks, predictions, annotations


def choice_result(label: str) -> list[dict[str, Any]]:
    """A Choices result as Label Studio stores it (annotation or prediction)."""
    return [{"from_name": CHOICES_NAME, "to_name": IMAGE_NAME, "type": "choices", "value": {"choices": [label]}}]


def import_tasks_with_predictions(client: LabelStudio, *, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
    """Import tasks ({"data": {...}, "predictions": [...]}) in one request; their Label Studio ids, in order."""
    if not tasks:
        return []
    response = client.projects.import_tasks(id=project_id, request=list(tasks), return_task_ids=True)
    task_ids = [int(task_id) for task_id in (response.task_ids or [])]
    if len(task_ids) != len(tasks):
        raise LabelStudioError(f"Label Studio imported {len(task_ids)} of {len(tasks)} tasks into project {project_id}")
    return task_ids


def import_predictions(client: LabelStudio, *, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
    """Predictions ({"task", "result", "model_version", "score"}) for existing tasks, in one request; how many."""
    if not predictions:
        return 0
    client.projects.import_predictions(id=project_id, request=list(predictions))
    return len(predictions)


# Tasks named per listing request when a listing is of chosen tasks: their ids go in the URL's query
SELECTED_TASKS_PER_REQUEST = 200


def list_task_data(client: LabelStudio, *, project_id: int, with_predictions: bool = False,
                   task_ids: Collection[int] | None = None) -> list[dict[str, Any]]:
    """Every task of the project (task_ids: only those of them still there) as {"task_id", "data"}: to adopt tasks
    pushed before a crash. with_predictions adds "predictions" ({"id", "model_version", "created_at"} each, created_at
    in seconds) and "n_answers" (annotations, skips included), what superseded_predictions reads."""
    include = "id,data,predictions,annotations" if with_predictions else "id,data"
    if task_ids is None:
        queries: list[str | None] = [None]
    else:
        chosen = sorted(set(task_ids))
        queries = [json.dumps({"selectedItems": {"all": False, "included": chosen[start:start + SELECTED_TASKS_PER_REQUEST]}})
                   for start in range(0, len(chosen), SELECTED_TASKS_PER_REQUEST)]
    tasks = []
    for query in queries:
        if query is None:
            tasks += list(client.tasks.list(project=project_id, include=include, page_size=500))
        else:  # every chosen task fits on the first page: iterating the pager would ask for an empty second one
            tasks += client.tasks.list(project=project_id, include=include, page_size=SELECTED_TASKS_PER_REQUEST, query=query).items or []
    if not with_predictions:
        return [{"task_id": int(task.id), "data": dict(task.data or {})} for task in tasks]
    return [
        {
            "task_id": int(task.id),
            "data": dict(task.data or {}),
            "predictions": [{"id": int(p["id"]), "model_version": p.get("model_version"), "created_at": _timestamp(p.get("created_at"))}
                            for p in map(_as_dict, task.predictions or [])],
            "n_answers": len(task.annotations or []),  # ids only in this listing: answer_times has their times
        }
        # only these fields: fields="all" took 7.7 s for 3000 tasks, this 3.6 s (without predictions and answers 1.1 s)
        for task in tasks
    ]


def answer_times(client: LabelStudio, *, task_id: int) -> list[float | None]:
    """When each answer (skips included) of the task was given, in seconds."""
    return [_timestamp(_as_dict(a).get("created_at")) for a in client.tasks.get(id=str(task_id)).annotations or []]


def superseded_predictions(predictions: Sequence[Mapping[str, Any]], *, answered_at: Sequence[float | None],
                           ours: Callable[[str | None], bool]) -> list[int]:
    """Ids of `ours` predictions of a task ("predictions" of a list_task_data(with_predictions=True) entry, listed
    before the task got its newer one) that a newer guess replaced, except: our newest listed (an annotator may have
    the task open with it: Label Studio refuses a submit whose parent prediction was deleted, HTTP 400), and for each
    answer the newest made before it (what list_annotated_tasks compares the answer with) and our newest made before
    it (what was pre-selected). So a waiting task lists at most two of our guesses. Other model versions' predictions
    (an ML backend's) are not ours to delete; an answer of unknown time keeps them all."""
    if any(answered is None for answered in answered_at):
        return []
    ordered = sorted(predictions, key=lambda p: (p["created_at"] if p["created_at"] is not None else float("-inf"), p["id"]))
    ours_listed = [p for p in ordered if ours(p.get("model_version"))]
    shown: set[int] = {ours_listed[-1]["id"]} if ours_listed else set()
    for answered in answered_at:
        before = [p for p in ordered if p["created_at"] is None or p["created_at"] <= answered]
        ours_before = [p for p in before if ours(p.get("model_version"))]
        shown |= {candidates[-1]["id"] for candidates in (before, ours_before) if candidates}
    return [p["id"] for p in ordered if ours(p.get("model_version")) and p["id"] not in shown]


def delete_predictions(client: LabelStudio, *, prediction_ids: Sequence[int]) -> tuple[int, list[int]]:
    """Delete these predictions, one request each (Label Studio's bulk action deletes every prediction of a task, an ML
    backend's too). (deleted, failed ids); one already gone counts as deleted."""
    deleted, failed = 0, []
    for prediction_id in prediction_ids:
        try:
            client.predictions.delete(id=prediction_id)
            deleted += 1
        except ApiError as error:
            if error.status_code == 404:
                deleted += 1
            else:
                failed.append(prediction_id)
        except httpx.HTTPError:
            failed.append(prediction_id)
    return deleted, failed


_ANSWERED = json.dumps(
    {
        "filters": {
            "conjunction": "or",
            "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0},
                {"filter": "filter:tasks:cancelled_annotations", "operator": "greater", "type": "Number", "value": 0},
            ],
        }
    }
)


def list_annotated_tasks(client: LabelStudio, *, project_id: int) -> list[dict[str, Any]]:
    """One plain dict per annotation (submitted or skipped) of the project, oldest task first.

    Keys: task_id, annotation_id, completed_by and updated_by (user ids), lead_time (s), choices (list of str from our Choices
    control), result (raw), was_cancelled, created_at, updated_at (ISO strings), predicted (choices of the newest
    prediction made before the answer: what the annotator was shown), task_data. `only_annotated=True` is ignored by the server, hence the filter query.
    """
    rows: list[dict[str, Any]] = []
    for task in client.tasks.list(project=project_id, fields="all", query=_ANSWERED, page_size=200):
        predictions = sorted(((_timestamp(p.get("created_at")), result_choices(p.get("result"))) for p in map(_as_dict, task.predictions or [])),
                             key=lambda pair: pair[0] if pair[0] is not None else float("-inf"))
        for annotation in task.annotations or []:
            annotation = _as_dict(annotation)
            # what the annotator was shown: the newest prediction made before the answer (a reopened task gets another
            # one later, and a task pushed without a model has none when answered)
            answered_at = _timestamp(annotation.get("created_at"))
            before = [choices for created, choices in predictions if created is None or answered_at is None or created <= answered_at]
            predicted = sorted(set(before[-1])) if before else []
            completed_by = annotation.get("completed_by")
            if isinstance(completed_by, Mapping):
                completed_by = completed_by.get("id")
            rows.append(
                {
                    "task_id": int(task.id),
                    "annotation_id": int(annotation["id"]),
                    "completed_by": completed_by,
                    "updated_by": _user_id(annotation.get("updated_by")),  # who saved it last: the annotator, or a class rename
                    "lead_time": annotation.get("lead_time"),
                    "choices": result_choices(annotation.get("result")),
                    "result": annotation.get("result") or [],
                    "was_cancelled": bool(annotation.get("was_cancelled")),
                    "created_at": _iso(annotation.get("created_at")),
                    "updated_at": _iso(annotation.get("updated_at")),
                    "predicted": predicted,
                    "task_data": dict(task.data or {}),
                }
            )
    rows.sort(key=lambda row: (row["task_id"], row["annotation_id"]))
    return rows


def reopen_task(client: LabelStudio, *, task_id: int, data_updates: Mapping[str, Any], prediction: Mapping[str, Any] | None,
                once: Mapping[str, Any], skips_count: bool = False) -> bool:
    """Ask again about an answered task: the prediction is added, its data gets data_updates (what the annotator
    reads) and its overlap becomes one more than the annotations it has, so Label Studio counts it unfinished and the
    label stream offers it to an annotator who has not answered it (those who did find it in the task list and can
    change their answer). Skips count too where the project counts them against the overlap (`skips_count`, from
    skips_count_against_overlap): a task that needs one answer more than the stream will ever hand out would stay
    open unseen.

    Idempotent: a task whose data already holds every item of `once` (asked again about this very label), and a
    task nobody answered yet, are left alone. The prediction goes first and the data (with `once`) last, so a
    failure in between is completed by the next call. True when the task was reopened."""
    task = client.tasks.get(id=str(task_id))
    data = dict(task.data or {})
    if once and all(data.get(key) == value for key, value in once.items()):
        return False
    if not _answerers(task):
        return False  # still open: it is asked anyway
    if prediction is not None:
        shown = [_as_dict(p) for p in task.predictions or []]
        if not any(p.get("model_version") == prediction.get("model_version") and result_choices(p.get("result")) == result_choices(prediction.get("result"))
                   for p in shown):
            client.predictions.create(task=task_id, **prediction)
    # one answer more than Label Studio counts against the overlap: its answers (an annotator's second one too), and its skips only where the project
    # counts them (IGNORE_SKIPPED). Counted in every mode, a skip asked for a second new answer (QA: overlap 4 with 2
    # answers and a skip in the default REQUEUE_FOR_OTHERS mode, so two more annotators were sent to it)
    overlap = max(int(task.overlap or 1), _counted_answers(task, skips_count=skips_count) + 1)
    # the overlap it had before the first reopening: closing it again never goes below the project's own setting
    asked = {**data, **data_updates, **once, REOPENED_FROM_OVERLAP: int(data.get(REOPENED_FROM_OVERLAP) or task.overlap or 1)}
    client.tasks.update(id=str(task_id), data=asked, overlap=overlap, is_labeled=False)
    return True


SETTLED_WHY = "Settled: the question asked again here has its answer. Nothing more to do on this task."


def close_reopened_task(client: LabelStudio, *, task_id: int, image_id: int | None = None, skips_count: bool = False) -> bool:
    """Close a task reopen_task opened once the loop has its answer (an annotator who changes their own answer gives
    Label Studio no new one, and the task would stay in the label stream with a settled question): overlap back to
    what it was, or the answers Label Studio counts if more (counted as reopen_task counts them), and the reopening
    mark removed. False: not a reopened task (or, with image_id, not that image's task any more)."""
    task = client.tasks.get(id=str(task_id))
    data = dict(task.data or {})
    if REOPENED_FROM_OVERLAP not in data or (image_id is not None and data.get("defect_loop_image_id") != image_id):
        return False
    answered = _counted_answers(task, skips_count=skips_count)
    overlap = max(int(data.pop(REOPENED_FROM_OVERLAP) or 1), answered, 1)
    # the question stayed beside a settled task (QA: "Check the answer given here" on a closed one); a project that
    # wants more answers per task than it has still asks for one (review: "nothing more to do" there sent them away)
    data[WHY_NAME] = SETTLED_WHY if answered >= overlap else (
        f"Settled: the question asked again here has its answer. This project wants {overlap} answers per task: give yours.")
    client.tasks.update(id=str(task_id), data=data, overlap=overlap, is_labeled=answered >= overlap)
    # an answer saved between the read and the write was counted by Label Studio and then overwritten: count again
    fresh = client.tasks.get(id=str(task_id))
    if (_counted_answers(fresh, skips_count=skips_count) >= overlap) != bool(fresh.is_labeled):
        client.tasks.update(id=str(task_id), is_labeled=_counted_answers(fresh, skips_count=skips_count) >= overlap)
    return True


def withdraw_unanswered_task(client: LabelStudio, *, task_id: int, image_id: int) -> str:
    """Take a task nobody has answered from the annotators (its image's file is gone or changed: the task shows a
    broken or another picture). "deleted" (skips alone are no answer: such a task would stay in the queue);
    "answered": it has an answer now (kept: the pull records it); "gone": deleted in Label Studio already, or its id
    shows another image by now."""
    try:
        task = client.tasks.get(id=str(task_id))
    except ApiError as error:
        if error.status_code == 404:
            return "gone"
        raise
    if (task.data or {}).get("defect_loop_image_id") != image_id:
        return "gone"
    if _answerers(task):
        return "answered"
    client.tasks.delete(id=str(task_id))
    return "deleted"


def skips_count_against_overlap(client: LabelStudio, *, project_id: int) -> bool:
    """Whether a Label Studio project counts skipped annotations against a task's overlap (skip_queue IGNORE_SKIPPED;
    the default, REQUEUE_FOR_OTHERS, does not): asked once per push that reopens or closes tasks."""
    skip_queue = getattr(client.projects.get(id=int(project_id)), "skip_queue", None)
    return str(getattr(skip_queue, "value", skip_queue) or "") == "IGNORE_SKIPPED"


def _counted_answers(task: Any, *, skips_count: bool) -> int:
    """The annotations Label Studio counts against the task's overlap: its answers (an annotator's second one too),
    its skips only where the project counts them."""
    annotations = [_as_dict(a) for a in task.annotations or []]
    return len(annotations) if skips_count else sum(1 for a in annotations if not a.get("was_cancelled"))


def _answerers(task: Any) -> set[Any]:
    """Distinct annotators with a (not skipped) answer: what Label Studio counts against the overlap, except in its
    IGNORE_SKIPPED mode, where skips count too."""
    return {(a.get("completed_by") or {}).get("id") if isinstance(a.get("completed_by"), Mapping) else a.get("completed_by")
            for a in map(_as_dict, task.annotations or []) if not a.get("was_cancelled")}


# task data fields naming the label a reopened task asks about (labelstudio_backend._relabel_data); later rounds
# rebuild the annotator's text from them
LABEL_DATA_FIELDS = ("current_label", "relabel_of")
RENAME_WORKERS = 4  # Label Studio takes ~0.3 s per change; it serves requests in threads


@dataclass
class ChoiceRenamed:
    """What rename_choice did in one project. saved: answer id -> (its updated_at before, after), for every answer now
    choosing `new` whose last save was this token's user (rewritten now, or by an earlier attempt: before is None)."""
    saved: dict[int, tuple[str | None, str | None]] = field(default_factory=dict)
    answers: int = 0  # rewritten now
    predictions: int = 0
    tasks: int = 0  # task data naming `old` as the label asked about
    drafts: int = 0  # annotators' drafts (unsubmitted answers, or unsubmitted edits to one) rewritten now


def rename_choice(client: LabelStudio, *, project_id: int, old: str, new: str, own_user_id: int | None,
                  workers: int = RENAME_WORKERS) -> ChoiceRenamed:
    """Every answer and prediction of the project choosing `old` chooses `new` instead (other result items kept), and
    a reopened task's data names `new` as the label it asks about, so a class renamed in loop.toml keeps its answers:
    Label Studio would hand them back under the old name at every pull. Answers keep their annotator (completed_by;
    Label Studio records this token's user as updated_by). Annotators' drafts choosing `old` (of every user: the token
    is an admin's; of a new answer or of an edit to one) choose `new` too, keeping their user and lead time, or a draft
    submitted after the rename would become an answer naming a class the project no longer has. Re-running after a
    failure finishes the rest: what was rewritten no longer names `old`."""
    done = ChoiceRenamed()
    changes: list[Callable[[], None]] = []
    counted = threading.Lock()  # drafts are counted by the requests that find them, several at once
    # listed in full first: rewriting while paging could shift what a later page holds
    for task in list(client.tasks.list(project=project_id, fields="all", page_size=200)):
        for annotation in map(_as_dict, task.annotations or []):
            answer_id = int(annotation["id"])
            result = _result_renamed(annotation.get("result"), old=old, new=new)
            if result is not None:
                def rewrite(answer_id: int = answer_id, result: list = result, before: str | None = _iso(annotation.get("updated_at"))) -> None:
                    saved = client.annotations.update(id=answer_id, result=result)
                    done.saved[answer_id] = (before, _iso(getattr(saved, "updated_at", None)))
                changes.append(rewrite)
                done.answers += 1
            elif new in result_choices(annotation.get("result")) and own_user_id is not None and _user_id(annotation.get("updated_by")) == own_user_id:
                done.saved[answer_id] = (None, _iso(annotation.get("updated_at")))
        for prediction in map(_as_dict, task.predictions or []):
            result = _result_renamed(prediction.get("result"), old=old, new=new)
            if result is not None:
                changes.append(lambda prediction_id=int(prediction["id"]), result=result: client.predictions.update(id=prediction_id, result=result))
                done.predictions += 1
        data = dict(task.data or {})
        renamed_data = {**data, **{key: new for key in (*LABEL_DATA_FIELDS, "predicted_label") if data.get(key) == old}}
        if isinstance(data.get(WHY_NAME), str):  # the text the annotator reads names the label too (QA: the old name stayed)
            renamed_data[WHY_NAME] = why_text_renamed(data[WHY_NAME], old=old, new=new)
        if renamed_data != data:
            changes.append(lambda task_id=str(task.id), data=renamed_data: client.tasks.update(id=task_id, data=data))
            done.tasks += 1
        if getattr(task, "draft_exists", None) or _as_dict(task).get("draft_exists"):
            def rewrite_drafts(task_id: int = int(task.id)) -> None:
                n = rename_drafts(client, task_id=task_id, old=old, new=new)
                with counted:
                    done.drafts += n
            changes.append(rewrite_drafts)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for finished in [pool.submit(change) for change in changes]:
            finished.result()  # the first failure is raised once the others ended
    return done


def why_text_renamed(text: str, *, old: str, new: str) -> str:
    """The annotator's text (labelstudio_backend.why_text) with the class `old` named `new` where the text names a
    label: "Current label: X.", "Suggested label: X", "Model's guess: X", "agrees with the current label (X"; the
    reason's own words are left alone."""
    import re

    label = re.escape(old)
    return re.sub(rf"(Current label: |Suggested label: |Model's guess: |agrees with the current label \()({label})(?=[.;, )]|$)",
                  lambda match: match.group(1) + new, text)


def rename_drafts(client: LabelStudio, *, task_id: int, old: str, new: str) -> int:
    """Every draft of the task (any user's: the token is an admin's) choosing `old` chooses `new` instead, its user and
    lead time kept; how many were rewritten. A task or draft gone meanwhile (a draft is deleted when it is submitted)
    is passed over: its answer is pulled. The SDK has no drafts client: its HTTP client makes the requests."""
    drafts = _request(client, f"api/tasks/{task_id}/drafts", method="GET", missing=[])
    rewritten = 0
    for draft in drafts if isinstance(drafts, list) else []:
        result = _result_renamed(_as_dict(draft).get("result"), old=old, new=new)
        if result is not None and _request(client, f"api/drafts/{int(draft['id'])}/", method="PATCH", payload={"result": result},
                                           missing=None) is not None:
            rewritten += 1
    return rewritten


_MISSING = object()


def _request(client: LabelStudio, path: str, *, method: str, payload: Any = None, missing: Any = _MISSING) -> Any:
    """A request the SDK has no method for, through its own HTTP client (its base URL, token and timeout): the JSON
    answered. HTTP 404 gives `missing` when one is given; any other refusal raises ApiError as the SDK's methods do."""
    response = client._client_wrapper.httpx_client.request(path, method=method, json=payload)
    if response.status_code == 404 and missing is not _MISSING:
        return missing
    if response.status_code >= 400:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=body)
    return response.json() if response.content else {}


def _user_id(value: Any) -> int | None:
    if isinstance(value, Mapping):
        value = value.get("id")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _result_renamed(result: Any, *, old: str, new: str) -> list[dict[str, Any]] | None:
    """The result with our Choices control's `old` replaced by `new` (once, if both were chosen); None if it has no
    `old`."""
    items = [_as_dict(item) for item in result or []]
    if old not in result_choices(items):
        return None
    renamed = []
    for item in items:
        if item.get("type") == "choices" and item.get("from_name", CHOICES_NAME) == CHOICES_NAME:
            chosen = [new if str(c) == old else c for c in (item.get("value") or {}).get("choices") or []]
            item = {**item, "value": {**(item.get("value") or {}), "choices": list(dict.fromkeys(chosen))}}
        renamed.append(item)
    return renamed


def result_choices(result: Any) -> list[str]:
    """The choices of our Choices control in an annotation's or prediction's result (other controls ignored)."""
    choices: list[str] = []
    for item in result or []:
        item = _as_dict(item)
        if item.get("type") == "choices" and item.get("from_name", CHOICES_NAME) == CHOICES_NAME:
            choices.extend(str(c) for c in (item.get("value") or {}).get("choices") or [])
    return choices


def own_user_id(client: LabelStudio) -> int | None:
    """The Label Studio user of the client's token (Label Studio names it as updated_by of what it changes)."""
    return _user_id(getattr(client.users.whoami(), "id", None))


def user_emails(client: LabelStudio) -> dict[int, str]:
    """Label Studio user id -> email, for readable annotator names in reports."""
    return {int(user.id): user.email or user.username or str(user.id) for user in client.users.list()}


def create_webhook(
    client: LabelStudio,
    *,
    project_id: int,
    url: str,
    secret_header: str | None = None,
    secret: str | None = None,
    actions: Sequence[str] = WEBHOOK_ACTIONS,
) -> int:
    """A webhook sending annotation events with their payload to url, with our shared-secret header; reused if
    one already points there. Label Studio sends each event once, 1 s timeout, no retry: pulls catch up."""
    headers = {secret_header: secret} if secret_header and secret else {}
    for hook in client.webhooks.list(project=str(project_id)):
        if hook.url == url:
            if set(hook.actions or []) != set(actions) or (hook.headers or {}) != headers or not hook.send_payload:
                client.webhooks.update(id=hook.id, url=url, actions=list(actions), headers=headers, send_payload=True, is_active=True)
            return int(hook.id)
    hook = client.webhooks.create(
        url=url, project=project_id, actions=list(actions), send_payload=True, send_for_all_actions=False, headers=headers
    )
    return int(hook.id)


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return dict(value or {})


def _timestamp(value: Any) -> float | None:
    """Seconds since the epoch of a datetime or an ISO string (Label Studio writes both forms); None if unreadable."""
    if value is None:
        return None
    if not hasattr(value, "timestamp"):
        try:
            value = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def as_utc(value: Any) -> datetime | None:
    """A datetime or ISO string as Label Studio writes it, as an aware UTC datetime; None if unreadable."""
    seconds = _timestamp(value)
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
