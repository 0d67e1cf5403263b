"""benchmarks/selection_tuning.py's --seeds reads as `loop simulate --seeds` does: a count N is seeds 0..N-1 (it meant
seed N alone, so "--seeds 5" compared one seed against the README's five); a comma list names seeds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import selection_tuning  # noqa: E402


@pytest.mark.parametrize(("given", "seeds"), [("5", [0, 1, 2, 3, 4]), ("1", [0]), ("3,", [3]), ("0,2,7", [0, 2, 7])])
def test_a_count_is_seeds_from_zero_and_a_list_names_them(given: str, seeds: list[int]) -> None:
    assert selection_tuning.seed_list(given) == seeds


@pytest.mark.parametrize("given", ["0", "-2", "five", "1,x", ","])
def test_anything_else_exits_2_naming_the_argument_before_any_data_is_read(given: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        selection_tuning.main(["--seeds", given, "--sim-dir", "/nonexistent"])
    assert stopped.value.code == 2
    assert f"argument --seeds: {given!r}: a count of seeds" in capsys.readouterr().err
