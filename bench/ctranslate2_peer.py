"""CTranslate2, a peer of the decoding benchmark: an aiayn model converted, and its searches.

CTranslate2 (OpenNMT's C++ inference engine for Transformers, ``pip install ctranslate2``) is
what people deploy for fast translation on CPUs and GPUs. It loads models in its own format,
so :func:`to_ctranslate2` writes an aiayn encoder-decoder in it through CTranslate2's public
specification API (``ctranslate2.specs.TransformerSpec``, the documented route for a custom
converter): the same weights, the same sinusoid table, the same LayerNorm epsilon, the same
decoder start token (aiayn's bos; CTranslate2's Marian converter would start from a zero
embedding instead, which is Marian's convention, not ours).

CTranslate2 speaks in token strings: :data:`token_names` names every id, and
:class:`CT2Searches` converts ids to names and back around ``Translator.translate_batch``.

The benchmark runs it in a process of its own (:class:`CT2Process`). CTranslate2's wheel
brings its own copy of the GNU OpenMP runtime, so a process that also runs PyTorch holds two
thread pools; on this project's 2-core CPU, once CTranslate2 had run with 2 threads next to
PyTorch's pool, both slowed down for the rest of the process (measured 2026-11-27, greedy,
16 sentences: CTranslate2 222 ms a batch with 2 threads against 77 with 1, and aiayn's
fixed-shape search 177 ms after it against 58 before it). Apart, neither sees the other's
pool, as for a user who runs one of them.

Equal work (see `bench.decode_throughput`): every search is forced to its length with
``min_decoding_length = max_decoding_length``. Greedy search decodes exactly L tokens, as aiayn
and Hugging Face do. Their beam search decodes L - 1 tokens and then a forced eos: L decoder
steps. CTranslate2 has no forced end token, so its beam search decodes L tokens (L steps, the
same work) and :meth:`CT2Searches.decode` returns the first L - 1 tokens of its best
hypothesis; its beam outputs are compared with aiayn's for the record only (the last step
ranks differently: any token there, against eos alone).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bench import common

if TYPE_CHECKING:
    from aiayn.model import Transformer


def available() -> bool:
    """Whether the ``ctranslate2`` package can be imported here."""
    return importlib.util.find_spec("ctranslate2") is not None


def compute_type(dtype: torch.dtype, device: str) -> str | None:
    """CTranslate2's name for `dtype`, or None where it does not compute in it on `device`."""
    import ctranslate2

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    return name if name in ctranslate2.get_supported_compute_types(device) else None


def token_names(vocab_size: int) -> list[str]:
    """A name for every id: the benchmark's special ids by their usual names, ``w<id>`` else."""
    special = {common.PAD_ID: "<pad>", common.BOS_ID: "<s>", common.EOS_ID: "</s>"}
    return [special.get(i, f"w{i}") for i in range(vocab_size)]


def _numpy(t: Tensor) -> Any:
    """A float32 NumPy copy (CTranslate2 stores float32 and converts when it loads)."""
    return t.detach().float().cpu().numpy()


def _linear(spec: Any, *linears: nn.Linear) -> None:
    """Fill a LinearSpec with one or several (stacked) nn.Linear layers."""
    spec.weight = _numpy(torch.cat([linear.weight for linear in linears]))
    spec.bias = _numpy(torch.cat([linear.bias for linear in linears]))


def _norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _numpy(norm.weight), _numpy(norm.bias)


def to_ctranslate2(model: Transformer, out_dir: str | Path) -> Path:
    """Write `model` (an encoder-decoder, post- or pre-LN, sinusoidal or learned positions,
    ReLU/GELU/SiLU) as a CTranslate2 model folder; returns the folder.

    Raises ValueError for what CTranslate2's Transformer cannot hold (an embedding LayerNorm,
    a decoder without cross-attention).
    """
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.cfg
    if model.encoder is None or model.decoder is None:
        raise ValueError("CTranslate2's Transformer needs an encoder and a decoder")
    if cfg.embedding_norm:
        raise ValueError("this converter does not carry an embedding LayerNorm")
    activation = {
        "relu": common_spec.Activation.RELU,
        "gelu": common_spec.Activation.GELU,
        "silu": common_spec.Activation.SWISH,
    }[cfg.activation]
    pre_norm = cfg.norm == "pre"
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers),
        cfg.n_heads,
        pre_norm=pre_norm,
        activation=activation,
    )
    table = model.positions(0, cfg.max_len).detach()  # (max_len, d), as the model adds it
    for side, embed, stack in (
        (spec.encoder, model.src_embed, model.encoder),
        (spec.decoder, model.tgt_embed, model.decoder),
    ):
        embeddings = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        embeddings.weight = _numpy(embed.lut.weight)
        side.scale_embeddings = float(embed.scale)
        side.position_encodings.encodings = _numpy(table)
        if pre_norm:
            _norm(side.layer_norm, stack.norm)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers, strict=True):
        attn = layer.self_attn
        _linear(layer_spec.self_attention.linear[0], attn.w_q, attn.w_k, attn.w_v)
        _linear(layer_spec.self_attention.linear[1], attn.w_o)
        _norm(layer_spec.self_attention.layer_norm, layer.sublayer[0].norm)
        _linear(layer_spec.ffn.linear_0, layer.feed_forward.w_1)
        _linear(layer_spec.ffn.linear_1, layer.feed_forward.w_2)
        _norm(layer_spec.ffn.layer_norm, layer.sublayer[1].norm)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder.layers, strict=True):
        attn, cross = layer.self_attn, layer.cross_attn
        _linear(layer_spec.self_attention.linear[0], attn.w_q, attn.w_k, attn.w_v)
        _linear(layer_spec.self_attention.linear[1], attn.w_o)
        _norm(layer_spec.self_attention.layer_norm, layer.sublayer[0].norm)
        _linear(layer_spec.attention.linear[0], cross.w_q)
        _linear(layer_spec.attention.linear[1], cross.w_k, cross.w_v)
        _linear(layer_spec.attention.linear[2], cross.w_o)
        _norm(layer_spec.attention.layer_norm, layer.sublayer[1].norm)
        _linear(layer_spec.ffn.linear_0, layer.feed_forward.w_1)
        _linear(layer_spec.ffn.linear_1, layer.feed_forward.w_2)
        _norm(layer_spec.ffn.layer_norm, layer.sublayer[2].norm)
    generator = model.generator
    spec.decoder.projection.weight = _numpy(generator.weight)
    if generator.bias is not None:
        spec.decoder.projection.bias = _numpy(generator.bias)
    spec.register_source_vocabulary(token_names(cfg.src_vocab_size))
    spec.register_target_vocabulary(token_names(cfg.tgt_vocab_size))
    spec.config.layer_norm_epsilon = cfg.layer_norm_eps
    spec.config.decoder_start_token = token_names(cfg.tgt_vocab_size)[common.BOS_ID]
    # CTranslate2 needs a vocabulary entry for its unknown token; every id here has a name, so
    # nothing is ever unknown: the pad token (banned in every search) stands in.
    spec.config.unk_token = token_names(cfg.tgt_vocab_size)[common.PAD_ID]
    spec.validate()
    spec.optimize(quantization=None)
    out = Path(out_dir)
    spec.save(str(out))
    return out


class CT2Searches:
    """Greedy and beam search of a CTranslate2 ``Translator``, on id tensors, forced lengths.

    Args:
        folder: a model written by :func:`to_ctranslate2`.
        vocab_size: its vocabulary's size (source and target: the benchmark shares one).
        device: "cpu" or "cuda".
        threads: intra-op threads on a CPU (``torch.get_num_threads()``: what the others use).
        compute_type: CTranslate2's compute type (see :func:`compute_type`).
    """

    def __init__(
        self, folder: Path, *, vocab_size: int, device: str, threads: int, compute_type: str
    ) -> None:
        import ctranslate2

        self.translator = ctranslate2.Translator(
            str(folder),
            device=device,
            compute_type=compute_type,
            inter_threads=1,
            intra_threads=threads if device == "cpu" else 0,
        )
        self.names = token_names(vocab_size)
        self.ids = {name: i for i, name in enumerate(self.names)}

    def decode(
        self, src: Tensor, search: str, steps: int, beam_size: int, length_penalty: float
    ) -> list[list[int]]:
        """(B, S) right-padded source ids -> B outputs as aiayn returns them: ids without the
        start token or eos; `steps` decoder steps each (see the module docstring)."""
        names = self.names
        sources = [[names[i] for i in row if i != common.PAD_ID] for row in src.tolist()]
        results = self.translator.translate_batch(
            sources,
            beam_size=1 if search == "greedy" else beam_size,
            max_decoding_length=steps,
            min_decoding_length=steps,
            length_penalty=length_penalty,
            suppress_sequences=[[names[common.PAD_ID]], [names[common.BOS_ID]]],
            max_input_length=0,
        )
        ids = self.ids
        keep = steps if search == "greedy" else steps - 1
        return [[ids[token] for token in result.hypotheses[0][:keep]] for result in results]


def _serve(conn: Any, folder: str, options: dict[str, Any]) -> None:
    """The loop of a :class:`CT2Process`: build the searches, then decode what comes in (the
    arguments of :meth:`CT2Searches.decode`, the source as lists) until None comes."""
    try:
        searches = CT2Searches(Path(folder), **options)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    conn.send("ready")
    while (request := conn.recv()) is not None:
        src, *rest = request
        try:
            conn.send(searches.decode(torch.tensor(src, dtype=torch.long), *rest))
        except Exception as exc:  # noqa: BLE001
            conn.send(f"{type(exc).__name__}: {exc}")


class CT2Process:
    """:class:`CT2Searches` (same arguments, same :meth:`decode`) in a process of its own:
    PyTorch's OpenMP threads and CTranslate2's never share one (see the module docstring).
    A call sends the source ids and gets the outputs back through a pipe: lists of a few
    hundred integers, a fraction of a millisecond against a batch's tens.
    """

    def __init__(
        self, folder: Path, *, vocab_size: int, device: str, threads: int, compute_type: str
    ) -> None:
        options = dict(
            vocab_size=vocab_size, device=device, threads=threads, compute_type=compute_type
        )
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no shared pools
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, str(folder), options), daemon=True
        )
        self._process.start()
        child.close()
        reply = self._receive()
        if reply != "ready":
            self.close()
            raise RuntimeError(f"CTranslate2 could not load {folder}: {reply}")

    def _receive(self) -> Any:
        try:
            return self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the CTranslate2 process ended (exit code {self._process.exitcode})"
            ) from None

    def decode(
        self, src: Tensor, search: str, steps: int, beam_size: int, length_penalty: float
    ) -> list[list[int]]:
        """:meth:`CT2Searches.decode`, in the other process."""
        self._conn.send((src.tolist(), search, steps, beam_size, length_penalty))
        reply = self._receive()
        if isinstance(reply, str):
            raise RuntimeError(f"CTranslate2: {reply}")
        return reply

    def close(self) -> None:
        """End the process (it also ends with this one: it is a daemon)."""
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
        self._conn.close()
