"""Send every input of a bulk run through Explain: a bounded number of calls in flight, each
with a deadline, retried with exponential backoff while the gateway answers UNAVAILABLE."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np
from tqdm import tqdm

from explainserve.bulk.inputs import BulkInput, label_index, load
from explainserve.bulk.record import RESULTS, error_line, is_final, ok_line, read_results
from explainserve.client import ExplainClient, ExplainError
from explainserve.methods import DEFAULT_METHODS

PICTURES = "pictures"
MAX_BACKOFF = 8.0  # seconds


@dataclass
class BulkOptions:
    """How a bulk run calls the gateway.

    concurrency : calls in flight at once (>= 1)
    timeout : seconds, the deadline of each call
    retries : further attempts after UNAVAILABLE (>= 0)
    backoff : seconds before the first retry; doubled each time (with jitter), at most 8 s
    methods : maps to ask for; empty: the first default method of each input's kind
    """

    model: str
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5
    methods: Sequence[str] = ()
    top_k: int = 0
    target_class: int | None = None
    request_fields: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency: expected an integer >= 1, got {self.concurrency}")
        if self.retries < 0 or self.backoff < 0 or self.timeout <= 0:
            raise ValueError(f"retries and backoff: expected >= 0, timeout > 0; got {self.retries}, "
                             f"{self.backoff}, {self.timeout}")


def picture_key(item: BulkInput) -> str:
    """A file name stem for the input's pictures: readable, and unique through a hash of its id."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(item.id).stem)[:60]
    return f"{stem}-{hashlib.sha1(item.id.encode()).hexdigest()[:10]}"


class CallFailed(Exception):
    """The last failure of a call, after ``attempts`` tries."""

    def __init__(self, error: ExplainError, attempts: int):
        super().__init__(str(error))
        self.error, self.attempts = error, attempts


def call_with_retries(client: ExplainClient, data, label: int | None, options: BulkOptions,
                      methods: Sequence[str]):
    """(result, attempts); raises CallFailed once retries are spent, or at once for any code but UNAVAILABLE."""
    for attempt in range(options.retries + 1):
        try:
            result = client.explain(data, model=options.model, methods=methods, timeout=options.timeout,
                                    label=label, top_k=options.top_k, target_class=options.target_class,
                                    explain_anomaly=True, **options.request_fields)
            return result, attempt + 1
        except ExplainError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE or attempt == options.retries:
                raise CallFailed(error, attempt + 1) from None
            delay = min(MAX_BACKOFF, options.backoff * 2 ** attempt)
            time.sleep(delay * random.uniform(0.5, 1.0))


def explain_one(client: ExplainClient, item: BulkInput, options: BulkOptions, out: Path) -> dict:
    """The results.jsonl line of one input; never raises for a bad input or a failed call."""
    started = time.perf_counter()
    try:
        data = load(item)
        label = label_index(item)
    except ValueError as error:
        return error_line(item, "BAD_INPUT", str(error))
    kind = "image" if data.ndim == 3 else "video"
    methods = list(options.methods) or list(DEFAULT_METHODS[kind][:1])
    try:
        # Pictures go as their own file bytes, so the gateway decodes exactly what is on disk.
        result, attempts = call_with_retries(client, item.path.read_bytes() if kind == "image" else data, label,
                                             options, methods)
    except CallFailed as failed:
        return error_line(item, failed.error.code.name, failed.error.details or "", time.perf_counter() - started,
                          failed.attempts)
    seconds = time.perf_counter() - started
    return ok_line(item, result, seconds, attempts, write_pictures(data, result, out, picture_key(item)))


def explain_or_error(client: ExplainClient, item: BulkInput, options: BulkOptions, out: Path) -> dict:
    """:func:`explain_one`, with anything unforeseen (a full disk, a map it cannot draw) recorded as
    the input's INTERNAL error line: one input never stops the run."""
    try:
        return explain_one(client, item, options, out)
    except Exception as error:  # noqa: BLE001 (recorded, not hidden)
        return error_line(item, "INTERNAL", f"{type(error).__name__}: {error}")


def write_pictures(data: np.ndarray, result, out: Path, key: str) -> dict[str, str]:
    """The overlays (full pictures) and the report's panels of one answer; paths relative to ``out``."""
    from explainserve import overlay, result_pictures

    folder = out / PICTURES
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {
        "overlay": result_pictures.map_picture(data, result) if result.maps else None,
        "region_overlay": result_pictures.region_picture(data, result),
        "original": overlay.enlarge(data, 128) if data.ndim == 3 else overlay.frame_strip(data, min_side=64),
        "map": result_pictures.map_picture(data, result, with_original=False, min_side=128) if result.maps else None,
        "region": result_pictures.region_picture(data, result, with_caption=False, with_original=False, min_side=128),
    }
    paths = {}
    for name, picture in pictures.items():
        if picture is not None:
            path = folder / f"{key}.{name}.png"
            overlay.save_png(picture, path)
            paths[name] = path.relative_to(out).as_posix()
    return paths


def run_bulk(client: ExplainClient, inputs: Sequence[BulkInput], out: Path, options: BulkOptions,
             progress: bool = True) -> dict[str, int]:
    """Explain every input not already final in ``out/results.jsonl``; append one line per input.

    Returns counts: ``inputs``, ``skipped`` (final lines of an earlier run), ``ok``, ``errors``
    and ``anomalous`` among those done now.
    """
    options.check()
    out.mkdir(parents=True, exist_ok=True)
    done = {key for key, line in read_results(out).items() if is_final(line)}
    todo = [item for item in inputs if item.id not in done]
    counts = {"inputs": len(inputs), "skipped": len(inputs) - len(todo), "ok": 0, "errors": 0, "anomalous": 0}
    path = out / RESULTS
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a") as results:
            results.write("\n")  # a line cut short by a crash stays on its own (and is ignored)
    bar = tqdm(total=len(todo), unit="input", disable=not progress, dynamic_ncols=True)
    with open(path, "a") as results, ThreadPoolExecutor(options.concurrency, thread_name_prefix="bulk") as pool:
        pending = set()
        for item in todo:  # at most 2 x concurrency inputs are loaded at once
            pending.add(pool.submit(explain_or_error, client, item, options, out))
            if len(pending) < 2 * options.concurrency:
                continue
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            record(finished, results, counts, bar)
        record(pending, results, counts, bar)
    bar.close()
    return counts


def record(finished, results, counts: dict, bar) -> None:
    """Append the lines of ``finished`` calls (written by this thread only) and count them."""
    for future in finished:
        line = future.result()
        results.write(json.dumps(line) + "\n")
        results.flush()
        counts["ok" if line["status"] == "ok" else "errors"] += 1
        counts["anomalous"] += line.get("verdict") == "ANOMALOUS"
        bar.update(1)
        bar.set_postfix(errors=counts["errors"], anomalous=counts["anomalous"], refresh=False)
