"""Token data: a synthetic corpus on disk, read through a memory map by a DataLoader per rank.

Batches are a pure function of (seed, step): each step draws ``global_batch`` random windows from
the file, and data-parallel rank r takes its contiguous slice of them. So every layout sees the
same global batch at every step (sweeps compare like with like) and a resumed run continues with
exactly the data it would have seen.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import perfkit
from perfkit.errors import ConfigError
from perfkit.files import write_atomic

CORPUS_FORMAT = "raw little-endian uint16 token ids"


def cache_dir() -> Path:
    return Path(os.environ.get("PERFKIT_CACHE", Path.home() / ".cache" / "perfkit"))


def synthetic_corpus(vocab_size: int, n_tokens: int, seed: int = 0, folder: Path | None = None) -> Path:
    """Write (once) and return a corpus with learnable structure: a Zipf-distributed stream of
    "words", each a fixed random string of 2 to 8 tokens from a 1024-word dictionary. A model
    learns to complete words, so the loss falls well below log(vocab_size)."""
    folder = folder or cache_dir()
    path = folder / f"corpus-v{vocab_size}-n{n_tokens}-s{seed}.u16"
    if path.exists() and path.stat().st_size == 2 * n_tokens:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_words = 1024
    lengths = rng.integers(2, 9, size=n_words)
    words = [rng.integers(0, vocab_size, size=n).astype(np.uint16) for n in lengths]
    zipf = 1.0 / np.arange(1, n_words + 1)
    draws = rng.choice(n_words, size=n_tokens // 2 + 16, p=zipf / zipf.sum())
    stream = np.concatenate([words[i] for i in draws])
    while stream.size < n_tokens:  # the expected length is ~5 tokens a word; top up if short
        stream = np.concatenate([stream, stream])
    # Concurrent ranks may all generate it: each writes its own temporary file and the rename is
    # atomic, so a reader never sees a partial corpus.
    return write_atomic(path, stream[:n_tokens].astype("<u2").tobytes())


class TokenBatches(Dataset[torch.Tensor]):
    """Item ``step`` is this rank's ``[local_batch, seq_len + 1]`` int64 token windows for that step."""

    def __init__(
        self,
        path: Path,
        *,
        seq_len: int,
        global_batch: int,
        local_batch: int,
        dp_rank: int,
        seed: int,
        read_delay_s: float = 0.0,
    ) -> None:
        self.path = path
        self.read_delay_s = read_delay_s
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.local_batch = local_batch
        self.dp_rank = dp_rank
        self.seed = seed
        size = path.stat().st_size // 2
        if size < seq_len + 2:
            raise ConfigError(
                f"token file {path} holds {size} tokens, fewer than model.seq_len+2={seq_len + 2}"
            )
        self.n_tokens = size
        self._tokens: np.memmap | None = None  # opened lazily: once per DataLoader worker

    def __len__(self) -> int:
        return 2**31 - 1

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        every = rng.integers(0, self.n_tokens - self.seq_len - 1, size=self.global_batch)
        return every[self.dp_rank * self.local_batch : (self.dp_rank + 1) * self.local_batch]

    def __getitem__(self, step: int) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype="<u2", mode="r")
        start_ns, t0 = time.time_ns(), time.perf_counter()
        # The copy out of the map is where the pages are read (from the page cache or the disk).
        rows = np.stack([self._tokens[o : o + self.seq_len + 1] for o in self.offsets(step)])
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        perfkit.record_read(rows.nbytes, time.perf_counter() - t0, start_ns, str(self.path), step=step + 1)
        return torch.from_numpy(rows.astype(np.int64))


def make_loader(
    dataset: TokenBatches,
    *,
    start_step: int,
    steps: int,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int,
) -> DataLoader[torch.Tensor]:
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start_step, steps),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        # fork starts workers ~3x faster than spawn inside torchrun (shared/design facts)
        multiprocessing_context="fork" if num_workers > 0 else None,
    )
