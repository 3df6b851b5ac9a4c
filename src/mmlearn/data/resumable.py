"""A training DataLoader that resumes part-way through an epoch.

Lightning saves the state of a train loader that implements ``state_dict``/``load_state_dict``
inside every checkpoint and hands it back on resume. Ours records (epoch, batches delivered); a
resumed run skips the delivered batches' *indices* (no data is read for them) and continues with
exactly the batches an uninterrupted run would have seen next. A checkpoint taken at an epoch's
end, or a state from another epoch, skips nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader


class ResumableBatchSampler(BatchSampler):
    """``BatchSampler`` whose next pass starts after its first ``skip`` batches."""

    skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        batches = super().__iter__()
        for _ in range(skip):
            next(batches, None)
        yield from batches


class ResumableDataLoader(DataLoader[Any]):
    """``DataLoader`` (built with a :class:`ResumableBatchSampler`) with Lightning's Stateful API.

    The count is taken where batches are handed to the training loop, so worker prefetching does
    not inflate it. The epoch is read from the sampler when iteration really starts (the first
    ``next``), i.e. after Lightning's ``set_epoch``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._delivered: dict[str, Any] = {"epoch": None, "batches": 0}
        self._resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(self._delivered)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch = getattr(getattr(self.batch_sampler, "sampler", None), "epoch", None)
        done = 0
        if self._resume is not None and self._resume.get("epoch") == epoch:
            done = int(self._resume.get("batches", 0))
        self._resume = None
        if isinstance(self.batch_sampler, ResumableBatchSampler):
            self.batch_sampler.skip = done
        self._delivered = {"epoch": epoch, "batches": done}
        for batch in super().__iter__():
            self._delivered["batches"] += 1
            yield batch
