"""The `loop` command line: init, ingest, round, status, export, prune, rename-class, demo, simulate, serve, labelstudio."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import DatabaseError
from sqlalchemy.exc import InterfaceError as DatabaseInterfaceError
from sqlalchemy.exc import OperationalError as DatabaseOperationalError

from loop.config import INIT_CHECKPOINT, AnnotatorConfig, ConfigError, LoopConfig, ModelConfig, ProjectConfig, config_path, path_beside, save_config, validation_problems
from loop.ingest import IngestError, ingest_source
from loop.project import (ProjectBusy, add_project_row, check_store_is_free, open_project, open_project_store, project_lock,
                          labels_left_out, project_lock_held, remove_project_row, sync_project_classes)
from loop.errors import RoundFailed
from loop.status import metric_text, project_status
from labeling.labelstudio_server import LabelStudioServerError
from modeling.errors import WeightsUnavailable
from store.db import (StoreUnavailable, database_error_reason, same_store, shown_url, store_connection_lost, store_disk_full, store_is_read_only,
                      store_lock_held)
from store.reports import class_change_text, selection_budget_text, test_split_changed, test_split_moves_text, test_split_renames_text, threshold_of

app = typer.Typer(help="defect-loop: label, train, gate and select, one round at a time.", no_args_is_help=True, pretty_exceptions_enable=False)
labelstudio_app = typer.Typer(help="A local Label Studio for one machine.", no_args_is_help=True)
app.add_typer(labelstudio_app, name="labelstudio")
console = Console()
error_console = Console(stderr=True, soft_wrap=True)  # an error is one line, whatever the width: scripts grep it

EXIT_USAGE = 2
EXIT_GATES_FAILED = 3
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # and for SIGTERM
DEFAULT_KEEP_MODEL_ROUNDS = 3  # loop prune without --keep-rounds or a setting
NARROW_TERMINAL = 120  # columns: below, `loop status` sizes its rounds table's number columns itself
ProjectOption = Annotated[Path, typer.Option("--project", "-p", help="project directory (holds loop.toml)")]


@contextmanager
def clear_errors() -> Iterator[None]:
    """Expected failures become one clear line and a non-zero exit, never a traceback."""
    try:
        yield
    except (ConfigError, IngestError, ProjectBusy, RoundFailed, WeightsUnavailable, LabelStudioServerError, StoreUnavailable, LookupError,
            OSError, ValueError) as error:  # OSError: a file or folder in the way, no permission, a full disk
        error_console.print(f"[bold red]error:[/] {escape(str(error))}")
        raise typer.Exit(EXIT_USAGE) from None
    except (DatabaseOperationalError, DatabaseInterfaceError) as error:
        if store_is_read_only(error):  # QA: a 91-line traceback for a loop.db this user may not write
            error_console.print(f"[bold red]error:[/] the store cannot be written ({escape(database_error_reason(error))}): make the project's "
                                "loop.db and its folder writable for this user (or the mount read-write), then run the command again. What "
                                "was committed before is kept")
            raise typer.Exit(EXIT_USAGE) from None
        if store_disk_full(error):  # QA: an ingest that filled the disk ended in a 50-line traceback, exit 1
            where = getattr(error, "round_step", None)  # a round names its step, as for a full disk under its files
            stopped = (f"round {where[0]} stopped in step {where[1]}: " if where else "")
            recorded = (" The round is recorded as failed, or, if the store could not take that either, by the next `loop round`."
                        if where else "")
            error_console.print(f"[bold red]error:[/] {escape(stopped)}the store's disk is full ({escape(database_error_reason(error))}): free space "
                                "where the store lives, then run the command again. What was committed before is kept; this command's "
                                f"unfinished step was rolled back.{recorded}")
            raise typer.Exit(EXIT_USAGE) from None
        if not store_connection_lost(error):
            raise  # a bug, a schema problem, a lock timeout: shown as what it is
        reason = database_error_reason(error)
        error_console.print(f"[bold red]error:[/] lost the store mid-command: {escape(reason)}. What was committed before is kept; a round "
                            "that was running is recorded as failed if the store could still be reached, or else marked interrupted by "
                            "the next `loop round`")
        raise typer.Exit(EXIT_USAGE) from None
    except DatabaseError as error:
        damage = str(getattr(error, "orig", "") or "")
        if not any(sign in damage for sign in ("malformed", "not a database")):
            raise  # a bug: shown as what it is
        # a truncated or overwritten SQLite file: one line, not a traceback; nothing is written to it
        error_console.print(f"[bold red]error:[/] the store's database file is damaged ({escape(damage)}): restore it from a backup, or "
                            "check it with `sqlite3 FILE 'pragma integrity_check'`. Nothing was changed")
        raise typer.Exit(EXIT_USAGE) from None


def _split_classes(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


@app.command()
def init(
    project_dir: Annotated[Path, typer.Argument(help="project directory to create")],
    classes: Annotated[str, typer.Option(help="comma-separated class names, e.g. good,scratch,spot")],
    negative_class: Annotated[Optional[str], typer.Option(help='the "no defect" class the FPR gate is about')] = None,
    name: Annotated[Optional[str], typer.Option(help="project name (default: the folder name)")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="timm model name (default efficientnet_lite0; with --init-from: the checkpoint's)")] = None,
    weights: Annotated[Optional[str], typer.Option(help="default | none | PATH to a state dict (not with --init-from)")] = None,
    image_size: Annotated[int, typer.Option(help="input resolution in pixels")] = 224,
    bit_depth: Annotated[str, typer.Option(help="the camera's significant bits for 16-bit frames, 8..16 (e.g. 12 for Mono12), or auto: each frame by its own largest value")] = "auto",
    pooling: Annotated[str, typer.Option(help="embedding pooling: multilayer (last 4 stages + head, avg and max) | avg (last feature map)")] = "multilayer",
    train: Annotated[str, typer.Option(help="training strategy: head | finetune | full")] = "head",
    annotator: Annotated[str, typer.Option(help="annotator backend: none | oracle | labelstudio")] = "none",
    oracle_manifest: Annotated[Optional[Path], typer.Option(help="ground truth CSV (path,label) for the oracle annotator")] = None,
    oracle_noise: Annotated[float, typer.Option(help="share of wrong oracle answers")] = 0.0,
    budget: Annotated[int, typer.Option(help="images selected for labeling per round")] = 20,
    strategy: Annotated[str, typer.Option(help="acquisition strategy: default (gate-aware) | random | margin | entropy | rare | diverse")] = "default",
    init_from: Annotated[Optional[Path], typer.Option(help="start from another project's model (dir or checkpoint)")] = None,
    database_url: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL (default: SQLite in the project dir)")] = None,
) -> None:
    """Create a project: loop.toml, the store (Alembic upgrade head) and its project row."""
    with clear_errors():
        project_dir = project_dir.expanduser().resolve()
        if weights not in (None, "default", "none"):  # loop.toml's relative paths are the project folder's, not this shell's
            weights = str(Path(weights).expanduser().resolve())
        if config_path(project_dir).exists():
            raise ConfigError(f"{config_path(project_dir)} already exists: this folder is a project already (edit loop.toml, or choose another folder)")
        try:
            config = ProjectConfig(
                name=name or project_dir.name, classes=_split_classes(classes), negative_class=negative_class, database_url=database_url,
                model=ModelConfig(backbone=backbone or "efficientnet_lite0", weights=weights or "default", image_size=image_size,
                                  bit_depth=int(bit_depth) if bit_depth.strip().isdigit() else bit_depth.strip(), pooling=pooling, train=train,
                                  init_from=str(init_from) if init_from else None),
                loop=LoopConfig(budget_per_round=budget, strategy=strategy),
                annotator=AnnotatorConfig(backend=annotator, oracle_manifest=path_beside(oracle_manifest, project_dir) if oracle_manifest else None,
                                          oracle_noise=oracle_noise),
            )
        except ValidationError as error:
            raise ConfigError(f"loop init: {validation_problems(error)}") from None
        if backbone is not None and init_from is None:  # a typo fails now, not in round 1's embedding step (QA)
            from modeling.backbones import known_backbone

            if not known_backbone(backbone):
                raise ConfigError(f"--backbone {backbone}: not a timm model name (e.g. efficientnet_lite0, efficientnet_lite2, resnet50)")
        if oracle_manifest is not None:  # read now: a wrong path failed round 1 in its pull, after init said "created" (QA)
            from labeling.simulated import read_ground_truth

            try:
                truth = read_ground_truth(oracle_manifest.expanduser().resolve())
            except (OSError, ValueError) as error:
                raise ConfigError(f"--oracle-manifest: {error}") from None
            unknown = sorted(set(truth.values()) - set(config.classes))
            if unknown:  # its answers would all be refused, round after round (QA)
                raise ConfigError(f"--oracle-manifest: labels that are not classes of the project: {', '.join(map(repr, unknown[:10]))} "
                                  f"(classes: {', '.join(config.classes)})")
        if weights not in (None, "default", "none") and init_from is None:  # the file must fit the network now, not in round 1
            from modeling.backbones import create_backbone

            try:
                create_backbone(config.model.backbone, weights=weights, pooling=config.model.pooling)
            except (ValueError, WeightsUnavailable) as error:
                raise ConfigError(f"--weights {weights}: {error}") from None
        environment_url = os.environ.get("LOOP_DATABASE_URL")
        if database_url and environment_url and not same_store(environment_url, database_url):  # the environment wins: the store would not be the one asked for
            raise ConfigError(f"--database-url {shown_url(database_url)} and LOOP_DATABASE_URL={shown_url(environment_url)} disagree, and the "
                              "environment wins for every command: unset LOOP_DATABASE_URL, or leave --database-url out")
        if init_from is not None:
            from loop.init_source import resolve_init_source
            from modeling.backbones import create_backbone
            from modeling.transfer import load_init_checkpoint

            if weights is not None:
                raise ConfigError("--weights and --init-from both name the starting weights: give one of them")
            source = resolve_init_source(init_from)
            init = load_init_checkpoint(source.checkpoint, class_names=config.classes, pooling=config.model.pooling, negative_class=config.negative_class)
            if backbone is not None and backbone != init.backbone_name:
                raise ConfigError(f"--backbone {backbone} and --init-from disagree: the checkpoint ({source.description}) holds the backbone "
                                  f"{init.backbone_name}; leave --backbone out")
            try:  # the weights must fit the network now, not in round 1 (after the answers were pulled into it)
                create_backbone(init.backbone_name, weights=str(init.backbone_weights_path), pooling=config.model.pooling)
            except (ValueError, WeightsUnavailable) as error:
                raise ConfigError(f"--init-from {source.checkpoint}: {error}") from None
            head_use = ("; the `head` strategy refits its linear head on this project's labels every round, so the transferred head "
                        "is used by `finetune` and `full` only") if init.head_weight is not None and config.model.train == "head" else ""
            console.print(f"starting from {escape(str(init.backbone_weights_path))}: {escape(source.description)} ({init.backbone_name}); "
                          f"{escape(init.head_reason)}{escape(head_use)}")
            if init.image_size is not None and init.image_size != config.model.image_size:  # said, not found out from the metrics
                console.print(f"[yellow]note:[/] the source model was trained at {init.image_size} px and this project's rounds run at "
                              f"{config.model.image_size} px (--image-size): what it learned shifts with the scale; give --image-size "
                              f"{init.image_size} to start where it was trained")
            # A copy in this project: the other project may retrain, move or be deleted; the rounds here must not change with it.
            config.model.init_from, config.model.init_from_source = INIT_CHECKPOINT, str(init.backbone_weights_path)
            config.model.init_from_backbone = f"{init.backbone_name}: {source.description}"  # the rounds say what was transferred (QA)
            config.model.backbone = init.backbone_name  # what the rounds run: loop.toml says so too
        made_dir = next((folder for folder in reversed([project_dir, *project_dir.parents]) if not folder.exists()), None)  # the top one init makes
        copied, url = None, None
        try:  # the project row, the checkpoint copy and loop.toml go in together, or none of them
            project_dir.mkdir(parents=True, exist_ok=True)
            checked = check_store_is_free(project_dir, config)
            if init_from is not None:
                copy = project_dir / INIT_CHECKPOINT
                if not (copy.exists() and copy.samefile(config.model.init_from_source)):  # pointed at this very copy: it is there
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(config.model.init_from_source, copy)
                    copied = copy
            add_project_row(checked, project_dir, config)
            url = checked  # from here on, a failure removes the row
            save_config(project_dir, config)
        except BaseException:
            # a store holding the row without its loop.toml would refuse the next try
            if url is not None:
                try:
                    remove_project_row(url)
                except Exception:  # noqa: BLE001  (the first failure is the one to report)
                    pass
            if made_dir is not None:  # the folders were made for this init: nothing in them is anyone else's
                shutil.rmtree(made_dir, ignore_errors=True)
            elif copied is not None:
                copied.unlink(missing_ok=True)
            raise
    console.print(f"[green]created[/] {config_path(project_dir)} and the store at {escape(shown_url(url))}")
    if os.environ.get("LOOP_DATABASE_URL") and not database_url:  # loop.toml does not say where the store is
        console.print("[yellow]note:[/] the store is the one LOOP_DATABASE_URL names, which loop.toml does not record: set it for every "
                      "command on this project (or put database_url in loop.toml)")


@app.command()
def ingest(
    source: Annotated[Path, typer.Argument(help="folder (class folders or MVTec AD layout) or CSV manifest path,label[,part] (part: photos of one physical part, never split apart)")],
    project: ProjectOption,
    unlabeled: Annotated[bool, typer.Option("--unlabeled", help="ingest every image below SOURCE without labels")] = False,
    split: Annotated[str, typer.Option(help="auto: stratified test/validation/train; test: a held-out set (its unlabeled images too: held out, never training labels); train: never test")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Reference images in place (path + content hash), quarantine undecodable ones, split stratified."""
    with clear_errors():
        ctx = open_project(project)
        try:
            with project_lock(ctx.root, action="loop ingest", engine=ctx.engine):
                report = ingest_source(ctx, source, unlabeled=unlabeled, split=split, show_progress=not quiet)
        except KeyboardInterrupt:  # it stores everything in one transaction at the end: an interruption stores nothing
            error_console.print("[bold red]interrupted:[/] nothing of this ingest was stored; run it again to ingest the folder")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    # each file counted once: new and decodable, a duplicate of another file here, already known, or quarantined
    relabeled = [f"{n} {what}" for n, what in ((report.n_labels_changed, "labels changed"), (report.n_labels_added, "labels added")) if n]
    console.print(f"[green]ingested[/] {report.n_files} files ({report.layout} layout): {report.n_new_images - report.n_quarantined} new images, "
                  f"{report.n_duplicates} byte-identical duplicates merged, {report.n_already_known} already known"
                  + (f" ({', '.join(relabeled)})" if relabeled else "") + f", {report.n_quarantined + report.n_quarantined_copies} quarantined")
    if report.split_counts:
        console.print("splits: " + ", ".join(f"{k} {v}" for k, v in sorted(report.split_counts.items())))
    for path, reason in report.quarantined[:20]:
        console.print(f"[yellow]quarantined[/] {escape(str(path))}: {escape(str(reason))}")
    for note in report.notes:
        console.print(f"note: {escape(str(note))}")


def gate_table(gates: list, *, title: str, classes_missing: list[str] | None = None) -> Table:
    table = Table(title=title)
    for column in ("gate", "value", "threshold", "result"):
        table.add_column(column)
    for gate in gates:
        value = "n/a" if gate.value is None else f"{gate.value:.4g}"
        result = "n/a" if not gate.applicable else ("[green]pass[/]" if gate.passed else "[bold red]FAIL[/]")
        if gate.name == "macro_f1" and gate.applicable and not gate.passed and classes_missing:
            # QA: "macro_f1 0.9787 >= 0.7 FAIL" read as a contradiction: the value is over the classes the test split holds
            below = gate.value is not None and gate.value < gate.threshold
            result += f" ({'and ' if below else ''}no test image of {escape(', '.join(classes_missing))})"
        table.add_row(gate.name, value, f"{gate.comparison} {gate.threshold:g}", result)
    return table


@app.command("round")
def round_command(
    project: ProjectOption,
    train: Annotated[Optional[str], typer.Option(help="training strategy for this round: head | finetune | full")] = None,
    annotator: Annotated[Optional[str], typer.Option(help="annotator backend for this round")] = None,
    fail_on_gates: Annotated[bool, typer.Option("--fail-on-gates", help=f"exit {EXIT_GATES_FAILED} when a gate fails")] = False,
    quarantine_missing_folders: Annotated[bool, typer.Option(
        "--quarantine-missing-folders", help="quarantine missing images even when whole folders are gone or empty (without it the round "
                                             "stops: an unmounted drive looks like that)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run one round: pull labels, embed, train, threshold, evaluate, gate, flag label issues, select, push."""
    with clear_errors():
        ctx = open_project(project)
        last_round_before = _latest_round(ctx)
        try:
            with project_lock(ctx.root, action="loop round", engine=ctx.engine), sigterm_as_interrupt():
                # torch & co. load once the project is ours: a busy project is said at once, not after 20 s of imports (QA);
                # a killed round is recorded as failed before them (QA: status showed it alive for those ~10 s)
                from loop.stale_rounds import record_stale_rounds
                record_stale_rounds(ctx, console=console)
                from loop.round import RoundOptions, run_round

                outcome = run_round(ctx, RoundOptions(train_strategy=train, annotator=annotator, show_progress=not quiet,
                                                    quarantine_missing_folders=quarantine_missing_folders), console=console)
        except OSError as error:  # a full disk, a file in the way, Label Studio gone: with the round and step it stopped in
            where = getattr(error, "round_step", None)
            if where is None:
                raise
            error_console.print(f"[bold red]error:[/] round {where[0]} stopped in step {where[1]}: {escape(str(error))}")
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt as error:
            how = getattr(error, "how", None)
            latest = _latest_round(ctx)
            if latest is None or latest == last_round_before:
                recorded = "before the round started: nothing was recorded"
            elif latest[2] == "failed":
                recorded = f"round {latest[1]} is recorded as failed (`loop status --json` gives the step it stopped in)"
            elif latest[2] == "completed":  # it came as the finished round let go of its locks
                recorded = f"round {latest[1]} had completed"
            else:  # a second Ctrl-C cut short the recording of the first
                recorded = f"round {latest[1]} is left as running; the next `loop round` records it as interrupted"
            error_console.print(f"[bold red]{'terminated (' + how + ')' if how else 'interrupted'}:[/] {recorded}; the labels and earlier rounds "
                                "are kept. `loop round` starts a new one.")
            raise typer.Exit(EXIT_TERMINATED if how else EXIT_INTERRUPTED) from None
    print_round(outcome)
    if ctx.config.loop.keep_model_rounds:
        _prune_after_round(ctx)
    failed = [g.name for g in outcome.gates if g.applicable and not g.passed] or (["all (cold start: no model yet)"] if outcome.details.get("cold_start") else [])
    if failed and fail_on_gates:
        error_console.print(f"[bold red]gates failed:[/] {', '.join(failed)}")
        raise typer.Exit(EXIT_GATES_FAILED)


def _prune_after_round(ctx: Any) -> None:
    """[loop] keep_model_rounds: the older rounds' model files go once a round is done. A failure here is a warning: the
    round itself is recorded, and `loop prune` can finish the job."""
    from sqlalchemy.exc import SQLAlchemyError

    from loop.prune import describe, prune_model_files

    try:
        with project_lock(ctx.root, action="loop round (pruning model files)", engine=ctx.engine):
            summary = prune_model_files(ctx, keep_rounds=ctx.config.loop.keep_model_rounds, by="loop round (keep_model_rounds)")
    except (ProjectBusy, OSError, StoreUnavailable, SQLAlchemyError) as error:  # the round is recorded: a warning, not a traceback
        error_console.print(f"[yellow]warning:[/] the older rounds' model files were not deleted: {escape(str(error).rstrip('.'))}. "
                            "`loop prune` deletes them")
        return
    if summary.error:
        error_console.print(f"[yellow]warning:[/] {escape(describe(summary))}. `loop prune` deletes the rest")
    elif summary.deleted or summary.temporary_files:
        console.print(escape(describe(summary)))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated (a KeyboardInterrupt) for the block, as Ctrl-C would: a round stopped by a scheduler
    records itself as failed with the step it was in. Only the main thread can take signals (a test's thread: none)."""
    import signal
    import threading

    from loop.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    terminated: list[bool] = []

    def terminate(_signum, _frame):  # noqa: ANN001, ANN202
        # the next ones (schedulers send several) must not cut the recording short, nor kill the exit that follows it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        terminated.append(True)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        if not terminated:  # once stopped, the command only says so and exits: SIGTERM stays ignored until then
            signal.signal(signal.SIGTERM, previous)


def _latest_round(ctx) -> tuple[int, int, str] | None:  # noqa: ANN001
    """(id, number, status) of the project's newest round: what a Ctrl-C left behind, compared with before the round."""
    from sqlalchemy import select

    from store import session_scope
    from store.models import Round

    with session_scope(ctx.engine) as session:
        row = session.execute(select(Round.id, Round.number, Round.status).order_by(Round.id.desc()).limit(1)).first()
    return tuple(row) if row is not None else None


def print_round(outcome) -> None:  # noqa: ANN001
    from store.reports import gate_values_text, metrics_by_batch_of, unfamiliar_batches_of

    metrics, details = outcome.metrics, outcome.details
    counts = details["labeled_counts"]
    _print_pull(details.get("pull") or {})
    ties = details.get("ties") or {}
    if ties.get("n_images"):  # QA: the pull's line never named the ties its answers made, only status --json did
        console.print(f"annotators disagree evenly on {ties['n_images']} {'image' if ties['n_images'] == 1 else 'images'}: kept out of training, "
                      f"{ties.get('asked', 0)} asked for one more answer this round")
    if details.get("cold_start"):
        selection = details.get("selection") or {}
        console.print(f"round {outcome.number}: [yellow]cold start[/] · {escape(details['cold_start']['reason'])}")
        console.print(f"labeled: train {counts['train']}, validation {counts['validation']}, test {counts['test']}; unlabeled {counts['unlabeled']} · "
                      f"{_selected_for_labeling(details.get('push') or {})} "
                      f"({selection.get('scanned', 0)} pool images ranked against {selection.get('n_known_good', 0)} known-good) · "
                      f"total {outcome.timings_s.get('total', 0):.1f} s")
        return
    console.print(gate_table(outcome.gates, title=f"round {outcome.number}: gates on the frozen test split ({metrics['n_images']} images)",
                             classes_missing=details.get("classes_missing_from_test") or metrics.get("classes_missing")))
    intervals = intervals_text(details)
    if intervals:  # photos of one part count as one draw: a test split of few parts cannot settle a 3% gate
        console.print(intervals)
    without = (details.get("data_quality") or {}).get("test_without_copies")
    if without:  # the warning during the round said why; a --quiet round prints only this summary
        console.print(f"[yellow]{without['n_excluded']} test images have a labeled near-copy outside the test split[/]; "
                      f"without them ({without['n_images']} images): {gate_values_text(without)}")
    _print_coverage([dataclasses.asdict(batch) for batch in unfamiliar_batches_of(details) or []],
                    [dataclasses.asdict(row) for row in metrics_by_batch_of(details) or []])
    training = details.get("training") or {}
    if training:
        best, history = training.get("best_epoch"), training.get("history") or []
        kept = "" if not history else (f", kept epoch {best} of {max(len(history) - 1, 0)}" if best is not None else f", {len(history) - 1} epochs")
        if best == 0 and len(history) > 1 and training.get("strategy") in ("finetune", "full"):  # nothing fine-tuned was deployed
            kept += " (epoch 0: the frozen backbone with its linear head; no fine-tuned epoch beat it on validation)"
        init = details.get("init_from")
        started = "" if not init else (f" · started from {escape(str(init.get('source') or init.get('checkpoint')))}"
                                       + (f", backbone {escape(str(init['backbone']))}" if init.get("backbone") else "")
                                       + f"; {escape(str(init.get('head') or ''))}{'' if init.get('head_used') else ' (head not used this round)'}")
        console.print(f"trained: {escape(str(training.get('strategy')))} on {training.get('n_fit')} labeled images{kept}{started}")
    threshold = details.get("threshold")
    console.print(
        f"labeled: train {counts['train']}, validation {counts['validation']}, test {counts['test']}; unlabeled {counts['unlabeled']}"
        + (f" (and {counts['unlabeled_test']} in test, {counts['held_back']} held back)" if counts.get("unlabeled_test") or counts.get("held_back") else "")
        + (f"; {counts['unlabeled_train_validation']} in train/validation wait for an answer (tied, its answer deleted in the annotation tool, or refused as not a class)"
           if counts.get("unlabeled_train_validation") else "")
        + " · "
        f"accuracy {metrics['accuracy']:.4f} · "
        # without a negative class there is no defect score to rank nor threshold to choose: the most probable class decides
        + (f"ROC-AUC {'n/a' if metrics.get('roc_auc_defect') is None else round(metrics['roc_auc_defect'], 4)} · "
           f"threshold {'n/a' if threshold is None else f'{threshold:.3g}'} ({_threshold_origin(details)}) · " if threshold is not None or metrics.get("roc_auc_defect") is not None
           else "no negative class: the most probable class decides · ")
        + (latency_text(details["latency"]) if details.get("latency") else "latency not measured")
    )
    data_quality = details.get("data_quality") or {}
    near = data_quality.get("near_duplicates")
    console.print(f"label issues flagged: {details['label_quality']['n_flagged']}"
                  + (f" · near-duplicates: {near['n_issues']} images ({near['pairs_across_test_split']} pairs across the test split; "
                     f"{near.get('pool_images_moved_to_test', 0)} pool copies joined test, {near.get('pool_images_held_back_from_labeling', 0)} held back)"
                     f" · outliers: {data_quality['outliers']['n_issues']}"
                     + (f" (labeled images of {', '.join(data_quality['outliers']['groups_not_judged'])} not judged: under 20 images)"
                        if data_quality["outliers"].get("groups_not_judged") else "") if near else "")
                  + f" · {_selected_for_labeling(details.get('push') or {})} · total {outcome.timings_s.get('total', 0):.1f} s")
    if details["label_quality"].get("weak_model_note"):
        console.print(f"[yellow]note:[/] label issues: {escape(details['label_quality']['weak_model_note'])}")
    plots = [outcome.artifacts.get(name) for name in ("confusion_matrix_png", "gates_png", "training_curves_png")]
    console.print("plots: " + ", ".join(str(path) for path in plots if path))


def _print_coverage(batches: list[dict], by_batch: list[dict], *, round_number: int | None = None) -> None:
    """Ingest batches unlike the training labels or the test split (a new camera; store.reports.UnfamiliarBatch as a
    dict), and the gates per batch (BatchTestMetrics)."""
    from store.reports import gate_values_text, ingest_batches_text

    of_round = "" if round_number is None else f" (round {round_number})"
    for batch in batches:
        unlike = [f"{share:.0%} unlike the {what}" for what, share, flagged in (
            ("training labels", batch["share_unlike_training_labels"], batch["unlike_training_labels"]),
            ("labeled test images", batch["share_unlike_test_labels"], batch["unlike_test_labels"])) if flagged and share is not None]
        drawn = f"; {batch['n_drawn_into_test']} asked for the test split, without a guess" if batch["n_drawn_into_test"] else ""
        console.print(f"[yellow]new images unlike the labeled ones{of_round}:[/] {ingest_batches_text(batch['ingest_batch_ids'])} "
                      f"({escape(str(batch['source']))}): "
                      f"{' and '.join(unlike)}{drawn}")
    if by_batch:
        console.print(f"gates by ingest batch on the test split{of_round}: " + " · ".join(
            f"{ingest_batches_text(row['ingest_batch_ids']).removeprefix('ingest ')} ({escape(' ... '.join(Path(part).name for part in str(row['source']).split(' ... ')))}, "
            f"{row['n_images']} images{_good_and_defects(row)}{', too few to be gated alone' if row.get('too_few_images') else ''}): "
            f"{gate_values_text(row)}" for row in by_batch))


def latency_text(latency: dict) -> str:
    """The round's latency as measured (the gate's figure: ms per image at batch 32, the median of its repeats), with
    what it was measured on and how busy the machine was: a loaded machine's figure is an upper bound (QA: one model
    measured 18, 28 and 36 ms as the load went)."""
    text = (f"latency {latency['ms_per_image']:.1f} ms/image (ONNX Runtime, batch {latency.get('batch_size', 32)}, {latency['threads']} threads, "
            f"{latency['cpu']}")
    load, cpus, own = latency.get("load_average_1min"), latency.get("cpu_count"), latency.get("threads") or 0
    # the 1-minute load still counts this round's own training threads (review): busy when the rest fills the CPUs
    fastest = latency.get("ms_per_image_fastest")
    if isinstance(load, (int, float)) and cpus and load - own >= cpus:
        text += (f"; load {load:g} on {cpus} CPUs, this round's own {own} threads included: busy, an upper bound"
                 + (f", fastest repeat {fastest:.1f} ms" if isinstance(fastest, (int, float)) else ""))
    elif isinstance(fastest, (int, float)) and fastest > 0 and latency["ms_per_image"] > 1.5 * fastest:
        # the repeats themselves show interference the 1-minute load missed (QA: the demo failed its gate at a median
        # of 35.5 ms, fastest 17.6 ms, load 2.96 on 2 CPUs)
        text += f"; its repeats ran from {fastest:.1f} ms: something else took the CPU while it was measured, an upper bound"
    return text + ")"


def intervals_text(details: dict) -> str:
    """The round's line on its FPR and defect-recall intervals, and what each counts as one draw; "" without any."""
    intervals = [(label, details.get("test_intervals", {}).get(name)) for name, label in (("negative_fpr", "FPR"), ("defect_recall", "defect recall"))]
    intervals = [(label, i) for label, i in intervals if i and i.get("low") is not None]
    if not intervals:
        return ""
    return "90% intervals on the test split: " + " · ".join(
        f"{label} {i['value']:.3f} [{i['low']:.3f}, {i['high']:.3f}] ({i['n_images']} images"
        + (f" of {i['n_parts']} {DRAW_NAMES.get(i.get('grouped_by'), 'parts')}" if i["n_parts"] < i["n_images"] else "")
        + ("" if i["settled"] else "; cannot settle the gate") + ")" for label, i in intervals)


# what a test interval counts as one draw (details.test_intervals.*.grouped_by; rounds before it was recorded: parts)
DRAW_NAMES = {"parts": "parts", "near-copies": "draws (near-copy groups as one)", "parts and near-copies": "draws (parts, near-copy groups as one)"}
GATE_SHORT = {"macro_f1": "F1", "defect_recall": "recall", "negative_fpr": "FPR", "latency_ms": "latency"}  # the status table's words


def _print_doubts_on_gates(latest: dict) -> None:
    """What the newest completed round said the gates cannot vouch for (a status entry): batches whose defects only good
    test parts stand near, and ingests whose labels look wrong as a whole. The round warned while it ran; status keeps
    saying so until a round no longer finds them (they were in status --json alone)."""
    from store.reports import ingest_batches_text

    if latest.get("unsettled_gates"):
        console.print(f"[yellow]gates the test split cannot settle (round {latest['number']}):[/] " + " · ".join(
            f"{name} {interval['value']:.3g}, 90% interval [{interval['low']:.3g}, {interval['high']:.3g}] around {gate['threshold']:g} "
            f"({interval['n_images']} images)" for name in latest["unsettled_gates"]
            if (interval := (latest.get("test_intervals") or {}).get(name)) and (gate := next((g for g in latest["gates"] if g["name"] == name), None)))
            + ": their pass or fail is the test split's luck; label more test images of those classes")
    changed = latest.get("test_labels_changed") or {}
    if test_split_changed(changed):
        console.print(f"[yellow]test labels changed (round {latest['number']}):[/] since round {changed['since_round']}, {changed['relabeled']} labeled "
                      f"test images have another label, {changed['no_longer_labeled']} none any more{test_split_moves_text(changed)}{escape(test_split_renames_text(changed))}: its gates score against other labels "
                      "than the round before")
    for row in latest.get("defects_unmeasured") or []:
        console.print(f"[yellow]defects not measured (round {latest['number']}):[/] {ingest_batches_text(row['ingest_batch_ids'])} "
                      f"({escape(str(row['source']))}): the model calls {row['n_predicted_defect']} of its unlabeled images defects, and the "
                      "labeled test image nearest each is a good part. Give the test split some of its defects (`loop ingest --split test`)")
    for row in (latest.get("label_quality") or {}).get("suspect_batches") or []:
        console.print(f"[yellow]labels suspect as a whole (round {latest['number']}):[/] {ingest_batches_text([row['ingest_batch_id']])} "
                      f"({escape(str(row['source']))}): {row['n_flagged']} of its {row['n_judged']} labeled training and validation images are "
                      f"suspected label errors ({(row['share_flagged'] or 0):.0%}; {(row['share_flagged_elsewhere'] or 0):.0%} in the other ingests)"
                      + (f"; its {row['n_labeled_test']} labeled test images are not checked" if row["n_labeled_test"] else ""))


def _good_and_defects(row: dict) -> str:
    """': 2 good, 10 defects' of a batch's test images (what its FPR and recall rest on); "" where not recorded."""
    return f": {row['n_good']} good, {row['n_defects']} defects" if row.get("n_good") is not None and row.get("n_defects") is not None else ""


def _selected_for_labeling(push: dict) -> str:
    if push.get("backend") == "none":  # nobody to push to: the batch is recorded for `loop status` and the API
        return f"selected for labeling: {push.get('recorded', 0)} recorded (annotator: none)"
    reopened = f"{push['reopened']} answered tasks asked again, " if push.get("reopened") else ""
    return f"selected for labeling: {push.get('pushed', 0)} pushed, {reopened}{push.get('pending', 0)} pending"


def _print_pull(pull: dict, *, lead: str = "pulled from the annotators") -> None:
    """What this round's pull took in from the annotators, and why any answer could not be used."""
    counts = [(pull.get(key) or 0, what) for key, what in (("new_label_events", "new answers"), ("skipped", "skipped"),
                                                            ("rejected", "rejected"), ("deleted", "deleted"))]
    if not any(n for n, _ in counts):
        return
    backend = pull.get("labelstudio") or {}
    confirmed, changed, renamed = backend.get("confirmed"), backend.get("changed"), backend.get("renamed_on_the_way_in")
    of_them = [f"{changed} {_answers(changed)} changed in place" if changed else "",
               f"{confirmed} {_answers(confirmed)} saved again unchanged: confirmed" if confirmed else "",
               f"{renamed} {_answers(renamed)} naming a class renamed since, taken as its new name" if renamed else ""]
    console.print(f"{lead}: " + ", ".join(f"{n} {what}" for n, what in counts if n)
                  + (f" (of the new: {'; '.join(part for part in of_them if part)})" if any(of_them) else ""))
    for reason in (pull.get("rejections") or [])[:5]:
        console.print(f"  [yellow]rejected:[/] {escape(str(reason))}")


def _answers(n: int) -> str:
    return "answer" if n == 1 else "answers"


def _threshold_origin(details: dict) -> str:
    """Where the threshold was chosen and what the loop expects there, e.g. "out_of_fold, finetune per fold, 250 good
    parts; own estimate FPR 0.028, recall 0.46": next to the test split's gates, a gap says the threshold is unsure."""
    choice = threshold_of(details)
    if choice is None:
        return str(details.get("threshold_source"))
    model = f", {choice.out_of_fold_model}{' per fold' if choice.out_of_fold_model != 'head' else ''}" if choice.out_of_fold_model else ""
    estimate = choice.estimated_metrics
    own = ", ".join(f"{name} {estimate[key]:.3f}" for key, name in (("negative_fpr", "FPR"), ("defect_recall", "recall")) if estimate.get(key) is not None)
    return f"{choice.source}{model}, {choice.n_negatives} good parts" + (f"; own estimate {own}" if own else "")


@app.command("rename-class")
def rename_class(
    old: Annotated[str, typer.Argument(help="the class name the stored answers use, no longer in loop.toml")],
    new: Annotated[str, typer.Argument(help="a class of loop.toml (edit loop.toml first)")],
    project: ProjectOption,
    merge: Annotated[bool, typer.Option("--merge", help="NEW already labels images: merge OLD into it (cannot be undone)")] = False,
    flip_defect: Annotated[bool, typer.Option("--flip-defect", help="OLD labeled defects and NEW is the negative class, or the other "
                                                                    "way round: its images change sides for the gates")] = False,
) -> None:
    """Move the answers naming a class to its new name in loop.toml: the store's (rewritten in place: the label history
    then says NEW) and, when images have tasks in Label Studio, the answers, guesses and questions there too, whose
    choices then follow loop.toml (Label Studio must be up: otherwise nothing is changed)."""
    from sqlalchemy import func, select

    from labeling import create_backend
    from store.db import session_scope
    from store.models import AnnotationTask, Image, LabelEvent
    from store.queries import current_labels, get_project, rename_label

    renamed: Any = None
    warnings: list[str] = []
    with clear_errors():
        ctx = open_project(project)
        if new not in ctx.config.classes:
            raise ConfigError(f"{new!r} is not one of loop.toml's classes ({', '.join(ctx.config.classes)}): put it there first")
        if old in ctx.config.classes:
            raise ConfigError(f"{old!r} is still one of loop.toml's classes: rename or remove it there first (a class that stays "
                              "is not renamed; to merge it into another, remove it from loop.toml and give --merge)")
        with project_lock(ctx.root, action="loop rename-class", engine=ctx.engine):
            with session_scope(ctx.engine) as session:  # what it would take, read only
                project_row = get_project(session)

                def answers_naming(label: str) -> int:
                    return session.scalar(select(func.count()).select_from(LabelEvent).join(Image, Image.id == LabelEvent.image_id)
                                          .where(Image.project_id == project_row.id, LabelEvent.label == label)) or 0

                in_label_studio = bool(session.scalar(select(func.count()).select_from(AnnotationTask).join(Image, Image.id == AnnotationTask.image_id)
                                                      .where(AnnotationTask.backend == "labelstudio", Image.project_id == project_row.id)))
                if not in_label_studio and not answers_naming(old):  # first: a typo in OLD was told to give --merge (QA)
                    raise ConfigError(f"no stored answer says {old!r}: nothing to rename")
                if answers_naming(new) and not merge:
                    # with Label Studio, OLD may be named there only: the store cannot tell a typo, so the advice says both
                    typo = "" if answers_naming(old) else f" (no stored answer says {old!r}: check its spelling; Label Studio's answers may still name it)"
                    raise ConfigError(f"{new!r} already labels images: renaming {old!r} to it merges the two classes for good; give --merge to do so{typo}")
                was_negative, becomes_negative = old == project_row.negative_class, new == ctx.config.negative_class
                # the images OLD labels now (review: images relabeled since were counted); none: nothing changes sides
                current = current_labels(session, project_row.id)
                now_old = [image_id for image_id, info in current.items() if info.status == "labeled" and info.label == old]
                # ties with a vote for OLD: that vote changes sides too (review: merged silently when no image was OLD alone)
                tied = [image_id for image_id, info in current.items() if info.status == "tie"]
                tied_with_old = {image_id for i in range(0, len(tied), 500) for image_id in session.scalars(
                    select(LabelEvent.image_id).where(LabelEvent.image_id.in_(tied[i:i + 500]), LabelEvent.label == old))}
                if ctx.config.negative_class is not None and was_negative != becomes_negative and not flip_defect and (now_old or tied_with_old):
                    # QA: `rename-class fray free --merge` turned 18 defects, 4 of them in the frozen test split, into good
                    # parts without a word; the FPR and recall gates then counted them as such
                    n_labeled = len(now_old)
                    n_test = sum(session.scalar(select(func.count()).select_from(Image).where(Image.id.in_(now_old[i:i + 500]), Image.split == "test")) or 0
                                 for i in range(0, len(now_old), 500))
                    sides = ("defects", f"good parts ({new!r} is the negative class)") if becomes_negative else (
                        f"good parts ({old!r} was the negative class)", "defects")
                    ties = f", and the votes for it in {len(tied_with_old)} tied images," if tied_with_old else ""
                    raise ConfigError(f"{old!r} labeled {sides[0]}: renaming it to {new!r} makes its {n_labeled} labeled images "
                                      f"({n_test} in the frozen test split){ties} {sides[1]}, and the recall and FPR gates count them so from "
                                      "the next round. Give --flip-defect to do so. Nothing was changed")
                still_left_out = sorted(labels_left_out(session, project_row, ctx.config.classes) - {old})
                if still_left_out:  # checked before Label Studio is touched: the store's side must then go through
                    # one class at a time (QA: with two renamed in loop.toml, each rename named the other as to do first)
                    others = ", ".join(map(repr, still_left_out))
                    raise ConfigError(f"stored answers also name {others}, which loop.toml leaves out: classes are renamed one at a time. "
                                      f"Put {others} back in loop.toml's classes for now, run this rename, then take each out again and "
                                      "rename it (`loop rename-class OLD NEW`). Nothing was changed")
            if in_label_studio:
                # Label Studio first: it keeps its answers under the old name and the next pull would read them again. Its
                # answers since the last pull are taken in as they are, then it is rewritten without touching the store,
                # so a failure part-way leaves the store's answers unrenamed; running the command again finishes the rest.
                # (A webhook it sends meanwhile names a class the store does not have yet: deferred.)
                from labeling.labelstudio_client import LabelStudioError

                backend = create_backend("labelstudio", config=ctx.config, project_dir=ctx.root)
                try:
                    with session_scope(ctx.engine) as session:  # committed first: the rewrite would hide them
                        backend.record_answers_before_rename(session=session, project=get_project(session), old=old, new=new)
                    with session_scope(ctx.engine) as session:
                        renamed = backend.rename_class(session=session, project=get_project(session), old=old, new=new)
                except LabelStudioError as error:
                    raise ConfigError(str(error)) from error
            with session_scope(ctx.engine) as session:  # the store, in one short transaction
                project_row = get_project(session)
                n_events, n_images = rename_label(session, project_row.id, old, new)
                if renamed is not None:
                    backend.record_class_rename(session=session, project=project_row, renamed=renamed)
                if n_events == 0 and not (renamed is not None and (renamed.answers or renamed.predictions or renamed.tasks or renamed.drafts)):
                    raise ConfigError(f"no answer says {old!r}, in the store{' or in Label Studio' if renamed is not None else ''}: nothing to rename")
                sync_project_classes(session, project_row, ctx.config, project_dir=ctx.root)
            if renamed is not None:
                with session_scope(ctx.engine) as session:
                    warnings = backend.show_classes(session=session, project=get_project(session))
    console.print(f"[green]renamed[/] {old!r} to {new!r}: {n_events} stored answers of {n_images} images"
                  + (f"; in Label Studio {renamed.answers} answers, {renamed.drafts} drafts, {renamed.predictions} guesses and {renamed.tasks} "
                     "tasks' texts and questions" if renamed is not None else "")
                  + (f"; the oracle takes its manifest's {old!r} as {new!r}" if ctx.config.annotator.backend == "oracle" else ""))
    if renamed is not None and renamed.projects_gone:
        console.print(f"Label Studio projects {', '.join(map(str, renamed.projects_gone))} are gone (deleted there): nothing to rename in them")
    for warning in warnings:
        error_console.print(f"[yellow]warning:[/] {escape(warning)}")


@app.command()
def status(project: ProjectOption, as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Rounds with metrics and gates, labels by class and source, quarantined files."""
    with clear_errors():
        ctx, config_error = open_project_store(project)
        if config_error:  # the record is still worth reading; say why the next round will refuse to start
            error_console.print(f"[yellow]warning:[/] {escape(config_error)}\n(rounds refuse to start until loop.toml is fixed; the store's record follows)")
        report = project_status(ctx)
    # the store says whether any folder or machine writes to it now (PostgreSQL, a SQLite file); this folder's lock too
    try:
        store_held = store_lock_held(ctx.engine)
    except (DatabaseOperationalError, DatabaseInterfaceError):  # the record is printed already: unknown, not a traceback
        store_held = None
    held = bool(store_held) or project_lock_held(ctx.root)
    running_without_process = [r["number"] for r in report["rounds"] if r["status"] == "running"] if not held else []
    for r in report["rounds"]:  # as the API's rounds say it (QA: --json gave a killed round as plainly "running")
        r["process_alive"] = (r["number"] not in running_without_process) if r["status"] == "running" else None
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
        return
    labels = report["labels"]
    quarantined = len(report["quarantined"])  # QA: 640 here, 643 in the API and the export, unexplained (replaced files: neither)
    console.print(f"[bold]{report['project']['name']}[/]: {report['images']['ok']} images ({report['images']['by_split']})"
                  + (f" and {quarantined} quarantined" if quarantined else "")
                  + f", {labels['labeled']} labeled, {labels['unlabeled']} unlabeled, {labels['ties_unresolved']} annotator ties")
    table = Table(title="labels by class and source")
    sources = sorted({s for per in labels["by_class_and_source"].values() for s in per})
    for column in ("class", *sources, "total"):
        table.add_column(column)
    left_out = report["project"]["classes_left_out"]
    for name, per in labels["by_class_and_source"].items():
        table.add_row(escape(name) + (" [yellow](not in loop.toml)[/]" if name in left_out else ""), *(str(per.get(s, 0)) for s in sources),
                      str(labels["by_class"][name]))
    console.print(table)
    if left_out:  # QA: listed like the others, while the next round and ingest refuse
        console.print(f"[yellow]warning:[/] stored answers name {escape(', '.join(map(repr, left_out)))}, which loop.toml's classes leave out: "
                      f"rounds and ingests refuse until it is put back, or renamed (`loop rename-class {escape(left_out[0])} NEW_NAME "
                      f"--project {escape(str(ctx.root))}`)")
    narrow = console.width < NARROW_TERMINAL
    # narrow: no column lines, nine columns and their numbers whole fit 80 columns only without them
    rounds = (Table(title="rounds", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True) if narrow
              else Table(title="rounds"))
    round_rows: list[tuple[str, ...]] = []
    for r in report["rounds"]:
        # narrow: the failed gates by their columns' words, which fit the column whole ("negative_fpr" folded mid-word)
        shown = GATE_SHORT if narrow else {}
        gates = "all pass" if r["all_gates_pass"] else ", ".join(shown.get(g["name"], g["name"]) for g in r["gates"]
                                                                 if g["applicable"] and not g["passed"]) or "-"
        if r["unsettled_gates"] and gates != "-":  # the test split is too small to tell these gates' pass from fail (QA)
            gates += f" ({', '.join(GATE_SHORT.get(name, name) for name in r['unsettled_gates'])} unsettled)"
        missing = r.get("classes_missing_from_test") or []
        if missing:  # macro F1 read 1 beside its failed gate: the classes it could not score (QA)
            gates += f"; no test image of {', '.join(missing)}"
        changed = r.get("test_labels_changed") or {}
        if test_split_changed(changed):  # its values moved with the labels too (QA: only the newest said so)
            gates += "; test labels changed"
        trained = r["train_strategy"] or "-"
        if r["training"].get("best_epoch") is not None and r["training"].get("epochs_run"):
            trained += f" (epoch {r['training']['best_epoch']}/{r['training']['epochs_run']})"
        state = "running?" if r["number"] in running_without_process else r["status"]
        # P(defect) threshold and where it was chosen (never the test split): beside the FPR it decides
        choice = r.get("threshold_choice") or {}
        source = {"out_of_fold": "oof", "validation": "val"}.get(choice.get("source"), choice.get("source"))  # short: the table is cramped at 80 columns
        threshold = "-" if r.get("threshold") is None else f"{r['threshold']:.3g}" + (f" ({source})" if source else "")
        round_rows.append((str(r["number"]), state, trained, *(metric_text(r, name) for name in ("macro_f1", "defect_recall", "negative_fpr", "latency_ms")),
                           threshold, gates))
    columns = ("round", "status", "trained", "macro F1", "defect recall", "FPR", "latency ms", "threshold", "gates")
    for index, column in enumerate(columns):
        # narrow terminals wrap a cell instead of cutting it to "comple…"; the status ("running?") stays whole, and so
        # does a number (0.000148 folded at 80 columns read "0.000" over "148"): wide enough for each column's longest
        # a number column: as wide as its longest number and its longest header word (a header folds between words)
        number_width = max(max((len(row[index].split(" ", 1)[0]) for row in round_rows), default=0),
                           max(len(word) for word in column.split())) if 3 <= index <= 7 else None
        # narrow: number columns fixed at that width, the others share the rest (shrunk in proportion, rich cut the last one)
        rounds.add_column(column, overflow="fold", no_wrap=column in ("round", "status"), width=number_width if narrow else None,
                          min_width={"status": 9, "gates": 8}.get(column, number_width))
    for row in round_rows:
        rounds.add_row(*row)
    console.print(rounds)
    changed = [(r["number"], r["classes_changed"]) for r in report["rounds"] if r.get("classes_changed")]
    if changed:  # QA: a macro F1 series over 5, then 6, then 5 classes read as one
        console.print("classes changed: " + "; ".join(f"before round {number} ({escape(class_change_text(change))})" for number, change in changed)
                      + ": macro F1 across such a change averages over other classes")
    newest = report["rounds"][-1] if report["rounds"] else None
    if newest is not None and newest["status"] == "failed" and newest.get("error"):  # why, where the table only says "failed" (QA)
        console.print(f"[yellow]round {newest['number']} failed:[/] {escape(str(newest['error']))}")
    latest = next((r for r in reversed(report["rounds"]) if r["status"] == "completed"), None)
    if latest is not None:  # the newest completed round's word on new images unlike the labeled ones (a new camera)
        _print_coverage(latest.get("unfamiliar_batches") or [], latest.get("test_metrics_by_batch") or [], round_number=latest["number"])
        _print_doubts_on_gates(latest)
        found = latest.get("data_issues") or {}
        flagged = (latest.get("label_quality") or {}).get("n_flagged")
        if flagged or found.get("near_duplicates") or found.get("outliers"):  # QA: outliers were printed by the round only
            console.print(f"round {latest['number']} flagged {flagged or 0} suspected label errors, {found.get('near_duplicates') or 0} images with a "
                          f"near-copy and {found.get('outliers') or 0} outliers: the dashboard lists them, `loop export` has a column each")
        held_back = selection_budget_text(latest.get("selection_budget"))
        if held_back:  # annotators behind: a manager's first question
            console.print(f"round {latest['number']} {escape(held_back)}")
    # what the annotators did, as the newest round that pulled read it, failed or running too: its answers are kept (QA)
    pulled = next((r for r in reversed(report["rounds"]) if r.get("pull")), None)
    if pulled is not None:
        _print_pull(pulled["pull"], lead=f"round {pulled['number']} pulled from the annotators")
    if running_without_process:  # killed (SIGKILL, power): nothing runs it, and nothing marked it yet
        holder = ("no process holds this project folder or its store" if store_held is not None
                  else "no process on this machine holds this project folder")
        console.print(f"[yellow]round {', '.join(map(str, running_without_process))} is recorded as running, but {holder}: it ended "
                      "without finishing. The next `loop round` marks it interrupted.[/]")
    if report["quarantined"]:
        console.print(f"[yellow]{len(report['quarantined'])} quarantined files[/]")
        for item in report["quarantined"][:20]:
            console.print(f"  {escape(str(item['path']))}: {escape(str(item['reason']))}")


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="the file to write: .csv or .jsonl")],
    project: ProjectOption,
    round_number: Annotated[Optional[int], typer.Option("--round", help="the completed round whose predictions and findings to include (default: the latest)")] = None,
    labeled_only: Annotated[bool, typer.Option("--labeled-only", help="only readable images with a label (no ties); the frozen test split's are kept, its `split` column says so: leave them out of training")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace OUT if it exists")] = False,
) -> None:
    """The images with their split and current label, and a completed round's decision, probabilities and findings
    (suspected label error with the suggested label, near-duplicate, outlier): one row each, to train elsewhere or
    audit. Images replaced by a new file are left out; quarantined ones are kept with their status. file_on_disk says
    whether each file is still as ingested (a round checks them; an export taken between rounds does too)."""
    from loop.export import export_project

    with clear_errors():
        ctx, _config_error = open_project_store(project)  # a loop.toml a round would refuse still has a record worth taking out
        summary = export_project(ctx, out, round_number=round_number, labeled_only=labeled_only, overwrite=force)
    by_class = ", ".join(f"{name} {n}" for name, n in sorted(summary.labeled_by_class.items()))
    console.print(f"[green]exported[/] {summary.n_images} images to {summary.path} ({sum(summary.labeled_by_class.values())} labeled"
                  + (f": {by_class}" if by_class else "") + ")")
    if summary.files_not_as_ingested:
        console.print(f"[yellow]left out[/] {sum(summary.files_not_as_ingested.values())} labeled images whose file is not as ingested ("
                      + ", ".join(f"{n} {what}" for what, n in sorted(summary.files_not_as_ingested.items()))
                      + "): a round reads a changed or missing one from a byte-identical copy it knows, or quarantines it; a quarantined "
                      "one comes back with its label when its file is ingested again")
    if summary.round_number is None:
        console.print("no completed round yet: the prediction and finding columns are empty")
    else:
        threshold = f"P(defect) threshold {summary.threshold:.4g}; " if summary.threshold is not None else ""
        console.print(f"predictions and findings of round {summary.round_number} ({threshold}{summary.n_suspected_label_errors} suspected "
                      f"label errors; its model: {summary.model_onnx or 'none deployed'})")


@app.command()
def prune(
    project: ProjectOption,
    keep_rounds: Annotated[Optional[int], typer.Option("--keep-rounds", help="the newest completed rounds whose model files stay (default: [loop] keep_model_rounds in loop.toml, else 3)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be deleted, delete nothing")] = False,
) -> None:
    """Delete the model files (model.pt, model.onnx) of older rounds: ~29 MB a round. The newest rounds' stay, and
    the newest fine-tuned backbone's model.pt (`loop init --init-from` names it); records, predictions and plots stay."""
    from loop.prune import describe, prune_model_files

    with clear_errors():
        ctx = open_project(project)
        keep = keep_rounds if keep_rounds is not None else (ctx.config.loop.keep_model_rounds or DEFAULT_KEEP_MODEL_ROUNDS)
        with project_lock(ctx.root, action="loop prune", engine=ctx.engine):
            summary = prune_model_files(ctx, keep_rounds=keep, dry_run=dry_run)
    if summary.error:  # what went before it is deleted and recorded: said so, not only the error
        error_console.print(f"[bold red]error:[/] {escape(describe(summary))}")
        raise typer.Exit(EXIT_USAGE)
    console.print(escape(describe(summary)))


@app.command()
def demo(
    project: ProjectOption,
    rounds: Annotated[int, typer.Option(help="rounds to run")] = 3,
    # 640: the frozen test split then holds ~40 good parts, so one false positive (2.5%) is within the 3% FPR gate;
    # with 480 (~32 good parts) a single one failed it. The gate needs a test split finer than its own 3% step.
    images: Annotated[int, typer.Option(help="synthetic images to generate")] = 640,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The embedded default: synthetic inspection images, SQLite, the simulated annotator, 3 rounds."""
    from loop.demo import run_demo

    with clear_errors():
        run_demo(project, n_rounds=rounds, n_images=images, seed=seed, console=console, print_round=print_round)


@app.command()
def simulate(
    source: Annotated[Path, typer.Argument(help="a fully labeled folder (class folders or MVTec AD layout) or CSV path,label[,part]: with parts, the test split holds whole parts")],
    out: Annotated[Path, typer.Option(help="output folder: simulation.json, simulation.md, gates_vs_labels.png")],
    negative_class: Annotated[Optional[str], typer.Option(help='the "no defect" class')] = None,
    strategies: Annotated[str, typer.Option(help="comma-separated acquisition strategies")] = "random,default",
    seed_labels: Annotated[int, typer.Option(help="randomly labeled images to start from")] = 40,
    budget: Annotated[int, typer.Option(help="labels added per round")] = 20,
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1, all reported")] = 5,
    noise: Annotated[float, typer.Option(help="share of seed labels flipped to a wrong class (exactly: rounded to whole labels)")] = 0.0,
    relabel_budget: Annotated[int, typer.Option(help="top suspected label errors sent back to the oracle per round")] = 0,
    max_rounds: Annotated[int, typer.Option(help="stop a run after this many rounds")] = 60,
    all_rounds: Annotated[bool, typer.Option("--all-rounds", help="keep going after the gates pass (until max rounds or an empty pool)")] = False,
    image_size: Annotated[int, typer.Option()] = 224,
    pooling: Annotated[str, typer.Option(help="embedding pooling: multilayer | avg (to compare with runs made before multilayer)")] = "multilayer",
) -> None:
    """Compare acquisition strategies with the simulated annotator: labels needed to pass the quality gates."""
    from loop.simulate import SimulationSettings
    from loop.simulate import simulate as run_simulation

    with clear_errors():
        run_simulation(SimulationSettings(
            source=source, out=out, strategies=_split_classes(strategies), negative_class=negative_class, seed_labels=seed_labels, budget=budget,
            seeds=seeds, noise=noise, relabel_budget=relabel_budget, max_rounds=max_rounds, image_size=image_size, pooling=pooling, stop_when_gates_pass=not all_rounds,
        ), console=console)
    console.print((out / "simulation.md").read_text())


@app.command()
def compare(
    projects: Annotated[list[Path], typer.Argument(help="two or more project folders (each holds loop.toml)")],
    out: Annotated[Path, typer.Option(help="output folder: compare.json, compare.md, gates_vs_labels.png")],
) -> None:
    """Projects side by side: each round's gates against the labels it used, and the labels each needed to pass every
    gate (a project started with --init-from against the same data from ImageNet weights, two lines, two cameras)."""
    from loop.compare import compare_projects, test_split_note

    with clear_errors():
        folders = list(dict.fromkeys(path.expanduser().resolve() for path in projects))
        if len(folders) < 2:
            raise ConfigError("loop compare needs two or more different project folders")
        if out.exists() and not out.is_dir():  # QA: "[Errno 17] File exists"
            raise ConfigError(f"--out {out} is a file: give a folder for compare.md, compare.json and gates_vs_labels.png")
        contexts = [open_project_store(folder)[0] for folder in folders]  # read only: a loop.toml a round would refuse still has its record
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot make --out {out}: {error.strerror}; nothing was written") from None
        report = compare_projects(contexts, out=out)
    table = Table(title="projects compared")
    for column in ("project", "started from", "rounds", "labels to pass the quality gates", "latest round's gates"):
        table.add_column(column, overflow="fold")
    for entry in report["projects"]:
        last = entry["rounds"][-1] if entry["rounds"] else None
        gates = "-" if last is None else " · ".join(f"{gate} {'n/a' if last['gates'][gate] is None else format(last['gates'][gate], '.3g')}"
                                                    for gate in ("macro_f1", "defect_recall", "negative_fpr"))
        if last is not None and last["unsettled_gates"]:
            gates += f" ({', '.join(last['unsettled_gates'])}: the test split cannot tell)"
        table.add_row(escape(entry["name"]), escape(entry["started_from"]), str(len(entry["rounds"])),
                      "not yet" if entry["labels_to_pass_gates"] is None else f"{entry['labels_to_pass_gates']} (round {entry['round_passing']})", gates)
    console.print(table)
    console.print(escape(test_split_note(report)))
    if report["folders_sharing_a_store"]:
        console.print(f"[yellow]warning:[/] {escape(', '.join(report['folders_sharing_a_store']))} share one store: folders of one project, not "
                      "projects to compare")
    console.print(f"wrote {escape(str(out / 'compare.md'))}, compare.json and gates_vs_labels.png")


@app.command()
def serve(
    project: ProjectOption,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="1-65535 (0 would bind a port nobody is told)")] = 8000,
) -> None:
    """The managers' REST API and dashboard for one project (tokens: LOOP_API_TOKEN, LOOP_API_READ_TOKEN; made up
    for this run and printed when neither is set)."""
    from api.app import serve as serve_api
    from api.settings import Settings

    with clear_errors():
        ctx = open_project(project)
        try:
            settings = Settings(database_url=ctx.database_url, project_dir=ctx.root)
        except ValidationError as error:  # one line naming the variable (a QA run got pydantic's block naming the field)
            raise ConfigError("; ".join(f"LOOP_{str(problem['loc'][0]).upper()}" + ("" if _secret_setting(problem['loc'][0]) else f"={problem.get('input')!r}")
                                        + f": {str(problem['msg']).removeprefix('Value error, ')}" for problem in error.errors())) from None
        serve_api(ctx.root, host=host, port=port, settings=settings, log_level="warning")


def _secret_setting(name: object) -> bool:
    """A token or secret: its value is never echoed in a message (a terminal's scrollback, a CI log)."""
    return any(word in str(name) for word in ("token", "secret"))


DEFAULT_LABELSTUDIO_DIR = Path("~/.local/share/defect-loop/labelstudio")


@labelstudio_app.command("up")
def labelstudio_up(
    data_dir: Annotated[Path, typer.Option(help="Label Studio's data dir (SQLite, media, state)")] = DEFAULT_LABELSTUDIO_DIR,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    username: Annotated[str, typer.Option(help="admin e-mail")] = "admin@defect-loop.local",
    password: Annotated[Optional[str], typer.Option(help="admin password (default: generated, printed)")] = None,
    token: Annotated[Optional[str], typer.Option(help="admin API token (default: generated, printed)")] = None,
    project: Annotated[Optional[Path], typer.Option("--project", "-p", help="also point this project's loop.toml at the server")] = None,
    document_root: Annotated[Optional[Path], typer.Option(help="the folder Label Studio serves images from, holding every image to label "
                                                           "(default: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, else what this data dir had, else /)")] = None,
) -> None:
    """Install the pinned Label Studio into its own venv (first time), start it on 127.0.0.1 with SQLite, an admin and
    a token, no phone-home; print the URL and token."""
    from labeling.labelstudio_server import labelstudio_up as start

    given_root = str(document_root.expanduser().resolve()) if document_root else None
    asked_root = given_root or os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    with clear_errors():
        console.print("starting Label Studio (the first start installs it into its own venv and migrates its database: a minute or two)")
        server = start(data_dir=data_dir.expanduser(), port=port, username=username, password=password, token=token, document_root=given_root)
        if project is not None:
            from loop.config import load_config

            config = load_config(project.expanduser().resolve())
            config.annotator.backend = "labelstudio"
            config.annotator.labelstudio_url = server.url
            config.annotator.labelstudio_api_key = server.token
            config.annotator.labelstudio_document_root = server.document_root  # the links the loop sends must be under it
            save_config(project.expanduser().resolve(), config)
    state = "already running" if server.already_running else "started"
    console.print(f"Label Studio {state} at [bold]{server.url}[/] (pid {server.pid}, data {server.data_dir}, log {server.log_path})")
    console.print(f"  login: {server.username}" + (f" / {server.password}" if server.password else ""))
    console.print(f"  API token: {server.token}")
    console.print(f"  images served from: {server.document_root} (set LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT to it for `loop round` too, or "
                  "give --project)", soft_wrap=True, highlight=False)
    if server.already_running and asked_root and os.path.abspath(asked_root) != os.path.abspath(server.document_root):
        error_console.print(f"[yellow]warning:[/] it runs with another document root than {escape(asked_root)}: stop it (loop labelstudio down "
                            f"--data-dir {escape(str(data_dir))}) and start it again to change it; images outside it are not shown")
    # one line, never wrapped, so it pastes into a shell as it is
    console.print(f"  export LABEL_STUDIO_URL={server.url} LABEL_STUDIO_API_KEY={server.token}", soft_wrap=True, highlight=False)
    if project is not None:
        console.print(f"  {escape(str(project))}/loop.toml now uses it: \\[annotator] backend = \"labelstudio\"")
    console.print(f"  stop it with: loop labelstudio down --data-dir {data_dir}")


@labelstudio_app.command("down")
def labelstudio_down(data_dir: Annotated[Path, typer.Option()] = DEFAULT_LABELSTUDIO_DIR) -> None:
    """Stop the local Label Studio started by `loop labelstudio up` (by its PID)."""
    from labeling.labelstudio_server import labelstudio_down as stop

    with clear_errors():
        stopped = stop(data_dir=data_dir.expanduser())
    console.print("stopped" if stopped else f"no Label Studio was running for {data_dir}")


@labelstudio_app.command("webhook")
def labelstudio_webhook(
    project: ProjectOption,
    url: Annotated[str, typer.Option(help="where `loop serve` listens, e.g. http://127.0.0.1:8000/webhooks/labelstudio")],
) -> None:
    """Register the webhook that records annotations the moment they are made (secret: LOOP_LABELSTUDIO_WEBHOOK_SECRET).
    Label Studio sends each event once with no retry; `loop round` still pulls to catch up."""
    import os

    from labeling.labelstudio_backend import LabelStudioBackend, remember_webhook
    from labeling.labelstudio_client import create_webhook
    from store import session_scope
    from store.queries import get_project

    with clear_errors():
        secret = os.environ.get("LOOP_LABELSTUDIO_WEBHOOK_SECRET")
        if not secret:
            raise ConfigError("set LOOP_LABELSTUDIO_WEBHOOK_SECRET (the same value for `loop serve`): the webhook is refused without it")
        ctx = open_project(project)
        backend = LabelStudioBackend(config=ctx.config, project_dir=ctx.root)
        # it may retire a Label Studio project that is no longer the store's: one writer at a time, as a round
        with project_lock(ctx.root, action="loop labelstudio webhook", engine=ctx.engine), session_scope(ctx.engine) as session:
            # the URL given, not one an earlier registration left on a retired project (review: both were registered)
            ls_project_id, warnings = backend.project_for_tasks(session=session, project=get_project(session), carry_webhook=False)
            hook_id = create_webhook(backend.client(), project_id=ls_project_id, url=url, secret_header="X-Loop-Webhook-Secret", secret=secret)
            remember_webhook(get_project(session), ls_project_id, url)  # carried to the project that replaces this one
        for warning in warnings:
            error_console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(f"webhook {hook_id} on Label Studio project {ls_project_id} -> {url}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
