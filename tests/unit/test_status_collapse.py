"""`loop status`'s table shows a collapsed round's macro F1 as its gate scored it (0), and says it collapsed."""
from __future__ import annotations

import numpy as np

from loop.status import metric_text, project_status
from modeling.evaluation import evaluate_gates, evaluate_predictions
from store import session_scope
from store.models import GateResult, Metric, Round
from store.queries import get_project

CLASSES = ["good", "scratch", "spot"]


def _record_round(ctx, number: int, y_pred: list[int]) -> None:  # noqa: ANN001
    """A completed round recorded as loop round records one: the test split's metrics and the gates scored from them."""
    y_true = np.array([0, 0, 0, 1, 1, 2, 2])
    metrics = evaluate_predictions(y_true=y_true, y_pred=np.array(y_pred), probabilities=np.full((7, 3), 1 / 3), class_names=CLASSES, negative_index=0)
    gates = evaluate_gates(metrics=metrics, latency_ms=5.0, macro_f1_min=0.7, defect_recall_min=0.85, negative_fpr_max=0.03, latency_ms_max=30.0)
    with session_scope(ctx.engine) as session:
        row = Round(project_id=get_project(session).id, number=number, status="completed",
                    details={"collapse_check": {"test_split": bool(metrics["collapsed"]), "every_image_predicted_as": None},
                             "threshold": 0.41, "threshold_source": "validation", "threshold_choice": {"threshold": 0.41, "source": "validation"}})
        session.add(row)
        session.flush()
        session.add_all(Metric(round_id=row.id, name=name, value=metrics[name]) for name in ("macro_f1", "defect_recall", "negative_fpr"))
        session.add_all(GateResult(round_id=row.id, name=g.name, value=g.value, threshold=g.threshold, comparison=g.comparison, applicable=g.applicable,
                                   passed=g.passed) for g in gates)


def test_a_collapsed_rounds_macro_f1_shows_the_gates_zero_and_says_collapsed(new_project) -> None:  # noqa: ANN001
    _record_round(new_project, 1, y_pred=[0] * 7)  # every test image called good: macro F1 still measures above 0
    _record_round(new_project, 2, y_pred=[0, 0, 0, 1, 1, 2, 1])
    collapsed, healthy = project_status(new_project)["rounds"]
    assert collapsed["collapsed"] is True and collapsed["metrics"]["macro_f1"] > 0  # the JSON keeps the measured score
    assert metric_text(collapsed, "macro_f1") == f"0 (collapsed; measured {collapsed['metrics']['macro_f1']:.4g})"
    assert metric_text(collapsed, "defect_recall") == "0"  # the other gates score what was measured
    assert healthy["collapsed"] is False
    assert metric_text(healthy, "macro_f1") == f"{healthy['metrics']['macro_f1']:.4g}" and "collapsed" not in metric_text(healthy, "macro_f1")
    # the table `loop status` prints
    from typer.testing import CliRunner

    from loop.cli import app

    table = " ".join(CliRunner().invoke(app, ["status", "--project", str(new_project.root)], env={"COLUMNS": "250"}).output.split())
    assert f"0 (collapsed; measured {collapsed['metrics']['macro_f1']:.4g})" in table
    assert "0.41 (val)" in table  # the threshold and where it was chosen: the table never said


def test_the_rounds_table_never_folds_a_number_at_80_columns(new_project) -> None:  # noqa: ANN001
    # a QA run read threshold 0.000148 as "0.000" over "148" and an FPR of 0.03226 as "0.032" over "26"
    import re

    from typer.testing import CliRunner

    from loop.cli import app

    _record_round(new_project, 1, y_pred=[0, 0, 1, 1, 1, 2, 2])  # one good part called a defect: FPR 0.3333
    with session_scope(new_project.engine) as session:
        row = session.query(Round).one()
        row.details = {**row.details, "threshold": 0.000148101, "threshold_choice": {"threshold": 0.000148101, "source": "out_of_fold"}}
    output = CliRunner().invoke(app, ["status", "--project", str(new_project.root)], env={"COLUMNS": "80"}).output
    assert max(len(line) for line in output.splitlines()) <= 80
    assert re.search(r"\b0\.000148\b", output) and re.search(r"\b0\.3333\b", output), output
    # the failed gates by their columns' words, whole (QA: "negative_" over "fpr,", "latency_m" over "s")
    assert re.search(r"\bFPR\b", output.split("gates", 1)[1]) and "negative_" not in output and "latency_m\n" not in output, output
