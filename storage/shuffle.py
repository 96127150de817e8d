"""Epoch order and its split over ranks and workers (numpy only, no torch).

The order of an epoch depends only on (ids, samples_per_shard, seed, epoch,
algorithm, block size), never on the number of ranks, workers or the batch
size. It is consumed as a prefix: after a job has taken ``n`` samples in
lockstep, exactly ``order[:n]`` were seen, whatever the world looked like. So
a resume, even with another world, only needs ``n``.

Block shuffling (after MosaicML Streaming's ``py1b`` / ``py1e``): the shard
order is shuffled, then samples are shuffled only within a window of about
``block_size`` samples, so a reader holds a few shards at a time and reads
each one whole instead of touching every shard for every few samples.
"""

from __future__ import annotations

import numpy as np

SHUFFLES = ("py1b", "py1e", "none")


def shard_major(sample_ids: np.ndarray, samples_per_shard: int, rng: np.random.Generator | None) -> np.ndarray:
    """Ids grouped by shard, shards in ``rng``'s order (sorted without ``rng``), ids sorted inside."""
    ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
    if rng is None or len(ids) == 0:
        return ids
    shard = ids // samples_per_shard
    shards = np.unique(shard)
    rank = np.empty(int(shards.max()) + 1, dtype=np.int64)
    rank[shards] = rng.permutation(len(shards))
    return ids[np.argsort(rank[shard], kind="stable")]


def epoch_order(
    sample_ids: np.ndarray,
    *,
    samples_per_shard: int,
    seed: int,
    epoch: int,
    shuffle: str = "py1b",
    block_size: int | None = None,
) -> np.ndarray:
    """The global order of ``sample_ids`` for one epoch.

    - ``py1b``: shards shuffled, then samples shuffled within consecutive
      fixed blocks of ``block_size`` samples.
    - ``py1e``: shards shuffled, then each sample moved by a uniform offset in
      ``[-block_size/2, block_size/2)`` and the sequence sorted by the moved
      positions: shards overlap smoothly instead of at hard block edges.
    - ``none``: ids in ascending order.

    ``block_size`` defaults to 8 shards' worth of samples (the reader's buffer).
    """
    if shuffle not in SHUFFLES:
        raise ValueError(f"unknown shuffle {shuffle!r}; use one of {SHUFFLES}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    block = int(block_size or 8 * samples_per_shard)
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if shuffle == "none":
        return shard_major(sample_ids, samples_per_shard, None)
    rng = np.random.default_rng([int(seed), int(epoch)])
    seq = shard_major(sample_ids, samples_per_shard, rng)
    n = len(seq)
    if shuffle == "py1b":
        keys = np.arange(n) // block * 2.0 + rng.random(n)  # block index, then random inside it
    else:
        keys = np.arange(n) + rng.uniform(-block / 2, block / 2, size=n)
    return seq[np.argsort(keys, kind="stable")]


def partition(
    order: np.ndarray,
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int = 1,
    drop_last: bool = False,
) -> np.ndarray:
    """The ids one (rank, DataLoader worker) yields, in order.

    The order is dealt in chunks of ``batch_size``: chunk ``q`` goes to rank
    ``q % world_size`` as that rank's batch ``j = q // world_size``, and a
    rank's batch ``j`` to worker ``j % num_workers``, which is the worker a
    DataLoader takes batch ``j`` from (it visits workers round robin). So
    after every rank has taken ``k`` batches, the samples seen are exactly
    ``order[:k * batch_size * world_size]``. ``drop_last`` trims the tail to
    whole rounds so all ranks take the same number of samples.
    """
    if not 0 <= rank < world_size or not 0 <= worker < num_workers or batch_size < 1:
        raise ValueError(
            f"need 0 <= rank < world_size, 0 <= worker < num_workers and batch_size >= 1; got rank={rank}, "
            f"world_size={world_size}, worker={worker}, num_workers={num_workers}, batch_size={batch_size}"
        )
    if drop_last:
        order = order[: len(order) - len(order) % (world_size * batch_size)]
    chunk = np.arange(len(order)) // batch_size
    mine = chunk % world_size == rank
    batch = chunk[mine] // world_size
    return order[mine][batch % num_workers == worker]
