"""Build a dataset as TFDS ArrayRecord files (readable with `tfds.builder_from_directory`).

    python -m tools.build_data NAME --data-dir DIR [--source DIR] [--images DIR] [--split-sizes ...]

NAME is one of the builders registered in `input_pipeline.builders` (e.g. `synthetic`); each builder
may add its own options (see `python -m tools.build_data NAME --help`). Prints, per split, the
examples written and the source records skipped with their reasons. Bad arguments exit with status 2.
An already built dataset (same arguments) is reused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile

import tensorflow_datasets as tfds
from absl import logging as absl_logging

from input_pipeline import builders
from input_pipeline.builders.base import BuildArgumentError, parse_split_sizes, split_report


def _name_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.build_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument("name", metavar="NAME", help="dataset: " + ", ".join(builders.names()))
    return parser


def _full_parser(name: str, builder_cls) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m tools.build_data {name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME", help="dataset: " + ", ".join(builders.names()))
    parser.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--source", default=None, help="folder holding the Hub's parquet files (anywhere below)")
    parser.add_argument("--images", default=None, help="folder of downloaded images, named by sha256(url)")
    parser.add_argument("--split-sizes", default=None, metavar="SPLIT=N,...", help=builder_cls.SPLIT_SIZES_HELP)
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
    parser.add_argument("--progress", action="store_true", help="show TFDS progress bars")
    builder_cls.add_arguments(parser)
    return parser


def format_report(report: dict[str, dict]) -> list[str]:
    lines = []
    for split, counts in report.items():
        skipped = counts["skipped"]
        lines.append(f"{split}: {counts['written']} examples written, {sum(skipped.values())} records skipped")
        lines += [f"  skipped {n}: {reason}" for reason, n in sorted(skipped.items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name_parser = _name_parser()
    if argv[:1] in (["-h"], ["--help"]):
        name_parser.print_help()
        return 0
    if not argv or argv[0].startswith("-"):
        name_parser.error("the first argument must be the dataset NAME, one of: " + ", ".join(builders.names()))
    name = argv[0]
    try:
        builder_cls = builders.get_builder_class(name)
    except builders.UnknownDatasetError as error:
        name_parser.error(str(error))  # exits with status 2
    parser = _full_parser(name, builder_cls)
    args = parser.parse_args(argv)
    try:
        sizes = parse_split_sizes(args.split_sizes, builder_cls.SPLITS) if args.split_sizes is not None else None
        builder = builder_cls.from_arguments(args.data_dir, args.source, args.images, sizes, args)
    except BuildArgumentError as error:
        parser.error(str(error))

    if not args.progress:
        tfds.disable_progress_bar()
        absl_logging.set_verbosity(absl_logging.ERROR)
    existed = builder.is_prepared()
    if existed and args.overwrite:
        # TFDS refuses to regenerate over a dataset it has loaded the info of; delete it and start afresh.
        shutil.rmtree(builder.data_dir)
        builder = builder_cls.from_arguments(args.data_dir, args.source, args.images, sizes, args)
        existed = False
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    # Builders read local files only; a scratch download dir keeps DIR free of an empty downloads/ tree.
    # TFDS prints its own progress lines; they go to stderr so that stdout is just the report.
    try:
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
            builder.download_and_prepare(download_dir=scratch, file_format="array_record",
                                         download_config=tfds.download.DownloadConfig(download_mode=mode))
    except BuildArgumentError as error:  # a source problem found while reading (its files are checked first)
        parser.error(str(error))
    print(f"{name}: {'reused the existing' if existed else 'built'} dataset at {builder.data_dir}")
    for line in format_report(split_report(builder)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
