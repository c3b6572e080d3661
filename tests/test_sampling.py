"""Sampling from a causal language model (aiayn.sampling): the filters against Hugging Face's
and by hand, the draws against their distribution, the cached loop against full forward passes."""

from __future__ import annotations

import math

import pytest
import torch

from aiayn.config import TransformerConfig
from aiayn.errors import ConfigError, DataError
from aiayn.lm_heads import CausalLanguageModel
from aiayn.model import Transformer
from aiayn.sampling import filter_logits, sample

PAD, BOS, EOS = 0, 1, 2
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}
pytestmark = pytest.mark.usefixtures("one_thread")


def causal_model(vocab: int = 24, max_len: int = 64, seed: int = 0) -> CausalLanguageModel:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=0,
        n_decoder_layers=2,
        dropout=0.3,  # must be off while sampling
        max_len=max_len,
        pad_id=PAD,
    )
    return CausalLanguageModel(cfg)


# --------------------------------------------------------------------------- the filters


def test_filters_equal_hugging_faces_warpers():
    """Temperature, top-k and top-p applied as transformers' logits warpers apply them, in
    the same order, on 200 random cases (the kept tokens and their logits)."""
    warpers = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        vocab = int(torch.randint(2, 300, (1,), generator=g))
        logits = torch.randn(4, vocab, generator=g) * (5 * float(torch.rand(1, generator=g)) + 0.1)
        temperature = 2 * float(torch.rand(1, generator=g)) + 0.2
        top_k = int(torch.randint(0, vocab + 3, (1,), generator=g))
        top_p = 0.99 * float(torch.rand(1, generator=g)) + 0.01
        expected = warpers.TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = warpers.TopKLogitsWarper(top_k)(None, expected)
        expected = warpers.TopPLogitsWarper(top_p)(None, expected)
        got = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.equal(got.isinf(), expected.isinf()), (vocab, top_k, top_p)
        torch.testing.assert_close(got, expected)


def test_top_k_and_top_p_keep_the_tokens_named_by_hand():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # probabilities, in no order

    def kept(**kw):
        return filter_logits(logits, **kw).isfinite()[0].nonzero().flatten().tolist()

    assert kept(top_k=1) == [1]
    assert kept(top_k=2) == [1, 3]
    assert kept(top_p=0.5) == [1]  # 0.5 alone reaches 0.5
    assert kept(top_p=0.79) == [1, 3]
    assert kept(top_p=0.81) == [0, 1, 3]  # 0.5 + 0.3 < 0.81: 0.15 is needed
    assert kept(top_p=1e-6) == [1]  # the most probable always stays
    assert kept(top_k=3, top_p=0.99) == [0, 1, 3]  # top-k first, then the nucleus of those
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert filter_logits(ties, top_k=1).isfinite().tolist() == [[False, True, True, False]]
    scaled = filter_logits(logits, temperature=0.5)
    torch.testing.assert_close(scaled, logits * 2)


def test_draws_follow_the_filtered_distribution():
    """40,000 draws of one step from fixed logits: each token's frequency within 4 standard
    errors of its filtered, tempered probability, and none outside the filters."""
    logits = torch.tensor([-math.inf, -math.inf, 2.0, 1.0, 0.5, 0.0, -1.0, 3.0])  # pad, bos: out
    model = FixedLogits(logits)
    n = 40_000
    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 4}, {"top_p": 0.8}):
        g = torch.Generator().manual_seed(1)
        prompts = torch.full((n, 1), BOS)
        drawn = torch.tensor(
            sample(model, prompts, max_new_tokens=1, generator=g, **IDS, **kw)
        ).flatten()
        expected = filter_logits(logits[None], **kw).softmax(-1)[0]
        counts = torch.bincount(drawn, minlength=len(logits)).double()
        error = (expected * (1 - expected) / n).sqrt().double()
        assert ((counts / n - expected).abs() <= 4 * error + 1e-9).all(), (kw, counts / n, expected)
        assert (counts[expected == 0] == 0).all()


class FixedLogits(CausalLanguageModel):
    """A causal LM whose every next-token distribution is `logits` (V,), plus `boost` on the
    ids it names: the distribution is known, so the draws can be checked against it."""

    def __init__(self, logits, boost=()):
        super().__init__(causal_model(vocab=len(logits)).cfg)
        self.logits, self.boost = logits, list(boost)

    def decode(self, tgt_ids, memory=None, src_ids=None, cache=None):
        out = super().decode(tgt_ids, cache=cache)  # keeps the cache's length right
        fixed = self.logits.clone()
        fixed[self.boost] += 100.0
        return fixed.expand_as(out).clone()


def test_pad_and_bos_are_never_drawn_and_a_row_ends_at_its_eos():
    logits = torch.zeros(6)
    model = FixedLogits(logits, boost=[PAD, BOS])  # what a half-trained model might favour
    g = torch.Generator().manual_seed(0)
    out = sample(model, torch.full((64, 1), BOS), max_new_tokens=12, generator=g, **IDS)
    assert all(PAD not in row and BOS not in row for row in out)
    ended = [row for row in out if EOS in row]
    assert ended and all(row.index(EOS) == len(row) - 1 for row in ended)  # cut after its eos
    assert all(len(row) == 12 for row in out if EOS not in row)
    model = FixedLogits(logits, boost=[PAD, BOS, EOS])
    out = sample(model, torch.full((2, 1), BOS), max_new_tokens=5, temperature=0, **IDS)
    assert out == [[EOS], [EOS]]


# --------------------------------------------------------------------------- the cached loop


def full_forward_sample(model, prompt, steps, context, temperature, g, **filters):
    """What `sample` must give, without a cache: every step a full forward pass over the
    window, the window restarting from its last context // 2 tokens when it would exceed
    `context` positions."""
    tokens = prompt.tolist()[0]
    start = len(tokens) - context // 2 if len(tokens) > context else 0
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model.decode(torch.tensor([tokens[start:]]))[0, -1].float()
            logits[[PAD, BOS]] = -math.inf
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = filter_logits(logits[None], temperature=temperature, **filters).softmax(-1)
                token = int(torch.multinomial(probs, 1, generator=g))
            new.append(token)
            if token == EOS:
                break
            tokens.append(token)
            if len(tokens) - start > context:
                start = len(tokens) - context // 2
    return new


@pytest.mark.parametrize(
    ("prompt_len", "context", "temperature", "filters"),
    [
        (3, 64, 1.0, {}),  # the model's whole max_len
        (3, 64, 0.0, {}),  # greedy
        (5, 8, 1.3, {"top_k": 10}),  # the window restarts several times
        (11, 8, 0.9, {"top_p": 0.9}),  # a prompt longer than the window
    ],
)
def test_cached_sampling_equals_full_forward_passes(prompt_len, context, temperature, filters):
    model = causal_model()
    model.train()  # sample() must turn dropout off, and put the mode back
    prompt = torch.randint(3, 24, (1, prompt_len), generator=torch.Generator().manual_seed(5))
    prompt[0, 0] = BOS
    g = torch.Generator().manual_seed(7)
    got = sample(
        model,
        prompt,
        max_new_tokens=40,
        temperature=temperature,
        context=context,
        generator=g,
        **IDS,
        **filters,
    )
    assert model.training
    model.eval()
    g.manual_seed(7)
    expected = full_forward_sample(model, prompt, 40, context, temperature, g, **filters)
    assert got == [expected]
    assert len(expected) == 40 or expected[-1] == EOS


@pytest.fixture(scope="module")
def gpt_pair():
    """aiayn's causal LM in the shape of GPT (Radford et al. 2018: post-LN, learned positions,
    unscaled embeddings, the output layer tied to them) and transformers' OpenAIGPTLMHeadModel
    with its weights, both float64. ReLU: HF's GPT "gelu" is the tanh approximation, which
    aiayn does not have. Random weights throughout (norms and biases too), and the last norm
    leaning toward eos, so that rows end at different steps."""
    transformers = pytest.importorskip("transformers")
    vocab, d_model, layers, heads, positions = 40, 32, 2, 4, 48
    cfg = TransformerConfig(
        src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=d_model, n_heads=heads,
        d_ff=4 * d_model, n_encoder_layers=0, n_decoder_layers=layers, dropout=0.0,
        max_len=positions, pad_id=PAD, positions="learned", norm="post", activation="relu",
        scale_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = CausalLanguageModel(cfg).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.3 * torch.randn_like(p))
        eos = ours.tgt_embed.lut.weight[EOS]
        ours.decoder.layers[-1].sublayer[1].norm.bias.add_(3.0 * eos / eos.norm())
    theirs = transformers.OpenAIGPTLMHeadModel(
        transformers.OpenAIGPTConfig(
            vocab_size=vocab,
            n_positions=positions,
            n_embd=d_model,
            n_layer=layers,
            n_head=heads,
            afn="relu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=cfg.layer_norm_eps,
        )
    )
    state = {
        "transformer.tokens_embed.weight": ours.tgt_embed.lut.weight,
        "transformer.positions_embed.weight": ours.positions.embedding.weight,
        "lm_head.weight": ours.generator.weight,
    }
    for i, layer in enumerate(ours.decoder.layers):
        attn, ffn, norms = layer.self_attn, layer.feed_forward, layer.sublayer
        name = f"transformer.h.{i}."
        # GPT's Conv1D computes x @ W + b: its W is nn.Linear's weight transposed.
        state |= {
            name + "attn.c_attn.weight": torch.cat([attn.w_q.weight, attn.w_k.weight, attn.w_v.weight]).T,
            name + "attn.c_attn.bias": torch.cat([attn.w_q.bias, attn.w_k.bias, attn.w_v.bias]),
            name + "attn.c_proj.weight": attn.w_o.weight.T,
            name + "attn.c_proj.bias": attn.w_o.bias,
            name + "ln_1.weight": norms[0].norm.weight,
            name + "ln_1.bias": norms[0].norm.bias,
            name + "mlp.c_fc.weight": ffn.w_1.weight.T,
            name + "mlp.c_fc.bias": ffn.w_1.bias,
            name + "mlp.c_proj.weight": ffn.w_2.weight.T,
            name + "mlp.c_proj.bias": ffn.w_2.bias,
            name + "ln_2.weight": norms[1].norm.weight,
            name + "ln_2.bias": norms[1].norm.bias,
        }  # fmt: skip
    theirs.double().load_state_dict(state)
    return ours, theirs.eval()


def test_a_gpt_shaped_causal_model_equals_hugging_faces_openai_gpt(gpt_pair):
    ours, theirs = gpt_pair
    ids = torch.randint(3, 40, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0},
        {"temperature": 0.8, "top_k": 10},
        {"top_p": 0.9},
        {"temperature": 1.3, "top_k": 5, "top_p": 0.8},
    ],
)
def test_sampling_equals_hugging_faces_generate_token_for_token(gpt_pair, settings):
    """The same weights, the same global seed: `sample` draws the tokens `generate` draws
    (temperature, top-k and top-p as its logits warpers, pad and bos suppressed, rows ending
    at eos and padded after it), through both libraries' key/value caches."""
    ours, theirs = gpt_pair
    prompts = torch.randint(3, 40, (6, 5), generator=torch.Generator().manual_seed(2))
    prompts[:, 0] = BOS
    torch.manual_seed(3)
    got = sample(ours, prompts, max_new_tokens=25, **IDS, **settings)
    greedy = settings["temperature"] == 0 if "temperature" in settings else False
    search = {"do_sample": False} if greedy else {
        "do_sample": True,
        "temperature": settings.get("temperature", 1.0),
        "top_k": settings.get("top_k", 0),  # generate's default is 50
        "top_p": settings.get("top_p", 1.0),
    }  # fmt: skip
    torch.manual_seed(3)
    out = theirs.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=25,
        eos_token_id=EOS,
        pad_token_id=PAD,
        suppress_tokens=[PAD, BOS],
        **search,
    )
    expected = [row[: row.index(EOS) + 1] if EOS in row else row for row in out[:, 5:].tolist()]
    assert got == expected
    if not greedy:  # rows ended at different steps (greedy never picks eos here)
        assert len({len(row) for row in got}) > 1


def test_rows_of_a_batch_are_the_rows_sampled_alone_when_greedy():
    model = causal_model()
    prompts = torch.randint(3, 24, (3, 4), generator=torch.Generator().manual_seed(2))
    prompts[:, 0] = BOS
    args = {"max_new_tokens": 30, "temperature": 0, **IDS}
    together = sample(model, prompts, **args)
    assert together == [sample(model, row[None], **args)[0] for row in prompts]


def test_bad_arguments_are_refused_with_a_clear_line():
    model = causal_model()
    prompt = torch.tensor([[BOS]])
    args = {"max_new_tokens": 5, **IDS}
    for kw, message in [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"context": 1}, "context must be between 2 and the model's max_len 64"),
        ({"context": 65}, "context must be between 2 and the model's max_len 64"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"pad_id": -1}, r"pad_id=-1 is not a token id of the model's vocabulary \[0, 24\)"),
        ({"eos_id": 24}, r"eos_id=24 is not a token id"),
    ]:
        with pytest.raises(ConfigError, match=message):
            sample(model, prompt, **{**args, **kw})
    with pytest.raises(DataError, match="prompt_ids must be a"):
        sample(model, torch.tensor([BOS]), **args)
    with pytest.raises(DataError, match="prompt_ids must be a"):
        sample(model, torch.zeros(1, 0, dtype=torch.long), **args)
    cfg = TransformerConfig(src_vocab_size=24, tgt_vocab_size=24, d_model=16, n_heads=2, d_ff=32,
                            n_encoder_layers=1, n_decoder_layers=1)  # fmt: skip
    with pytest.raises(ConfigError, match="sample needs a decoder-only model"):
        sample(Transformer(cfg), prompt, **args)
