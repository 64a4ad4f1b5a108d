"""A distributed sampler that can start mid-epoch, so a resumed run sees exactly the remaining batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` plus a skip offset.

    The order of an epoch is a pure function of ``(seed, epoch)`` (the parent's seeded permutation), so
    skipping the ``consumed`` samples this rank already trained on reproduces the interrupted epoch's
    tail exactly. Skipping happens at the index level: no skipped sample is loaded or augmented.
    Works without a process group when ``num_replicas``/``rank`` are given (single process = 1/0).
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_position(self, epoch: int, consumed: int) -> None:
        """Position the sampler at ``epoch`` after this rank has already consumed ``consumed`` samples."""
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed={consumed} outside the epoch of {self.num_samples} samples")
        self.set_epoch(epoch)
        self.skip = consumed

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip
