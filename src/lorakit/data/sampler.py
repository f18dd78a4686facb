"""`LengthGroupedBatchSampler`: batches of similar lengths, shuffled, reproducible and resumable."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lorakit.errors import ConfigError


class LengthGroupedBatchSampler:
    """Yield batches (lists of example indices) whose examples have similar lengths.

    Padding to the longest in a batch wastes little when lengths are close. Each epoch:
    1. permute all indices (seeded by `seed + epoch`; no permutation if `shuffle=False`);
    2. cut the permutation into mega-batches of `G * mega_batch_mult` indices, where
       G = `batch_size * num_replicas` is the global batch, and sort each by length,
       longest first (grouping stays local, so batches still mix data);
    3. cut those into global batches of G, shuffle their order (if `shuffle`), and move the
       one holding the longest example to the front so an out-of-memory shows on step 0;
    4. with `num_replicas > 1`, rank r takes the r-th of `num_replicas` equal slices of
       every global batch. An incomplete last global batch (not dropped) of m examples is
       first padded by wrapping around to the epoch's first examples up to a multiple of
       `num_replicas`, so every rank gets ceil(m / num_replicas) examples and runs the
       same number of steps (collectives would hang otherwise).

    So the global batch of step k is the same for any split of G into
    `num_replicas x batch_size`: `num_replicas=2, batch_size=4` runs exactly the batches of
    one process with `batch_size=8`, which makes data-parallel training comparable to (and
    resumable as) single-process training. With `num_replicas=1` it is the plain sampler.

    The batches depend only on (lengths, G, num_replicas, seed, epoch, and the flags), never
    on global RNG state, so a resumed run sees the same batches: `set_epoch(e, skip=k)`
    makes the next iteration start at the k-th (global) batch of epoch e.

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
    def global_batch_size(self) -> int:
        """Examples per step over all ranks: `batch_size * num_replicas`."""
        return self.batch_size * self.num_replicas

    @property
    def num_batches(self) -> int:
        """Batches per epoch (the same on every rank), skip not counted."""
        n, g = len(self.lengths), self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def __len__(self) -> int:
        """Batches the next iteration yields (the epoch's, minus the skipped ones)."""
        return self.num_batches - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        yield from batches[self.skip :]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All of this rank's batches of `epoch`, in order (a pure function of the settings)."""
        n = len(self.lengths)
        size = self.global_batch_size
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)

        mega = size * self.mega_batch_mult
        batches: list[list[int]] = []
        for start in range(0, n, mega):
            chunk = order[start : start + mega]
            # stable sort so equal lengths keep their (random) permutation order
            chunk = chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices]
            batches += [chunk[k : k + size].tolist() for k in range(0, len(chunk), size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == size]

        if self.shuffle and len(batches) > 1:
            perm = torch.randperm(len(batches), generator=gen).tolist()
            batches = [batches[k] for k in perm]
            longest = max(range(len(batches)), key=lambda k: int(self.lengths[batches[k]].max()))
            batches[0], batches[longest] = batches[longest], batches[0]

        if self.num_replicas > 1:
            r, flat = self.num_replicas, order.tolist()
            sliced = []
            for b in batches:
                if len(b) % r:  # only an incomplete last batch: wrap around to the epoch's first examples
                    b = b + [flat[k % n] for k in range(r - len(b) % r)]
                per_rank = len(b) // r
                sliced.append(b[self.rank * per_rank : (self.rank + 1) * per_rank])
            batches = sliced
        return batches
