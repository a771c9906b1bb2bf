"""One endless, sharded, resumable DataLoader per :class:`DataConfig`.

Order. The records form one endless stream: epoch ``e`` is the dataset in the order given by ``seed`` and ``e``
(a permutation for random access; for streaming, a shuffled file order plus a ``shuffle_buffer``-sized buffer
shuffle), and epochs follow each other without a break, so no record is dropped at an epoch's end. The stream is cut
into global blocks of ``batch_size * world_size`` records. Block ``k`` is global step ``k``: rank ``r`` takes
positions ``r, r + W, r + 2W, ...`` of the block. So a 1-process run with batch size ``2B`` sees at every step the
union of what a 2-process run with batch size ``B`` sees, whatever ``num_workers`` is.

Workers. DataLoader worker ``w`` of ``N`` (a "lane") builds the batches of blocks ``w, w + N, w + 2N, ...``;
DataLoader takes batches from workers round-robin, so batches arrive in block order. Parsing, tokenisation, image
decoding and transforms all run in the workers; the main process only receives finished tensors.

Bad records are left out of their batch and counted by reason in the next batch's ``skipped``; a batch whose
records are all bad is not emitted, and its worker goes on to its next block. The reasons: ``not_utf8`` (a JSON
Lines line that is not UTF-8), ``malformed_json``, ``malformed_record``, ``image_count_mismatch`` (``<image>``
tokens vs images), ``outside_data_root`` (an image path leading out of the data folder, see
``DataConfig.allow_outside_paths``), ``missing_image`` (no regular file there: absent, a directory, a FIFO, a
device), ``image_too_large`` (over ``DataConfig.max_image_pixels``), ``corrupt_image``, and ``empty`` (nothing to
train after truncation). The first record skipped for each reason is logged (a warning naming the file, the line and
the image path), once per reason and worker. With ``strict=True`` the first bad record raises ValueError naming
the dataset, file and line/row/key. A worker that finds no usable record in two epochs raises ValueError with the
skip counts (a wrong ``format`` would otherwise spin forever).

Work per record is bounded, so one hostile record cannot stall or exhaust a worker: text beyond what ``max_tokens``
can reach is never tokenized, images after ``max_images`` are never looked at, a path that is no regular file (a
FIFO, a device) is never read, and an image over ``max_image_pixels`` is never decoded (see :mod:`.samples` and
:mod:`.formats`).

Split by shards. Streaming from many files (web-scale shards), reading the whole stream in every reader would cost
``world_size * num_workers`` times the I/O. With ``split_by="shards"`` (the default ``"auto"`` picks it when there
are at least as many files as readers) reader ``rank * N + w`` streams only files ``rank * N + w``, ``+ W N``, ... of
each epoch's shuffled file order, and its batches are consecutive records of its own files. Global batches then
depend on the number of readers, as in every web-scale loader; resuming is still exact.

Resume. Every batch carries ``position``: its lane, the lane's next block, and the loader's starting point.
:class:`PositionTracker` folds them into a state; ``build_dataloader(..., start=tracker.state_dict())`` restarts
each lane at its next block and the round-robin at the lane after the last batch consumed, so the batches that
follow are exactly those an uninterrupted loader would have produced. Random access jumps straight to the block;
streaming re-reads (without decoding) the records before it. Save each rank's tracker: rank 0's state is exact for
every rank unless some rank left out a whole all-bad batch.

Usage::

    loader = build_dataloader(config, processor, rank=0, world_size=1, seed=0)
    tracker = PositionTracker()
    for step, batch in zip(range(steps), loader):
        tracker.update(batch["position"])
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}).loss
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flamingo.processing import FlamingoProcessor

from .config import DataConfig
from .formats import BadRecord, decode_line, parse_record
from .samples import SampleBuilder, collate, decode_images
from .sources import LazySample, Part, RandomAccess, open_parts

logger = logging.getLogger(__name__)


class PositionTracker:
    """Where a loader stands: the next block of each lane and which lane comes next. JSON-able state."""

    def __init__(self) -> None:
        self.num_workers: int | None = None
        self.next_blocks: list[int] | None = None
        self.next_lane = 0
        self.global_batch: int | None = None

    def update(self, batch_position: dict) -> None:
        """Call with ``batch["position"]`` for every batch consumed, in order."""
        if self.next_blocks is None or self.num_workers != batch_position["num_workers"]:
            self.num_workers = batch_position["num_workers"]
            self.next_blocks = list(batch_position["start_blocks"])
        lane = batch_position["lane"]
        self.next_blocks[lane] = batch_position["next_block"]
        self.next_lane = (lane + 1) % self.num_workers
        self.global_batch = batch_position["global_batch"]

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "next_blocks": self.next_blocks, "next_lane": self.next_lane,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.num_workers, self.next_blocks = state["num_workers"], state["next_blocks"]
        self.next_lane, self.global_batch = state["next_lane"], state.get("global_batch")


class _Batches(IterableDataset):
    """Yields finished batches (see the module docstring); used with ``DataLoader(batch_size=None)``."""

    def __init__(self, config: DataConfig, processor: FlamingoProcessor, parts: list[Part], *, rank: int,
                 world_size: int, seed: int, strict: bool, lanes: int, start_blocks: list[int], first_lane: int,
                 split_shards: bool = False):
        self.config, self.processor, self.parts = config, processor, parts
        self.split_shards = split_shards
        self.table = RandomAccess(parts) if not config.streaming else None
        self.rank, self.world_size, self.seed, self.strict = rank, world_size, seed, strict
        self.lanes, self.start_blocks, self.first_lane = lanes, start_blocks, first_lane
        self.global_batch = config.batch_size * world_size
        self.builder = SampleBuilder(processor, max_tokens=config.max_tokens, max_images=config.max_images,
                                     mask_text_before_first_image=config.mask_text_before_first_image,
                                     labels=config.labels, answer_markers=tuple(config.answer_markers))
        size = processor.preprocess_cfg["size"]
        self.image_shape = (3, *(tuple(size) if isinstance(size, (list, tuple)) else (size, size)))
        self.pad_id = processor.tokenizer.pad_token_id

    # ---------------------------------------------------------------------------------------------- order
    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.table)
        if not self.config.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _random_access_records(self, positions: list[int], orders: dict[int, np.ndarray]) -> list[tuple[str, Any, Any]]:
        """Records at global stream ``positions``; ``orders`` caches the current epoch's permutation."""
        n, records = len(self.table), []
        for position in positions:
            epoch, offset = divmod(position, n)
            if epoch not in orders:
                orders.clear()
                orders[epoch] = self._permutation(epoch)
            records.append(self.table.get(int(orders[epoch][offset])))
        return records

    def _stream(self, slot: int | None = None, slots: int = 1) -> Iterator[tuple[str, Any, Any]]:
        """The endless streaming order: epoch after epoch of (shuffled files, buffer-shuffled records).

        With ``slot`` (split by shards), only files ``slot, slot + slots, ...`` of each epoch's file order are read,
        with a buffer shuffle of the reader's own.
        """
        epoch = empty_epochs = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.parts)) if self.config.shuffle else np.arange(len(self.parts))
            if slot is not None:
                order = order[slot::slots]
                rng = np.random.default_rng([self.seed, epoch, 1 + slot])
            records = ((origin, raw, self.parts[p].root) for p in order for origin, raw in self.parts[p].iterate())
            if self.config.shuffle:
                records = _buffer_shuffle(records, self.config.shuffle_buffer, rng)
            count = 0
            for record in records:
                count += 1
                yield record
            epoch += 1
            if count == 0:
                empty_epochs += 1
                # Split by shards, one epoch may deal this reader only empty files (img2dataset writes a shard with
                # no sample when all its downloads fail); the next epoch deals it others.
                if slot is None or not self.config.shuffle or empty_epochs >= 2 * len(self.parts):
                    what = "the data holds" if slot is None else f"the files of reader {slot} of {slots} hold"
                    raise ValueError(f"DataConfig {self.config.name!r}: {what} no records.")
                continue
            empty_epochs = 0
            self._epoch_length = count

    # ---------------------------------------------------------------------------------------------- batches
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        lane = (self.first_lane + (info.id if info is not None else 0)) % self.lanes
        block = self.start_blocks[lane]
        orders: dict[int, np.ndarray] = {}
        if self.split_shards:
            stream = self._stream(slot=self.rank * self.lanes + lane, slots=self.world_size * self.lanes)
        else:
            stream = self._stream() if self.config.streaming else None
        stream_position = 0
        skipped: Counter = Counter()
        reported: set[str] = set()  # the reasons already logged by this worker
        self._epoch_length = len(self.table) if self.table is not None else None  # streaming: known after epoch 0
        last_good = block  # a worker that finds nothing usable for two epochs stops instead of spinning forever
        while True:
            first = block * self.global_batch
            mine = [first + self.rank + self.world_size * j for j in range(self.config.batch_size)]
            if stream is None:
                records = self._random_access_records(mine, orders)
            elif self.split_shards:
                # This lane's j-th block (block = lane + j * lanes) is records [j B, (j + 1) B) of its own files.
                own_first = (block // self.lanes) * self.config.batch_size
                records = []
                while stream_position < own_first + self.config.batch_size:
                    record = next(stream)
                    if stream_position >= own_first:
                        records.append(record)
                    stream_position += 1
            else:
                wanted, records = set(mine), []
                while stream_position < first + self.global_batch:
                    record = next(stream)
                    if stream_position in wanted:
                        records.append(record)
                    stream_position += 1
            samples, pixels = [], []
            for origin, raw, root in records:
                try:
                    sample, sample_pixels = self._make(raw, root)
                except BadRecord as bad:
                    where = f"{origin} ({bad.reason}): {_shorten(str(bad))}"
                    if self.strict:
                        raise ValueError(f"DataConfig {self.config.name!r}: bad record {where}") from None
                    if bad.reason not in reported:
                        reported.add(bad.reason)
                        logger.warning("DataConfig %r: skipped %s. Further records skipped for this reason are only "
                                       "counted.", self.config.name, where)
                    skipped[bad.reason] += 1
                    continue
                if sample is not None:
                    samples.append(sample)
                    pixels.append(sample_pixels)
            block += self.lanes
            if not samples:
                # Records of this lane's stream passed since its last usable batch, in the units of _epoch_length:
                # split by shards, the lane's own files (batch_size records per block of its own); otherwise the
                # whole stream (global_batch records per block).
                per_block = self.config.batch_size if self.split_shards else self.global_batch * self.lanes
                span = (block - last_good) // self.lanes * per_block
                if self._epoch_length is not None and span >= max(2 * self._epoch_length, 2 * per_block):
                    raise ValueError(
                        f"DataConfig {self.config.name!r}: no usable record in two epochs of {self.config.path} "
                        f"(skipped by reason: {dict(skipped)}); check format={self.config.format!r}, the paths and "
                        f"image_root."
                    )
                continue
            last_good = block
            batch = collate(samples, pixels, pad_id=self.pad_id, image_shape=self.image_shape)
            batch["position"] = {
                "lane": lane, "next_block": block, "num_workers": self.lanes, "start_blocks": list(self.start_blocks),
                "global_batch": self.global_batch,
            }
            batch["skipped"] = dict(skipped)
            skipped = Counter()
            yield batch

    def _make(self, raw: Any, root: Any):
        if isinstance(raw, bytes):
            raw = decode_line(raw)  # a JSON Lines line
        if isinstance(raw, str) and not raw.strip():
            return None, None  # a blank line in a JSON Lines file is not a record
        if isinstance(raw, LazySample):
            raw = raw.load()
        config = self.config
        document = parse_record(raw, config.format, root, allow_outside=config.allow_outside_paths,
                                max_images=config.max_images)
        sample = self.builder.build(document)
        return sample, decode_images(sample, self.processor, max_pixels=config.max_image_pixels)


def _shorten(message: str, limit: int = 2000) -> str:
    """A bad record's message, which may quote its values (a path can be megabytes long), cut to ``limit``."""
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message):,} characters)"


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Approximate shuffle of an endless or huge stream: emit a random element of a ``size``-element buffer."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def build_dataloader(config: DataConfig, processor: FlamingoProcessor, *, rank: int, world_size: int, seed: int,
                     strict: bool = False, start: dict | None = None) -> DataLoader:
    """An endless DataLoader of ``config``'s batches for process ``rank`` of ``world_size`` (see module docstring).

    Each batch: input_ids, attention_mask, labels (B, L), right-padded, labels -100 where masked; pixel_values
    (B, T_max, 1, C, H, W) zero-padded; position (JSON-able, for :class:`PositionTracker`); skipped (reason -> count).
    Do not pass it through ``accelerator.prepare``: it shards itself.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"build_dataloader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    lanes = max(config.num_workers, 1)
    if start is None or start.get("next_blocks") is None:
        start_blocks, first_lane = list(range(lanes)), 0
    else:
        if start["num_workers"] != lanes:
            raise ValueError(
                f"DataConfig {config.name!r}: the resume state was written with num_workers={start['num_workers']}, "
                f"this loader has {lanes} worker lane(s); resume with the same num_workers."
            )
        if start.get("global_batch") not in (None, config.batch_size * world_size):
            raise ValueError(
                f"DataConfig {config.name!r}: the resume state has a global batch of {start['global_batch']} records, "
                f"this loader has batch_size * world_size = {config.batch_size * world_size}."
            )
        start_blocks, first_lane = list(start["next_blocks"]), start["next_lane"]
    parts = open_parts(config)
    if not config.streaming and sum(part.length for part in parts) == 0:
        raise ValueError(f"DataConfig {config.name!r}: {config.path} holds no records.")
    if config.num_workers > 0:
        # Workers fork after the tokenizer has been used here; its thread pool must not be inherited.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    readers = world_size * lanes
    split_shards = config.streaming and readers > 1 and config.split_by != "records"
    if split_shards and len(parts) < readers:
        if config.split_by == "shards":
            raise ValueError(
                f"DataConfig {config.name!r}: split_by='shards' needs at least one file per reader, but there are "
                f"{len(parts)} file(s) for {world_size} process(es) x {lanes} worker lane(s)."
            )
        split_shards = False  # "auto": too few files to give every reader its own
    dataset = _Batches(config, processor, parts, rank=rank, world_size=world_size, seed=seed, strict=strict,
                       lanes=lanes, start_blocks=start_blocks, first_lane=first_lane, split_shards=split_shards)
    return DataLoader(dataset, batch_size=None, num_workers=config.num_workers)
