"""Text from a decoder-only language model: sampling with temperature, top-k and top-p.

A causal language model (`aiayn.lm_heads.CausalLanguageModel`, pre-trained with
`data.objective: causal`) gives the next token's distribution given the tokens so far.
:func:`sample` draws a continuation of a prompt from it one token at a time, with the
model's key/value cache (`Transformer.new_cache`): each step feeds one new position, as
the searches of :mod:`aiayn.decoding` do for translation.

The next token's distribution is reshaped first, in this order (Hugging Face's):

* **temperature** T: logits / T. Below 1 sharpens the distribution, above 1 flattens it;
  ``temperature=0`` takes the most probable token (greedy decoding: no randomness).
* **top-k** (Fan et al. 2018): only the k most probable tokens may be drawn.
* **top-p**, nucleus sampling (Holtzman et al. 2020): only the smallest set of most probable
  tokens whose probabilities sum to at least p may be drawn.

**Context.** A causal model is trained on windows of a fixed number of positions (a run's
``data.block_size``); positions past that were never seen. When a sample's window holds
``context`` positions and one more token comes, the cache is rebuilt from the last
``context // 2`` tokens, which then start again at position 0, as a training window starts
anywhere in the text (a prompt longer than ``context`` is read from its last half too).
Generation can so go on past the model's ``max_len``, each token seeing at least
``context // 2`` tokens of past.

pad and bos are never drawn; a row ends at its first eos (kept in its output).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aiayn.decoding import _banned_ids, _eval_mode
from aiayn.errors import ConfigError, DataError
from aiayn.model import Transformer

__all__ = ["check_sampling", "filter_logits", "sample"]


def check_sampling(*, temperature: float, top_k: int, top_p: float) -> None:
    """Refuse settings with no meaning, with a line that says which values are allowed."""
    if not 0 <= temperature < math.inf:
        raise ConfigError(
            f"temperature must be a finite number >= 0 (0: always the most probable token), "
            f"got {temperature}"
        )
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1: off), got {top_p}")


def filter_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Logits (N, V) divided by `temperature`, -inf for every token outside the top-k and the
    nucleus of probability `top_p` (a new tensor; `top_k` 0 and `top_p` 1 are off).

    At least one token, the most probable, always stays. `temperature` must be > 0 here:
    temperature 0 is greedy decoding, which :func:`sample` does with an argmax.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        raise ConfigError("filter_logits needs a temperature > 0 (0 is greedy: take the argmax)")
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (N, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th stay
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # A token stays when the tokens more probable than it hold less than top_p: the
        # first one whose running sum reaches top_p is the last one in the nucleus.
        outside = probs.cumsum(dim=-1) - probs >= top_p  # (N, V), in order of probability
        outside[..., 0] = False
        outside = torch.empty_like(outside).scatter_(-1, order, outside)  # in vocabulary order
        logits = logits.masked_fill(outside, float("-inf"))
    return logits


def sample(
    model: Transformer,
    prompt_ids: Tensor,
    *,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    context: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt row with tokens drawn from the model, one position at a time.

    Args:
        model: a decoder-only `Transformer` (n_encoder_layers=0), e.g. a causal LM.
        prompt_ids: (B, P) token ids, P >= 1, on the model's device. A new document starts
            with bos, as in training; several samples of one prompt are B copies of it.
        max_new_tokens: the most tokens drawn for a row (its eos included).
        bos_id, eos_id, pad_id: the tokenizer's; pad and bos are never drawn.
        temperature, top_k, top_p: how the distribution is reshaped (see the module
            docstring); temperature 0 is greedy decoding.
        context: the most positions the model sees at once (default its max_len); a run's
            window, ``data.block_size``, is what it was trained on.
        generator: the random numbers' source, on the model's device (default: the global one).

    Returns:
        B lists of new token ids, each ending at its first eos or after max_new_tokens.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if model.encoder is not None or model.decoder is None:
        raise ConfigError(
            "sample needs a decoder-only model (n_encoder_layers: 0), such as one pre-trained "
            "with data.objective: causal; translate with aiayn.decoding instead"
        )
    if prompt_ids.dim() != 2 or prompt_ids.size(1) < 1:
        raise DataError(
            f"prompt_ids must be a (batch, length >= 1) tensor of ids, got shape "
            f"{tuple(prompt_ids.shape)}; start a new text with the bos id"
        )
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = model.cfg.max_len if context is None else context
    if not 2 <= context <= model.cfg.max_len:
        raise ConfigError(
            f"context must be between 2 and the model's max_len {model.cfg.max_len}, got {context}"
        )
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if not 0 <= value < model.cfg.tgt_vocab_size:  # a negative id would ban another token
            raise ConfigError(
                f"{name}={value} is not a token id of the model's vocabulary "
                f"[0, {model.cfg.tgt_vocab_size}): pass the tokenizer's id"
            )
    keep = context // 2  # what a full window keeps when it starts again
    banned = _banned_ids(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, device=prompt_ids.device)
    rows = prompt_ids.size(0)
    new: list[Tensor] = []  # (B,) per step
    done = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
    with _eval_mode(model), torch.inference_mode():
        window = prompt_ids if prompt_ids.size(1) <= context else prompt_ids[:, -keep:]
        cache = model.new_cache()
        logits = model.decode(window, cache=cache)[:, -1]  # (B, V)
        for _ in range(max_new_tokens):
            # In at least float32 (a half-precision model's logits), float64 kept.
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            logits = logits.index_fill(-1, banned, float("-inf"))
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                # The largest logit made 0 first: a tiny temperature then sends the others to
                # -inf rather than every one to +-inf (whose differences are NaN).
                logits = logits - logits.amax(dim=-1, keepdim=True)
                probs = filter_logits(
                    logits, temperature=temperature, top_k=top_k, top_p=top_p
                ).softmax(dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            token = token.masked_fill(done, pad_id)  # a finished row only pads
            new.append(token)
            done |= token == eos_id
            if len(new) == max_new_tokens or bool(done.all()):
                break
            if cache.length < context:
                logits = model.decode(token[:, None], cache=cache)[:, -1]
            else:  # the window is full: start it again from its last `keep` tokens
                recent = torch.cat([prompt_ids, torch.stack(new, dim=1)], dim=1)[:, -keep:]
                cache = model.new_cache()
                logits = model.decode(recent, cache=cache)[:, -1]
    outputs = torch.stack(new, dim=1).tolist()  # (B, steps)
    return [ids[: ids.index(eos_id) + 1] if eos_id in ids else ids for ids in outputs]
