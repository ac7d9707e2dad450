"""CoresetTrainingArguments(coreset_temperature=...) reaches CoresetOptimizer's temperature."""

import pytest

pytest.importorskip("transformers")

from coreset_optim.integrations.transformers import CoresetTrainingArguments  # noqa: E402


def _args(tmp_path, **kw):
    return CoresetTrainingArguments(
        output_dir=str(tmp_path), coreset_size=4, per_device_train_batch_size=8, report_to=[], **kw
    )


def test_temperature_passes_through(tmp_path):
    args = _args(tmp_path, coreset_temperature=float("inf"))
    assert args.coreset_options()[0].temperature == float("inf")
    assert args.coreset_kwargs(with_modules=False)["temperature"] == float("inf")


def test_unset_temperature_is_the_presets(tmp_path):
    args = _args(tmp_path)
    assert "temperature" not in args.coreset_kwargs(with_modules=False)
    assert args.coreset_options()[0].temperature == 1.0


def test_bad_temperature_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="temperature must be a float > 0"):
        _args(tmp_path, coreset_temperature=-1.0)
