"""``explainserve explain IMAGE|CLIP``: call the gateway, print classes and timings, draw the overlay.

``explainserve explain DIR|MANIFEST --out OUTDIR``: explain many inputs (see :mod:`explainserve.bulk`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explainserve._generated import explain_pb2
from explainserve.anomaly import Reason
from explainserve.client import ExplainError
from explainserve.commands.connection import add_connection_arguments, connect
from explainserve.inputs import decode_image
from explainserve.methods import METHODS
from explainserve.video_files import VIDEO_SUFFIXES, decode_video


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain", help="explain an image (JPEG/PNG), a clip (.npy, uint8 T x H x W x 3; or an MP4, WebM or AVI "
                    "file), or many",
        description="Explain one image or clip, or every input of a folder or manifest (.txt: one path a line; "
                    ".csv or .jsonl: path and optional label) into --out OUTDIR: results.jsonl, pictures/ and "
                    "report.html. A rerun skips the inputs results.jsonl already holds.")
    parser.add_argument("input", type=Path, help="a picture, a .npy clip, a folder, or a manifest")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--method", action="append", default=[], choices=METHODS,
                        help="explanation method (repeat for several; none: prediction only)")
    parser.add_argument("--class", dest="target_class", type=int, help="class to explain (default: predicted)")
    parser.add_argument("--label", type=int, help="ground-truth class, also scored for anomalies")
    parser.add_argument("--top-k", type=int, help="classes returned (default: 5, or every class of a smaller model)")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    parser.add_argument("--out", type=Path, help="PNG of the first method's map beside the input (each other "
                                                 "method's as OUT_<method>.png); for a folder or manifest, the "
                                                 "output folder (required)")
    add_connection_arguments(parser)
    bulk = parser.add_argument_group("many inputs")
    bulk.add_argument("--concurrency", type=int, default=4, help="calls in flight at once (default 4)")
    bulk.add_argument("--retries", type=int, default=3, help="further attempts while the gateway is UNAVAILABLE")
    bulk.add_argument("--backoff", type=float, default=0.5, help="seconds before the first retry, doubled each time")
    bulk.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)


def load_input(path: Path) -> np.ndarray:
    """A uint8 (H, W, 3) image or (T, H, W, 3) clip from a picture or a .npy file."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    return decode_image(path.read_bytes(), what=str(path))


def print_result(name: str, result) -> None:
    classes = ", ".join(f"{class_name} ({index}) {score:.3f}" for index, class_name, score in result.classes)
    print(f"{name}: {classes}")
    stages = ("decode", "network", "superpixels", "jitter_cam", "torchserve_queue", "gateway", "total")
    print("  timings: " + " ".join(f"{stage}={result.timings.get(stage, 0.0) * 1000:.0f}ms" for stage in stages)
          + f" batch={int(result.timings.get('batch_size', 0))}")
    anomaly = result.anomaly
    print(f"  anomaly: {explain_pb2.AnomalyReport.Status.Name(anomaly.status)} {anomaly.reason}".rstrip())
    for against, verdict in (("predicted", anomaly.predicted), ("label", anomaly.label)):
        if anomaly.HasField(against):
            print(f"    {against} {verdict.class_name} ({verdict.class_index}): "
                  f"{explain_pb2.ClassVerdict.Verdict.Name(verdict.verdict)} p={verdict.p_value:.3g} "
                  f"(target {verdict.target_fpr:g}) score={verdict.score:.3g} "
                  f"beta={verdict.beta:.3g} (P{verdict.beta_percentile:.0f}, z={verdict.beta_z:.2f}) "
                  f"surprising={verdict.surprise_count} missing={verdict.expectation_count}"
                  + (" (no training images: scored against the pooled distribution)" if verdict.pooled_distribution else ""))
            for reason in verdict.reasons:
                print(f"      {Reason(reason.code, reason.value, reason.threshold, reason.source, reason.p_value)}")
            if verdict.smallest_p_value >= verdict.target_fpr > 0:  # 0 from a gateway without the field
                print(f"      never ANOMALOUS with this store: its p-values for this class go no lower than "
                      f"{verdict.smallest_p_value:.3g} (too few validation samples; recalibrate the store)")


def render(data: np.ndarray, result, path: Path) -> None:
    """Write one picture per map of ``result`` on ``data`` (original | explanation): the first
    method's at ``path``, each other method's beside it as ``<stem>_<method><suffix>``."""
    from explainserve.overlay import save_png  # matplotlib and skimage: 0.5 s
    from explainserve.result_pictures import map_picture

    path.parent.mkdir(parents=True, exist_ok=True)
    for index, method in enumerate(result.maps):
        picture_path = path if index == 0 else path.with_name(f"{path.stem}_{method}{path.suffix}")
        save_png(map_picture(data, result, method), picture_path)
        print(f"  {method} picture -> {picture_path}")


def bulk_main(args) -> int:
    from explainserve.bulk import BulkOptions, list_inputs, run_bulk, write_report

    if args.out is None:
        raise ValueError("--out: a folder for the results is needed with a folder or manifest input")
    options = BulkOptions(model=args.model, concurrency=args.concurrency, timeout=args.timeout, retries=args.retries,
                          backoff=args.backoff, methods=args.method, top_k=args.top_k, target_class=args.target_class)
    options.check()
    inputs = list_inputs(args.input, exclude=args.out)
    with connect(args) as client:
        counts = run_bulk(client, inputs, args.out, options, progress=not args.no_progress)
    report = write_report(args.out)
    print(f"{counts['inputs']} inputs: {counts['skipped']} done before, {counts['ok']} answered now, "
          f"{counts['errors']} errors, {counts['anomalous']} anomalous; results in {args.out / 'results.jsonl'}, "
          f"report {report}")
    return 0


def main(args) -> int:
    from explainserve.bulk.inputs import is_bulk_source

    if is_bulk_source(args.input):
        return bulk_main(args)
    if args.out and not args.method:
        raise ValueError("--out: no map to draw without --method; pass one (repeat for several), e.g. --method swag_i_g")
    video = args.input.suffix.lower() in VIDEO_SUFFIXES
    data = None if video else load_input(args.input)
    with connect(args) as client:
        try:
            result = client.explain(args.input if video else data, model=args.model, methods=args.method, timeout=args.timeout,
                                    target_class=args.target_class, label=args.label, top_k=args.top_k)
        except ExplainError as error:
            print(f"explain failed: {error}")
            return 1
    print_result(str(args.input), result)
    if args.out and result.maps:
        if video:  # the frames the server sampled, for the picture
            data = decode_video(args.input.read_bytes(), next(iter(result.maps.values())).heatmap.shape[0])
        render(data, result, args.out)
    return 0
