"""`LengthGroupedBatchSampler`: batches of similar lengths, shuffled, reproducible and resumable."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lorakit.errors import ConfigError


class LengthGroupedBatchSampler:
    """Yield batches (lists of example indices) whose examples have similar lengths.

    Padding to the longest in a batch wastes little when lengths are close. Each epoch:
    1. permute all indices (seeded by `seed + epoch`; no permutation if `shuffle=False`);
    2. cut the permutation into mega-batches of `batch_size * mega_batch_mult` indices and
       sort each by length, longest first (grouping stays local, so batches still mix data);
    3. cut those into batches, shuffle the batch order (if `shuffle`), and move the batch
       holding the longest example to the front so an out-of-memory shows on step 0;
    4. with `num_replicas > 1`, pad (or trim, if `drop_last`) the batch list to a multiple
       of `num_replicas` and give rank r the batches r, r + num_replicas, ...

    The batches depend only on (lengths, batch_size, seed, epoch, and the flags), never on
    global RNG state, so a resumed run sees the same batches: `set_epoch(e, skip=k)` makes
    the next iteration start at this rank's k-th batch of epoch e.

    Args:
        lengths: length of each example (e.g. `len(ex["input_ids"])`).
        batch_size: examples per batch (per rank).
        seed: base seed; epoch e uses `seed + e`.
        shuffle: False keeps the file order before grouping and the sorted batch order
            (for evaluation; consumers map outputs back through the indices).
        drop_last: drop incomplete batches (and, with several ranks, the uneven tail).
        mega_batch_mult: mega-batch size in batches; larger groups lengths more tightly
            but makes batches less random.
        num_replicas, rank: data-parallel sharding (`torch.distributed` world size, rank).

    Raises:
        ConfigError: empty lengths, batch_size or mega_batch_mult < 1, rank out of range.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        mega_batch_mult: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(lengths) == 0:
            raise ConfigError("Cannot batch an empty dataset (no lengths given).")
        if batch_size < 1 or mega_batch_mult < 1:
            raise ConfigError(
                f"batch_size and mega_batch_mult must be >= 1, got {batch_size} and {mega_batch_mult}."
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.mega_batch_mult = mega_batch_mult
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch for the next iteration and skip its first `skip` batches (resume).

        Raises:
            ConfigError: skip is negative or beyond the epoch's batch count.
        """
        if not 0 <= skip <= self.num_batches:
            raise ConfigError(
                f"Cannot skip {skip} batches: an epoch has {self.num_batches} batches on this rank."
            )
        self.epoch = epoch
        self.skip = skip

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank, skip not counted."""
        n = len(self.lengths)
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if self.num_replicas > 1:
            total = total // self.num_replicas if self.drop_last else -(-total // self.num_replicas)
        return total

    def __len__(self) -> int:
        """Batches the next iteration yields (the epoch's, minus the skipped ones)."""
        return self.num_batches - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        yield from batches[self.skip :]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All of this rank's batches of `epoch`, in order (a pure function of the settings)."""
        n = len(self.lengths)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)

        mega = self.batch_size * self.mega_batch_mult
        batches: list[list[int]] = []
        for start in range(0, n, mega):
            chunk = order[start : start + mega]
            # stable sort so equal lengths keep their (random) permutation order
            chunk = chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices]
            batches += [
                chunk[k : k + self.batch_size].tolist()
                for k in range(0, len(chunk), self.batch_size)
            ]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]

        if self.shuffle and len(batches) > 1:
            perm = torch.randperm(len(batches), generator=gen).tolist()
            batches = [batches[k] for k in perm]
            longest = max(range(len(batches)), key=lambda k: int(self.lengths[batches[k]].max()))
            batches[0], batches[longest] = batches[longest], batches[0]

        if self.num_replicas > 1:
            r = self.num_replicas
            if self.drop_last:
                batches = batches[: len(batches) // r * r]
            else:
                # Every rank must run the same number of steps (collectives would hang),
                # so wrap around and repeat the first batches.
                need = -(-len(batches) // r) * r
                batches = batches + [batches[k % len(batches)] for k in range(need - len(batches))]
            batches = batches[self.rank :: r]
        return batches
