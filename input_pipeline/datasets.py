"""The datasets mixtures are made of: name -> which built TFDS dataset to read and how to turn its
records into examples (`conversions.py`), plus opening them (random access) under a data directory.

Names follow the original's mixture names (docs/architecture.md#mixtures); legacy aliases are accepted. A dataset is
read from `<data_dir>/<tfds name>/<config>/<version>/`, where `python -m tools.build_data` writes it.
The academic sets enter through the generic `vqa` builder, built under the mixture name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import sys
import tempfile

from input_pipeline import builders, conversions


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str                       # the name in mixtures
    builder: str                    # `python -m tools.build_data` NAME
    config: str | None = None       # TFDS config (subset); None: the builder has none
    converter: str = ""             # key of conversions.CONVERTERS (default: the builder name)
    options: tuple = ()             # keyword arguments of the converter, as (key, value) pairs
    build_hint: str = ""            # extra CLI arguments shown in the "how to build" message

    def convert(self, record, rng, notes):
        return conversions.CONVERTERS[self.converter or self.builder](record, rng, notes, **dict(self.options))


def _vqa(name: str, style: str) -> DatasetSpec:
    return DatasetSpec(name, "vqa", name, build_hint=f"--name {name} --style {style} --source DIR_WITH_JSONL_OR_PARQUET"
                       " [--images DIR]")


_HUB = "--source HUB_DIR --images IMAGE_DIR"
DATASETS: dict[str, DatasetSpec] = {d.name: d for d in [
    DatasetSpec("pixmo_cap", "pixmo_cap", options=(("mode", "captions"),), build_hint=_HUB),
    DatasetSpec("pixmo_cap_with_transcripts", "pixmo_cap", options=(("mode", "transcript_and_caption"),),
                build_hint=_HUB),
    DatasetSpec("pixmo_cap_transcripts", "pixmo_cap", options=(("mode", "transcripts"),), build_hint=_HUB),
    DatasetSpec("pixmo_ask_model_anything", "pixmo_ask_model_anything", build_hint=_HUB),
    DatasetSpec("pixmo_cap_qa", "pixmo_cap_qa", build_hint=_HUB),
    DatasetSpec("pixmo_pointing_explanations", "pixmo_point_explanations", build_hint=_HUB),
    DatasetSpec("pixmo_points", "pixmo_points", "basic", options=(("counting", False),),
                build_hint="--subset basic " + _HUB),
    DatasetSpec("pixmo_points_counting", "pixmo_points", "basic", options=(("counting", True),),
                build_hint="--subset basic " + _HUB),
    DatasetSpec("pixmo_points_high_freq", "pixmo_points", "high_frequency", options=(("counting", False),),
                build_hint="--subset high_frequency " + _HUB),
    DatasetSpec("pixmo_points_high_freq_counting", "pixmo_points", "high_frequency", options=(("counting", True),),
                build_hint="--subset high_frequency " + _HUB),
    DatasetSpec("pixmo_count", "pixmo_count", options=(("counting", False),), build_hint=_HUB),
    DatasetSpec("pixmo_count_counting", "pixmo_count", options=(("counting", True),), build_hint=_HUB),
    *[DatasetSpec(f"pixmo_docs_{s}", "pixmo_docs", s, options=(("subset", s),),
                  build_hint=f"--subset {s} --source HUB_DIR") for s in ("charts", "tables", "diagrams", "other")],
    DatasetSpec("pixmo_clocks", "pixmo_clocks", build_hint="--source HUB_DIR --images RENDERED_CLOCKS_DIR"),
    DatasetSpec("synthetic_captions", "synthetic", "default", "synthetic", (("mode", "captions"),)),
    DatasetSpec("synthetic_tasks", "synthetic", "default", "synthetic", (("mode", "tasks"),)),
    _vqa("coco_2014_vqa_multi", "vqa2"), _vqa("text_vqa", "text_vqa"), _vqa("okvqa", "okvqa"),
    _vqa("chart_qa_weighted", "chart_qa"), _vqa("doc_qa", "doc_qa"), _vqa("info_qa", "info_qa"),
    _vqa("ai2_diagram_v2_mix_transparent", "ai2_diagram"), _vqa("a_okvqa_mc", "a_okvqa_mc"),
    _vqa("a_okvqa_da", "a_okvqa_da"), _vqa("android_control", "android_control"),
    _vqa("science_qa_img", "science_qa"), _vqa("tabwmp_da", "tabwmp_da"), _vqa("st_qa", "st_qa"),
    _vqa("tally_qa", "tally_qa"), _vqa("dv_qa", "dv_qa"), _vqa("figure_qa", "figure_qa"), _vqa("plot_qa", "plot_qa"),
]}

ALIASES = {
    "cockatoo_and_transcript_712k_sept6": "pixmo_cap_with_transcripts", "cockatoo_712k_sept6": "pixmo_cap",
    "user_qa": "pixmo_ask_model_anything", "synthetic_qa_v3_as_user_qa": "pixmo_cap_qa",
    "point_qa": "pixmo_pointing_explanations", "scifi_charts_qa": "pixmo_docs_charts",
    "scifi_table_qa": "pixmo_docs_tables", "scifi_document_qa": "pixmo_docs_other",
    "scifi_diagram_qa": "pixmo_docs_diagrams", "pointing": "pixmo_points", "point_count": "pixmo_points_counting",
    "pointing_high_freq": "pixmo_points_high_freq", "point_count_high_freq": "pixmo_points_high_freq_counting",
    "fast_flickr_count_qa_pointing": "pixmo_count", "fast_flickr_count_qa_point_count": "pixmo_count_counting",
}


class MissingDatasetError(FileNotFoundError):
    """Datasets a mixture needs that are not built; the message says how to build each."""


def spec(name: str) -> DatasetSpec:
    name = ALIASES.get(name, name)
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith("vqa:"):  # any other set built with the generic builder: vqa:<name>
        return DatasetSpec(name, "vqa", name[4:], build_hint=f"--name {name[4:]} --source DIR")
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))} (or vqa:<name> for a set "
                   "built with `tools.build_data vqa --name <name>`)")


def dataset_dir(data_dir: str, ds: DatasetSpec) -> pathlib.Path | None:
    """The newest built version of the dataset under `data_dir`, or None."""
    tfds_name = builders.get_builder_class(ds.builder).name
    base = pathlib.Path(data_dir) / tfds_name
    if ds.config is not None:
        base = base / ds.config
    versions = sorted((p for p in base.glob("*/dataset_info.json")),
                      key=lambda p: tuple(int(v) for v in p.parent.name.split(".") if v.isdigit()))
    return versions[-1].parent if versions else None


def build_command(data_dir: str, ds: DatasetSpec) -> str:
    hint = f" {ds.build_hint}" if ds.build_hint else ""
    return f"python -m tools.build_data {ds.builder} --data-dir {data_dir}{hint}"


def check_built(data_dir: str, names) -> dict[str, pathlib.Path]:
    """{name: dataset folder}; MissingDatasetError naming every missing one and its build command."""
    found, missing = {}, []
    for name in names:
        ds = spec(name)
        folder = dataset_dir(data_dir, ds)
        if folder is None:
            missing.append(f"  {name}: {build_command(data_dir, ds)}")
        else:
            found[name] = folder
    if missing:
        raise MissingDatasetError(f"{len(missing)} dataset(s) of the mixture are not built under {data_dir!r}:\n"
                                  + "\n".join(missing))
    return found


def open_source(folder: pathlib.Path, split: str):
    """Random-access records of a built split (image bytes left encoded: workers decode them)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(folder))
    if split not in builder.info.splits:
        raise KeyError(f"{folder}: no split {split!r} (it has {sorted(builder.info.splits)})")
    decoders = {"image": tfds.decode.SkipDecoding()} if isinstance(builder.info.features["image"],
                                                                   tfds.features.Image) else None
    return builder.as_data_source(split=split, decoders=decoders)


def default_data_dir() -> str:
    return os.environ.get("MOLMO_JAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "molmo_jax", "data")


def ensure_synthetic(data_dir: str, split_sizes: dict[str, int] | None = None, options=None) -> pathlib.Path:
    """The synthetic PixMo under `data_dir`, built first if absent (default sizes: about half a minute)."""
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    from input_pipeline.builders.synthetic import SyntheticPixmo, make_config

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns about custom configs and new folders
    os.makedirs(data_dir, exist_ok=True)
    # Several processes of one host (or hosts sharing a disk) may start together: one builds, the
    # others wait for the lock and then find the dataset prepared.
    try:
        with open(os.path.join(data_dir, ".synthetic_build.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            builder = SyntheticPixmo(data_dir=data_dir, config=make_config(options, split_sizes=split_sizes))
            if not builder.is_prepared():
                tfds.disable_progress_bar()
                print(f"building the synthetic PixMo under {data_dir} (once)", file=sys.stderr)
                with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
                    builder.download_and_prepare(download_dir=scratch, file_format="array_record")
    finally:
        absl_logging.set_verbosity(verbosity)
    return pathlib.Path(builder.data_dir)
