"""Token ids of a whole corpus in flat tensors: what a corpus of the paper's size needs.

Lists of ids held about 50 bytes a token once encoded, and 130 while the tokenizer's output for
the whole corpus was alive (`bench/data_memory.py`: 697 and 1,746 MiB for 13.9 million tokens).
WMT 2014 English-German, the paper's corpus (§5.1: about 4.5 million sentence pairs), is a few
hundred million tokens: tens of GB, in every process that torchrun starts. Here each side is
one int32 tensor of every id (4 bytes a token) and one int64 tensor of where each example
starts, and the text is encoded a chunk at a time (138 and 320 MiB for the same tokens).

`PackedPairs` is a sequence of `(src_ids, tgt_ids)` like the lists it replaces: indexing gives
two 1-D int32 tensors (views, no copy), which `aiayn.data.batching.collate` takes as it takes
lists. Lengths and cuts are computed on the whole tensors at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain

import torch
from torch import Tensor

# Texts encoded at a time: bounds the tokenizer's per-text objects (ids, offsets, tokens:
# several times the ids' size), which exist only until a chunk is packed.
ENCODE_CHUNK = 65536
COPY_CHUNK = 65536  # sequences cut or selected at a time


class Packed:
    """Many id sequences as `values` (T,) int32, all ids end to end, and `offsets` (N + 1,)
    int64: sequence i is `values[offsets[i]:offsets[i + 1]]`."""

    def __init__(self, values: Tensor, offsets: Tensor) -> None:
        if values.dim() != 1 or offsets.dim() != 1 or len(offsets) < 1:
            raise ValueError("values and offsets must be 1-D, offsets with at least one entry")
        if int(offsets[0]) != 0 or int(offsets[-1]) != len(values):
            raise ValueError(f"offsets must run from 0 to {len(values)} (the number of values)")
        self.values = values.to(torch.int32)
        self.offsets = offsets.to(torch.int64)

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[int]]) -> Packed:
        """Pack id lists (or 1-D tensors)."""
        rows = [r.tolist() if isinstance(r, Tensor) else r for r in rows]
        values = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.int32)
        return cls(values, _starts(torch.tensor([len(r) for r in rows], dtype=torch.int64)))

    @classmethod
    def concat(cls, parts: Sequence[Packed]) -> Packed:
        """The sequences of `parts`, in order, in one `Packed`."""
        if not parts:
            return cls.from_rows([])
        lengths = torch.cat([p.lengths() for p in parts])
        return cls(torch.cat([p.values for p in parts]), _starts(lengths))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Tensor:
        """Sequence i: (L,) int32, a view of `values`."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} sequences")
        i %= n
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def lengths(self) -> Tensor:
        """(N,) int64: the length of each sequence."""
        return self.offsets[1:] - self.offsets[:-1]

    def truncated(self, limit: int) -> Packed:
        """Each sequence cut to its first `limit` ids (self where none is longer)."""
        lengths = self.lengths()
        if len(lengths) == 0 or int(lengths.max()) <= limit:
            return self

        def kept(start: int, end: int) -> Tensor:
            # Each id's place in its own sequence: its index minus where its sequence starts.
            first = self.offsets[start:end] - self.offsets[start]
            place = torch.arange(int(first[-1] + lengths[end - 1])) - torch.repeat_interleave(
                first, lengths[start:end]
            )
            return place < limit

        return self._copy(lengths.clamp(max=limit), kept)

    def select(self, mask: Tensor) -> Packed:
        """The sequences where `mask` (N,) is true, in order."""
        lengths = self.lengths()
        mask = mask.to(torch.bool)
        return self._copy(
            lengths[mask],
            lambda start, end: torch.repeat_interleave(mask[start:end], lengths[start:end]),
        )

    def _copy(self, lengths: Tensor, kept: Callable[[int, int], Tensor]) -> Packed:
        """A `Packed` of sequences of `lengths`, holding the ids of self for which `kept(start,
        end)` (a bool for each id of sequences start to end) is true. A chunk of sequences at a
        time, into the output: no index over the whole corpus (8 bytes an id) is ever made."""
        values = torch.empty(int(lengths.sum()), dtype=torch.int32)
        at = 0
        for start in range(0, len(self), COPY_CHUNK):
            end = min(start + COPY_CHUNK, len(self))
            part = self.values[int(self.offsets[start]) : int(self.offsets[end])][kept(start, end)]
            values[at : at + len(part)] = part
            at += len(part)
        return Packed(values, _starts(lengths))

    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes


class PackedPairs(Sequence[tuple[Tensor, Tensor]]):
    """(source ids, target ids) pairs, each side `Packed`: `pairs[i]` is two 1-D int32 tensors."""

    def __init__(self, src: Packed, tgt: Packed) -> None:
        if len(src) != len(tgt):
            raise ValueError(f"{len(src)} sources but {len(tgt)} targets")
        self.src, self.tgt = src, tgt

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> PackedPairs:
        pairs = list(pairs)
        return cls(Packed.from_rows(s for s, _ in pairs), Packed.from_rows(t for _, t in pairs))

    @classmethod
    def encode(
        cls,
        encode_batch: Callable[[list[str]], list[list[int]]],
        pairs: Sequence[tuple[str, str]],
        chunk: int = ENCODE_CHUNK,
    ) -> PackedPairs:
        """Both sides of each text pair encoded by `encode_batch` (such as
        `Tokenizer.encode_batch`), `chunk` pairs at a time."""
        src, tgt = [], []
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            src.append(Packed.from_rows(encode_batch([s for s, _ in part])))
            tgt.append(Packed.from_rows(encode_batch([t for _, t in part])))
        return cls(Packed.concat(src), Packed.concat(tgt))

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.src[i], self.tgt[i]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> Tensor:
        """(N, 2) int64: each pair's source and target length."""
        return torch.stack([self.src.lengths(), self.tgt.lengths()], dim=1)

    def truncated(self, src_limit: int, tgt_limit: int) -> PackedPairs:
        """Each source cut to its first `src_limit` ids, each target to `tgt_limit`."""
        return PackedPairs(self.src.truncated(src_limit), self.tgt.truncated(tgt_limit))

    def select(self, mask: Tensor) -> PackedPairs:
        """The pairs where `mask` (N,) is true, in order."""
        return PackedPairs(self.src.select(mask), self.tgt.select(mask))

    def nbytes(self) -> int:
        return self.src.nbytes() + self.tgt.nbytes()


def _starts(lengths: Tensor) -> Tensor:
    """(N + 1,) offsets of sequences of these lengths, end to end."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
