"""SQLAlchemy 2 models. The schema itself is created by the Alembic migrations in ../alembic."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, Index
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    root_dir: Mapped[str] = mapped_column(Text)
    classes: Mapped[list[Any]] = mapped_column(JSON)
    negative_class: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    # Classes renamed by `loop rename-class`, old name -> new name (queries.record_class_rename): an answer given later
    # under an old name means its new one (queries.renamed_classes). None: no class was ever renamed.
    class_renames: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Label Studio projects this store pushed tasks to: id -> {"created_at": as Label Studio reports it}. A server
    # reinstalled or replaced starts its ids over, and the same id then names another project
    # (labeling.labelstudio_backend). None: none recorded yet (an older store: recorded at its next contact).
    labelstudio_projects: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class IngestBatch(Base):
    __tablename__ = "ingest_batches"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    source: Mapped[str] = mapped_column(Text)
    layout: Mapped[str] = mapped_column(String(40))  # folders | mvtec | manifest | unlabeled
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    n_files: Mapped[int] = mapped_column(Integer, default=0)
    n_new_images: Mapped[int] = mapped_column(Integer, default=0)
    n_duplicates: Mapped[int] = mapped_column(Integer, default=0)
    n_quarantined: Mapped[int] = mapped_column(Integer, default=0)
    notes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("project_id", "sha256", name="uq_images_project_sha256"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    # Byte-identical copies found at ingest: they are the same image, never split apart.
    duplicate_paths: Mapped[list[Any]] = mapped_column(JSON, default=list)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="ok")  # ok | quarantined | replaced (a quarantined file ingested again as a new image)
    status_reason: Mapped[str | None] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(20))  # test | validation | train | pool
    # The physical part the photo shows (e.g. one tile under six exposures): a part's images always share a split,
    # and out-of-fold folds keep them together; None = the image is its own part.
    part: Mapped[str | None] = mapped_column(String(200), default=None)
    # True: its split is the ingest's own random draw, made when the image was created (labeled, no part), which a round
    # may still change before anything measured it (loop.round.regroup_unmeasured_copies). None: placed otherwise, or
    # ingested before this was recorded.
    split_drawn: Mapped[bool | None] = mapped_column(Boolean, default=None)
    ingest_batch_id: Mapped[int] = mapped_column(ForeignKey("ingest_batches.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class LabelEvent(Base):
    """Append-only: a label is never updated in place; the current label is derived (queries.current_labels)."""

    __tablename__ = "label_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    label: Mapped[str | None] = mapped_column(String(200))  # None with action=delete / skip
    source: Mapped[str] = mapped_column(String(20))  # import | annotator | oracle
    action: Mapped[str] = mapped_column(String(20), default="set")  # set | delete | skip
    annotator: Mapped[str | None] = mapped_column(String(200))
    external_id: Mapped[str | None] = mapped_column(String(200), index=True)
    lead_time_s: Mapped[float | None] = mapped_column(Float)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    # When the annotator's tool (Label Studio) last saved this answer, by its own clock: the same answer saved again
    # later is a new answer (a confirmation), not a repeat of this one. Filled in on first sight for older rows.
    external_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("project_id", "number", name="uq_rounds_project_number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | completed | failed
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    config_snapshot: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    step_timings_s: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Everything else a reader wants per round: confusion matrix, per-class scores, threshold, counts.
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[list["Metric"]] = relationship(back_populates="round", cascade="all, delete-orphan")
    gates: Mapped[list["GateResult"]] = relationship(back_populates="round", cascade="all, delete-orphan")


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    class_name: Mapped[str | None] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float)
    round: Mapped[Round] = relationship(back_populates="metrics")


class GateResult(Base):
    __tablename__ = "gate_results"
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    comparison: Mapped[str] = mapped_column(String(4))  # ">=" or "<="
    applicable: Mapped[bool] = mapped_column(Boolean, default=True)
    passed: Mapped[bool | None] = mapped_column(Boolean)
    round: Mapped[Round] = relationship(back_populates="gates")


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_round_image", "round_id", "image_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    predicted_label: Mapped[str] = mapped_column(String(200))
    p_defect: Mapped[float | None] = mapped_column(Float)
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)


class LabelIssue(Base):
    __tablename__ = "label_issues"
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    kind: Mapped[str] = mapped_column(String(40))  # label_error | near_duplicate | outlier
    # near_duplicate: the copy; outlier: the nearest image; label_error: none
    related_image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", name="fk_label_issues_related_image_id_images"), nullable=True)
    given_label: Mapped[str | None] = mapped_column(String(200))
    suggested_label: Mapped[str | None] = mapped_column(String(200))
    score: Mapped[float] = mapped_column(Float)  # label quality: low = more suspect
    flagged: Mapped[bool] = mapped_column(Boolean, default=True)
    rank: Mapped[int] = mapped_column(Integer)


class Selection(Base):
    __tablename__ = "selections"
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    strategy: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(String(40))  # uncertain | rare_class | diverse | suspected_label_error | annotators_disagree | random | cold_start
    predicted_label: Mapped[str | None] = mapped_column(String(200))
    p_defect: Mapped[float | None] = mapped_column(Float)
    push_status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | pushed | failed | recorded | withdrawn
    pushed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AnnotationTask(Base):
    """Which annotator-backend task shows which image: pushing twice never duplicates a task."""

    __tablename__ = "annotation_tasks"
    __table_args__ = (UniqueConstraint("backend", "image_id", name="uq_tasks_backend_image"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    backend: Mapped[str] = mapped_column(String(40))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    external_project_id: Mapped[str | None] = mapped_column(String(100))
    external_task_id: Mapped[str] = mapped_column(String(100), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class RejectedAnnotation(Base):
    """An annotation that could not become a label event (unknown class, unknown task): kept, with why."""

    __tablename__ = "rejected_annotations"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    backend: Mapped[str] = mapped_column(String(40))
    external_id: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
