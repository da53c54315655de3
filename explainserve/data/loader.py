"""Decode a user's samples in worker processes while the network runs on earlier batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch.utils.data

from explainserve.data.files import SampleFile, decode_sample


class DecodedSamples(torch.utils.data.Dataset):
    """Sample ``i`` decoded, then given to ``prepare`` when set: ``(i, sample, None)``, or
    ``(i, None, reason)`` if it is bad (the reason does not repeat the path)."""

    def __init__(self, samples: list[SampleFile], kind: str, frames: int | None, prepare: Callable | None = None):
        self.samples, self.kind, self.frames, self.prepare = samples, kind, frames, prepare

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        path = self.samples[index].path
        try:
            sample = decode_sample(path, self.kind, self.frames)
            return index, sample if self.prepare is None else self.prepare(sample), None
        except ValueError as error:
            return index, None, str(error).removeprefix(f"{path}: ")


def class_batches(samples: list[SampleFile], indices: list[int], batch_size: int) -> list[list[int]]:
    """``indices`` cut into batches of at most ``batch_size`` consecutive samples of one class.

    A network's output can change in the last bits with the batch it is computed in; batches
    that never mix classes are the same whichever shard builds the class, which keeps a merged
    store byte-identical to an unsharded one.
    """
    batches: list[list[int]] = []
    for index in indices:
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or samples[last[0]].label != samples[index].label:
            batches.append([index])
        else:
            last.append(index)
    return batches


def plain_batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]


def decoded_batches(samples: list[SampleFile], batches: list[list[int]], kind: str, frames: int | None,
                    workers: int, prepare: Callable | None = None) -> Iterator[list[tuple]]:
    """Each batch of sample indices, decoded, in order; ``workers`` processes decode ahead.

    Parameters
    ----------
    samples : list of SampleFile
    batches : list of list of int
        Indices into ``samples``.
    kind, frames
        As :func:`explainserve.data.files.decode_sample`.
    workers : int
        Decoding processes; 0 decodes in this process (no overlap with the network).
    prepare : callable, optional
        Applied to each decoded uint8 sample in the worker (the model's resize and
        normalisation), so that the network's process only runs the network.

    Yields
    ------
    list of (index, uint8 array or what ``prepare`` returns, or None; reason or None)
    """
    loader = torch.utils.data.DataLoader(
        DecodedSamples(samples, kind, frames, prepare), batch_sampler=batches, collate_fn=list, num_workers=workers,
        prefetch_factor=4 if workers else None)
    yield from loader
