"""Registry of the dataset builders that `python -m tools.build_data NAME` can run.

Each entry maps a CLI name to "module:Class", a `RecordBuilder` subclass (see `base.py`). Modules are
imported only when their builder is asked for, so one builder's import cost or failure does not
touch the others. Adding a dataset (pixmo_cap, pixmo_points, ...) = one new module in this package
plus one line here.
"""
from __future__ import annotations

import importlib

BUILDERS: dict[str, str] = {
    "synthetic": "input_pipeline.builders.synthetic:SyntheticPixmo",
}


class UnknownDatasetError(KeyError):
    def __str__(self):  # KeyError would print the message with quotes around it
        return str(self.args[0])


def names() -> list[str]:
    return sorted(BUILDERS)


def get_builder_class(name: str):
    """The builder class registered under `name`; UnknownDatasetError naming the choices otherwise."""
    if name not in BUILDERS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(names())}")
    module_name, _, class_name = BUILDERS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
