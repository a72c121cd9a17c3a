"""Mixtures: which datasets, at which sampling rates, and the order in which their examples are drawn.

Rates (docs/architecture.md#mixtures): a mixture is a list of groups with fixed rates; inside a group each dataset gets
a weight proportional to sqrt(size) (size = its cap when one is given, else its number of examples),
scaled to the group's rate; the final rates are normalised to sum to 1. A single dataset has rate 1.

Order (`MixturePlan`, the original's `IterableDatasetMixture`): datasets sorted by name; one
`RandomState(seed)` draws, for every global batch in turn, `choice(n_datasets, size=B, p=rates)`;
slot i of the batch takes dataset d's item number c_d (a running count across all processes), which
is position c_d % len(d) of the permutation `RandomState(seed + 1771 * epoch).permutation(len(d))`,
epoch = c_d // len(d). The example's own random choices use the per-example seed
`seed + record + len(d) * epoch` (docs/architecture.md#prompt-formatting). A global batch is therefore a function of the seed
and the batch number only: the same for any number of processes or workers.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

EPOCH_SEED_STRIDE = 1771


@dataclasses.dataclass(frozen=True)
class Group:
    rate: float
    datasets: tuple[tuple[str, int | None], ...]   # (name, size cap or None)


def _group(rate, *datasets):
    return Group(rate, tuple(d if isinstance(d, tuple) else (d, None) for d in datasets))


MIXTURES: dict[str, tuple[Group, ...]] = {
    # Stage 1 (docs/architecture.md#stages): PixMo-Cap, caption + one transcript per image.
    "pixmo_cap_with_transcripts": (_group(1.0, "pixmo_cap_with_transcripts"),),
    # Stage 2 (docs/architecture.md#mixtures): three groups, sqrt-size weighting inside each.
    "3.2-synthetic": (
        _group(0.15, "pixmo_ask_model_anything", ("pixmo_cap", 50_000), "pixmo_cap_qa", "pixmo_pointing_explanations"),
        _group(0.50, "coco_2014_vqa_multi", "text_vqa", "okvqa", "chart_qa_weighted", "doc_qa", "info_qa",
               "ai2_diagram_v2_mix_transparent", "a_okvqa_mc", "a_okvqa_da", "android_control", "science_qa_img",
               "tabwmp_da", "st_qa", "tally_qa", "pixmo_docs_charts", "pixmo_docs_tables", "pixmo_docs_other",
               "pixmo_docs_diagrams", ("dv_qa", 10_000), ("figure_qa", 10_000), ("plot_qa", 20_000)),
        _group(0.35, "pixmo_points", "pixmo_count", "pixmo_points_high_freq", "pixmo_points_counting",
               "pixmo_points_high_freq_counting", "pixmo_count_counting"),
    ),
    # The same three groups without the academic sets: what PixMo alone gives.
    "pixmo_only": (
        _group(0.15, "pixmo_ask_model_anything", ("pixmo_cap", 50_000), "pixmo_cap_qa", "pixmo_pointing_explanations"),
        _group(0.50, "pixmo_docs_charts", "pixmo_docs_tables", "pixmo_docs_other", "pixmo_docs_diagrams"),
        _group(0.35, "pixmo_points", "pixmo_count", "pixmo_points_high_freq", "pixmo_points_counting",
               "pixmo_points_high_freq_counting", "pixmo_count_counting"),
    ),
    "synthetic_pretrain": (_group(1.0, "synthetic_captions"),),
    # Stage 2 keeps some captioning, as the original's "demo" group keeps PixMo-Cap: without it the
    # fine-tuned model forgets how to caption (demo: caption loss 0.14 after stage 1, 7.1 after stage 2).
    "synthetic_sft": (_group(0.85, "synthetic_tasks"), _group(0.15, "synthetic_captions")),
}


def parse_mixture(text: str) -> tuple[Group, ...]:
    """A mixture by name, a single dataset name, or "name:rate,name:rate" (rates taken as given)."""
    text = text.strip()
    if text in MIXTURES:
        return MIXTURES[text]
    if ":" not in text and "," not in text:
        if not text:
            raise ValueError("empty mixture: set config.data.mixture")
        return (_group(1.0, text),)
    groups = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rate = item.rpartition(":")
        try:
            value = float(rate)
        except ValueError:
            raise ValueError(f"mixture {text!r}: expected NAME:RATE items, got {item!r}") from None
        if not name or value <= 0:
            raise ValueError(f"mixture {text!r}: expected NAME:RATE with a rate > 0, got {item!r}")
        groups.append(_group(value, name))
    return tuple(groups)


def dataset_names(groups) -> list[str]:
    return sorted({name for g in groups for name, _ in g.datasets})


def drop_datasets(groups, missing) -> tuple[Group, ...]:
    """The mixture without the `missing` datasets (groups left empty disappear)."""
    out = []
    for g in groups:
        kept = tuple(d for d in g.datasets if d[0] not in missing)
        if kept:
            out.append(Group(g.rate, kept))
    return tuple(out)


def mixture_rates(groups, sizes: dict[str, int]) -> dict[str, float]:
    """{dataset: rate} by the grouped root-size rule (the module docstring), summing to 1."""
    rates: dict[str, float] = {}
    for g in groups:
        roots = {name: math.sqrt(cap if cap is not None else sizes[name]) for name, cap in g.datasets}
        total = sum(roots.values())
        if total <= 0:
            raise ValueError(f"mixture group {[n for n, _ in g.datasets]} has no examples")
        for name, root in roots.items():
            rates[name] = rates.get(name, 0.0) + g.rate * root / total
    norm = sum(rates.values())
    return {name: rate / norm for name, rate in sorted(rates.items())}


class MixturePlan:
    """Which (dataset, record, epoch) fills each slot of each global batch (the module docstring).

    The per-batch draws come from one sequential RandomState, so a batch far ahead needs the draws of
    all batches before it: `slots(b)` continues from the last batch it computed (the usual, sequential
    case costs one draw) and otherwise replays from a snapshot taken every SNAPSHOT_EVERY batches.
    """

    SNAPSHOT_EVERY = 1000

    def __init__(self, names: list[str], rates: list[float], lengths: list[int], seed: int, global_batch: int):
        if len(names) != len(rates) or len(names) != len(lengths):
            raise ValueError("names, rates and lengths must align")
        if any(n <= 0 for n in lengths):
            empty = [name for name, n in zip(names, lengths) if n <= 0]
            raise ValueError(f"dataset(s) without examples: {empty}")
        self.names, self.lengths = list(names), np.asarray(lengths, np.int64)
        self.rates = np.asarray(rates, np.float64) / np.sum(rates)
        self.seed, self.global_batch = int(seed), int(global_batch)
        self._cursor = None            # (next batch, RandomState, counters before that batch)
        self._last = None              # (batch, choices, items) of the latest call
        self._snapshots: dict[int, tuple] = {}
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _start(self, batch: int):
        base = max((b for b in self._snapshots if b <= batch), default=None)
        if base is None:
            return 0, np.random.RandomState(self.seed), np.zeros(len(self.names), np.int64)
        state, counters = self._snapshots[base]
        rs = np.random.RandomState()
        rs.set_state(state)
        return base, rs, counters.copy()

    def _draw(self, rs) -> np.ndarray:
        if len(self.names) == 1:
            return np.zeros(self.global_batch, np.int64)
        return rs.choice(len(self.names), size=self.global_batch, p=self.rates)

    def dataset_choices(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index [B], item number [B]) of the slots of global batch `batch`."""
        if self._last is not None and self._last[0] == batch:
            return self._last[1], self._last[2]
        if self._cursor is not None and self._cursor[0] <= batch:
            b, rs, counters = self._cursor
        else:
            b, rs, counters = self._start(batch)
        while True:
            if b % self.SNAPSHOT_EVERY == 0 and b not in self._snapshots:
                self._snapshots[b] = (rs.get_state(), counters.copy())
            choices = self._draw(rs)
            items = np.empty(self.global_batch, np.int64)
            for d in np.unique(choices):
                where = np.flatnonzero(choices == d)
                items[where] = counters[d] + np.arange(len(where))
                counters[d] += len(where)
            b += 1
            if b > batch:
                self._cursor = (b, rs, counters)
                self._last = (batch, choices, items)
                return choices, items

    def permutation(self, dataset: int, epoch: int) -> np.ndarray:
        key = (dataset, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 4 * len(self.names):
                self._permutations.clear()
            rs = np.random.RandomState(self.seed + EPOCH_SEED_STRIDE * epoch)
            self._permutations[key] = rs.permutation(int(self.lengths[dataset]))
        return self._permutations[key]

    def record(self, dataset: int, item: int) -> tuple[int, int]:
        """(record index, epoch) of dataset's item number `item`."""
        n = int(self.lengths[dataset])
        epoch, position = divmod(int(item), n)
        return int(self.permutation(dataset, epoch)[position]), epoch

    def example_seed(self, dataset: int, record: int, epoch: int) -> int:
        return self.seed + record + int(self.lengths[dataset]) * epoch
