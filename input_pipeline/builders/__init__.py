"""Registry of the dataset builders that `python -m tools.build_data NAME` can run.

Each entry maps a CLI name to "module:Class", a `RecordBuilder` subclass (see `base.py`). Modules are
imported only when their builder is asked for, so one builder's import cost or failure does not
touch the others. Adding a dataset = one new builder class plus one line here.
"""
from __future__ import annotations

import importlib

BUILDERS: dict[str, str] = {
    "synthetic": "input_pipeline.builders.synthetic:SyntheticPixmo",
    "pixmo_cap": "input_pipeline.builders.pixmo:PixmoCap",
    "pixmo_ask_model_anything": "input_pipeline.builders.pixmo:PixmoAskModelAnything",
    "pixmo_cap_qa": "input_pipeline.builders.pixmo:PixmoCapQa",
    "pixmo_points": "input_pipeline.builders.pixmo:PixmoPoints",
    "pixmo_count": "input_pipeline.builders.pixmo:PixmoCount",
    "pixmo_point_explanations": "input_pipeline.builders.pixmo:PixmoPointExplanations",
    "pixmo_docs": "input_pipeline.builders.pixmo:PixmoDocs",
    "pixmo_clocks": "input_pipeline.builders.pixmo:PixmoClocks",
    "vqa": "input_pipeline.builders.vqa:Vqa",
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
