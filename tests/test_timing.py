"""timing.json: where a training run's wall time went."""

import json

import pytest

from waterdrop.engine.timing import PHASES
from waterdrop.engine.train import run_training


def test_a_run_splits_its_wall_time_into_phases(registry_file, tmp_path, capsys):
    run_training(registry_file, tmp_path / "run", epochs=1)
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert set(timing) == {f"{p}_s" for p in PHASES} | {"other_s", "total_s", "total_over_training"}
    for phase in PHASES:  # each phase happened, and was timed
        assert timing[f"{phase}_s"] > 0, phase
    assert sum(timing[f"{p}_s"] for p in PHASES) + timing["other_s"] == pytest.approx(timing["total_s"], abs=0.05)
    assert timing["other_s"] >= -0.2
    # The seconds are stored to 0.01 s and this tiny run trains for under a second: allow for the rounding.
    assert timing["total_over_training"] == pytest.approx(timing["total_s"] / timing["training_s"],
                                                          rel=0.006 / timing["training_s"] + 0.01)
    assert f"wall time {timing['total_s']:.0f} s" in capsys.readouterr().out
