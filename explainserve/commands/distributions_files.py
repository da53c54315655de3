"""build-distributions over a user's files: decode in parallel, one class at a time, resumable.

Every sample is decoded by the handler's own functions (:mod:`explainserve.data.files`) and
prepared by the Explainer's (:meth:`~explainserve.explainer.Explainer.prepare`) in worker
processes, while the network computes the alpha of earlier batches. Each class is summarised
as soon as its last batch is done and kept in a checkpoint folder (``.<name>.checkpoint``
beside ``--out``), so a build killed halfway and restarted with the same arguments skips the
classes it finished. Bad files (unreadable, corrupt, too small, of the wrong kind) are skipped
and counted; the build fails when more than ``--max-bad-fraction`` of them are bad.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from explainserve.anomaly import StoreMeta, shard_classes
from explainserve.anomaly.build import default_build_time, write_class_arrays
from explainserve.anomaly.checkpoint import ClassCheckpoint
from explainserve.anomaly.store import MANIFEST, finalise_store
from explainserve.anomaly.summary import PERCENTILE_LEVELS, summarise_class
from explainserve.data.files import SampleFile
from explainserve.data.loader import class_batches, decoded_batches, plain_batches
from explainserve.data.sources import DataSplits
from explainserve.explainer import Prepared

BUILD_RECORD = "build_record.json"
LISTED_BAD_FILES = 100  # paths kept in the build record; the count is complete
PRINTED_BAD_FILES = 20


@dataclass
class BadFiles:
    """Files skipped as bad, out of ``files`` looked at."""

    files: int = 0
    bad: int = 0
    listed: list = field(default_factory=list)

    def add(self, path: Path, reason: str) -> None:
        self.bad += 1
        if len(self.listed) < LISTED_BAD_FILES:
            self.listed.append({"path": str(path), "reason": reason})

    def extend(self, other: dict) -> None:
        self.files += other["files"]
        self.bad += other["bad"]
        self.listed.extend(other["listed"][:LISTED_BAD_FILES - len(self.listed)])

    def to_json(self) -> dict:
        return {"files": self.files, "bad": self.bad, "listed": self.listed}

    def check(self, max_fraction: float, total: int, what: str) -> None:
        """Raise ValueError once more than ``max_fraction`` of ``total`` files are bad."""
        if self.bad > max_fraction * total:
            shown = "\n  ".join(f"{item['path']}: {item['reason']}" for item in self.listed[:PRINTED_BAD_FILES])
            raise ValueError(f"{self.bad} of {total} {what} files are bad, more than --max-bad-fraction "
                             f"{max_fraction:g}; the first:\n  {shown}")


def workers(args) -> int:
    """Decoding processes: --workers, checked."""
    if args.workers < 0:
        raise ValueError(f"--workers: must be >= 0 (0 decodes in the build process), got {args.workers}")
    return args.workers


def prepare_one(explainer) -> Callable:
    """What the decoding workers apply to each sample: the Explainer's own preparation (resize
    and normalise, as for a request), so the network's process only runs the network."""
    return lambda sample: explainer.prepare([sample])


def joined(parts: list[Prepared]) -> Prepared:
    """One batch of samples prepared one at a time (preparation is per sample, so the batch is
    the one :meth:`Explainer.prepare` would give)."""
    return Prepared(torch.cat([part.rgb for part in parts]), torch.cat([part.inputs for part in parts]))


def checkpoint_folder(out: Path) -> Path:
    """Where the finished classes of a build of ``out`` wait; hidden from a gateway's --store-dir scan."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def remove_checkpoint(out: Path) -> None:
    """Drop the finished classes once the store they made is published."""
    shutil.rmtree(checkpoint_folder(out), ignore_errors=True)


def fingerprint(args, meta: StoreMeta, model, samples: list[SampleFile], held: range) -> dict:
    """What the finished classes depend on: a restarted build reuses them only if all agree."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    paths = hashlib.sha256()
    for sample in samples:
        paths.update(f"{sample.label}:{sample.path}\n".encode())
    return {"model": meta.to_json(), "weights": weights.hexdigest(), "samples": paths.hexdigest(), "classes": [held.start, held.stop],
            "batch_size": args.batch_size, "top_k": args.top_k}


def build_from_files(args, explainer, meta: StoreMeta, data: DataSplits, alpha_of: Callable, folder: Path) -> dict:
    """Build the store (or shard) of ``args.out`` from ``data.train`` into ``folder``; returns
    the build record.

    ``alpha_of(explainer, samples, ids, targets)`` computes the alpha as served. The finished
    classes stay in :func:`checkpoint_folder` until :func:`remove_checkpoint`.
    """
    held = shard_classes(len(meta.class_names), args.shard, args.num_shards)
    mine = [i for i, sample in enumerate(data.train) if sample.label in held]
    checkpoint = ClassCheckpoint(checkpoint_folder(args.out),
                                 fingerprint(args, meta, explainer.model, [data.train[i] for i in mine], held))
    finished = checkpoint.finished()
    if finished:
        print(f"resuming: {len(finished)} of {len(held)} classes already finished in {checkpoint.directory}")
    todo = [i for i in mine if data.train[i].label not in finished]
    bad = BadFiles()
    for record in finished.values():
        bad.extend(record["bad"])

    def finish(class_id: int, rows: list, ids: list, class_bad: BadFiles) -> None:
        values = np.concatenate(rows) if rows else np.empty((0, meta.num_filters), np.float32)
        summary = summarise_class(values, np.asarray(ids, np.int64), args.top_k) if len(values) else None
        checkpoint.save(class_id, summary, {"count": len(values), "bad": class_bad.to_json()})
        bad.extend(class_bad.to_json())
        # Against every training file of the source, so a shard fails only when the whole
        # build must; the merge checks the shards' sum.
        bad.check(args.max_bad_fraction, len(data.train), "training")

    frames = explainer.input_size[0] if explainer.kind == "video" else None
    current, rows, ids, class_bad = None, [], [], BadFiles()
    with tqdm(total=len(todo), unit="images", desc=f"training alpha, classes {held.start}..{held.stop - 1}",
              dynamic_ncols=True) as bar:
        for batch in decoded_batches(data.train, class_batches(data.train, todo, args.batch_size), explainer.kind,
                                     frames, workers(args), prepare_one(explainer)):
            label = data.train[batch[0][0]].label
            if label != current and current is not None:
                finish(current, rows, ids, class_bad)
                rows, ids, class_bad = [], [], BadFiles()
            current = label
            class_bad.files += len(batch)
            good = [(index, sample) for index, sample, reason in batch if reason is None]
            for index, _, reason in batch:
                if reason is not None:
                    class_bad.add(data.train[index].path, reason)
            if good:
                alpha, _, _ = alpha_of(explainer, joined([s for _, s in good]), [i for i, _ in good], [label] * len(good))
                rows.append(alpha)
                ids.extend(i for i, _ in good)
            bar.update(len(batch))
        if current is not None:
            finish(current, rows, ids, class_bad)
    done = checkpoint.finished()
    for class_id in held:  # classes without any file in this source
        if class_id not in done:
            checkpoint.save(class_id, None, {"count": 0, "bad": BadFiles().to_json()})
    return write_store(args, meta, data, held, checkpoint, folder)


def write_store(args, meta: StoreMeta, data: DataSplits, held: range, checkpoint: ClassCheckpoint, out: Path) -> dict:
    """Assemble the finished classes into the store (or shard) folder ``out`` and write its
    build record."""
    records = checkpoint.finished()
    write_class_arrays(out, (checkpoint.summary(c) for c in held), len(held), meta.num_filters, args.top_k)
    counts = [records[c]["count"] for c in held]
    shard = None if args.num_shards == 1 else {"index": args.shard, "count": args.num_shards,
                                                "classes": [held.start, held.stop]}
    finalise_store(out, meta, counts=counts, top_k=args.top_k, levels=PERCENTILE_LEVELS,
                   build_time=args.build_time or default_build_time(), shard=shard, data=data.record)
    bad = BadFiles()
    for class_id in held:
        bad.extend(records[class_id]["bad"])
    empty = [meta.class_names[c] for c, count in zip(held, counts) if count == 0]
    record = {"train": bad.to_json(), "classes_without_training_samples": empty}
    write_record(out, record)
    report(record)
    return record


def write_record(out: Path, record: dict) -> None:
    (out / BUILD_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def report(record: dict) -> None:
    train = record["train"]
    print(f"training files: {train['files']}, bad and skipped: {train['bad']} (listed in {BUILD_RECORD})")
    for item in train["listed"][:PRINTED_BAD_FILES]:
        print(f"  bad: {item['path']}: {item['reason']}")
    if record["classes_without_training_samples"]:
        print(f"classes without training samples (scored against the pooled distribution of all classes): "
              f"{record['classes_without_training_samples']}")


def merged_record(shards: list[Path], max_bad_fraction: float) -> dict:
    """The build record of a merged store: the shards' records joined in shard order.

    Raises ValueError if more than ``max_bad_fraction`` of all training files were bad.
    """
    bad, empty = BadFiles(), []
    for shard in sorted(shards, key=lambda path: json.loads((path / MANIFEST).read_text())["shard"]["index"]):
        record = json.loads((shard / BUILD_RECORD).read_text())
        bad.extend(record["train"])
        empty.extend(record["classes_without_training_samples"])
    bad.check(max_bad_fraction, bad.files, "training")
    return {"train": bad.to_json(), "classes_without_training_samples": empty}


def validation_from_files(args, explainer, samples: list[SampleFile], held_out_scores: Callable) -> tuple:
    """Alpha of every val sample for its predicted class, that class, its pooled features
    (``held_out_scores(explainer, samples)``), and the bad files."""
    frames = explainer.input_size[0] if explainer.kind == "video" else None
    scored, bad = [], BadFiles(files=len(samples))
    with tqdm(total=len(samples), unit="images", desc="calibrating on val", dynamic_ncols=True) as bar:
        for batch in decoded_batches(samples, plain_batches(list(range(len(samples))), args.batch_size),
                                     explainer.kind, frames, workers(args), prepare_one(explainer)):
            good = [(index, sample) for index, sample, reason in batch if reason is None]
            for index, _, reason in batch:
                if reason is not None:
                    bad.add(samples[index].path, reason)
            if good:
                scored.append(held_out_scores(explainer, joined([s for _, s in good])))
            bar.update(len(batch))
    bad.check(args.max_bad_fraction, len(samples), "validation")
    if not scored:
        raise ValueError("no val sample could be decoded")
    alpha, predicted, features = (np.concatenate(parts) for parts in zip(*scored))
    return alpha, predicted, features, bad
