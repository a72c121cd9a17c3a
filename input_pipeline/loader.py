"""The training loader: a grain pipeline yielding this process's share of every global batch.

    loader = TrainLoader(BatchMaker(sources, model_cfg, settings), num_workers=2)
    batch = next(loader)          # numpy dict in the model batch contract, fixed shapes
    state = loader.get_state()    # JSON: {"next_batch": k, ...}; set_state(state) resumes exactly there

Every batch is a pure function of (seed, batch number, process index, process count): `BatchMaker`
asks the mixture plan which records fill the global batch's slots (`mixtures.py`), keeps this
process's contiguous block of them (the block `jax.make_array_from_process_local_data` expects), and
per slot reads the record, converts it (`conversions.py`), preprocesses it with the per-example RNG
(image crops, formatting, packing, tokens) and finally collates to the fixed shapes. A Molmo2 with
`pack_records` k > 1 draws k slots per row and packs the examples of a row's slots while they fit. grain runs
BatchMaker over batch numbers k, k+1, ... in `num_workers` processes (round-robin, so the order never
depends on the worker count) or, with 0 workers, in one background thread. The iterator state is
therefore just the next batch number; resuming with any number of workers continues the same sequence.

A record that cannot be used (undecodable image, empty text, NaN points, image tokens longer than the
sequence, ...) never stops the loader: it is replaced by the next record of the same dataset's
permutation (up to `max_fallbacks` times, else the row stays padding) and counted by reason; the
counts travel with the batches and are kept in the state.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading

import numpy as np

from input_pipeline import conversions, datasets, mixtures
from molmo_jax.preprocess import (Collator, FormatError, FormatSettings, ImageError, MolmoTokenizer, Preprocessor,
                                  SequenceError, truncate_example)

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    global_batch: int
    seq_len: int
    seed: int
    tokenizer: str                                  # folder of the LLM's tokenizer.json
    stage: str = "sft"                              # "pretrain": stage-1 formatting; "sft": released formatting
    split: str = "train"
    process_index: int = 0
    process_count: int = 1
    max_crops: int | None = None                    # default: the model's
    max_images: int = 1                             # Molmo2: images per record (several-image records)
    max_frames: int = 0                             # Molmo2: video frames per record (0: no video records)
    pack_records: int = 1                           # Molmo2: records drawn per row, packed while they fit
    seq_buckets: tuple[int, ...] | None = None      # default (seq_len,): one fixed shape
    always_subsegments: bool = True                 # add all-ones subsegment_ids to unpacked batches
    max_fallbacks: int = 8

    def __post_init__(self):
        if self.global_batch % self.process_count:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {self.process_count} processes")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} outside 0..{self.process_count - 1}")
        if self.pack_records < 1:
            raise ValueError(f"data.pack_records must be >= 1, got {self.pack_records}")
        if self.stage not in ("pretrain", "sft"):
            raise ValueError(f"stage must be 'pretrain' or 'sft', got {self.stage!r}")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    def format_settings(self) -> FormatSettings:
        return FormatSettings.stage1() if self.stage == "pretrain" else FormatSettings()


def skip_reason(error: Exception) -> str:
    """A short category for the counts (the full message goes to the log)."""
    if isinstance(error, conversions.BadRecord):
        return str(error)
    if isinstance(error, ImageError):
        return "bad image"
    if isinstance(error, FormatError):
        return "conversation cannot be formatted"
    if isinstance(error, SequenceError):
        return "image tokens do not fit the sequence length"
    return f"unexpected {type(error).__name__}"


def example_makers(cfg, s: LoaderSettings):
    """(record -> example, examples -> batch) of the model's family."""
    from molmo_jax.models import family_of

    if family_of(cfg) == "molmo2":
        from molmo_jax.inference_molmo2 import processor_for
        from molmo_jax.preprocess.molmo2_example import Molmo2Collator, Molmo2Examples

        if s.stage != "sft" or s.seq_buckets:
            raise ValueError("a Molmo2 trains on stage 'sft' formatting with one sequence length (no seq_buckets)")
        processor = processor_for(cfg, s.tokenizer, max_crops=s.max_crops)
        media = dict(max_images=s.max_images, max_frames=s.max_frames)
        return (Molmo2Examples(processor, s.seq_len, **media),
                Molmo2Collator(processor.image, s.seq_len, s.local_batch, video_settings=processor.video,
                               pack_records=s.pack_records, **media))
    if s.max_images != 1 or s.max_frames:
        raise ValueError("data.max_images / data.max_frames: a Molmo trains on one image per record; several "
                         "images and videos are Molmo2's")
    if s.pack_records != 1:
        raise ValueError("data.pack_records: a Molmo packs the conversations of one image into a row (its "
                         "preprocessor does); packing several records into a row is Molmo2's")
    tokenizer = MolmoTokenizer(s.tokenizer, cfg.llm.vocab_size)
    return (Preprocessor(cfg, tokenizer, s.format_settings(), max_crops=s.max_crops),
            Collator.from_config(cfg, s.seq_len, seq_buckets=s.seq_buckets or (s.seq_len,), max_crops=s.max_crops,
                                 batch_size=s.local_batch))


class _Runtime:
    """What a BatchMaker opens on first use in each process (never pickled)."""

    def __init__(self, maker: "BatchMaker"):
        s = maker.settings
        self.sources = [datasets.open_source(folder, s.split) for _, folder in maker.sources]
        # With packing, every row draws `pack_records` slots of the plan (the row's candidates).
        self.plan = mixtures.MixturePlan([ds.name for ds, _ in maker.sources], list(maker.rates),
                                         list(maker.lengths), s.seed, s.global_batch * s.pack_records)
        self.preprocessor, self.collator = example_makers(maker.model_cfg, s)
        blank = {"image": np.full((8, 8, 3), 128, np.uint8), "message_list": [{"style": "none", "question": "",
                                                                               "answer": ""}]}
        self.blank = self.preprocessor(blank, np.random.default_rng(0))
        self.detailed: set[str] = set()


class BatchMaker:
    """Callable: batch number -> (this process's collated batch, {reason: count}). Picklable (workers)."""

    def __init__(self, sources: list[tuple[datasets.DatasetSpec, str]], rates: list[float], lengths: list[int],
                 model_cfg, settings: LoaderSettings):
        order = sorted(range(len(sources)), key=lambda i: sources[i][0].name)  # the plan's order: by name
        self.sources = [(sources[i][0], str(sources[i][1])) for i in order]
        self.rates = [float(rates[i]) for i in order]
        self.lengths = [int(lengths[i]) for i in order]
        self.model_cfg, self.settings = model_cfg, settings
        self._runtime = None
        # The mixture plan walks batches in order; a prefetch thread left over from before a
        # set_state() must not interleave with the new one.
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_runtime", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _runtime=None, _lock=threading.Lock())

    def runtime(self) -> _Runtime:
        if self._runtime is None:
            self._runtime = _Runtime(self)
        return self._runtime

    def __call__(self, batch_index: int):
        with self._lock:
            return self._make(int(batch_index))

    def _make(self, batch_index: int):
        rt = self.runtime()
        s = self.settings
        choices, items = rt.plan.dataset_choices(batch_index)
        k = s.pack_records
        lo, n = s.process_index * s.local_batch * k, s.local_batch * k
        counts: collections.Counter = collections.Counter()
        examples = [self._example(rt, int(d), int(item), counts)
                    for d, item in zip(choices[lo:lo + n], items[lo:lo + n])]
        if k > 1:  # row r packs the examples of slots r*k .. r*k+k-1 (a pure function of the row)
            examples = [self._pack(rt, [ex for ex in examples[r:r + k] if ex is not None], counts)
                        for r in range(0, n, k)]
        return self._collate(rt, [ex for ex in examples if ex is not None]), dict(counts)

    def _pack(self, rt: _Runtime, examples: list[dict], counts: collections.Counter):
        if not examples:
            return None
        try:
            packed, left_out = rt.collator.pack(examples)
        except SequenceError:
            counts["packing: no example of the row fits it"] += 1
            return None
        if left_out:
            counts["packing: examples left out of a full row"] += left_out
        return packed

    def _example(self, rt: _Runtime, d: int, item: int, counts: collections.Counter):
        spec, n = self.sources[d][0], self.lengths[d]
        epoch, position = divmod(item, n)
        permutation = rt.plan.permutation(d, epoch)
        for attempt in range(self.settings.max_fallbacks + 1):
            record_index = int(permutation[(position + attempt) % n])
            rng = np.random.default_rng(rt.plan.example_seed(d, record_index, epoch))
            notes: collections.Counter = collections.Counter()
            try:
                example = spec.convert(rt.sources[d][record_index], rng, notes)
                out = rt.preprocessor(example, rng)
                out = truncate_example(out, rt.collator.max_sequence_length)
            except Exception as error:  # noqa: BLE001 - a bad record must never stop the loader
                key = f"{spec.name}: skipped: {skip_reason(error)}"
                counts[key] += 1
                if key not in rt.detailed:  # the full message once per reason and process
                    rt.detailed.add(key)
                    log.warning("%s record %d skipped: %s", spec.name, record_index, error)
                continue
            counts.update({f"{spec.name}: {note}": k for note, k in notes.items()})
            out.pop("metadata", None)
            return out
        counts[f"{spec.name}: slot left as padding after {self.settings.max_fallbacks + 1} bad records"] += 1
        return None

    def _collate(self, rt: _Runtime, examples: list[dict]) -> dict:
        if examples:
            batch = rt.collator(examples)
        else:  # every slot failed: an all-padding batch of the same shapes
            batch = rt.collator([rt.blank])
            for value in batch.values():
                value[...] = -1
        if self.settings.always_subsegments and rt.collator.packs and "subsegment_ids" not in batch:
            batch["subsegment_ids"] = np.where(batch["input_ids"] == -1, -1, 1).astype(np.int32)
        return batch


class TrainLoader:
    """Iterator over this process's batches with JSON get_state()/set_state() (see the module docstring)."""

    def __init__(self, maker: BatchMaker, num_workers: int = 0, worker_buffer: int = 2, fingerprint: dict | None = None):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.maker, self.num_workers, self.worker_buffer = maker, int(num_workers), max(1, int(worker_buffer))
        self.fingerprint = dict(fingerprint or {})
        self.next_batch = 0
        self.counts: collections.Counter = collections.Counter()
        self._iterator = None

    def _start(self):
        import grain

        ds = grain.MapDataset.range(self.next_batch, self.next_batch + (1 << 48)).map(self.maker)
        # One thread per process: a batch is a sequential walk of the mixture plan, and the
        # parallelism comes from the worker processes (or, with none, from overlapping the step).
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.worker_buffer))
        if self.num_workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (outside absl.app.run)
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers,
                                                             per_worker_buffer_size=self.worker_buffer))
        return iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._start()
        batch, counts = next(self._iterator)
        self.next_batch += 1
        for reason, n in counts.items():
            if reason not in self.counts:
                log.warning("data: %s (first seen in batch %d)", reason, self.next_batch - 1)
            self.counts[reason] += n
        return {k: np.asarray(v) for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "next_batch": self.next_batch, "fingerprint": self.fingerprint,
                "counts": dict(sorted(self.counts.items()))}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "next_batch" not in state:
            raise ValueError(f"not a loader state (expected a dict with 'next_batch'): {state!r}")
        if state.get("fingerprint") not in (None, self.fingerprint):
            log.warning("resuming data from a run with other data settings: %s, now %s",
                        state["fingerprint"], self.fingerprint)
        self.close()
        self.next_batch = int(state["next_batch"])
        self.counts = collections.Counter(state.get("counts") or {})

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
