"""``explainserve build-distributions`` and ``merge-distributions``: the anomaly distribution store.

``build-distributions`` runs every training image through the model with its ground-truth
class, keeps its Grad-AMap filter scores, and writes the store (or one shard of its classes).
The data is a demo dataset or a user's files (``imagefolder:DIR``, ``clipfolder:DIR``,
``manifest:FILE``; see :mod:`explainserve.data.sources` and :mod:`.distributions_files`).
A whole build is then calibrated on the validation split, scored against the *predicted*
class as the server will score it. ``merge-distributions`` joins the shards of a sharded build
and, given the model and data, calibrates the merged store the same way.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from explainserve.anomaly import (StoreMeta, build_store, calibrate, load_store, merge_stores,
                                  save_calibration, shard_classes)
from explainserve.anomaly.build import DEFAULT_TOP_K
from explainserve.anomaly.calibration import (DEFAULT_TARGET_FPR, FALLBACK, POOLED, classes_never_anomalous,
                                              never_anomalous_warning)
from explainserve.anomaly.publish import publishing
from explainserve.anomaly.reissue import reissue_store
from explainserve.data.files import default_workers
from explainserve.commands.train_demo import DEMO_KINDS
from explainserve.data.sources import is_file_source, open_source
from explainserve.data.stratified import STRATIFIED_RULE

DEMO_MODELS = DEMO_KINDS
#: A demo dataset is generated: its limit is how many samples are generated, a seeded random draw.
DEMO_LIMIT_RULE = "the first N samples of the seeded generated dataset (a random draw of the classes)"
DATASETS = {"fashion-scenes": ("FashionScenes", "image"), "moving-fashion": ("MovingFashion", "clip")}


def data_spec(text: str) -> str:
    """argparse type: a demo dataset name or a file source spelling."""
    if text in DATASETS or is_file_source(text):
        return text
    raise argparse.ArgumentTypeError(f"expected a demo dataset ({', '.join(sorted(DATASETS))}) or "
                                     f"imagefolder:DIR, clipfolder:DIR or manifest:FILE, got {text!r}")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def add_model_arguments(parser, *, required: bool) -> None:
    parser.add_argument("--model", required=required,
                        help="'image', 'image_large' or 'video' (a demo model), a .mar archive, or an unpacked archive folder")
    parser.add_argument("--data", required=required, type=data_spec, metavar="SPEC",
                        help="training and validation data: imagefolder:DIR (DIR/train/<class>/*, DIR/val/<class>/*; or "
                             "DIR/<class>/*, training only), "
                             "clipfolder:DIR (DIR/<split>/<class>/<clip>/<frames>), manifest:FILE (CSV or JSONL with "
                             f"path, label, split), or a demo dataset ({', '.join(sorted(DATASETS))})")
    parser.add_argument("--val-fraction", type=float,
                        help="without a val split: hold out this fraction of each class, deterministically")
    parser.add_argument("--max-bad-fraction", type=fraction, default=0.01,
                        help="fail if more than this fraction of the files are bad (default 0.01)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"decoding processes beside the network pass (default {default_workers()} here; 0: none)")
    parser.add_argument("--name", help="served model name the store is for (default: the model's metadata)")
    parser.add_argument("--version", help="served model version (default: the model's metadata)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per network pass")
    parser.add_argument("--val-limit", type=positive_int,
                        help="use only N validation samples: for files a per-class stratified choice (recorded in "
                             "the store's manifest); for a demo dataset the first N generated (past its item pool, "
                             "fresh composites of the same items)")
    parser.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR,
                        help=f"false-positive rate the verdict is calibrated to (default {DEFAULT_TARGET_FPR})")
    parser.add_argument("--min-class-count", type=positive_int,
                        help="classes with fewer validation images in the ranking half use the class-independent "
                             "group (default max(50, 2 / target-fpr): 200 at 1 %%)")


def register(subparsers) -> None:
    build = subparsers.add_parser("build-distributions", help="build the anomaly distribution store of a model")
    add_model_arguments(build, required=True)
    build.add_argument("--out", type=Path, required=True,
                       help="where to publish the store: a symlink, swapped atomically, to a new version folder beside it")
    build.add_argument("--shard", type=int, default=0, help="index of the shard of classes to build")
    build.add_argument("--num-shards", type=positive_int, default=1, help="number of shards (1: the whole store)")
    build.add_argument("--limit", type=positive_int,
                       help="use only N training samples: for files a per-class stratified choice (recorded in the "
                            "store's manifest); for a demo dataset the first N generated")
    build.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K, help="exemplar image ids kept per (class, filter)")
    build.add_argument("--build-time", help="ISO 8601 UTC build time; give every shard the same one "
                                            "(default: $SOURCE_DATE_EPOCH, else now)")
    build.set_defaults(func=build_main)

    merge = subparsers.add_parser("merge-distributions", help="merge the shards of a sharded build, then calibrate")
    merge.add_argument("shards", type=Path, nargs="+", help="shard store folders")
    merge.add_argument("--out", type=Path, required=True, help="where to publish the merged store (as build-distributions --out)")
    add_model_arguments(merge, required=False)
    merge.set_defaults(func=merge_main)

    recalibrate = subparsers.add_parser(
        "recalibrate-distributions",
        help="calibrate a store again on the validation split, keeping its training arrays (also upgrades a store "
             "of an older format)")
    recalibrate.add_argument("store", type=Path, help="the store whose training arrays are kept (left unchanged)")
    recalibrate.add_argument("--out", type=Path, required=True,
                             help="where to publish the recalibrated store (as build-distributions --out; may be the "
                                  "store's own published path)")
    add_model_arguments(recalibrate, required=True)
    recalibrate.set_defaults(func=recalibrate_main)

    describe = subparsers.add_parser(
        "describe-distributions",
        help="verify a store and say what it holds: model, training data, calibration groups, and classes "
             "whose verdict can never be ANOMALOUS")
    describe.add_argument("store", type=Path, help="a store folder (build-distributions --out)")
    describe.set_defaults(func=describe_main)


def load_model(spec: str):
    """(model, archive metadata) of a demo model kind, a .mar file or an unpacked archive folder."""
    from explainserve import model_archive

    if spec in DEMO_MODELS:
        from explainserve.commands.archive import demo_model

        return demo_model(spec)  # named and described exactly as `archive --demo` serves it
    path = Path(spec)
    if path.is_dir():
        return model_archive.load_model(path)
    if path.suffix == ".mar" and path.is_file():
        return model_archive.load_archive(path)
    raise ValueError(f"--model: expected {', '.join(map(repr, DEMO_MODELS))}, a .mar file or an archive folder, got {spec!r}")


def open_subject(args):
    """The model's Explainer and its store metadata, checked against the dataset's classes."""
    from explainserve.explainer import Explainer

    model, metadata = load_model(args.model)
    name = args.name or metadata.get("name")
    if not name:
        raise ValueError(f"--model {args.model}: its metadata has no model name; pass --name")
    explainer = Explainer(model, kind=metadata["kind"], input_size=metadata["input_size"], mean=metadata["mean"],
                          std=metadata["std"], class_names=metadata["class_names"], layer=metadata.get("layer"))
    meta = StoreMeta(
        model_name=name, model_version=args.version or str(metadata.get("version", "1.0")), layer=explainer.layer,
        input_transform={"input_size": list(explainer.input_size), "mean": list(metadata["mean"]),
                         "std": list(metadata["std"]), "resize": "bilinear, antialiased", "scale": "uint8 / 255"},
        class_names=tuple(metadata["class_names"]), num_filters=explainer.num_filters,
    )
    return explainer, meta


def open_split(args, split: str, limit: int | None, image_size: int):
    """The dataset split and the key of its samples' pixels ("image" or "clip")."""
    from explainserve import data

    class_name, key = DATASETS[args.data]
    return getattr(data, class_name)(split, seed=args.seed, size=limit, image_size=image_size), key


def demo_record(args) -> dict:
    """The manifest's ``data`` for a demo dataset: which one, its seed, and the limits applied."""
    record = {"source": args.data, "seed": args.seed}
    for key, value in (("limit", args.limit), ("val_limit", args.val_limit)):
        if value is not None:
            record[key] = {"train" if key == "limit" else "val": value, "rule": DEMO_LIMIT_RULE}
    return record


def alpha_of(explainer, samples: list, ids: list, targets: list | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One network pass: (alpha (B, K) float32, class scored (B,) int64, image ids (B,) int64).

    With ``targets`` the alpha is computed for those classes, else for the predicted ones.
    """
    scores = explainer.filter_scores(samples, targets=targets)
    return scores.alpha, scores.target.astype(np.int64), np.asarray(ids, dtype=np.int64)


def training_batches(explainer, dataset, key: str, held: range, batch_size: int) -> Iterator[tuple]:
    """Training alpha for the ground-truth class, in batches of one class each.

    A network's output can change in the last bits with the batch it is computed in, so every
    batch holds ``batch_size`` consecutive images of one class (in dataset order): a class's
    batches, and hence its bytes in the store, are the same whichever shard builds it. Memory
    holds at most ``batch_size - 1`` pending samples per class. Other shards' images are
    skipped before the network pass.
    """
    pending: dict[int, list] = {class_id: [] for class_id in held}
    for index in tqdm(range(len(dataset)), desc=f"training alpha, classes {held.start}..{held.stop - 1}", unit="image"):
        sample = dataset[index]
        queue = pending.get(sample["label"])
        if queue is None:
            continue
        queue.append((index, sample[key]))
        if len(queue) == batch_size:
            yield run_class(explainer, queue, sample["label"])
    for class_id, queue in pending.items():
        if queue:
            yield run_class(explainer, queue, class_id)


def run_class(explainer, queue: list, class_id: int) -> tuple:
    ids, samples = zip(*queue)
    queue.clear()
    return alpha_of(explainer, list(samples), list(ids), [class_id] * len(ids))


def held_out_scores(explainer, samples: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One network pass over held-out samples, as served: alpha (B, K) float32 for the
    predicted class, that class (B,) int64, and the target layer's pooled features (B, K) float32."""
    scores = explainer.filter_scores(samples)
    return scores.alpha, scores.target.astype(np.int64), scores.features


def validation_scores(explainer, dataset, key: str, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`held_out_scores` of every validation image, concatenated."""
    batches = [held_out_scores(explainer, [dataset[i][key] for i in range(start, min(start + batch_size, len(dataset)))])
               for start in tqdm(range(0, len(dataset), batch_size), desc="calibrating on val", unit="batch")]
    return tuple(np.concatenate(parts) for parts in zip(*batches))


def calibrate_store(args, explainer, store_path: Path, record: dict | None = None) -> None:
    """Calibrate the store at ``store_path`` on the validation split and print the result.

    For a file source, the validation files skipped as bad go into the build ``record``,
    which is written with the store.
    """
    # distributions_files imports torch (its DataLoader): imported where used, so `explainserve --help` starts fast.
    from explainserve.commands.distributions_files import validation_from_files, write_record

    store = load_store(store_path)
    if is_file_source(args.data):
        data = open_source(args.data, explainer.class_names, val_fraction=args.val_fraction, val_limit=args.val_limit)
        alpha, predicted, features, bad = validation_from_files(args, explainer, data.val, held_out_scores)
        if record is not None:
            record["val"] = bad.to_json()
            write_record(store_path, record)
        print(f"validation files: {bad.files}, bad and skipped: {bad.bad}")
    else:
        val, key = open_split(args, "val", args.val_limit, explainer.input_size[-1])
        alpha, predicted, features = validation_scores(explainer, val, key, args.batch_size)
    calibration = calibrate(store, alpha, predicted, features=features, target_fpr=args.target_fpr,
                            min_class_count=args.min_class_count)
    save_calibration(store, calibration)
    section = calibration.section
    sources = section["classes"]["source"]
    print(f"calibrated on {len(alpha)} val samples to a {args.target_fpr:.2%} false-positive rate "
          f"({section['split']['part_a']} for scales and tail grids, {section['split']['part_b']} for conformal ranks): "
          f"{sources.count('class')} classes ranked on their own samples, {sources.count('fallback')} on the "
          f"class-independent group")
    pooled = [name for name, source in zip(store.meta.class_names, sources) if source == POOLED]
    if pooled:
        print(f"classes without training samples, scored against the pooled distribution of all classes and "
              f"ranked among all {section['classes']['count'][sources.index(POOLED)]} ranking val samples: {pooled}")
    warning = never_anomalous_warning(section, list(store.meta.class_names))
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)


def describe_store(store) -> list[str]:
    """Lines saying what a loaded store holds: model and layer, training data, calibration and
    its groups (with the scatter of the realised rate each group's ranks allow, sqrt(target / n)
    points), the feature block, and the never-ANOMALOUS warning when it applies."""
    meta, manifest, section = store.meta, store.manifest, store.calibration
    counts = store.counts
    lines = [f"{store.path}: model {meta.model_name!r} version {meta.model_version!r}, layer {meta.layer!r}, "
             f"{meta.num_filters} filters, format {manifest['format_version']}, sha256 {store.sha256[:16]}",
             f"built {manifest['build_time']} from {(manifest.get('data') or {}).get('source', 'an unrecorded source')}: "
             f"{int(counts.sum())} training samples in {store.num_classes} classes "
             f"({int((counts == 0).sum())} without any), serving arrays {store.serving_bytes() / 1e6:.1f} MB"]
    if "shard" in manifest:
        return lines + ["a shard: merge the shards (merge-distributions) before serving"]
    if section is None:
        return lines + ["not calibrated: calibrate it (recalibrate-distributions) before serving"]
    target, sources = section["target_fpr"], section["classes"]["source"]
    lines.append(f"calibrated to a {target:.2%} false-positive rate on {section['held_out_images']} validation samples "
                 f"({section['split']['part_a']} for scales and tail grids, {section['split']['part_b']} ranked), "
                 f"scored against the {section['scored_against']} class")
    silent = {class_id for ids in classes_never_anomalous(section).values() for class_id in ids}
    own = [count for source, count in zip(sources, section["classes"]["count"]) if source == "class"]
    if own:
        scatter = sorted({f"{100 * math.sqrt(target / count):.2f}" for count in (max(own), min(own))}, key=float)
        reached = not any(sources[class_id] == "class" for class_id in silent)
        lines.append(f"  {len(own)} classes ranked on their own samples ({min(own)}-{max(own)} each: "
                     + (f"the realised rate scatters by about ±{'-'.join(scatter)} points per class)" if reached
                        else "too few for some to reach the target)"))
    shared = sources.count(FALLBACK)
    if shared:
        ranked = section["fallback"]["count"]
        reached = not any(sources[class_id] == FALLBACK for class_id in silent)
        lines.append(f"  {shared} classes on the class-independent group ({ranked} ranked: "
                     + (f"about ±{100 * math.sqrt(target / ranked):.2f} points over those classes)" if reached
                        else "too few to reach the target)"))
    if sources.count(POOLED):
        lines.append(f"  {sources.count(POOLED)} classes without training samples, on the pooled distribution")
    features = section.get("features")
    lines.append(f"  pooled-feature tests: {features['num_features']} features, rank {features['mahalanobis_rank']}"
                 if features else "  pooled-feature tests: none (alpha tests only)")
    warning = never_anomalous_warning(section, list(meta.class_names))
    if warning:
        lines.append(f"WARNING: {warning}")
    return lines


def describe_main(args) -> int:
    for line in describe_store(load_store(args.store)):
        print(line)
    return 0


def print_store(path: Path) -> None:
    store = load_store(path)
    print(f"wrote {path}: {store.num_classes if 'shard' not in store.manifest else len(store.counts)} classes x "
          f"{store.meta.num_filters} filters, {int(store.counts.sum())} training samples, "
          f"serving arrays {store.serving_bytes() / 1e6:.1f} MB, all arrays {store.total_bytes() / 1e6:.1f} MB, "
          f"sha256 {store.sha256[:16]}")


def build_main(args) -> int:
    from explainserve.commands.distributions_files import build_from_files, remove_checkpoint

    explainer, meta = open_subject(args)
    if is_file_source(args.data):
        data = open_source(args.data, list(meta.class_names), val_fraction=args.val_fraction, limit=args.limit,
                           val_limit=args.val_limit)
        with publishing(args.out) as folder:  # readers of --out see the old store until the new one is complete
            record = build_from_files(args, explainer, meta, data, alpha_of, folder)
            if args.num_shards == 1:
                calibrate_store(args, explainer, folder, record)
        remove_checkpoint(args.out)
        print_store(args.out)
        return 0
    held = shard_classes(len(meta.class_names), args.shard, args.num_shards)
    train, key = open_split(args, "train", args.limit, explainer.input_size[-1])
    if list(train.class_names) != list(meta.class_names):
        raise ValueError(f"--data {args.data}: classes {train.class_names} differ from the model's {list(meta.class_names)}")
    with publishing(args.out) as folder:  # readers of --out see the old store until the new one is complete
        build_store(training_batches(explainer, train, key, held, args.batch_size), folder, meta,
                    shard_index=args.shard, num_shards=args.num_shards, top_k=args.top_k,
                    build_time=args.build_time, progress=True, data=demo_record(args))
        if args.num_shards == 1:
            calibrate_store(args, explainer, folder)
    print_store(args.out)
    return 0


def check_built_for(built: StoreMeta, meta: StoreMeta, model: str, what: str) -> None:
    """Refuse to calibrate a store with a model (or layer) other than the one it was built for:
    its alpha would be another layer's, its ranks meaningless."""
    if (built.model_name, built.model_version, built.layer) != (meta.model_name, meta.model_version, meta.layer):
        raise ValueError(f"--model {model} is {meta.model_name!r} version {meta.model_version!r} at layer "
                         f"{meta.layer!r}, {what} built for "
                         f"{built.model_name!r} version {built.model_version!r} at layer {built.layer!r}")


def recalibrate_main(args) -> int:
    explainer, meta = open_subject(args)
    source = args.store.resolve()  # before --out, possibly the same path, is swapped to the new folder
    with publishing(args.out) as folder:
        rule = STRATIFIED_RULE if is_file_source(args.data) else DEMO_LIMIT_RULE
        reissue_store(source, folder, val_limit=None if args.val_limit is None else {"val": args.val_limit, "rule": rule})
        check_built_for(load_store(folder).meta, meta, args.model, "the store was")
        calibrate_store(args, explainer, folder)
    print_store(args.out)
    return 0


def merge_main(args) -> int:
    from explainserve.commands.distributions_files import BUILD_RECORD, merged_record, write_record

    if (args.model is None) != (args.data is None):
        raise ValueError("--model and --data go together: both calibrate the merged store")
    with publishing(args.out) as folder:
        merge_stores(args.shards, folder)
        record = (merged_record(args.shards, args.max_bad_fraction)
                  if all((shard / BUILD_RECORD).is_file() for shard in args.shards) else None)
        if record is not None:
            write_record(folder, record)
        if args.model is not None:
            explainer, meta = open_subject(args)
            check_built_for(load_store(folder).meta, meta, args.model, "the shards were")
            calibrate_store(args, explainer, folder, record)
    if args.model is None:
        print("merged without calibration: pass --model and --data to calibrate before serving")
    print_store(args.out)
    return 0
