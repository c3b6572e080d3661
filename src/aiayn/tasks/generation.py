"""Text from a pre-trained causal language model: what `aiayn generate` runs.

`TextGenerator.from_checkpoint(run_dir)` loads a checkpoint of `aiayn train
configs/pretrain_causal.yaml` (task `pretrain`, `data.objective: causal`) with its
tokenizer, and `generate(prompts)` continues each prompt with :func:`aiayn.sampling.sample`.
A prompt starts a new document, `<s> prompt`, as the training documents did; the empty
prompt asks for a document from its start.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from aiayn import checkpoint as ckpt
from aiayn.config import TransformerConfig
from aiayn.data.tokenizer import Tokenizer
from aiayn.errors import CheckpointError, ConfigError
from aiayn.lm_heads import CausalLanguageModel
from aiayn.sampling import check_sampling, sample
from aiayn.tasks.pretrain import TOKENIZER_FILE
from aiayn.tasks.translation import load_resolved, task_model

logger = logging.getLogger(__name__)

__all__ = ["TextGenerator"]


class TextGenerator:
    """A causal language model with its tokenizer: prompts in, continued texts out.

    `context` is the most positions the model sees at once: the run's training window
    (``data.block_size``), where a sample past it starts its window again (see
    :mod:`aiayn.sampling`).
    """

    def __init__(self, model: CausalLanguageModel, tokenizer: Tokenizer, context: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context = min(context, model.cfg.max_len)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> TextGenerator:
        """Load a checkpoint directory, or a run directory (its best, else its latest checkpoint)."""
        return load_resolved(path, lambda found: cls._load(found, device))

    @classmethod
    def _load(cls, path: Path, device: str) -> TextGenerator:
        run = ckpt.load_checkpoint(path).config
        objective = run.get("data", {}).get("objective") if run.get("task") == "pretrain" else None
        if objective != "causal":
            what = f"a {objective!r} pre-training model" if objective else task_model(run)
            raise CheckpointError(
                f"{path} holds {what}, not a causal language model; pass a checkpoint of "
                "`aiayn train` with data.objective: causal (configs/pretrain_causal.yaml)"
            )
        model = CausalLanguageModel(TransformerConfig.from_dict(ckpt.model_section(run, path)))
        ckpt.load_checkpoint(path, model=model)
        tokenizer_path = path / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise CheckpointError(
                f"{path} has no {TOKENIZER_FILE}; it was not saved by `aiayn train`: copy "
                f"the {TOKENIZER_FILE} of its run directory into it"
            )
        tokenizer = Tokenizer.load(tokenizer_path)
        if tokenizer.vocab_size != model.cfg.tgt_vocab_size:
            raise CheckpointError(
                f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model expects "
                f"{model.cfg.tgt_vocab_size}: the tokenizer belongs to another run"
            )
        context = int(run["data"].get("block_size", model.cfg.max_len))
        return cls(model.to(device).eval(), tokenizer, context)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
    ) -> list[list[str]]:
        """`num_samples` texts for each prompt: the prompt as written (its trailing
        whitespace, which the tokenizer strips, left out) and its continuation.

        A prompt's samples are drawn from a generator seeded by (`seed`, the prompt's ids)
        (`prompt_seed`), so a prompt gets the same texts whatever other prompts come with it.
        """
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device)
        texts = []
        for prompt in prompts:
            ids = tok.encode(prompt)
            if len(ids) + 1 > self.context:  # sample() reads the last half of the window
                logger.info(
                    "a prompt of %d tokens fills the model's %d-position window; the "
                    "continuation sees its last %d",
                    len(ids) + 1,
                    self.context,
                    self.context // 2,
                )
            prompt_ids = torch.tensor([[tok.bos_id, *ids]] * num_samples, device=device)
            generator.manual_seed(prompt_seed(seed, ids))
            continuations = sample(
                self.model,
                prompt_ids,
                max_new_tokens=max_new_tokens,
                bos_id=tok.bos_id,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                context=self.context,
                generator=generator,
            )
            head = tok.decode(ids)
            texts.append([_continued(prompt, head, tok.decode(ids + new)) for new in continuations])
        return texts


def prompt_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """The seed of one prompt's draws, from a hash of (seed, the prompt's ids): the same for a
    prompt whatever prompts come with it (and for two spellings the tokenizer reads alike),
    and unrelated between prompts (one seed for all would draw the same random numbers for
    each, and similar prompts the same continuation)."""
    digest = hashlib.blake2b(repr((seed, list(prompt_ids))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are below 2**63


def _continued(prompt: str, head: str, text: str) -> str:
    """The prompt as written (its trailing whitespace left out) and what `text` (the prompt's
    ids and their continuation, decoded) adds to `head` (the prompt's ids decoded), so that
    characters the vocabulary lacks stay in the prompt; `text` itself where it does not start
    with `head` (a decoder that joins tokens across the prompt's end)."""
    return prompt.rstrip() + text[len(head) :] if text.startswith(head) else text
