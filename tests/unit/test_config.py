import re
from pathlib import Path

import pytest

from loop.config import ConfigError, ProjectConfig, load_config, save_config


def test_round_trip_keeps_every_value(tmp_path: Path) -> None:
    config = ProjectConfig(name="p", classes=["ok", "dent"], negative_class="ok", class_descriptions={"dent": "a dent"})
    save_config(tmp_path, config)
    loaded = load_config(tmp_path)
    assert loaded == config
    assert loaded.gates.negative_fpr_max == 0.03 and loaded.gates.latency_ms_max == 30.0
    assert loaded.split.test_fraction == 0.2 and loaded.split.validation_fraction == 0.15
    assert loaded.negative_index == 0
    assert loaded.loop.strategy == "default" and loaded.model.train == "head"


def test_typo_in_a_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "loop.toml").write_text('name = "p"\nclasses = ["a", "b"]\n[gates]\nmacro_f1_minn = 0.8\n')
    with pytest.raises(ConfigError, match=r"gates\.macro_f1_minn: Extra inputs are not permitted"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "body, message",
    [
        ('name = "p"\nclasses = ["a", "b"]\nnegative_class = "c"\n', "negative_class 'c' is not one of the classes"),
        ('name = "p"\nclasses = ["a", "a"]\n', "duplicate class names"),
        ('name = "p"\nclasses = ["a", "b"]\n[gates]\nnegative_fpr_max = 3\n', "gates.negative_fpr_max"),
        ('name = "p"\nclasses = ["a", "b"]\n[annotator]\nbackend = "oracle"\n', "needs annotator.oracle_manifest"),
        ('name = "p"\nclasses = ["a", "b"\n', "not valid TOML"),
        ('name = "p"\nclasses = ["a", "b"]\n[model.training]\nepochz = 3\n', "unknown training option(s) epochz"),
        ('name = "p"\nclasses = ["a", "b"]\n[model.training]\nmode = "sideways"\n', "mode must be 'cached' or 'augment'"),
        ('name = "p"\nclasses = ["a", "b"]\n[model.training]\nhead_regularization = -1\n', "head_regularization must be a number > 0"),
        ('name = "p"\nclasses = ["a", "b"]\n[model]\ncalibration = "platt"\n', "model.calibration"),
        ('name = "p"\nclasses = ["a", "b"]\n[model]\ntrain = "finetun"\n', "model.train"),
        ('name = "p"\nclasses = ["a", "b"]\n[model.training]\naugmentation = "factory"\n', 'applied only with mode = "augment"'),
        ('name = "p"\nclasses = ["a", "b"]\n[loop]\nstrategy = "marginn"\n', "unknown selection strategy 'marginn'; available: default, diverse"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "loop.toml").write_text(body)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tmp_path)


def test_missing_config_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loop init"):
        load_config(tmp_path)


def test_training_options_round_trip_through_loop_toml(tmp_path: Path) -> None:
    (tmp_path / "loop.toml").write_text(
        'name = "p"\nclasses = ["a", "b"]\n[model]\ntrain = "finetune"\n'
        '[model.training]\nepochs = 3\nmode = "augment"\naugmentation = "factory"\ntta = "flips"\n'
    )
    loaded = load_config(tmp_path)
    assert loaded.model.training == {"epochs": 3, "mode": "augment", "augmentation": "factory", "tta": "flips"}
    assert loaded.model.calibration == "temperature"
    save_config(tmp_path, loaded)
    assert load_config(tmp_path) == loaded


def test_reading_loop_toml_loads_neither_torch_nor_faiss(tmp_path: Path) -> None:
    """`loop status` and `loop serve` read loop.toml: an empty [model.training] (what `loop init` writes) and a
    built-in strategy are checked without importing the training or selection code (seconds of torch import)."""
    import subprocess
    import sys

    from loop.config import BUILT_IN_STRATEGIES
    from modeling.selection import available_strategies

    assert BUILT_IN_STRATEGIES == set(available_strategies())  # the static list is the registry's
    save_config(tmp_path, ProjectConfig(name="p", classes=["ok", "dent"], negative_class="ok"))
    assert "[model.training]" in (tmp_path / "loop.toml").read_text()
    code = (f"import sys; from pathlib import Path; from loop.config import load_config; load_config(Path({str(tmp_path)!r})); "
            "assert not {'torch', 'faiss'} & set(sys.modules), sorted({'torch', 'faiss'} & set(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
