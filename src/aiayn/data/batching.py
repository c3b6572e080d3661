"""Batching by token count, collation, and length limits.

The paper (§5.1): "Sentence pairs were batched together by approximate sequence length. Each
training batch contained a set of sentence pairs containing approximately 25000 source tokens
and 25000 target tokens." :class:`TokenBatchSampler` implements this with a hard budget on
*padded* tokens, so memory use per step is bounded; :func:`collate` turns a batch of id lists
into the padded tensors the model takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from aiayn.data.packed import PackedPairs
from aiayn.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IdPair = tuple[Sequence[int], Sequence[int]]


def example_lengths(examples: Sequence[IdPair]) -> list[tuple[int, int]] | torch.Tensor:
    """``(src_len, tgt_len)`` of each example as :func:`collate` will build it: a list, or an
    (N, 2) tensor for :class:`~aiayn.data.packed.PackedPairs`.

    :func:`collate` adds one special token per side (``</s>`` to the source, ``<s>``/``</s>``
    to the target input/output), so these are ``len(ids) + 1``: the lengths to give
    :class:`TokenBatchSampler` so its budget matches the real tensors.
    """
    if isinstance(examples, PackedPairs):
        return examples.lengths() + 1
    return [(len(src) + 1, len(tgt) + 1) for src, tgt in examples]


class DeviceBatch:
    """What every task's batch dataclass shares: its tensors move to a device together.

    `to(device)` and `pin_memory()` return a copy with every Tensor field moved (or pinned)
    and the other fields (such as `n_tokens`) as they are. Copies to a GPU are non-blocking:
    from pinned memory they overlap the previous step's work.
    """

    def _with_tensors(self, change):
        return dataclasses.replace(
            self,
            **{
                f.name: change(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    def to(self, device: torch.device):
        return self._with_tensors(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self):
        return self._with_tensors(lambda t: t.pin_memory())


class TokenBatchSampler:
    """Yields lists of example indices whose padded tensors hold at most ``max_tokens`` tokens.

    Use it as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)``.

    Budget: a batch of ``n`` examples is padded to ``n * max_src`` source and ``n * max_tgt``
    target tokens; both must be ``<= max_tokens``, i.e. ``n * max(max_src, max_tgt) <=
    max_tokens``. An example longer than ``max_tokens`` by itself still gets trained on: it
    goes in a batch of its own (the only batches allowed over budget), and a warning counts
    them once at construction.

    Bucketing (``shuffle=True``): examples are sorted globally by ``max(src_len, tgt_len)``
    (then ``src_len + tgt_len``), with ties broken by a random permutation; the sorted list is
    cut greedily into batches, and the batch order is shuffled. This is fairseq's scheme: it
    wastes the least padding, ties (common with short sentences) vary the batch contents from
    epoch to epoch, and the shuffled order avoids a length curriculum. Because the cut depends
    only on the sorted lengths, the number of batches (``len``) is the same every epoch. With
    ``shuffle=False`` ties keep index order and batches come shortest first (for evaluation).

    Randomness comes from a ``torch.Generator`` seeded with ``seed + epoch``, so an epoch's
    order is a pure function of (lengths, max_tokens, seed, epoch). That makes exact resume
    cheap: :meth:`state_dict` stores the epoch and how many batches were consumed, and after
    :meth:`load_state_dict` the next iteration continues with the next batch.

    Args:
        lengths: ``(src_len, tgt_len)`` per example, as the tensors will be (see
            :func:`example_lengths`). All must be >= 1.
        max_tokens: padded-token budget per side per batch (paper: ~25000).
        shuffle: random tie-breaking and batch order (training) or fixed order (evaluation).
        seed: base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(
        self,
        lengths: Sequence[tuple[int, int]] | torch.Tensor,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if max_tokens < 1:
            raise ConfigError(f"max_tokens {max_tokens} must be >= 1; the paper uses 25000")
        if len(lengths) == 0:
            raise DataError("no examples to batch; check that the data set is not empty")
        lens = torch.as_tensor(lengths, dtype=torch.long).reshape(-1, 2)  # (N, 2)
        if bool((lens < 1).any()):
            bad = int((lens < 1).any(dim=1).nonzero()[0])
            raise DataError(
                f"example {bad} has lengths {tuple(lens[bad].tolist())}; lengths must be >= 1 "
                f"(use example_lengths(), which counts the added </s> or <s>)"
            )
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self._digest: str | None = None
        self._longest = lens.max(dim=1).values  # (N,) padded size per example per side
        self._total = lens.sum(dim=1)  # (N,) secondary sort key
        n_oversize = int((self._longest > max_tokens).sum())
        if n_oversize:
            logger.warning(
                "%d of %d examples are longer than max_tokens=%d; each goes in a batch of its "
                "own (raise max_tokens or filter/truncate long examples to avoid this)",
                n_oversize,
                len(lengths),
                max_tokens,
            )
        # The cut depends only on the sorted lengths, so any epoch gives the same count.
        self._num_batches = len(self.batches(0))
        self._epoch = 0
        self._resume_from = 0  # batches to skip at the start of the next iteration
        self._consumed = 0  # batches yielded so far in this epoch (skipped ones included)

    def digest(self) -> str:
        """A short hash of every example's lengths, in order: it changes with the data (or
        the tokenizer), so a checkpoint can tell whether it is resumed on what it trained on."""
        if self._digest is None:  # once: every checkpoint records it
            lengths = torch.stack([self._longest, self._total]).numpy().tobytes()
            self._digest = hashlib.blake2b(lengths, digest_size=8).hexdigest()
        return self._digest

    def _make_batches(self, order: torch.Tensor) -> list[list[int]]:
        """Cut ``order`` (example indices, sorted by length) greedily into batches."""
        batches: list[list[int]] = []
        batch: list[int] = []
        batch_max = 0
        for idx, longest in zip(order.tolist(), self._longest[order].tolist(), strict=True):
            new_max = max(batch_max, longest)
            if batch and (len(batch) + 1) * new_max > self.max_tokens:
                batches.append(batch)
                batch, new_max = [], longest
            batch.append(idx)
            batch_max = new_max
        if batch:
            batches.append(batch)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, in the order they are yielded."""
        n = len(self._longest)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        # Stable sorts, secondary key first: the result is ordered by longest side, then by
        # total length, then by position in ``perm`` (the random tie-break).
        perm = perm[torch.sort(self._total[perm], stable=True).indices]
        perm = perm[torch.sort(self._longest[perm], stable=True).indices]
        batches = self._make_batches(perm)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows.

        Changing the epoch discards any pending resume point; setting the current epoch again
        is a no-op, so ``load_state_dict`` then ``set_epoch(same epoch)`` still resumes.
        """
        if epoch < 0:
            raise ConfigError(f"epoch {epoch} must be >= 0")
        if epoch != self._epoch:
            self._epoch = epoch
            self._resume_from = 0
            self._consumed = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[list[int]]:
        # Not a generator function: the resume point is taken (and the count reset) as soon as
        # iteration starts, so state_dict() is right even before the first batch is drawn.
        start, self._resume_from = self._resume_from, 0
        self._consumed = start
        return self._iterate(self.batches(self._epoch)[start:])

    def _iterate(self, batches: list[list[int]]) -> Iterator[list[int]]:
        for batch in batches:
            # Count before yielding: once the caller holds a batch, it counts as consumed.
            self._consumed += 1
            yield batch

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        return self._num_batches

    def state_dict(self, *, consumed: int | None = None) -> dict[str, Any]:
        """Resume state: ``{"epoch", "consumed", "seed", "num_batches"}``.

        ``consumed`` defaults to the batches this sampler has yielded in the current epoch. A
        ``DataLoader`` with workers pulls batches ahead of training, so pass the number of
        batches actually trained on instead in that case.
        """
        return {
            "epoch": self._epoch,
            "consumed": self._consumed if consumed is None else consumed,
            "seed": self.seed,
            "num_batches": self._num_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration starts at batch ``consumed`` of ``epoch``.

        Raises:
            DataError: ``state`` is malformed, or was saved with another seed or another
                batching (data or max_tokens changed), so the order would not match.
        """
        try:
            epoch, consumed = int(state["epoch"]), int(state["consumed"])
            seed, num_batches = int(state["seed"]), int(state["num_batches"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"batch sampler state {state!r} is malformed ({e!r}); expected the dict "
                f"returned by TokenBatchSampler.state_dict()"
            ) from None
        if seed != self.seed:
            raise DataError(
                f"batch sampler state was saved with seed {seed} but this run uses {self.seed}; "
                f"use the same seed to resume"
            )
        if num_batches != self._num_batches:
            raise DataError(
                f"batch sampler state has {num_batches} batches per epoch but the data now gives "
                f"{self._num_batches}; resume with the same data and max_tokens"
            )
        if not 0 <= consumed <= num_batches or epoch < 0:
            raise DataError(
                f"batch sampler state has epoch {epoch}, consumed {consumed} of {num_batches} "
                f"batches; the state is corrupt"
            )
        self._epoch = epoch
        self._resume_from = consumed
        self._consumed = consumed


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """(B, L) long tensor of id lists, right-padded with ``pad_id`` to the longest (L)."""
    tensors = [torch.as_tensor(list(r), dtype=torch.long) for r in rows]
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad_id)


def collate(
    pairs: Sequence[IdPair],
    pad_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a batch of ``(src_ids, tgt_ids)`` into model inputs and targets.

    - ``src``     = ``src_ids + [eos]``: the encoder input.
    - ``tgt_in``  = ``[bos] + tgt_ids``: the decoder input (teacher forcing, shifted right).
    - ``tgt_out`` = ``tgt_ids + [eos]``: what the decoder must predict at each position.

    Returns:
        ``src`` (B, S), ``tgt_in`` (B, T), ``tgt_out`` (B, T), all ``torch.long``, padded on
        the right with ``pad_id``; S and T are the longest source/target plus one.
    """
    if len(pairs) == 0:
        raise DataError("cannot collate an empty batch; check the batch sampler")
    n = len(pairs)
    s_len = max(len(src) for src, _ in pairs) + 1
    t_len = max(len(tgt) for _, tgt in pairs) + 1
    src = torch.full((n, s_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((n, t_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((n, t_len), pad_id, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        s_ids, t_ids = _ids(s), _ids(t)
        src[i, : len(s)] = s_ids
        src[i, len(s)] = eos_id
        tgt_in[i, 0] = bos_id
        tgt_in[i, 1 : len(t) + 1] = t_ids
        tgt_out[i, : len(t)] = t_ids
        tgt_out[i, len(t)] = eos_id
    return src, tgt_in, tgt_out


def _ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A list of ids (or a tensor of them: `PackedPairs`) as a long tensor."""
    return torch.as_tensor(ids if isinstance(ids, torch.Tensor) else list(ids), dtype=torch.long)


def fit_to_max_len(
    examples: Sequence[IdPair],
    max_len: int,
    policy: Literal["truncate", "drop", "reject"] = "truncate",
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Make every example fit a model that accepts sequences of at most ``max_len`` positions.

    ``max_len`` counts positions as :func:`collate` builds them -- the ids plus one ``<s>``
    or ``</s>`` -- so each side keeps at most ``max_len - 1`` ids.

    Policies:
        ``"truncate"``: cut each too-long side to its first ``max_len - 1`` ids (the target
            still ends in ``</s>`` after collation).
        ``"drop"``: leave out every example with a too-long side (a cut pair's two sides no
            longer say the same).
        ``"reject"``: raise DataError on the first too-long example.

    Returns:
        ``(examples, n_long)``: new lists (the input is not modified; for
        :class:`~aiayn.data.packed.PackedPairs`, a `PackedPairs`) and the number of examples
        that had a too-long side, cut or left out, so that the caller can log one counted
        warning (always 0 for ``"reject"``).

    Raises:
        ConfigError: unknown policy, or ``max_len < 2``.
        DataError: (``"reject"``) an example is too long; the message names it.
    """
    if policy not in ("truncate", "drop", "reject"):
        raise ConfigError(f"unknown length policy {policy!r}; use 'truncate', 'drop' or 'reject'")
    if max_len < 2:
        raise ConfigError(f"max_len {max_len} must be >= 2 (one id plus <s> or </s>)")
    limit = max_len - 1
    if isinstance(examples, PackedPairs):
        over = examples.lengths() > limit  # (N, 2)
        long = over.any(dim=1)
        if policy == "reject" and bool(long.any()):
            i = int(long.nonzero()[0])
            side = 0 if bool(over[i, 0]) else 1
            _refuse_long(i, ("source", "target")[side], len(examples[i][side]), max_len)
        if policy == "drop":
            return examples.select(~long), int(long.sum())
        return examples.truncated(limit, limit), int(long.sum())
    out: list[tuple[list[int], list[int]]] = []
    n_long = 0
    for i, (src, tgt) in enumerate(examples):
        if len(src) > limit or len(tgt) > limit:
            if policy == "reject":
                side, length = ("source", len(src)) if len(src) > limit else ("target", len(tgt))
                _refuse_long(i, side, length, max_len)
            n_long += 1
            if policy == "drop":
                continue
        out.append((list(src[:limit]), list(tgt[:limit])))
    return out, n_long


def _refuse_long(i: int, side: str, length: int, max_len: int) -> None:
    raise DataError(
        f"example {i}: {side} has {length} tokens (+1 for </s>) but max_len is {max_len}; "
        "raise max_len, filter long examples, or use the 'truncate' policy"
    )
