"""Reference models are real SavedModels with deterministic weights, loadable by hub.load."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import in_process

from pool import reference_models


@pytest.mark.parametrize("name", ["small_cnn", "multi_io", "text_embedding"])
def test_rebuilding_gives_the_same_model(models, tmp_path, name):
    rebuilt = reference_models.ensure(name, tmp_path)
    assert rebuilt != models[name]
    inputs = {
        "small_cnn": np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32),
        "multi_io": {"a": np.ones((2, 4), np.float32), "b": np.ones((2, 3), np.int32)},
        "text_embedding": np.array(["same words", "same weights"], dtype=object),
    }[name]
    first, second = in_process(models[name], inputs), in_process(rebuilt, inputs)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_unknown_reference_model_is_refused():
    with pytest.raises(ValueError, match="unknown reference model 'nope'.*mobilenet_v2"):
        reference_models.ensure("nope")
