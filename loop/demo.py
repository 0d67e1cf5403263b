"""`loop demo`: the embedded default, offline: synthetic images, SQLite, the oracle annotator, a few rounds."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from sqlalchemy import select

from loop.config import AnnotatorConfig, LoopConfig, ProjectConfig, config_path, path_beside, save_config
from loop.ingest import ingest_source
from loop.project import check_store_is_free, create_project_store, open_project, project_lock
from loop.round import RoundOptions, run_round
from loop.synthetic_images import DEFAULT_CLASS_SHARES, write_partial_manifest, write_synthetic_dataset
from store import session_scope
from store.models import Image


def run_demo(project_dir: Path, *, n_rounds: int, n_images: int, seed: int, console: Console, print_round: Callable) -> None:
    project_dir = project_dir.expanduser().resolve()
    if config_path(project_dir).exists():
        raise ValueError(f"{project_dir} is a project already; give `loop demo` a new folder")
    project_dir.mkdir(parents=True, exist_ok=True)
    # before minutes of image generation: a store (LOOP_DATABASE_URL) that holds a project already is refused
    check_store_is_free(project_dir, ProjectConfig(name=project_dir.name, classes=list(DEFAULT_CLASS_SHARES), negative_class="good"))
    data_dir = project_dir / "data"
    console.print(f"[bold]1/4[/] generating {n_images} synthetic inspection images in {data_dir}")
    dataset = write_synthetic_dataset(data_dir, n_images=n_images, seed=seed)
    manifest, wrong = write_partial_manifest(dataset, path=data_dir / "labels.csv", labeled_fraction=0.55, label_noise=0.05, seed=seed)
    console.print(f"    {len(dataset.image_paths)} images + {len(dataset.corrupt_paths)} corrupt files; {len(wrong)} of the given labels are wrong on purpose")

    console.print("[bold]2/4[/] loop init")
    config = ProjectConfig(
        name=project_dir.name, classes=list(DEFAULT_CLASS_SHARES), negative_class="good",
        class_descriptions={"good": "no visible defect", "scratch": "thin straight bright line", "spot": "round dark blob",
                            "crack": "jagged dark line", "patch": "rectangle of rougher texture (rare)"},
        loop=LoopConfig(budget_per_round=30, strategy="default", relabel_budget=5, seed=seed),
        # relative to the project folder, which can then move as a whole (QA: the moved demo's oracle looked in the old place)
        annotator=AnnotatorConfig(backend="oracle", oracle_manifest=path_beside(dataset.ground_truth_csv, project_dir)),
    )
    project_dir.mkdir(parents=True, exist_ok=True)
    create_project_store(project_dir, config)
    save_config(project_dir, config)

    ctx = open_project(project_dir)
    console.print(f"[bold]3/4[/] loop ingest {manifest}")
    with project_lock(ctx.root, action="loop demo", engine=ctx.engine):
        report = ingest_source(ctx, manifest)
        console.print(f"    {report.n_new_images - report.n_quarantined} images, {report.n_quarantined + report.n_quarantined_copies} quarantined, splits {report.split_counts}")
        with session_scope(ctx.engine) as session:  # QA: the demo's only test errors were its own planted labels, unsaid
            wrong_paths = {str(dataset.image_paths[index].resolve()) for index in wrong}
            in_test = sum(1 for path in session.scalars(select(Image.path).where(Image.split == "test")) if path in wrong_paths)
        if in_test:
            console.print(f"    {in_test} of the {len(wrong)} wrong labels are in the frozen test split: its figures count them as the "
                          "model's mistakes (test labels are never questioned, so nothing can tune the test split to the model)")
        for number in range(1, n_rounds + 1):
            console.print(f"[bold]4/4[/] loop round ({number} of {n_rounds})")
            print_round(run_round(ctx, RoundOptions(), console=console))
    console.print(f"\nDone. Look around: `loop status --project {project_dir}`, plots in {ctx.artifacts_dir}, "
                  f"`loop serve --project {project_dir}` for the dashboard.")
