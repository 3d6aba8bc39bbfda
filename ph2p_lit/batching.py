"""The plan of a run's batches: each batch of images repeated once per optimiser step, every rank
its own stride slice in lockstep, and where a checkpoint stopped inside that plan."""

import bisect

from torch.utils.data import Sampler


class RepeatedBatches(Sampler):
    """A plan of (batch of indices, repeats) pairs: each batch yielded `repeats` times in a row,
    one optimiser step each.

    consumed: items the run had already consumed before a restart from a checkpoint. Lightning
    restores its batch count and expects only the remaining ones, so they count in len() but are
    not yielded again.
    """

    def __init__(self, plan: list[tuple[list[int], int]], consumed: int = 0):
        self.plan, self.consumed = plan, consumed
        # Per batch: where its repeats end, and how many distinct images came before it and with
        # it. The progress bar asks at every step; a walk of the plan there would make a run of
        # n images O(n^2) (100,000 images: hours of bookkeeping).
        self._ends, self._seen_before, self._seen_after = [], [], []
        seen, position = set(), consumed
        for batch, repeats in plan:
            self._seen_before.append(len(seen))
            seen.update(batch)
            position += repeats
            self._ends.append(position)
            self._seen_after.append(len(seen))
        self._n_images = len(seen)

    def __iter__(self):
        for batch, repeats in self.plan:
            for _ in range(repeats):
                yield batch

    def __len__(self) -> int:
        return self.consumed + sum(repeats for _, repeats in self.plan)

    def n_images(self) -> int:
        return self._n_images

    def images_at(self, consumed: int) -> tuple[int, int]:
        """(first, last) ordinal of the images being inverted after `consumed` items, from 1."""
        k = bisect.bisect_right(self._ends, consumed)
        if k == len(self._ends):
            return self._n_images, self._n_images
        return self._seen_before[k] + 1, self._seen_after[k]


def rank_batches(items: list, batch_size: int, world: int, rank: int) -> list[list]:
    """Rank `rank`'s stride slice of `items` in batches. Under DDP ranks step in lockstep, so every
    rank gets the longest shard's batch count: a shorter one repeats its last batch (a repeat of a
    finished batch costs nothing), and a rank left without items repeats the last item (the merge of
    the rank files keeps one line per image)."""
    shards = [items[r::world] for r in range(world)]
    n_batches = max(-(-len(shard) // batch_size) for shard in shards)
    mine = shards[rank] or items[-1:]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return batches + batches[-1:] * (n_batches - len(batches))


def in_flight(plan: list[tuple[list, int]], consumed: int) -> tuple[list, int]:
    """The batch of `plan` that `consumed` items stop inside, and how many of its repeats were
    used; ([], 0) when they stop between batches."""
    position = 0
    for batch, repeats in plan:
        if consumed < position + repeats:
            return (batch, consumed - position) if consumed > position else ([], 0)
        position += repeats
    return [], 0
