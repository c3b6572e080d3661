"""What every benchmark of the suite shares: sizes, timing, memory, FLOPs, the machine, the output.

The method (docs/performance.md says it at length):

* **Warm-up, then medians.** Each case runs ``warmup`` untimed calls (module loading, kernel
  selection, ``torch.compile``'s compilation, allocator growth), then ``repeats`` timed ones;
  the median is the number, and every repeat is kept in the JSON to show the spread.
* **Device time, honestly.** CUDA work is asynchronous: on a GPU each call is bracketed by
  CUDA events recorded on the stream, and the device is synchronised before the events are
  read; on a CPU a monotonic host clock is enough.
* **Same work.** Peers get the same configuration, batch (token ids drawn once, from a seed),
  dtype and optimiser, and are measured one after the other in the same process.
* **MFU** = model FLOPs per second / this device's measured matrix-product rate in the run's
  compute dtype (measured in the same run by :func:`matmul_rate`, not a datasheet figure).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aiayn.config import TransformerConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = ROOT / "bench" / "results"

# Token ids shared by every model of the suite (aiayn's defaults): pad 0, bos 1, eos 2.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Random batches draw ids from [FIRST_WORD_ID, vocab): no pad, bos or eos inside a sentence.
FIRST_WORD_ID = 3

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Size:
    """A model size and the default batch shapes benchmarked at it.

    Attributes:
        name: ``tiny`` (tests), ``small`` (CPU) or ``base`` (GPU, the paper's base model).
        preset: the `TransformerConfig` preset the model starts from.
        overrides: changes to the preset.
        train_batch, train_src_len, train_tgt_len: training batch (B sentences of S and T tokens).
        decode_batch, decode_src_len, decode_steps: decoding batch and its forced output length
            (decoder steps per sentence; see bench/decode_throughput.py).
    """

    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    train_batch: int = 32
    train_src_len: int = 32
    train_tgt_len: int = 32
    decode_batch: int = 16
    decode_src_len: int = 24
    decode_steps: int = 24

    def config(self) -> TransformerConfig:
        """The model configuration of this size."""
        return TransformerConfig.from_preset(self.preset, **self.overrides)


SIZES: dict[str, Size] = {
    # Seconds on a CPU: for the smoke tests only, never for numbers.
    "tiny": Size(
        "tiny",
        "tiny",
        train_batch=2,
        train_src_len=8,
        train_tgt_len=8,
        decode_batch=3,
        decode_src_len=8,
        decode_steps=6,
    ),
    # The CPU size: d_model 256, 3+3 layers, a shared vocabulary of 8k (d_k = 64 as in the paper).
    "small": Size(
        "small",
        "base",
        dict(
            d_model=256,
            n_heads=4,
            d_ff=1024,
            n_encoder_layers=3,
            n_decoder_layers=3,
            vocab_size=8000,
        ),
        train_batch=32,
        train_src_len=32,
        train_tgt_len=32,
        decode_batch=16,
        decode_src_len=24,
        decode_steps=24,
    ),
    # The paper's base model (Table 3) with its 37k shared vocabulary; 256 x 64 + 256 x 64 tokens.
    "base": Size(
        "base",
        "base",
        train_batch=256,
        train_src_len=64,
        train_tgt_len=64,
        decode_batch=64,
        decode_src_len=48,
        decode_steps=48,
    ),
}


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell two result files' machines apart (and a loaded one from an idle one)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # A busy machine gives slow, noisy numbers: the load says whether this one was idle.
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_multiprocessors": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    else:
        info["gpu"] = None
    return info


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; a clear error instead of a failure deep inside the first kernel."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to this PyTorch build")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """Use `threads` intra-op CPU threads (None: PyTorch's default, one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: --device, --size, --dtype, --threads, --seed, --out."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results)")


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, Size, TransformerConfig]:
    """The device (checked), threads set, dtype, size and model config that the options name."""
    device = resolve_device(args.device)
    set_threads(args.threads)
    size = SIZES[args.size]
    return device, DTYPES[args.dtype], size, size.config()


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int
) -> list[float]:
    """Seconds per call of `fn`: `warmup` untimed calls, then `repeats` timed ones.

    On a GPU each call is bracketed by CUDA events recorded on the current stream, and all
    events are read after one synchronisation at the end: the host never waits between calls,
    so the measurement does not add idle gaps, and the GPU time of every call is counted
    whether or not `fn` itself synchronises.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]  # ms -> s
    times = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start_s)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile (the median thrice for one value)."""
    if len(values) < 2:
        return (float(values[0]),) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return float(q1), float(q2), float(q3)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart the repeats are; compare speed-ups against it."""
    mid = median(values)
    return (max(values) - min(values)) / mid if mid > 0 else 0.0


def _malloc_trim() -> None:
    """Hand the C allocator's free memory back to the system (glibc only; else nothing).

    Freed tensors stay in glibc's free lists, part of the resident set: without a trim, the
    case that runs first would be charged memory that later cases reuse without growing it.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_memory(device: torch.device) -> None:
    """Drop what the previous case left, so that the next case's memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


# --------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


class PeakMemory:
    """The peak memory one case adds over what was in use when it started, in MiB.

    * GPU: ``torch.cuda.max_memory_allocated`` (tensors, exact) after resetting the peak,
      minus what was allocated at the start (the shared batches).
    * CPU: the process's peak resident set (Linux ``VmHWM``, reset by writing 5 to
      /proc/self/clear_refs) minus its resident set at the start. Process-wide and including
      the allocator's free lists, so an approximation; None where the peak cannot be reset.

    Call :meth:`start` before the case builds its model, :meth:`peak_mib` after its last call.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline: int | None = None  # bytes

    def start(self) -> None:
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # "reset the peak resident set size" (proc(5))
        except OSError:
            self.baseline = None
            return
        rss = _proc_status_kib("VmRSS")
        self.baseline = rss * 1024 if rss is not None else None

    def peak_mib(self) -> float | None:
        if self.baseline is None:
            return None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kib("VmHWM")
            if hwm is None:
                return None
            peak = hwm * 1024
        return round(max(peak - self.baseline, 0) / 2**20, 1)


# --------------------------------------------------------------------------- FLOPs and MFU


def matmul_rate(
    device: torch.device, dtype: torch.dtype, *, n: int, warmup: int = 3, repeats: int = 10
) -> dict[str, Any]:
    """This device's measured rate of an n x n x n matrix product in `dtype`, in FLOP/s.

    The MFU denominator: measured in the same run as the models, not read off a datasheet.
    Random inputs (zeros run faster than real data on some GPUs), two input sets used in
    turn, so that a product small enough for the cache cannot reuse the previous one's inputs.
    """
    generator = torch.Generator(device=device).manual_seed(0)  # drawn where they are used
    pairs = [
        tuple(torch.randn(n, n, generator=generator, device=device, dtype=dtype) for _ in "ab")
        for _ in range(2)
    ]
    calls = 0

    def product() -> torch.Tensor:
        nonlocal calls
        a, b = pairs[calls % 2]
        calls += 1
        return a @ b

    times = time_fn(product, device, warmup=warmup, repeats=repeats)
    flops = 2.0 * n**3
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "flops_per_s": flops / median(times),
        "repeats_s": times,
    }


FLOPS_FORMULA = (
    "6 * B * (S * P_src + T * P_tgt) + 12 * B * d_model * (L_enc * S^2 + L_dec * (T^2 + T * S)), "
    "P_src = L_enc * (4 d^2 + 2 d d_ff) + L_dec * 2 d^2 (cross-attention K, V of the memory), "
    "P_tgt = L_dec * (6 d^2 + 2 d d_ff) + d * V (tied output layer)"
)


def train_step_flops(
    cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int
) -> dict[str, Any]:
    """Model FLOPs of one training step (forward + backward) of an encoder-decoder Transformer.

    A weight matrix of m x n multiplies each token that passes through it: 2 m n FLOPs
    forward, twice that backward (gradients of the input and of the weight), so
    6 x (matrix parameters a token passes through) x tokens in all. Source tokens pass
    through the encoder and the decoder's cross-attention key/value projections (which
    project the memory); target tokens through the rest of the decoder and the output layer
    (tied to the embedding, but a full d x V product). Attention adds, per layer, Q K^T and
    A V: 2 x 2 x T_q x T_k x d_model forward, times 3 with the backward pass; the causal
    self-attention is counted in full (the PaLM convention), as most kernels compute it.

    Not counted: embedding look-ups (gathers), biases, LayerNorm, softmax, dropout, the loss
    and the optimiser (all O(tokens x d_model) or O(parameters)). See FLOPS_FORMULA.

    Returns:
        ``total``, ``dense`` and ``attention`` FLOPs, ``params_touched_src/tgt`` per token,
        and the ``formula``.
    """
    d, d_ff, vocab = cfg.d_model, cfg.d_ff, cfg.tgt_vocab_size
    l_enc, l_dec = cfg.n_encoder_layers, cfg.n_decoder_layers
    # Matrix parameters each source / target token passes through.
    per_src = l_enc * (4 * d * d + 2 * d * d_ff) + l_dec * 2 * d * d
    per_tgt = l_dec * (4 * d * d + 2 * d * d + 2 * d * d_ff) + d * vocab
    dense = 6 * batch * (src_len * per_src + tgt_len * per_tgt)
    attention = 3 * 4 * batch * d * (l_enc * src_len**2 + l_dec * (tgt_len**2 + tgt_len * src_len))
    return {
        "total": float(dense + attention),
        "dense": float(dense),
        "attention": float(attention),
        "params_touched_src": per_src,
        "params_touched_tgt": per_tgt,
        "formula": FLOPS_FORMULA,
    }


# --------------------------------------------------------------------------- inputs


def random_ids(
    batch: int, length: int, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """(batch, length) word ids in [FIRST_WORD_ID, vocab_size): no special tokens."""
    return torch.randint(FIRST_WORD_ID, vocab_size, (batch, length), generator=generator)


# --------------------------------------------------------------------------- output


def timestamp() -> str:
    """Local date and time for file names: 2025-11-26T134501 (no characters a file system minds)."""
    return dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")


def results_path(out_dir: str | Path | None, name: str, device: torch.device) -> Path:
    """``<out_dir>/<name>-<device>-<date>T<time>.json`` (default out_dir: bench/results)."""
    folder = Path(out_dir) if out_dir is not None else DEFAULT_RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{device.type}-{timestamp()}.json"


def header(benchmark: str, machine: dict[str, Any], status: str | None = None) -> dict[str, Any]:
    """The first keys of every results JSON: which benchmark, when, (how far), on what."""
    created = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    head: dict[str, Any] = {"benchmark": benchmark, "created": created}
    if status is not None:
        head["status"] = status
    return {**head, "machine": machine}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` atomically: the file is rewritten after every case, and a run killed
    by its time limit must leave the last complete version, not half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table: thousands separated, '-' when missing."""
    return "-" if value is None else f"{value:,.{digits}f}"


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the top of a printed table."""
    where = info["gpu"] or f"{info['cpu']} ({info['torch_threads']} threads)"
    load = info.get("load_average_1_5_15")
    load_text = f", load {load[0]:.2f}" if load else ""
    return f"{where}; torch {info['torch']}, transformers {info['transformers']}{load_text}"
