"""Decoding throughput: aiayn's greedy and beam search vs Hugging Face ``generate``, same weights.

    python -m bench.decode_throughput --device cpu --size small
    python -m bench.decode_throughput --device cuda --size base --dtype bf16

One randomly initialised aiayn `Transformer` is exported with `aiayn.interop.to_hf_marian` and
loaded as a ``MarianMTModel``: both sides hold the same weights. aiayn decodes with
`aiayn.decoding.greedy_search` / `beam_search` over a `TransformerDecoder` (the reference
searches; row ``aiayn``) and with `aiayn.static_decoding.StaticDecoding` (the same searches
with fixed shapes, each step one CUDA graph launch on a GPU and a step of
`aiayn.frozen_decoder.FrozenDecoder` on a CPU; row ``aiayn-static``; on a CPU also the same
search stepping the model's own modules, the before row ``aiayn-static-modules``); Hugging
Face with ``model.generate``; and, where the ``ctranslate2`` package is installed, CTranslate2
(OpenNMT's C++ inference engine) on a copy of the same weights converted with
`bench.ctranslate2_peer.to_ctranslate2` (row ``ctranslate2``; a peer like ``generate``, its
forced lengths are described there).

**Equal work.** A random model ends its outputs at random steps, differently on each side once
floating-point sums differ, so both sides are made to decode exactly ``--steps`` (L) decoder
steps for every sentence:

* greedy: eos is banned for all L outputs. aiayn: ``min_len = max_len = L``. HF:
  ``min_new_tokens = max_new_tokens = L``, no forced eos.
* beam: L - 1 tokens, then eos forced at step L, so that every beam of every sentence
  finishes at the same step and neither search can stop early. aiayn: ``min_len = max_len =
  L - 1`` (eos banned below L - 1 tokens; at its limit the search allows only eos). HF:
  ``min_new_tokens=L-1, max_new_tokens=L, forced_eos_token_id=eos``. With equal lengths
  neither length penalty changes the ranking, but HF's forced eos scores log-probability 0
  where aiayn scores eos's own, so the beams kept at the last step may differ (the work does
  not: L steps of K beams on both sides).

Both sides ban pad and bos (aiayn.decoding always does; HF through ``bad_words_ids``).

**Same outputs.** Before timing, both sides decode the timed batch in float32 and the greedy
outputs must be token-identical (and aiayn-static's those of aiayn's reference search): a
benchmark that compares different work is worthless. A
row may differ only where the two candidates' logits are within float32 rounding of each
other (a tie, broken differently); such rows are counted and reported, any other difference
stops the run. Output lengths are checked after every timed case too. Beam outputs are
compared and the agreement reported, not required (the forced eos's score above, and
near-ties among 2K candidates).

**Interleaved** (``--interleave N``, what the CPU suite uses): after the cases above, every
implementation decodes one batch in turn, N times, and each is reported as the median over
the turns of HF ``generate``'s time divided by its own in the same turn. On a machine whose
speed drifts by tens of percent within a minute (this project's CPU machine), one case after
another lets the drift decide the ratio; side by side it cannot.

Output: bench/results/decode_throughput-<device>-<date>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

import aiayn.model
from aiayn import static_decoding
from aiayn.config import TransformerConfig
from aiayn.decoding import TransformerDecoder, beam_search, beam_step, greedy_search
from aiayn.interop import to_hf_marian
from aiayn.model import Transformer
from aiayn.static_decoding import StaticDecoding, StaticKVCache
from bench import common, ctranslate2_peer
from bench.peers import quiet_transformers  # also sets HF_HUB_OFFLINE before transformers loads

# aiayn: the reference searches of aiayn.decoding; aiayn-static: aiayn.static_decoding (fixed
# shapes; one CUDA graph launch per step on a GPU, the frozen decoder of aiayn.frozen_decoder
# on a CPU); hf-generate: the peer, with its default dynamic cache; hf-generate-static: with
# its static cache (`cache_implementation="static"`, which transformers also compiles on a
# GPU): the peer's own fast path.
# ctranslate2: CTranslate2 on the same weights, where the package is installed.
IMPLEMENTATIONS = ("aiayn", "aiayn-static", "hf-generate", "hf-generate-static")
CT2 = "ctranslate2"
PEERS = ("hf-generate", "hf-generate-static", CT2)
# On a CPU, a before row: the fixed-shape search stepping the model's own modules
# (`StaticDecoding(frozen=False)`), what a CPU ran before the frozen decoder.
CPU_BEFORE = "aiayn-static-modules"
# On a GPU, before rows of the graphed search (session 8's changes, one at a time): every step
# over the whole cache instead of the smallest window of positions that holds the step's
# (`static_decoding._FIRST_WINDOW` out of reach), and, beam search only, the cache reordered
# in place (a gather and a copy back) instead of double-buffered; and (session 9), beam search
# only, each source's candidates taken by one top-k over its K x V scores, after a pass that
# bans every token but eos at the length limit, instead of `_Plan._candidates`' two top-k's;
# and the memory's keys/values copied for every beam instead of shared by a source's beams.
ONE_WINDOW, ONE_BUFFER = "aiayn-static-one-window", "aiayn-static-one-buffer"
ONE_TOPK, REPEATED_MEMORY = "aiayn-static-one-topk", "aiayn-static-repeated-memory"
# And a candidate (session 10, not yet measured): attention of a single query (every step's
# self-attention, and greedy search's cross-attention) written out as eq. (1), three kernels,
# instead of PyTorch's fused kernel, which took 29 µs a call in a graphed beam step on an H200
# (session 9's profile: 256 rows x 8 heads, about 49 keys), several times what reading the
# keys and values takes. If it is faster, `MultiHeadAttention.attend` should choose it.
WRITTEN_ATTENTION = "aiayn-static-written-attention"
_FUSED_IS_SLOW = aiayn.model._slow_fused_backward


def written_out_for_one_query(q: Tensor) -> bool:
    """`aiayn.model._slow_fused_backward` in the candidate row: also True for one query."""
    return q.size(-2) == 1 or _FUSED_IS_SLOW(q)


def one_topk_candidates(
    plan: static_decoding._Plan, log_probs: Tensor, at_limit: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`_Plan._candidates` as it was before session 9: (N, V) -> each (B, 2K)."""
    batch, beam, vocab = plan.batch, plan.beam, log_probs.size(-1)
    log_probs = log_probs.view(batch, beam, vocab).masked_fill(
        at_limit.view(-1, 1, 1) & plan.not_eos.view(1, 1, -1), float("-inf")
    )
    return beam_step(log_probs, plan.state.scores, num_candidates=min(2 * beam, beam * vocab))


# Each GPU row that is aiayn-static with one thing patched: (owner, attribute, value).
GPU_VARIANTS = {
    ONE_WINDOW: (static_decoding, "_FIRST_WINDOW", 1 << 30),
    ONE_BUFFER: (StaticKVCache, "double_buffered", False),
    ONE_TOPK: (static_decoding._Plan, "_candidates", one_topk_candidates),
    REPEATED_MEMORY: (StaticKVCache, "shares_memory", False),
    WRITTEN_ATTENTION: (aiayn.model, "_slow_fused_backward", written_out_for_one_query),
}


def implementations(
    device: torch.device, search: str | None = None, impls: set[str] | None = None
) -> tuple[str, ...]:
    """The rows measured on `device`, in order (for `search`, where the rows differ; of
    `impls` only, if given)."""
    if device.type == "cpu":
        rows = IMPLEMENTATIONS[:2] + (CPU_BEFORE,) + IMPLEMENTATIONS[2:]
    elif search == "greedy":  # greedy search never reorders its cache
        rows = IMPLEMENTATIONS[:2] + (ONE_WINDOW, WRITTEN_ATTENTION) + IMPLEMENTATIONS[2:]
    else:
        variants = (ONE_WINDOW, ONE_BUFFER, ONE_TOPK, REPEATED_MEMORY, WRITTEN_ATTENTION)
        rows = IMPLEMENTATIONS[:2] + variants + IMPLEMENTATIONS[2:]
    rows += (CT2,) if ctranslate2_peer.available() else ()
    return tuple(row for row in rows if impls is None or row in impls)


SEARCHES = ("greedy", "beam")
LENGTH_PENALTY = 0.6  # the paper's alpha; irrelevant to the ranking when all lengths are equal
# Two logits closer than this (relative to the largest) are a tie at float32 precision.
TIE_TOLERANCE = 1e-4


class EqualWorkError(RuntimeError):
    """aiayn and Hugging Face did not compute the same thing: no timing would mean anything."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report  # what `check_equal_work` found, for the result file


# --------------------------------------------------------------------------- the two models


def build_pair(
    cfg: TransformerConfig, *, seed: int, device: torch.device
) -> tuple[Transformer, nn.Module]:
    """A random aiayn model and the same weights as a Hugging Face ``MarianMTModel``, float32, eval.

    The Marian model gets a generation config of its own that holds only the ids: every
    search setting is passed to ``generate`` explicitly (see :func:`hf_generate`), so nothing
    written by the export (such as ``forced_eos_token_id``) applies unless asked for.
    """
    import transformers

    quiet_transformers()
    torch.manual_seed(seed)
    ours = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        to_hf_marian(ours, folder, eos_id=common.EOS_ID, decoder_start_id=common.BOS_ID)
        theirs = transformers.MarianMTModel.from_pretrained(folder, attn_implementation="sdpa")
    theirs.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=common.BOS_ID,
        eos_token_id=common.EOS_ID,
        pad_token_id=common.PAD_ID,
    )
    return ours.to(device), theirs.to(device).eval()


def make_sources(cfg: TransformerConfig, *, batch: int, src_len: int, seed: int) -> Tensor:
    """(batch, src_len) sources of varied lengths (src_len/2 .. src_len), each ending in eos,
    right-padded: both sides mask the same padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, src_len // 2), src_len + 1, (batch,), generator=generator)
    src = torch.full((batch, src_len), common.PAD_ID, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        src[row, : length - 1] = common.random_ids(1, length - 1, cfg.src_vocab_size, generator)
        src[row, length - 1] = common.EOS_ID
    return src


def aiayn_decode(
    model: Transformer,
    src: Tensor,
    search: str,
    steps: int,
    beam_size: int,
    static: StaticDecoding | None = None,
) -> list[list[int]]:
    """aiayn's search, forced to `steps` decoder steps (see the module docstring): the
    reference search, or the fixed-shape one when `static` is given."""
    # greedy: eos banned for all `steps` outputs; beam: for steps - 1, then forced.
    length = steps if search == "greedy" else steps - 1
    ids = dict(
        bos_id=common.BOS_ID,
        eos_id=common.EOS_ID,
        pad_id=common.PAD_ID,
        max_len=length,
        min_len=length,
    )
    if static is not None:
        if search == "greedy":
            return static.greedy(src, **ids)
        hypotheses = static.beam(src, beam_size=beam_size, length_penalty=LENGTH_PENALTY, **ids)
        return [hyps[0].tokens if hyps else [] for hyps in hypotheses]
    with torch.inference_mode():
        decoder = TransformerDecoder(model)
        if search == "greedy":
            return greedy_search(decoder, src, **ids)
        hypotheses = beam_search(
            decoder, src, beam_size=beam_size, length_penalty=LENGTH_PENALTY, **ids
        )
    return [hyps[0].tokens if hyps else [] for hyps in hypotheses]


def hf_generate(
    model: nn.Module, src: Tensor, search: str, steps: int, beam_size: int, static: bool = False
) -> Tensor:
    """HF ``generate`` forced to `steps` decoder steps; returns its (B, 1 + steps) sequences.
    `static`: with HF's static key/value cache instead of its dynamic one."""
    options: dict[str, Any] = dict(
        input_ids=src,
        attention_mask=src.ne(common.PAD_ID),
        do_sample=False,
        max_new_tokens=steps,
        bad_words_ids=[[common.PAD_ID], [common.BOS_ID]],  # what aiayn.decoding bans
        decoder_start_token_id=common.BOS_ID,
        eos_token_id=common.EOS_ID,
        pad_token_id=common.PAD_ID,
        use_cache=True,
    )
    if static:
        options["cache_implementation"] = "static"
    if search == "greedy":
        options |= dict(num_beams=1, min_new_tokens=steps, forced_eos_token_id=None)
    else:
        options |= dict(
            num_beams=beam_size,
            min_new_tokens=steps - 1,
            forced_eos_token_id=common.EOS_ID,
            early_stopping=True,  # stop a sentence at num_beams finished hypotheses, as aiayn
            length_penalty=LENGTH_PENALTY,
        )
    with torch.inference_mode():
        return model.generate(**options)


def hf_outputs(sequences: Tensor, search: str) -> list[list[int]]:
    """HF's sequences as aiayn returns outputs: without the start token, and without the final
    eos for beam search."""
    rows = sequences[:, 1:].tolist()
    if search == "beam":
        rows = [row[:-1] if row and row[-1] == common.EOS_ID else row for row in rows]
    return rows


def check_lengths(
    outputs: list[list[int]], sequences: Tensor | None, search: str, steps: int
) -> None:
    """Raise `EqualWorkError` unless every output has the forced length (and HF's ends right)."""
    expected = steps if search == "greedy" else steps - 1
    lengths = sorted({len(row) for row in outputs})
    if lengths != [expected] or any(common.EOS_ID in row for row in outputs):
        raise EqualWorkError(
            f"{search}: output lengths {lengths} (expected all {expected}, no eos inside): "
            "the forced-length settings did not hold"
        )
    if sequences is not None and search == "beam":
        if not bool(sequences[:, -1].eq(common.EOS_ID).all()):
            raise EqualWorkError("beam: HF's outputs do not all end in the forced eos")


def _is_tie(
    model: Transformer, src_row: Tensor, prefix: list[int], a: int, b: int
) -> tuple[bool, float]:
    """Whether tokens a and b were a float32 tie after `prefix`: (tie, |logit_a - logit_b|)."""
    tgt = torch.tensor([[common.BOS_ID, *prefix]], device=src_row.device)
    with torch.inference_mode():
        logits = model(src_row[None], tgt)[0, -1].float()
    gap = abs(float(logits[a] - logits[b]))
    return gap <= TIE_TOLERANCE * max(1.0, float(logits.abs().max())), gap


def compare_outputs(
    ours: list[list[int]],
    theirs: list[list[int]],
    model: Transformer | None = None,
    src: Tensor | None = None,
) -> dict[str, Any]:
    """Row-by-row comparison; with `model` and `src`, mismatching rows are checked for ties.

    Returns ``rows``, ``identical``, ``ties`` (rows that first differ at a float32 tie),
    ``mismatches`` (rows that differ otherwise) and ``first_mismatch`` (row, step, gap).
    """
    identical = ties = mismatches = 0
    first_mismatch = None
    for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a == b:
            identical += 1
            continue
        step = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        if model is not None and src is not None and step < min(len(a), len(b)):
            tie, gap = _is_tie(model, src[row], a[:step], a[step], b[step])
            if tie:
                ties += 1
                continue
        else:
            gap = None
        mismatches += 1
        if first_mismatch is None:
            first_mismatch = {"row": row, "step": step, "logit_gap": gap}
    return {
        "rows": len(ours),
        "identical": identical,
        "ties": ties,
        "mismatches": mismatches,
        "first_mismatch": first_mismatch,
    }


def check_equal_work(
    ours: Transformer,
    theirs: nn.Module,
    src: Tensor,
    *,
    steps: int,
    beam_size: int,
    searches: Sequence[str],
    ct2: ctranslate2_peer.CT2Process | None = None,
) -> dict[str, Any]:
    """Decode `src` with both models (float32) and check that they do the same work.

    Greedy outputs must be token-identical (up to float32 ties, see `compare_outputs`);
    every output must have the forced length. Raises `EqualWorkError` otherwise. With `ct2`
    (CTranslate2 on the same weights, float32), its outputs are checked the same way.
    """
    report: dict[str, Any] = {}
    static = StaticDecoding(ours)
    for search in searches:
        mine = aiayn_decode(ours, src, search, steps, beam_size)
        sequences = hf_generate(theirs, src, search, steps, beam_size)
        other = hf_outputs(sequences, search)
        check_lengths(mine, None, search, steps)
        check_lengths(other, sequences, search, steps)
        report[search] = compare_outputs(mine, other, ours if search == "greedy" else None, src)
        # The fixed-shape search must give the reference's outputs (up to float32 ties). If it
        # fails to run, its rows fail later; the reference and HF are still compared and timed.
        try:
            fixed = aiayn_decode(ours, src, search, steps, beam_size, static)
            check_lengths(fixed, None, search, steps)
            found = compare_outputs(fixed, mine, ours if search == "greedy" else None, src)
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            traceback.print_exc()
            found = {"error": f"{type(exc).__name__}: {exc}"}
        report[search]["static_vs_reference"] = found
        if ct2 is not None:
            theirs_ct2 = ct2.decode(src, search, steps, beam_size, LENGTH_PENALTY)
            check_lengths(theirs_ct2, None, search, steps)
            report[search]["ctranslate2_vs_reference"] = compare_outputs(
                theirs_ct2, mine, ours if search == "greedy" else None, src
            )
    for search, found in report.items():
        checks = [("HF generate", found), ("aiayn-static", found["static_vs_reference"])]
        if "ctranslate2_vs_reference" in found:
            checks.append(("CTranslate2", found["ctranslate2_vs_reference"]))
        for name, check in checks:
            if search == "greedy" and check.get("mismatches"):
                raise EqualWorkError(
                    f"greedy outputs differ between aiayn and {name} beyond float32 ties: {check}",
                    report,
                )
    return report


def load_ctranslate2(
    ours: Transformer,
    folder: str,
    device: torch.device,
    dtype: torch.dtype,
    threads: int,
) -> tuple[ctranslate2_peer.CT2Process, ctranslate2_peer.CT2Process | Exception]:
    """`ours` converted into `folder` for CTranslate2: (a float32 translator for the
    equal-work check, the translator timed in `dtype`, or why there is none), each in a
    process of its own (see `ctranslate2_peer.CT2Process`: not in PyTorch's), with `threads`
    intra-op threads on a CPU."""
    ctranslate2_peer.to_ctranslate2(ours, folder)

    def translator(dt: torch.dtype) -> ctranslate2_peer.CT2Process:
        name = ctranslate2_peer.compute_type(dt, device.type)
        if name is None:
            raise RuntimeError(f"CTranslate2 does not compute in {dt} on {device.type}")
        return ctranslate2_peer.CT2Process(
            folder,
            vocab_size=ours.cfg.tgt_vocab_size,
            device=device.type,
            threads=threads,
            compute_type=name,
        )

    check = translator(torch.float32)
    if dtype == torch.float32:
        return check, check
    try:
        return check, translator(dtype)
    except RuntimeError as exc:
        return check, exc


# --------------------------------------------------------------------------- timing


Run = Callable[[], tuple[list[list[int]], Tensor | None]]


def make_run(
    impl: str,
    model: nn.Module,
    src: Tensor,
    search: str,
    steps: int,
    beam_size: int,
    ct2: ctranslate2_peer.CT2Process | None = None,
) -> Run:
    """One batch decoded by `impl`: returns (outputs as aiayn returns them, HF's sequences or None).

    Every side ends with Python lists of token ids (aiayn's search returns them; HF's tensor is
    converted; CTranslate2 returns token strings, mapped back to ids), so all pay for the final
    copy to the host. `ct2`: the translator the ``ctranslate2`` row decodes with.
    """
    if impl == CT2:
        if ct2 is None:
            raise RuntimeError("no CTranslate2 translator (see the log above)")
        return lambda: (ct2.decode(src, search, steps, beam_size, LENGTH_PENALTY), None)
    if impl == "aiayn":
        return lambda: (aiayn_decode(model, src, search, steps, beam_size), None)
    if impl in ("aiayn-static", CPU_BEFORE):
        # Made here, after the cast to the timed dtype: its buffers take the model's dtype.
        # Its CUDA graphs are captured in the first (warm-up) batch.
        static = (
            StaticDecoding(model, frozen=False) if impl == CPU_BEFORE else StaticDecoding(model)
        )
        return lambda: (aiayn_decode(model, src, search, steps, beam_size, static), None)
    if impl in GPU_VARIANTS:
        before = StaticDecoding(model)
        owner, name, value = GPU_VARIANTS[impl]

        def run_before() -> tuple[list[list[int]], None]:
            # Its plans (and graphs) are made inside, at the first (warm-up) batch.
            with mock.patch.object(owner, name, value):
                return aiayn_decode(model, src, search, steps, beam_size, before), None

        return run_before

    static = impl == "hf-generate-static"

    def run() -> tuple[list[list[int]], Tensor | None]:
        sequences = hf_generate(model, src, search, steps, beam_size, static)
        return hf_outputs(sequences, search), sequences

    return run


def run_case(
    impl: str,
    search: str,
    run: Run,
    *,
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    repeats: int,
) -> tuple[dict[str, Any], list[list[int]]]:
    """Time `run` (one batch decoded) and check its outputs' lengths; returns result and outputs."""
    memory = common.PeakMemory(device)
    memory.start()  # the models exist already: this is the search's own memory
    last: list[tuple[list[list[int]], Tensor | None]] = []

    def call() -> None:
        last[:] = [run()]

    # The first batch alone: it includes one-time work (aiayn-static captures its CUDA graphs).
    started = time.perf_counter()
    call()
    common.synchronize(device)
    first_batch_s = time.perf_counter() - started
    times = common.time_fn(call, device, warmup=max(0, warmup - 1), repeats=repeats)
    outputs, sequences = last[0]
    check_lengths(outputs, sequences, search, steps)
    seconds = common.median(times)
    result = {
        "impl": impl,
        "search": search,
        "batch_s_median": seconds,
        "batch_s_repeats": times,
        "batch_s_spread": common.spread(times),
        "first_batch_s": first_batch_s,
        "sentences_per_s": batch / seconds,
        "output_tokens_per_s": batch * steps / seconds,
        "peak_mem_mib": memory.peak_mib(),
    }
    return result, outputs


def interleave(runs: dict[str, Run], device: torch.device, turns: int) -> dict[str, dict[str, Any]]:
    """One batch of each run in turn, `turns` times (every run warmed up already).

    Returns per implementation: the median batch time and, for each peer, the median over
    the turns of the peer's time / this implementation's time in the same turn.
    """
    times: dict[str, list[float]] = {impl: [] for impl in runs}
    for _ in range(turns):
        for impl, run in runs.items():
            times[impl] += common.time_fn(run, device, warmup=0, repeats=1)
    report = {}
    for impl, values in times.items():
        report[impl] = {"batch_s_median": common.median(values), "batch_s_turns": values}
        for peer in PEERS:
            if peer in times and impl not in PEERS:
                ratios = [p / t for p, t in zip(times[peer], values, strict=True)]
                report[impl][f"speedup_over_{peer}_median"] = common.median(ratios)
    return report


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per search: each aiayn search's speed-up over each HF variant (>1: aiayn is faster)."""
    summary = {}
    for search in SEARCHES:
        rows = {r["impl"]: r for r in results if r["search"] == search and "batch_s_median" in r}
        ratios = {
            f"{impl}_speedup_over_{peer}".replace("-", "_"): rows[peer]["batch_s_median"]
            / row["batch_s_median"]
            for impl, row in rows.items()
            if impl not in PEERS
            for peer in PEERS
            if peer in rows
        }
        if ratios:
            summary[search] = ratios
    return summary


def table(results: list[dict[str, Any]], beam_size: int) -> str:
    """The markdown table; 'aiayn x' = this row's time / aiayn's time for the same search."""
    aiayn = {r["search"]: r for r in results if r["impl"] == "aiayn" and "batch_s_median" in r}
    rows = []
    for r in results:
        search = "greedy" if r["search"] == "greedy" else f"beam {beam_size}"
        if "error" in r:
            rows.append([r["impl"], search, "failed: " + r["error"].splitlines()[-1]] + ["-"] * 5)
            continue
        ref = aiayn.get(r["search"])
        ratio = r["batch_s_median"] / ref["batch_s_median"] if ref else None
        rows.append(
            [
                r["impl"],
                search,
                common.fmt(r["sentences_per_s"], 1),
                common.fmt(r["output_tokens_per_s"], 0),
                common.fmt(r["batch_s_median"] * 1e3, 1),
                common.fmt(r["peak_mem_mib"], 0),
                f"±{r['batch_s_spread'] * 50:.0f}%",
                common.fmt(ratio, 2),
            ]
        )
    headers = ["impl", "search", "sent/s", "out tok/s", "ms/batch", "peak MiB", "spread", "aiayn x"]
    return common.markdown_table(headers, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_throughput",
        description="Decoding throughput of aiayn vs Hugging Face generate, on the same weights.",
    )
    common.add_run_options(parser)
    parser.add_argument("--searches", default="greedy,beam", help="comma-separated: greedy, beam")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument(
        "--impls",
        help="comma-separated rows to run, in their usual order (default: every row for the "
        "device; hf-generate is always kept, the peer the ratios are read against)",
    )
    parser.add_argument("--batch", type=int, help="sentences per batch (default: the size's)")
    parser.add_argument("--src-len", type=int, help="longest source (default: the size's)")
    parser.add_argument(
        "--steps", type=int, help="decoder steps per sentence, forced (default: the size's)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per case")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed batches (the median is reported)"
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="N",
        help="then N turns of one batch per implementation, side by side (0: not done)",
    )
    parser.add_argument(
        "--ct2-threads",
        type=int,
        metavar="N",
        help="CTranslate2's threads on a CPU (default: PyTorch's, what the other rows use)",
    )
    args = parser.parse_args(argv)
    args.searches = [s.strip() for s in args.searches.split(",") if s.strip()]
    unknown = [s for s in args.searches if s not in SEARCHES]
    if unknown:
        parser.error(f"unknown search {unknown[0]!r}; choose from {', '.join(SEARCHES)}")
    if args.beam_size < 2:
        parser.error("--beam-size must be at least 2 (greedy is its own search)")
    if args.impls is not None:
        args.impls = {i.strip() for i in args.impls.split(",") if i.strip()} | {"hf-generate"}
        known = set(IMPLEMENTATIONS) | {CPU_BEFORE, *GPU_VARIANTS, CT2}
        unknown = sorted(args.impls - known)
        if unknown:
            parser.error(
                f"unknown implementation {unknown[0]!r}; choose from {', '.join(sorted(known))}"
            )
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark; returns the path of the JSON written."""
    args = parse_args(argv)
    device, dtype, size, cfg = common.setup(args)
    batch = args.batch or size.decode_batch
    src_len, steps = args.src_len or size.decode_src_len, args.steps or size.decode_steps
    if not 2 <= steps <= cfg.max_len - 2 or src_len > cfg.max_len:
        raise SystemExit(
            f"--steps must be in [2, {cfg.max_len - 2}] and --src-len <= {cfg.max_len}"
        )
    machine = common.machine_info(device)
    print(
        f"decode_throughput: aiayn vs HF generate, {', '.join(args.searches)} "
        f"(beam {args.beam_size}) on {device.type} ({common.describe_machine(machine)})\n"
        f"  size {size.name}: d_model {cfg.d_model}, {cfg.n_encoder_layers}+{cfg.n_decoder_layers} "
        f"layers, vocab {cfg.src_vocab_size}; {batch} sentences of <= {src_len} tokens, "
        f"exactly {steps} decoder steps each, {args.dtype}; "
        f"{args.warmup} warm-up batches, median of {args.repeats}",
        flush=True,
    )
    ours, theirs = build_pair(cfg, seed=args.seed, device=device)
    ct2_check: ctranslate2_peer.CT2Process | None = None
    ct2_timed: ctranslate2_peer.CT2Process | Exception = RuntimeError("not loaded")
    ct2_folder = tempfile.TemporaryDirectory(prefix="aiayn-ct2-")
    ct2_threads = args.ct2_threads or torch.get_num_threads()
    if CT2 in implementations(device, impls=args.impls):
        try:
            ct2_check, ct2_timed = load_ctranslate2(
                ours, ct2_folder.name, device, dtype, ct2_threads
            )
        except Exception as exc:  # noqa: BLE001 - the peer's rows record it; the rest runs
            traceback.print_exc()
            ct2_timed = exc
    src = make_sources(cfg, batch=batch, src_len=src_len, seed=args.seed + 1).to(device)

    path = common.results_path(args.out, "decode_throughput", device)
    payload: dict[str, Any] = {
        **common.header("decode_throughput", machine, status="running"),
        "settings": {
            "device": device.type,
            "size": size.name,
            "dtype": args.dtype,
            "batch": batch,
            "src_len_max": src_len,
            "src_tokens": int(src.ne(common.PAD_ID).sum()),
            "decoder_steps": steps,
            "beam_size": args.beam_size,
            "length_penalty": LENGTH_PENALTY,
            "searches": args.searches,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "interleave_turns": args.interleave,
            "ct2_threads": ct2_threads,
            "seed": args.seed,
            "equal_length": (
                "greedy: eos banned, exactly `decoder_steps` tokens; beam: eos banned for "
                "decoder_steps - 1 tokens, then forced; both sides"
            ),
        },
        "model_config": cfg.to_dict(),
        "equal_work_check_fp32": None,
        "results": [],
    }
    print("  checking that both sides decode the same tokens (float32) ...", flush=True)
    try:
        check = check_equal_work(
            ours,
            theirs,
            src,
            steps=steps,
            beam_size=args.beam_size,
            searches=args.searches,
            ct2=ct2_check,
        )
    except EqualWorkError as exc:
        # Record why nothing was timed, then stop: timing different work would mislead.
        payload |= {"status": "failed: equal-work check", "error": str(exc)}
        payload["equal_work_check_fp32"] = exc.report
        common.write_json(path, payload)
        raise
    payload["equal_work_check_fp32"] = check
    for search, report in check.items():
        static = report["static_vs_reference"]
        print(
            f"    {search}: {report['identical']}/{report['rows']} identical, "
            f"{report['ties']} float32 ties, {report['mismatches']} other; aiayn-static vs aiayn: "
            + (
                static["error"]
                if "error" in static
                else f"{static['identical']}/{static['rows']} identical, {static['ties']} ties"
            ),
            flush=True,
        )
        if "ctranslate2_vs_reference" in report:
            ct2 = report["ctranslate2_vs_reference"]
            print(
                f"    {search}: CTranslate2 vs aiayn: {ct2['identical']}/{ct2['rows']} identical, "
                f"{ct2['ties']} ties",
                flush=True,
            )
    if dtype != torch.float32:
        ours, theirs = ours.to(dtype), theirs.to(dtype)

    common.write_json(path, payload)
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    runs: dict[str, dict[str, Run]] = {}  # per search: the runs that worked, for --interleave
    for search in args.searches:
        for impl in implementations(device, search, args.impls):
            model = theirs if impl in PEERS else ours
            print(f"  {impl} ({search}) ...", flush=True)
            try:
                if impl == CT2 and isinstance(ct2_timed, Exception):
                    raise ct2_timed
                ct2 = ct2_timed if impl == CT2 else None
                run = make_run(impl, model, src, search, steps, args.beam_size, ct2)
                runs.setdefault(search, {})[impl] = run
                result, outputs[impl, search] = run_case(
                    impl,
                    search,
                    run,
                    device=device,
                    batch=batch,
                    steps=steps,
                    warmup=args.warmup,
                    repeats=args.repeats,
                )
            except Exception as exc:  # report it and go on with the other cases
                traceback.print_exc()
                result = {"impl": impl, "search": search, "error": f"{type(exc).__name__}: {exc}"}
                runs.setdefault(search, {}).pop(impl, None)
            payload["results"].append(result)
            payload["summary"] = summarise(payload["results"])
            common.write_json(path, payload)
        for impl in ("aiayn", "aiayn-static", "hf-generate-static", CT2):
            if (impl, search) in outputs and ("hf-generate", search) in outputs:
                # In the timed dtype (bf16: rounding differs, outputs may differ): for the record.
                agreement = compare_outputs(outputs[impl, search], outputs["hf-generate", search])
                payload.setdefault("agreement_timed_dtype", {})[f"{impl} {search}"] = agreement
                common.write_json(path, payload)
    for search in args.searches if args.interleave else ():
        print(f"  interleaved ({search}): {args.interleave} turns ...", flush=True)
        report = interleave(runs[search], device, args.interleave)
        payload.setdefault("interleaved", {})[search] = report
        common.write_json(path, payload)
    payload["status"] = "complete"
    common.write_json(path, payload)
    for peer in (ct2_check, ct2_timed):  # the same process twice in float32: close is idempotent
        if isinstance(peer, ctranslate2_peer.CT2Process):
            peer.close()
    ct2_folder.cleanup()
    print(f"\n{common.describe_machine(machine)}\n{table(payload['results'], args.beam_size)}")
    for search, speedups in payload.get("summary", {}).items():
        for name, ratio in speedups.items():
            impl, peer = name.split("_speedup_over_")
            print(f"{search}: {impl} is {ratio:.2f}x {peer}")
    for search, report in payload.get("interleaved", {}).items():
        for impl, row in report.items():
            for key, ratio in row.items():
                if key.startswith("speedup_over_"):
                    peer = key.removeprefix("speedup_over_").removesuffix("_median")
                    print(f"{search}, interleaved: {impl} is {ratio:.2f}x {peer}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
