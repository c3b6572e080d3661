"""Smoke tests of the benchmark suite in bench/: tiny sizes, one timed call, a CPU.

Each script's main function runs and writes well-formed JSON with the expected keys; aiayn and
Hugging Face generate decode token-identical greedy outputs of exactly the forced length on
the same weights (the equal-work check); the FLOPs formula matches the model's own matrices.
No test ever asserts a time or a speed-up: those are measured by bench/run_cpu.sh and
bench/gpu.sh, on machines that are idle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# Set before transformers is imported: everything here is local, nothing may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
# bench/ is a package at the repository root, not part of the installed aiayn package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiayn.dropout  # noqa: E402
import aiayn.model  # noqa: E402
import aiayn.train  # noqa: E402
from aiayn import static_decoding  # noqa: E402
from aiayn.frozen_decoder import FrozenDecoder  # noqa: E402
from aiayn.model import Transformer  # noqa: E402
from aiayn.static_decoding import StaticDecoding  # noqa: E402
from bench import (  # noqa: E402
    common,
    decode_floor,
    decode_throughput,
    interleaved,
    optimizer_step,
    padding,
    train_kernels,
    train_throughput,
)

FAST = ["--device", "cpu", "--size", "tiny", "--warmup", "0", "--repeats", "1"]

TRAIN_RESULT_KEYS = {
    "model",
    "mode",
    "params",
    "params_trainable",
    "step_s_median",
    "step_s_repeats",
    "step_s_spread",
    "first_step_s",
    "tgt_tokens_per_s",
    "tokens_per_s",
    "model_flops_per_s",
    "mfu",
    "peak_mem_mib",
    "loss_first",
    "loss_last",
}
DECODE_RESULT_KEYS = {
    "impl",
    "search",
    "batch_s_median",
    "batch_s_repeats",
    "batch_s_spread",
    "sentences_per_s",
    "output_tokens_per_s",
    "peak_mem_mib",
}


def _check_common_keys(data: dict, benchmark: str) -> None:
    assert data["benchmark"] == benchmark
    assert data["status"] == "complete"
    machine = data["machine"]
    for key in ("cpu", "torch", "torch_threads", "transformers", "gpu", "load_average_1_5_15"):
        assert key in machine, key
    assert machine["gpu"] is None and machine["torch"] == torch.__version__
    assert data["settings"]["device"] == "cpu" and data["settings"]["size"] == "tiny"
    assert data["model_config"]["d_model"] == 32


def test_train_throughput_writes_json(tmp_path: Path, one_thread) -> None:
    path = train_throughput.main([*FAST, "--matmul-size", "64", "--out", str(tmp_path)])
    assert path.parent == tmp_path and path.name.startswith("train_throughput-cpu-")
    data = json.loads(path.read_text(encoding="utf-8"))
    _check_common_keys(data, "train_throughput")
    assert data["flops_per_step"]["total"] > 0 and data["matmul_rate"]["flops_per_s"] > 0
    results = data["results"]
    # Every model, eager, but the GPU's compiled-only row.
    assert [(r["model"], r["mode"]) for r in results] == [
        (name, "eager") for name in train_throughput.MODELS if name != "aiayn-cuda-graphs"
    ]
    for r in results:
        assert "error" not in r, r.get("error")
        assert TRAIN_RESULT_KEYS <= set(r), TRAIN_RESULT_KEYS - set(r)
        assert len(r["step_s_repeats"]) == 1 and r["step_s_median"] > 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    # The same architecture: the three models train exactly as many parameters.
    assert len({r["params_trainable"] for r in results}) == 1
    assert set(data["summary"]) == {"aiayn eager vs peers eager"}


def test_decode_throughput_writes_json(tmp_path: Path, one_thread) -> None:
    path = decode_throughput.main([*FAST, "--interleave", "2", "--out", str(tmp_path)])
    assert path.parent == tmp_path and path.name.startswith("decode_throughput-cpu-")
    data = json.loads(path.read_text(encoding="utf-8"))
    _check_common_keys(data, "decode_throughput")
    check = data["equal_work_check_fp32"]
    rows = data["settings"]["batch"]
    assert check["greedy"]["identical"] == rows and check["greedy"]["mismatches"] == 0
    for search in decode_throughput.SEARCHES:
        # The fixed-shape search gives the reference search's outputs.
        assert check[search]["static_vs_reference"]["identical"] == rows
    if decode_throughput.CT2 in decode_throughput.implementations(torch.device("cpu")):
        # The CTranslate2 peer decodes the same weights to the same greedy outputs.
        assert check["greedy"]["ctranslate2_vs_reference"]["identical"] == rows
    results = data["results"]
    assert [(r["impl"], r["search"]) for r in results] == [
        (impl, search)
        for search in decode_throughput.SEARCHES
        for impl in decode_throughput.implementations(torch.device("cpu"))
    ]
    for r in results:
        assert "error" not in r, r.get("error")
        assert DECODE_RESULT_KEYS <= set(r), DECODE_RESULT_KEYS - set(r)
        assert r["batch_s_median"] > 0
    assert set(data["summary"]) == set(decode_throughput.SEARCHES)
    # Interleaved: every implementation decoded 2 batches, each ours with its ratio per peer.
    for search, report in data["interleaved"].items():
        rows = set(decode_throughput.implementations(torch.device("cpu")))
        assert set(report) == rows, search
        for impl, row in report.items():
            assert len(row["batch_s_turns"]) == 2 and row["batch_s_median"] > 0
            ratios = {k for k in row if k.startswith("speedup_over_")}
            peers = set() if impl in decode_throughput.PEERS else set(decode_throughput.PEERS)
            assert ratios == {f"speedup_over_{p}_median" for p in peers}
            assert all(row[k] > 0 for k in ratios)


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = common.SIZES["tiny"].config()
    ours, theirs = decode_throughput.build_pair(cfg, seed=0, device=torch.device("cpu"))
    src = decode_throughput.make_sources(cfg, batch=4, src_len=8, seed=1)
    return ours, theirs, src


def test_decode_throughput_runs_only_the_rows_asked_for(tmp_path: Path, one_thread) -> None:
    """--impls: the rows named, in their usual order, and always hf-generate, the peer."""
    path = decode_throughput.main(
        [*FAST, "--searches", "greedy", "--impls", "aiayn-static", "--out", str(tmp_path)]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [r["impl"] for r in data["results"]] == ["aiayn-static", "hf-generate"]
    with pytest.raises(SystemExit):
        decode_throughput.parse_args(["--impls", "aiayn-static,nonesuch"])


def test_greedy_outputs_identical_to_hf_generate(tiny_pair, one_thread) -> None:
    """The equal-work check: the same weights, the same tokens, the same forced length."""
    ours, theirs, src = tiny_pair
    steps = 7
    mine = decode_throughput.aiayn_decode(ours, src, "greedy", steps, beam_size=4)
    sequences = decode_throughput.hf_generate(theirs, src, "greedy", steps, beam_size=4)
    other = decode_throughput.hf_outputs(sequences, "greedy")
    assert mine == other
    assert {len(row) for row in mine} == {steps}
    assert common.EOS_ID not in {token for row in mine for token in row}
    assert len({token for row in mine for token in row}) > 1, "a degenerate check: one token"


def test_beam_outputs_have_the_forced_length(tiny_pair, one_thread) -> None:
    """Beam: steps - 1 tokens then the forced eos, on both sides, and the same best outputs."""
    ours, theirs, src = tiny_pair
    steps = 7
    report = decode_throughput.check_equal_work(
        ours, theirs, src, steps=steps, beam_size=4, searches=("greedy", "beam")
    )
    assert report["greedy"]["identical"] == report["greedy"]["rows"] == len(src)
    assert report["beam"]["identical"] == len(src)  # tiny and float32: no near-ties either
    mine = decode_throughput.aiayn_decode(ours, src, "beam", steps, beam_size=4)
    assert {len(row) for row in mine} == {steps - 1}


def test_gpu_before_rows_decode_as_before_with_the_same_outputs(
    tiny_pair, one_thread, monkeypatch
) -> None:
    """The GPU's before rows: `aiayn-static-one-window` (both searches) builds its plans with
    one window of positions, the whole cache; `aiayn-static-one-buffer` (beam search only)
    with the cache reordered in place; `aiayn-static-one-topk` (beam only) takes the
    candidates by one top-k; `aiayn-static-repeated-memory` (beam only) keeps the memory's
    keys/values for every beam; and the candidate `aiayn-static-written-attention` (both)
    writes one query's attention out; all give aiayn-static's outputs."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    one_window, one_buffer = decode_throughput.ONE_WINDOW, decode_throughput.ONE_BUFFER
    one_topk, repeated = decode_throughput.ONE_TOPK, decode_throughput.REPEATED_MEMORY
    written = decode_throughput.WRITTEN_ATTENTION
    beam_rows = {one_window, one_buffer, one_topk, repeated, written}
    assert beam_rows <= set(decode_throughput.implementations(cuda, "beam"))
    greedy_rows = decode_throughput.implementations(cuda, "greedy")
    assert {one_window, written} <= set(greedy_rows)
    assert not {one_buffer, one_topk, repeated} & set(greedy_rows)
    assert not beam_rows & set(decode_throughput.implementations(cpu, "beam"))
    ours, _, src = tiny_pair
    plans = []
    real_init = static_decoding._Plan.__init__

    def recording_init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        cache = self.state.cache
        plans.append((len(self.windows), len(cache._buffers), cache.beams))

    monkeypatch.setattr(static_decoding._Plan, "__init__", recording_init)
    monkeypatch.setattr(static_decoding, "_FIRST_WINDOW", 2)  # several windows for 6 steps
    monkeypatch.setattr(  # the GPU's step (the model's modules), on this CPU
        decode_throughput, "StaticDecoding", functools.partial(StaticDecoding, frozen=False)
    )
    one_topk_calls = []
    real_one_topk = decode_throughput.one_topk_candidates

    def recording_one_topk(*args):
        one_topk_calls.append(len(plans))
        return real_one_topk(*args)

    monkeypatch.setitem(
        decode_throughput.GPU_VARIANTS,
        one_topk,
        (static_decoding._Plan, "_candidates", recording_one_topk),
    )
    for search, rows in (("greedy", greedy_rows), ("beam", sorted(beam_rows))):
        rows = ("aiayn-static", *(r for r in rows if r in decode_throughput.GPU_VARIANTS))
        outputs = [decode_throughput.make_run(impl, ours, src, search, 6, 4)()[0] for impl in rows]
        assert all(o == outputs[0] for o in outputs[1:]), search
    # (windows, buffers, rows sharing the memory) of each plan, in order: greedy, greedy
    # one-window, greedy written-attention; beam, then the other rows by name: one-buffer,
    # one-topk, one-window, repeated-memory, written-attention.
    assert plans == [
        (3, 1, 1),
        (1, 1, 1),
        (3, 1, 1),
        (3, 2, 4),
        (3, 1, 4),
        (3, 2, 4),
        (1, 2, 4),
        (3, 2, 1),
        (3, 2, 4),
    ]
    assert set(one_topk_calls) == {6}  # the one-topk row's steps (its plan: the 6th), only


def test_written_attention_row_writes_out_one_querys_attention(
    tiny_pair, one_thread, monkeypatch
) -> None:
    """The candidate row computes every one-query attention of the search with eq. (1)
    written out (`aiayn.model.scaled_dot_product_attention`); aiayn-static with PyTorch's
    fused kernel (the GPU's step, the model's modules, here on the CPU)."""
    ours, _, src = tiny_pair
    monkeypatch.setattr(
        decode_throughput, "StaticDecoding", functools.partial(StaticDecoding, frozen=False)
    )
    queries: dict[str, list[int]] = {}
    written_out = aiayn.model.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        queries[impl].append(q.size(-2))
        return written_out(q, *args, **kwargs)

    monkeypatch.setattr(aiayn.model, "scaled_dot_product_attention", recording)
    for impl in ("aiayn-static", decode_throughput.WRITTEN_ATTENTION):
        queries[impl] = []
        decode_throughput.make_run(impl, ours, src, "greedy", 6, 4)()
    layers = ours.cfg.n_decoder_layers
    assert queries == {
        "aiayn-static": [],
        decode_throughput.WRITTEN_ATTENTION: [1] * (6 * 2 * layers),  # 6 steps, self + cross
    }


def test_a_different_token_is_a_mismatch_not_a_tie(tiny_pair, one_thread) -> None:
    ours, _, src = tiny_pair
    mine = decode_throughput.aiayn_decode(ours, src, "greedy", 5, beam_size=4)
    changed = [list(row) for row in mine]
    # Replace row 1's third token by the least likely word after its prefix: far from a tie.
    tgt = torch.tensor([[common.BOS_ID, *mine[1][:2]]])
    with torch.no_grad():
        logits = ours(src[1:2], tgt)[0, -1]
    changed[1][2] = int(logits[common.FIRST_WORD_ID :].argmin()) + common.FIRST_WORD_ID
    report = decode_throughput.compare_outputs(mine, changed, ours, src)
    assert (report["identical"], report["ties"], report["mismatches"]) == (len(src) - 1, 0, 1)
    assert report["first_mismatch"]["row"] == 1 and report["first_mismatch"]["step"] == 2
    with pytest.raises(decode_throughput.EqualWorkError, match="lengths"):
        decode_throughput.check_lengths([row[:-1] for row in mine], None, "greedy", 5)


def test_different_greedy_outputs_stop_the_run(tmp_path: Path, monkeypatch, one_thread) -> None:
    """A benchmark that compares different work is worthless: nothing is timed, and the JSON
    says why."""
    real = decode_throughput.hf_outputs

    def one_token_off(sequences: torch.Tensor, search: str) -> list[list[int]]:
        rows = real(sequences, search)
        rows[0][0] = common.FIRST_WORD_ID if rows[0][0] != common.FIRST_WORD_ID else 4
        return rows

    monkeypatch.setattr(decode_throughput, "hf_outputs", one_token_off)
    with pytest.raises(decode_throughput.EqualWorkError, match="greedy outputs differ"):
        decode_throughput.main([*FAST, "--out", str(tmp_path)])
    (path,) = tmp_path.glob("decode_throughput-cpu-*.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["status"] == "failed: equal-work check" and data["results"] == []
    assert data["equal_work_check_fp32"]["greedy"]["mismatches"] == 1


def test_train_step_flops_match_the_models_matrices() -> None:
    """6 x (matrix parameters each token passes through) x tokens + the attention term."""
    cfg = common.SIZES["tiny"].config()
    model = Transformer(cfg)

    def matrices(module: nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    cross_kv = sum(
        matrices(layer.cross_attn.w_k) + matrices(layer.cross_attn.w_v)
        for layer in model.decoder.layers
    )
    per_src = matrices(model.encoder) + cross_kv
    per_tgt = matrices(model.decoder) - cross_kv + model.generator.weight.numel()
    batch, src_len, tgt_len = 3, 5, 7
    flops = common.train_step_flops(cfg, batch, src_len, tgt_len)
    assert (flops["params_touched_src"], flops["params_touched_tgt"]) == (per_src, per_tgt)
    assert flops["dense"] == 6 * batch * (src_len * per_src + tgt_len * per_tgt)
    # Q K^T and A V: 2 x 2 x T_q x T_k x d_model forward per layer, x 3 with the backward pass.
    attention = 3 * 4 * batch * cfg.d_model
    attention *= cfg.n_encoder_layers * src_len**2 + cfg.n_decoder_layers * (
        tgt_len**2 + tgt_len * src_len
    )
    assert flops["attention"] == attention
    assert flops["total"] == flops["dense"] + flops["attention"]


@pytest.mark.parametrize("script", ["run_cpu.sh", "gpu.sh"])
def test_suite_scripts_print_what_they_run(script: str, tmp_path: Path) -> None:
    path = ROOT / "bench" / script
    assert os.access(path, os.X_OK), f"bench/{script} must be executable"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path)}
    out = subprocess.run(
        ["bash", str(path)], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "-m bench.train_throughput" in out and "-m bench.decode_throughput" in out
    assert str(tmp_path) in out  # results go to $OUT when it is set


@pytest.mark.slow
def test_train_throughput_compiled(tmp_path: Path, one_thread) -> None:
    """torch.compile'd training runs for every model (minutes on a CPU: compilation)."""
    path = train_throughput.main(
        [*FAST, "--modes", "compile", "--matmul-size", "64", "--out", str(tmp_path)]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    # Every model but the rows that compiled on a CPU are aiayn itself (its dropout is
    # F.dropout, its loss the compiled one, never in place; CUDA graphs need a GPU).
    same_as_aiayn = ("aiayn-torch-dropout", "aiayn-new-grad-memory", "aiayn-cuda-graphs")
    models = [m for m in train_throughput.MODELS if m not in same_as_aiayn]
    assert [(r["model"], r["mode"]) for r in data["results"]] == [(m, "compile") for m in models]
    assert all("error" not in r for r in data["results"])


def test_train_throughput_rounds_take_the_median_over_rounds(tmp_path: Path, one_thread) -> None:
    path = train_throughput.main(
        [*FAST, "--matmul-size", "64", "--models", "aiayn,nn.Transformer", "--rounds", "3"]
        + ["--out", str(tmp_path)]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["settings"]["rounds"] == 3
    assert [(r["model"], r["round"]) for r in data["results"]] == [
        (name, k) for k in (1, 2, 3) for name in ("aiayn", "nn.Transformer")
    ]
    for case in data["cases"]:
        rows = [r for r in data["results"] if r["model"] == case["model"]]
        assert case["step_s_rounds"] == [r["step_s_median"] for r in rows]
        assert case["step_s_median"] == sorted(case["step_s_rounds"])[1]
        assert len(case["step_s_repeats"]) == 3
        # Rates follow the combined time.
        assert case["tgt_tokens_per_s"] * case["step_s_median"] == pytest.approx(
            rows[0]["tgt_tokens_per_s"] * rows[0]["step_s_median"]
        )
    summary = data["summary"]["aiayn eager vs peers eager"]
    ours, peer = (
        next(c for c in data["cases"] if c["model"] == m) for m in ("aiayn", "nn.Transformer")
    )
    assert summary["aiayn_speedup"] == pytest.approx(peer["step_s_median"] / ours["step_s_median"])
    assert summary["per_round"] == pytest.approx(
        [
            p["step_s_median"] / o["step_s_median"]
            for o, p in zip(data["results"][0::2], data["results"][1::2], strict=True)
        ]
    )


def calls_in_two_steps(
    monkeypatch, owner: object, attr: str, names: tuple[str, ...], cfg, dtype: torch.dtype
) -> dict[str, int]:
    """How many times each model row calls `owner.attr` in two training steps on the CPU."""
    calls: list[None] = []
    original = getattr(owner, attr)

    def counting(*args, **kwargs):
        calls.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, counting)
    cpu = torch.device("cpu")
    batches = train_throughput.make_batches(
        cfg, batch=2, src_len=8, tgt_len=8, count=1, seed=0, device=cpu
    )
    counts = {}
    for name in names:
        step = train_throughput.TrainingStep(
            name, "eager", cfg, batches, device=cpu, dtype=dtype, label_smoothing=0.1, seed=0
        )
        calls.clear()
        step()
        step()
        counts[name] = len(calls)
    return counts


def test_sdpa_only_row_is_the_before_of_the_cpu_half_precision_choice(monkeypatch) -> None:
    """In CPU bf16 training aiayn writes attention out; the row aiayn-sdpa-only does not."""
    cfg = common.SIZES["tiny"].config()
    counts = calls_in_two_steps(
        monkeypatch,
        torch.nn.functional,
        "scaled_dot_product_attention",
        ("aiayn", "aiayn-sdpa-only"),
        cfg,
        torch.bfloat16,
    )
    layers = cfg.n_encoder_layers + 2 * cfg.n_decoder_layers  # attention calls per forward
    assert counts == {"aiayn": 0, "aiayn-sdpa-only": 2 * layers}


def test_torch_dropout_row_is_the_before_of_the_cpu_dropout_mask(monkeypatch) -> None:
    """On a CPU aiayn draws its own dropout masks; the row aiayn-torch-dropout calls F.dropout."""
    cfg = dataclasses.replace(common.SIZES["tiny"].config(), dropout=0.1)
    counts = calls_in_two_steps(
        monkeypatch,
        aiayn.dropout.F,
        "dropout",
        ("aiayn", "aiayn-torch-dropout"),
        cfg,
        torch.float32,
    )
    # Embedding sums (2), and every sub-layer's output: two per encoder layer, three per
    # decoder layer.
    per_forward = 2 + 2 * cfg.n_encoder_layers + 3 * cfg.n_decoder_layers
    assert counts == {"aiayn": 0, "aiayn-torch-dropout": 2 * per_forward}


def tiny_training_steps(names: tuple[str, ...], mode: str):
    """(name, TrainingStep) of each benchmark row, at the tiny size on the CPU, built in turn."""
    cfg = common.SIZES["tiny"].config()
    cpu = torch.device("cpu")
    batches = train_throughput.make_batches(
        cfg, batch=2, src_len=4, tgt_len=4, count=1, seed=0, device=cpu
    )
    for name in names:
        yield (
            name,
            train_throughput.TrainingStep(
                name,
                mode,
                cfg,
                batches,
                device=cpu,
                dtype=torch.float32,
                label_smoothing=0.1,
                seed=0,
            ),
        )


def test_new_grad_memory_row_is_the_before_of_the_gradient_over_the_logits(monkeypatch) -> None:
    """aiayn's loss writes its gradient over the logits, as the Trainer's does; the row
    aiayn-new-grad-memory writes it into new memory."""
    asked: list[bool] = []  # inplace_backward of each loss computed, in order
    original = train_throughput.label_smoothed_nll

    def spy(*args, inplace_backward: bool = False, **kwargs):
        asked.append(inplace_backward)
        return original(*args, inplace_backward=inplace_backward, **kwargs)

    monkeypatch.setattr(train_throughput, "label_smoothed_nll", spy)
    for _, step in tiny_training_steps(("aiayn", "aiayn-new-grad-memory"), "eager"):
        step()
    assert asked == [True, False]


def test_aiayn_rows_take_the_trainers_loss(monkeypatch) -> None:
    """Eager, aiayn's loss is its default (`fused=None`: compiled on a GPU, by blocks on a
    CPU); compiled, the compiled loss (`train.compile`'s); the peers' row never asks."""
    asked: list[bool | None] = []
    original = train_throughput.label_smoothed_nll

    def spy(*args, fused=None, **kwargs):
        asked.append(fused)
        return original(*args, fused=False, **kwargs)  # no compiler needed here

    monkeypatch.setattr(train_throughput, "label_smoothed_nll", spy)
    monkeypatch.setattr(train_throughput.torch, "compile", lambda model, mode=None: model)
    for mode in ("eager", "compile"):
        for _, step in tiny_training_steps(("aiayn", "aiayn-unfused-loss"), mode):
            step()
    assert asked == [None, True]


def test_before_rows_that_would_repeat_aiayn_are_not_run() -> None:
    def skipped(device: torch.device) -> list[tuple[str, str]]:
        return [
            (name, mode)
            for name in train_throughput.MODELS
            for mode in train_throughput.MODES
            if not train_throughput.differs_from_aiayn(name, mode, device)
        ]

    # Compiled, aiayn's dropout is F.dropout on every device; CUDA graphs are a GPU's and
    # need a compiled model.
    assert skipped(torch.device("cpu")) == [
        ("aiayn-torch-dropout", "compile"),
        ("aiayn-new-grad-memory", "compile"),
        ("aiayn-cuda-graphs", "eager"),
        ("aiayn-cuda-graphs", "compile"),
    ]
    # On a GPU aiayn's eager loss is its compiled one (since session 11): the peers' differs.
    assert skipped(torch.device("cuda")) == [
        ("aiayn-torch-dropout", "eager"),
        ("aiayn-torch-dropout", "compile"),
        ("aiayn-new-grad-memory", "eager"),
        ("aiayn-new-grad-memory", "compile"),
        ("aiayn-sdpa-only", "eager"),
        ("aiayn-sdpa-only", "compile"),
        ("aiayn-cuda-graphs", "eager"),
    ]


def test_cuda_graphs_row_compiles_with_reduce_overhead(monkeypatch) -> None:
    """aiayn-cuda-graphs is aiayn compiled with mode="reduce-overhead"; the other compiled rows
    with the default mode; interleaved leaves it out where it would repeat aiayn."""
    modes = {}
    monkeypatch.setattr(
        train_throughput.torch, "compile", lambda model, mode=None: modes.setdefault(mode, model)
    )
    list(tiny_training_steps(("aiayn", "aiayn-cuda-graphs"), "compile"))
    assert set(modes) == {None, "reduce-overhead"}


def test_interleaved_steps_give_ratios_to_aiayn_in_the_same_turn(tmp_path: Path, one_thread):
    path = interleaved.main(
        [*FAST[:4], "--steps", "3", "--warmup", "0", "--models", "aiayn,nn.Transformer"]
        + ["--out", str(tmp_path)]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["benchmark"] == "interleaved" and data["status"] == "complete"
    ours, peer = data["results"]
    assert [ours["model"], peer["model"]] == ["aiayn", "nn.Transformer"]
    assert len(peer["step_s_turns"]) == 3 and ours["vs_aiayn_median_ratio"] == 1.0
    ratios = sorted(p / o for p, o in zip(peer["step_s_turns"], ours["step_s_turns"], strict=True))
    assert peer["vs_aiayn_median_ratio"] == pytest.approx(ratios[1])
    assert peer["step_s_q1"] <= peer["step_s_median"] <= peer["step_s_q3"]
    assert data["settings"]["order"] == "shuffled" and len(data["turn_orders"]) == 3
    with pytest.raises(SystemExit):
        interleaved.main(["--device", "cpu", "--size", "tiny", "--models", "nn.Transformer"])
    assert data["settings"]["mode"] == "eager"
    # A row that would repeat aiayn on this machine is left out.
    path = interleaved.main(
        [*FAST[:4], "--steps", "1", "--warmup", "0", "--models", "aiayn,aiayn-cuda-graphs"]
        + ["--out", str(tmp_path / "again")]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [r["model"] for r in data["results"]] == ["aiayn"]


def test_interleaved_also_times_steps_in_a_row(tmp_path: Path, one_thread, monkeypatch):
    """--in-a-row K: every turn also runs K steps of each model one after another and records
    their time / K, with ratios to aiayn's K steps of the same turn, apart from the steps
    timed one at a time."""
    made = []

    class Recorded(train_throughput.TrainingStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(interleaved, "TrainingStep", Recorded)
    path = interleaved.main(
        [*FAST[:4], "--steps", "3", "--warmup", "0", "--models", "aiayn,nn.Transformer"]
        + ["--in-a-row", "2", "--out", str(tmp_path)]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["settings"]["in_a_row"] == 2
    # Each turn: one step timed alone, then two in a row.
    assert [step.calls for step in made] == [3 * (1 + 2)] * 2
    ours, peer = data["results_in_a_row"]
    assert [ours["model"], peer["model"]] == ["aiayn", "nn.Transformer"]
    assert len(peer["step_s_turns"]) == 3 and ours["vs_aiayn_median_ratio"] == 1.0
    ratios = sorted(p / o for p, o in zip(peer["step_s_turns"], ours["step_s_turns"], strict=True))
    assert peer["vs_aiayn_median_ratio"] == pytest.approx(ratios[1])
    assert [r["model"] for r in data["results"]] == ["aiayn", "nn.Transformer"]
    assert len(data["results"][1]["step_s_turns"]) == 3
    # Off by default: no such results.
    path = interleaved.main(
        [*FAST[:4], "--steps", "1", "--warmup", "0", "--models", "aiayn"]
        + ["--out", str(tmp_path / "off")]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert "results_in_a_row" not in data and data["settings"]["in_a_row"] == 0
    with pytest.raises(SystemExit):
        interleaved.main([*FAST[:4], "--models", "aiayn", "--in-a-row", "-1"])


def test_profile_train_splits_the_device_time_of_the_kernels_alone(capsys) -> None:
    """profile_train on a CPU prints each model's table and its split; the split's classes
    come from the kernel (or operator) names, and on a GPU only the device's own events
    count: the operators that launch kernels repeat their times."""
    from bench import profile_train

    profile_train.main([*FAST[:4], "--models", "aiayn", "--mode", "eager", "--steps", "1"])
    out = capsys.readouterr().out
    assert "=== aiayn (eager" in out and "aiayn: wall" in out and "matrix products" in out
    names = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matrix products",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16": "attention",
        "triton_per_fused__to_copy_add_native_dropout_native_layer_norm_0": "compiled (triton)",
        "void at::native::vectorized_elementwise_kernel<4>": "other",
    }
    assert {name: profile_train.kernel_class(name) for name in names} == names

    class Event:
        def __init__(self, key, device_type, us, annotation=False):
            self.key, self.device_type, self.is_user_annotation = key, device_type, annotation
            self.self_device_time_total, self.self_cpu_time_total = us, 0.0

    class Prof:
        def key_averages(self):
            cuda, cpu = profile_train.DeviceType.CUDA, profile_train.DeviceType.CPU
            return [
                Event("aten::mm", cpu, 300.0),  # the operator: its kernel's time again
                Event("nvjet_sm90_gemm", cuda, 300.0),
                Event("triton_poi_fused_relu_0", cuda, 100.0),
                Event("triton_poi_fused_relu_0", cuda, 100.0, annotation=True),
            ]

    assert profile_train.split(Prof(), 2, on_gpu=True) == {
        "matrix products": 150.0,
        "compiled (triton)": 50.0,
    }


def test_interleaved_turns_are_shuffled_reproducibly_unless_fixed() -> None:
    models = ["aiayn", "aiayn-torch-dropout", "nn.Transformer", "hf-marian"]
    shuffled = interleaved.turn_orders(models, 20, shuffled=True, seed=0)
    assert all(sorted(order) == sorted(models) for order in shuffled)
    assert len({tuple(order) for order in shuffled}) > 1  # not one order every turn
    assert shuffled == interleaved.turn_orders(models, 20, shuffled=True, seed=0)
    assert interleaved.turn_orders(models, 3, shuffled=False, seed=0) == [models] * 3


def test_optimizer_step_times_both_adamw_kinds(tmp_path: Path, one_thread) -> None:
    path = optimizer_step.main(
        [*FAST[:4], "--turns", "2", "--repeats", "1", "--out", str(tmp_path)]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    per_turn = data["step_s_median_per_turn"]
    assert set(per_turn) == {"fused", "multi-tensor"}
    assert all(len(v) == 2 and min(v) > 0 for v in per_turn.values())


def test_padding_shares_count_the_padded_positions_of_each_side() -> None:
    # Budget 8 takes the first two (longest side 4: 2 x 4 <= 8); the third, alone, has none.
    lengths = [(2, 3), (4, 3), (5, 5)]
    shares = padding.padding_shares(lengths, max_tokens=8, seed=0)
    assert shares["batches"] == 2
    assert shares["source_padding"] == pytest.approx(1 - 11 / 13)  # (2 + 4 + 5) of (8 + 5)
    assert shares["target_padding"] == pytest.approx(0.0)  # (3 + 3 + 5) of (6 + 5)


def test_padding_counts_a_corpus_and_writes_json(tmp_path: Path) -> None:
    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("ein hund\nzwei kleine katzen laufen\nein\n", encoding="utf-8")
    tgt.write_text("a dog\ntwo small cats run\none\n", encoding="utf-8")
    path = padding.main(
        ["--src", str(src), "--tgt", str(tgt), "--vocab-size", "60", "--max-tokens", "8,64"]
        + ["--out", str(tmp_path)]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["pairs"] == 3 and [r["max_tokens"] for r in data["results"]] == [8, 64]
    for r in data["results"]:
        assert 0 <= r["source_padding"] < 1 and 0 <= r["target_padding"] < 1


def test_train_kernels_times_both_sides_of_every_pair(tmp_path: Path, one_thread) -> None:
    path = train_kernels.main(
        [*FAST[:4], "--turns", "1", "--repeats", "1", "--matmul-size", "16", "--out", str(tmp_path)]
    )
    results = json.loads(path.read_text(encoding="utf-8"))["seconds_median_per_turn"]
    assert len(results) == 9  # loss, attention fwd+bwd, attention fwd, dropout: x 2 dtypes; matmul
    for pair in results.values():
        assert len(pair) == 2 and all(len(v) == 1 and v[0] > 0 for v in pair.values())


def test_train_kernels_times_the_compiled_losses_when_asked(
    tmp_path: Path, one_thread, monkeypatch
) -> None:
    """`--compile-loss` (bench/gpu.sh's) adds the two compiled losses in both dtypes; here
    uncompiled (tests/test_train.py checks the compiled loss itself)."""
    compiled = []
    monkeypatch.setattr(train_kernels.torch, "compile", lambda f: compiled.append(f) or f)
    path = train_kernels.main(
        [*FAST[:4], "--turns", "1", "--repeats", "1", "--matmul-size", "16", "--compile-loss"]
        + ["--out", str(tmp_path)]
    )
    results = json.loads(path.read_text(encoding="utf-8"))["seconds_median_per_turn"]
    pairs = {case: pair for case, pair in results.items() if case.startswith("compiled loss")}
    assert len(results) == 11 and len(pairs) == 2
    for pair in pairs.values():
        assert set(pair) == {"compiled F.cross_entropy", "compiled row sums"}
    assert (
        compiled == [aiayn.train._label_smoothed_nll, aiayn.train._label_smoothed_nll_by_rows] * 2
    )


def test_demo_decode_times_both_searches_on_a_trained_demo(tmp_path: Path, one_thread) -> None:
    """bench/demo_decode.py on a tiny demo run: both searches, identical outputs, a JSON."""
    from aiayn.tasks.demo import DemoConfig, run_demo
    from bench import demo_decode

    tiny = DemoConfig(
        n_train=200, n_valid=10, n_test=30, d_model=32, n_heads=2, d_ff=64, n_layers=1,
        max_steps=4, max_tokens=256, warmup_steps=2, eval_every=0, n_examples=2,
    )  # fmt: skip
    run_demo(tmp_path / "demo", tiny, progress=False)
    path = demo_decode.main(
        [
            "--run",
            str(tmp_path / "demo" / "run"),
            "--turns",
            "1",
            "--batch",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["status"] == "complete" and data["settings"]["numbers"] == tiny.n_test
    assert set(data["results"]) == {"greedy", "beam 4"}
    for row in data["results"].values():
        assert len(row["seconds"]["reference"]) == len(row["seconds"]["static"]) == 1
        assert row["reference_over_static_median"] > 0 and row["output_tokens"] >= 0


class _MatrixProducts(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (operation, shapes of the two factors) of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kind = {"mm": "mm", "addmm": "mm", "bmm": "bmm", "baddbmm": "bmm"}.get(name)
        if kind is not None:
            first, second = args[1:3] if name.startswith(("addmm", "baddbmm")) else args[:2]
            self.seen.append((kind, tuple(first.shape), tuple(second.shape)))
        return func(*args, **(kwargs or {}))


def test_decode_floor_times_the_frozen_decoders_own_products(one_thread) -> None:
    """The floor's products are a greedy step's products: one step of `step_products` runs the
    same (N, d_in) x (d_in, d_out) products as `FrozenDecoder.logits`, which also runs the
    attention's batched products (not part of the floor)."""
    torch.manual_seed(0)
    model = Transformer(common.SIZES["tiny"].config()).eval()
    frozen = FrozenDecoder(model)
    rows, src_len = 3, 5
    src = torch.randint(3, model.cfg.src_vocab_size, (rows, src_len))
    cache = frozen.new_cache(rows, 4, src_len)
    with torch.inference_mode():
        cache.load(model, model.encode(src), torch.ones(rows, 1, 1, src_len, dtype=torch.bool), 1)
        with _MatrixProducts() as step:
            frozen.logits(
                torch.full((rows,), 1), cache, frozen.output_bias_banning(torch.tensor([0]))
            )
        with _MatrixProducts() as floor:
            decode_floor.step_products(frozen, rows, steps=1)()
    products = sorted(p for p in step.seen if p[0] == "mm")
    assert products == sorted(floor.seen)
    assert len(products) == 6 * model.cfg.n_decoder_layers + 1
    assert {p[0] for p in step.seen} == {"mm", "bmm"}  # the rest: attention


def test_decode_floor_writes_the_bound_it_prints(tmp_path: Path, one_thread) -> None:
    path = decode_floor.main([*FAST[:4], "--turns", "2", "--out", str(tmp_path)])
    result = json.loads(path.read_text(encoding="utf-8"))["result"]
    ms = result["ms_per_batch"]
    assert set(ms) == {"aiayn-static", "hf-generate", "load", "products"}
    assert all(len(v) == 2 and min(v) > 0 for v in result["ms_per_batch_all_turns"].values())
    assert result["floor_ms"] == pytest.approx(ms["load"] + ms["products"])
    assert result["floor_x_generate"] == pytest.approx(ms["hf-generate"] / result["floor_ms"])
    with pytest.raises(SystemExit):
        decode_floor.main([*FAST[:4], "--dtype", "bf16", "--out", str(tmp_path)])


def test_data_memory_counts_both_layouts_in_processes_of_their_own(tmp_path: Path) -> None:
    from bench import data_memory

    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("ein hund\nzwei kleine katzen laufen\nein\n" * 20, encoding="utf-8")
    tgt.write_text("a dog\ntwo small cats run\none\n" * 20, encoding="utf-8")
    data_memory.main(["--src", str(src), "--tgt", str(tgt), "--pairs", "300", "--vocab-size",
                      "60", "--max-len", "4", "--out-dir", str(tmp_path)])  # fmt: skip
    (path,) = tmp_path.glob("data_memory-cpu-*.json")
    rows = json.loads(path.read_text(encoding="utf-8"))["results"]
    assert [r["layout"] for r in rows] == ["lists", "packed"]
    # The same pairs, cut alike (a third of them have 4 words: more than 3 ids), batched alike.
    assert rows[0]["tokens"] == rows[1]["tokens"] and rows[0]["pairs"] == rows[1]["pairs"] == 300
    assert rows[0]["cut_to_max_len"] == rows[1]["cut_to_max_len"] >= 100
    assert rows[0]["batches"] == rows[1]["batches"]


def test_source_reliance_sees_a_decoder_that_ignores_its_source(
    tmp_path: Path, toy_config, one_thread
) -> None:
    """The loss with moved sources equals the loss with the own ones exactly when the decoder
    cannot see the source (cross-attention's output projection zeroed), and differs otherwise."""
    from aiayn.data.tokenizer import Tokenizer
    from aiayn.experiment import Experiment
    from aiayn.model import TransformerConfig
    from bench.source_reliance import pair_losses

    exp = Experiment.from_yaml(toy_config(tmp_path / "toy.yaml", tmp_path / "run"))
    texts = [line for side in ("valid_src", "valid_tgt") for line in
             Path(exp.data[side]).read_text(encoding="utf-8").splitlines()]  # fmt: skip
    tok = Tokenizer.train(texts, vocab_size=60, min_frequency=1)
    torch.manual_seed(0)
    cfg = TransformerConfig(src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size,
                            d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1,
                            n_decoder_layers=1, dropout=0.0, max_len=64)  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():
        own, moved = pair_losses(exp, model, tok)
        assert own != moved
        for layer in model.decoder.layers:
            layer.cross_attn.w_o.weight.zero_()
            layer.cross_attn.w_o.bias.zero_()
        own, moved = pair_losses(exp, model, tok)
    assert own == moved
