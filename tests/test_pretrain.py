"""Pre-training: BERT masking, T5 span corruption, the causal LM, the three objectives through
`aiayn train`, checkpoints a plain Transformer loads, exact resume, configs and bad input."""

import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from aiayn import checkpoint as ckpt
from aiayn.cli import main
from aiayn.config import TransformerConfig
from aiayn.data.pretraining import (
    chunk_documents,
    concat_and_chunk,
    corrupt_spans,
    mask_tokens,
    max_spans,
    read_documents,
    restore_spans,
    span_counts,
)
from aiayn.data.tokenizer import MASK, Tokenizer, sentinel
from aiayn.errors import ConfigError, DataError
from aiayn.experiment import Experiment
from aiayn.lm_heads import MLM_HEAD_PREFIX, CausalLanguageModel, MaskedLanguageModel
from aiayn.model import Transformer
from aiayn.tasks.pretrain import (
    KeyedBatch,
    Objective,
    PretrainData,
    batch_generator,
    check_experiment,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIGS = {
    name: ROOT / "configs" / f"pretrain_{name}.yaml" for name in ("mlm", "denoise", "causal")
}

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat dog man woman sees likes eats a big small red blue ball house tree runs to from"


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    """300 documents of 5-40 words, a document a line, from a fixed seed."""
    rng = random.Random(0)
    words = WORDS.split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(300)]
    path = tmp_path_factory.mktemp("pretrain_text") / "tiny.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


TINY = [
    "--data.vocab_size", "100", "--data.block_size", "32", "--data.valid_fraction", "0.1",
    "--model.d_model", "32", "--model.d_ff", "64", "--model.n_heads", "2",
    "--train.max_tokens", "512", "--train.warmup_steps", "10", "--train.lr_scale", "0.3",
    "--train.log_every", "2", "--train.eval_every", "4", "--train.save_every", "4",
]  # fmt: skip


def train_args(objective, run_dir, steps, source, *extra):
    return ["train", CONFIGS[objective], "--quiet", "--run_dir", run_dir,
            "--data.sources", f"[{{path: {source}}}]", "--train.max_steps", steps,
            *TINY, *extra]  # fmt: skip


def log_records(run_dir):
    return [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- tokenizer


def test_extra_special_tokens_follow_the_fixed_four():
    extra = [MASK, sentinel(0), sentinel(1)]
    tok = Tokenizer.train([WORDS] * 20, 60, extra_special_tokens=extra)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert [tok.token_to_id(t) for t in extra] == [4, 5, 6]
    assert tok.special_ids == [0, 1, 2, 3, 4, 5, 6]
    ids = tok.encode("the cat <mask> dog")
    assert ids.count(4) == 1  # never split into pieces
    assert tok.decode(ids).split() == ["the", "cat", "dog"]  # dropped like the other specials
    for bad in (["<pad>"], [MASK, MASK], [""]):
        with pytest.raises(ConfigError, match="extra special token"):
            Tokenizer.train([WORDS], 60, extra_special_tokens=bad)


# --------------------------------------------------------------------------- BERT masking


def test_mask_statistics_follow_bert():
    g = torch.Generator().manual_seed(0)
    B, S, V, mask_id = 1000, 128, 1000, 4
    ids = torch.randint(5, V, (B, S), generator=g)
    lengths = torch.randint(10, S, (B,), generator=g)
    ids[torch.arange(S)[None, :] >= lengths[:, None]] = 0  # padding after each row's length
    ids[:, 0] = 1  # <s>
    ids[torch.arange(B), lengths - 1] = 2  # </s>
    inputs, labels = mask_tokens(
        ids, mask_id=mask_id, special_ids=[0, 1, 2, 3, 4], vocab_size=V, pad_id=0,
        mask_prob=0.15, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    special = ids <= 4
    chosen = labels.ne(0)
    assert not (chosen & special).any()  # pad, <s>, </s> are never chosen
    assert torch.equal(inputs[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])  # labels: the original tokens
    assert torch.equal(inputs[~chosen], ids[~chosen])  # only chosen positions change
    # round(15%) of every row's ordinary tokens
    n_ordinary = (~special).sum(1)
    assert torch.equal(chosen.sum(1), (n_ordinary.double() * 0.15).round().long().clamp(min=1))
    n = int(chosen.sum())
    assert n > 8000
    masked = float((inputs[chosen] == mask_id).sum()) / n
    kept = float((inputs[chosen] == ids[chosen]).sum()) / n
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(replaced - 0.1) < 0.015
    # random replacements are ordinary tokens, never a special one
    random_ids = inputs[chosen & (inputs != mask_id) & (inputs != ids)]
    assert int(random_ids.min()) > 4
    # a different generator state draws other positions
    other, _ = mask_tokens(
        ids, mask_id=mask_id, special_ids=[0, 1, 2, 3, 4], vocab_size=V, pad_id=0,
        mask_prob=0.15, generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    assert not torch.equal(other, inputs)


def mlm_tokenizer() -> Tokenizer:
    """A BPE vocabulary of WORDS with BERT's <mask>, as the masked-LM objective needs."""
    return Tokenizer.train([WORDS] * 20, 60, extra_special_tokens=[MASK])


def mlm_objective(tok, **data):
    data = PretrainData.from_dict({"objective": "mlm", "sources": [{"path": "x"}], **data})
    return Objective("mlm", tok, data)


def mlm_batch(objective: Objective):
    """A masked-LM batch of three sentences, corrupted from a fixed seed."""
    sentences = [WORDS, "the cat sees a dog", "a big red ball runs to the tree"]
    examples = objective.tokenizer.encode_batch(sentences)
    return objective.batch(examples, batch_generator(1, 0, 0))


def test_mlm_loss_is_on_the_chosen_positions_only():
    torch.manual_seed(0)
    tok = mlm_tokenizer()
    cfg = TransformerConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, n_decoder_layers=0, dropout=0.0
    )
    model = MaskedLanguageModel(cfg).eval()
    objective = mlm_objective(tok)
    batch = mlm_batch(objective)
    chosen = batch.labels.ne(0)
    assert batch.n_tokens == int(chosen.sum()) >= 3
    # The batch carries the chosen positions as row-major indices, found on the CPU.
    assert batch.chosen.tolist() == chosen.flatten().nonzero().squeeze(1).tolist()
    loss = objective.loss_fn(0.0)(model, batch)
    logits = model(batch.input_ids)  # (B, S, V): every position
    expected = F.cross_entropy(logits[chosen], batch.labels[chosen], reduction="sum")
    torch.testing.assert_close(loss, expected)
    # The model selects the same rows, in the same order, from the indices or from the mask.
    torch.testing.assert_close(model(batch.input_ids, batch.chosen), logits[chosen])
    torch.testing.assert_close(model(batch.input_ids, chosen), logits[chosen])


def test_validation_masks_are_each_examples_own_whatever_the_seed_and_batching():
    """A held-out example's masks come from its index and a constant seed: the same
    checkpoint scores the same under another train.seed or train.max_tokens (they moved
    val_loss by about 0.04 nats)."""
    torch.manual_seed(0)
    tok = mlm_tokenizer()
    objective = mlm_objective(tok)
    sentences = [WORDS, "the cat sees a dog", "a big red ball runs to the tree"] * 4
    examples = tok.encode_batch(sentences)
    cfg = TransformerConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, n_decoder_layers=0, dropout=0.0
    )
    model = MaskedLanguageModel(cfg).eval()
    scores = [objective.evaluator(examples, max_tokens)(model) for max_tokens in (40, 100, 4096)]
    for other in scores[1:]:  # the same masks; summed in other batches, to float rounding
        assert other == pytest.approx(scores[0], rel=1e-6)
    # One example alone is masked as it is in any batch.
    alone = objective.fixed_batch(examples[5:6], [5])
    together = objective.fixed_batch(examples, list(range(len(examples))))
    row = together.input_ids[5][: alone.input_ids.size(1)]
    assert torch.equal(row, alone.input_ids[0])


def test_denoising_span_accuracy_leaves_out_the_sentinels_and_eos():
    tok = Tokenizer.train([WORDS] * 20, 80, extra_special_tokens=[sentinel(i) for i in range(8)])
    data = PretrainData.from_dict({"objective": "denoise", "sources": [{"path": "x"}]})
    objective = Objective("denoise", tok, data)
    examples = tok.encode_batch([WORDS, WORDS])
    batch = objective.fixed_batch(examples, [0, 1])
    given = set(objective.sentinel_ids()) | {tok.eos_id, tok.pad_id}
    spans = [t for t in batch.tgt_out.flatten().tolist() if t not in given]

    class Oracle(torch.nn.Module):
        """Predicts every sentinel and </s> right, and nothing else."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, src, tgt_in):
            gold = batch.tgt_out
            right = torch.isin(gold, torch.tensor(sorted(given)))
            guess = torch.where(right, gold, 0)  # id 0 (<pad>) is never a span token
            return F.one_hot(guess, tok.vocab_size).float() * 10

    scores = objective.evaluator(examples, 4096)(Oracle())
    n_given = int(batch.tgt_out.ne(tok.pad_id).sum()) - len(spans)
    assert scores["val_accuracy"] == pytest.approx(n_given / (n_given + len(spans)))
    assert scores["span_accuracy"] == 0.0


# --------------------------------------------------------------------------- T5 span corruption


def test_span_corruption_round_trips_and_has_t5_statistics():
    sentinels = list(range(1000, 1000 + max_spans(200, 0.15, 3.0)))
    g = torch.Generator().manual_seed(0)
    total = noise = spans = 0
    for length in list(range(2, 40)) + [127] * 50 + [200] * 20:
        ids = torch.randint(10, 900, (length,), generator=g).tolist()
        source, target = corrupt_spans(
            ids, sentinels, noise_density=0.15, mean_span_length=3.0, generator=g
        )
        assert restore_spans(source, target, sentinels) == ids
        n_noise, n_spans = span_counts(length, 0.15, 3.0)
        assert len(target) == n_noise + n_spans and len(source) == length - n_noise + n_spans
        assert [t for t in source if t in sentinels] == sentinels[:n_spans]  # in order
        assert [t for t in target if t in sentinels] == sentinels[:n_spans]
        assert target[0] == sentinels[0] and source[0] != sentinels[0]  # T5: starts kept
        total, noise, spans = total + length, noise + n_noise, spans + n_spans
    assert abs(noise / total - 0.15) < 0.01
    assert abs(noise / spans - 3.0) < 0.3
    with pytest.raises(DataError, match="sentinels"):
        corrupt_spans(list(range(10, 110)), sentinels[:1], noise_density=0.15,
                      mean_span_length=3.0, generator=g)  # fmt: skip


# --------------------------------------------------------------------------- causal LM


def test_causal_lm_loss_is_next_token_cross_entropy_and_causal():
    torch.manual_seed(0)
    cfg = TransformerConfig.from_preset("tiny", n_encoder_layers=0, dropout=0.0)
    model = CausalLanguageModel(cfg).eval()
    tok = Tokenizer.train([WORDS] * 20, 64)
    cfg_data = {"objective": "causal", "sources": [{"path": "x"}], "block_size": 8}
    objective = Objective("causal", tok, PretrainData.from_dict(cfg_data))
    windows = concat_and_chunk(tok.encode_batch([WORDS, "the cat", "a dog runs"]), 8, 1, 2)
    assert all(len(w) == 9 for w in windows[:-1])
    assert [t for w in windows for t in w[:-1]] + windows[-1][-1:] == [
        t for doc in tok.encode_batch([WORDS, "the cat", "a dog runs"]) for t in [1, *doc, 2]
    ]  # windows overlap by one token and cover the stream
    batch = objective.batch(windows, batch_generator(0, 0, 0))
    with torch.no_grad():
        loss = objective.loss_fn(0.0)(model, batch)
    manual = 0.0
    for row_in, row_out in zip(batch.tgt_in, batch.tgt_out, strict=True):
        for t in range(len(row_in)):
            if row_out[t] == 0:
                continue
            with torch.no_grad():
                logits = model.decode(row_in[None, : t + 1])[0, -1]  # only the prefix 0..t
            manual -= float(torch.log_softmax(logits, -1)[row_out[t]])
    assert math.isclose(float(loss), manual, rel_tol=1e-4)
    # causality: changing token 5 leaves the logits of positions 0..4 unchanged
    x = batch.tgt_in[:1].clone()
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % cfg.tgt_vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


# --------------------------------------------------------------------------- corpora


def test_read_documents_text_paragraphs_and_tables(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("First line.\nSecond line.\n\n\nThird\n  \n")
    assert read_documents(text) == ["First line.", "Second line.", "Third"]
    assert read_documents(text, split="paragraph") == ["First line.\nSecond line.", "Third"]
    assert read_documents(text, max_docs=1) == ["First line."]
    table = tmp_path / "t.jsonl"
    table.write_text('{"text": "a b", "label": 1}\n{"text": "  ", "label": 0}\n{"text": "c"}\n')
    assert read_documents(table, "text") == ["a b", "c"]
    with pytest.raises(DataError, match="no key 'document'; available: 'text', 'label'"):
        read_documents(table, "document")
    with pytest.raises(DataError, match="give the field"):
        read_documents(table)
    with pytest.raises(DataError, match="plain text but a field"):
        read_documents(text, "text")
    assert chunk_documents([[5] * 10, [6] * 3], 4) == [[5] * 4, [5] * 4, [5] * 2, [6] * 3]
    assert chunk_documents([[5] * 5], 4, min_len=2) == [[5] * 4]


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_real_sources_read():
    imdb = read_documents(DATA / "imdb" / "train.jsonl.gz", "text", max_docs=5)
    bbc = read_documents(DATA / "bbc_news_summary" / "bbc_news_summary.jsonl.gz", "document")
    plays = read_documents(DATA / "tiny_shakespeare" / "input.txt", split="paragraph")
    assert len(imdb) == 5 and len(bbc) == 2225 and len(plays) > 7000
    assert plays[0].startswith("First Citizen:\nBefore we proceed")


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("objective", sorted(CONFIGS))
def test_shipped_pretrain_configs_are_valid(objective):
    exp = Experiment.from_yaml(CONFIGS[objective])
    assert exp.task == "pretrain"
    data = check_experiment(exp)
    assert data.objective == objective
    if DATA.is_dir():  # the sources exist where the config says (root relative to the repo)
        for source in data.sources:
            assert (ROOT / data.source_path(source)).is_file(), source
    moved = Experiment.from_yaml(CONFIGS[objective], ["--data.root", "/elsewhere"])
    assert str(PretrainData.from_dict(moved.data).source_path(data.sources[0])).startswith(
        "/elsewhere/"
    )


def test_mlm_config_is_the_encoder_a_classifier_takes():
    exp = Experiment.from_yaml(CONFIGS["mlm"])
    data = check_experiment(exp)
    cfg = exp.model_config(vocab_size=16000, pad_id=0)
    assert (cfg.d_model, cfg.n_heads, cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.d_ff) == (
        256, 4, 4, 0, 1024,
    )  # fmt: skip
    assert (data.vocab_size, data.block_size) == (16000, 128)
    assert {Path(s["path"]).parts[0] for s in data.sources} == {"imdb", "bbc_news_summary"}


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("objective", ["mlm", "denoise", "causal"])
def test_objective_trains_through_the_cli_and_saves_a_plain_transformer(
    objective, tiny_text, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    code, out, err = run(train_args(objective, run_dir, 16, tiny_text), capsys)
    assert code == 0, err
    metric = {"mlm": "mlm_accuracy", "denoise": "val_accuracy", "causal": "perplexity"}[objective]
    assert out.startswith(f"finished {run_dir}: val_loss ") and metric in out
    records = log_records(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0], vals

    checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints")
    tok = Tokenizer.load(checkpoint / "tokenizer.json")  # saved beside the weights
    config = ckpt.load_checkpoint(checkpoint).config
    assert config["task"] == "pretrain" and config["data"]["objective"] == objective
    cfg = TransformerConfig.from_dict(config["model"])
    assert cfg.src_vocab_size == tok.vocab_size
    plain = Transformer(cfg)
    state = ckpt.load_model_state_dict(checkpoint)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert missing == []
    if objective == "mlm":
        assert tok.token_to_id(MASK) == 4
        assert unexpected and all(k.startswith(MLM_HEAD_PREFIX) for k in unexpected)
        assert "encoder.layers.0.self_attn.w_q.weight" in state
        torch.testing.assert_close(plain.src_embed.lut.weight, state["src_embed.lut.weight"])
    else:
        assert unexpected == []
        ckpt.load_checkpoint(checkpoint, model=Transformer(cfg))  # strict
    if objective == "denoise":
        assert tok.token_to_id(sentinel(0)) == 4


def test_generate_continues_prompts_from_a_causal_checkpoint(tiny_text, tmp_path, capsys):
    """`aiayn generate` on a causal run: samples per prompt, reproducible by seed and
    whatever other prompts come along, greedy at temperature 0, text or JSON lines."""
    run_dir = tmp_path / "run"
    assert run(train_args("causal", run_dir, 16, tiny_text), capsys)[0] == 0
    base = ["generate", "--checkpoint", run_dir, "--quiet", "--device", "cpu",
            "--max-new-tokens", "12"]  # fmt: skip

    def texts(*argv):
        code, out, err = run([*base, *argv, "--jsonl"], capsys)
        assert code == 0 and err == "", err
        return [json.loads(line) for line in out.splitlines()]

    both = texts("--prompt", "the cat", "--prompt", "", "--num-samples", "3", "--seed", "4")
    assert [(r["prompt"], r["sample"]) for r in both] == [
        ("the cat", 0), ("the cat", 1), ("the cat", 2), ("", 0), ("", 1), ("", 2),
    ]  # fmt: skip
    assert all(r["text"].startswith("the cat") for r in both[:3])
    assert len({r["text"] for r in both[:3]}) > 1  # drawn, not all alike
    assert texts("--prompt", "", "--num-samples", "3", "--seed", "4") == both[3:]
    assert texts("--prompt", "", "--num-samples", "3", "--seed", "5") != both[3:]
    greedy = texts("--prompt", "a big", "--num-samples", "2", "--temperature", "0")
    assert greedy[0]["text"] == greedy[1]["text"]
    # A tiny temperature is greedy too (no overflow); any integer seeds.
    assert texts("--prompt", "a big", "--temperature", "1e-45", "--seed", str(10**30)) == greedy[:1]
    # Two prompts do not share their random numbers (a seed for each, from the prompt).
    two = texts("--prompt", "the cat", "--prompt", "the dog", "--num-samples", "3")
    tails = [[r["text"].split(" ", 2)[-1] for r in two[i : i + 3]] for i in (0, 3)]
    assert tails[0] != tails[1]
    # The prompt comes back as written, a character the vocabulary lacks included.
    assert texts("--prompt", "the 日本 cat ")[0]["text"].startswith("the 日本 cat")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\n")
    output = tmp_path / "out.txt"
    code, out, err = run([*base, "--input", prompts, "--num-samples", "3", "--seed", "4",
                          "--output", output], capsys)  # fmt: skip
    assert code == 0 and out == "", err
    separator = "\n---\n"
    assert output.read_text() == separator.join(r["text"].rstrip() for r in both) + "\n"

    mlm_dir = tmp_path / "mlm"
    assert run(train_args("mlm", mlm_dir, 4, tiny_text), capsys)[0] == 0
    for argv, message in [
        (["--checkpoint", mlm_dir], "holds a 'mlm' pre-training model, not a causal language"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--num-samples", "0"], "num_samples must be >= 1"),
        (["--input", prompts], "give prompts with --prompt or with --input, not both"),
    ]:
        code, out, err = run([*base, "--prompt", "the", *argv], capsys)
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert err.startswith("error: ") and message in err, err


def test_resume_is_exact_for_masked_lm(tiny_text, tmp_path, capsys):
    extra = ["--model.dropout", "0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(train_args("mlm", straight, 8, tiny_text, *extra), capsys)[0] == 0
    assert run(train_args("mlm", resumed, 4, tiny_text, *extra), capsys)[0] == 0
    # Resumed from the run's own record, which spells out the model with the tokenizer's sizes.
    record = ["train", resumed / "config.yaml", "--quiet", "--resume", "--train.max_steps", 8]
    code, _, err = run(record, capsys)
    assert code == 0, err
    a = load_file(straight / "checkpoints" / "step_00000008" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000008" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [[r["loss"] for r in log_records(d) if "loss" in r] for d in (straight, resumed)]
    assert losses[0] == losses[1]
    # and the masks really differ from batch to batch (else resuming would be trivially exact)
    assert not torch.equal(
        torch.rand(4, generator=batch_generator(1, 0, 0)),
        torch.rand(4, generator=batch_generator(1, 0, 1)),
    )


def test_resume_of_a_checkpoint_older_than_per_example_masks_sets_the_best_afresh(
    tiny_text, tmp_path, capsys, caplog
):
    """Before validation masks were each example's own, checkpoints recorded no data digest:
    their best val_loss was measured on other masks, and must not outrank the new ones."""
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert run(train_args("mlm", run_dir, 4, tiny_text), capsys)[0] == 0
    old = ckpt.latest_checkpoint(root)
    state_path = old / ckpt.TRAINER_STATE_FILE
    state = json.loads(state_path.read_text())
    del state["data"]["data_digest"]
    state["best_value"] = 0.0  # better than any val_loss to come: only a reset lets one win
    state_path.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="aiayn"):
        code, _, err = run([*train_args("mlm", run_dir, 8, tiny_text), "--resume"], capsys)
    assert code == 0, err
    assert f"{old.name} was saved by an older aiayn, whose validation measured val_loss " in (
        caplog.text
    )
    assert ckpt.read_best_pointer(root).name == "step_00000008"
    (val_loss,) = [r["val_loss"] for r in log_records(run_dir) if "val_loss" in r][-1:]
    assert json.loads((root / ckpt.BEST_POINTER_FILE).read_text())["value"] == val_loss


def test_keyed_batches_are_required():
    make = mlm_objective(mlm_tokenizer()).batch_maker([[10, 11, 12]], seed=1)
    with pytest.raises(TypeError, match="KeyedBatchSampler"):
        make([0])
    a, b = make(KeyedBatch([0], 0, 0)), make(KeyedBatch([0], 0, 0))
    assert torch.equal(a.input_ids, b.input_ids)  # reproducible from (seed, epoch, position)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "file is empty"),
        ("missing_field", "no key 'text'"),
        ("block_size", "data.block_size must be >= 2"),
        ("no_mask", "has no <mask> token, which objective mlm needs"),
        ("shape", "objective mlm needs an encoder-only model"),
        ("one_doc", "pre-training needs at least 2"),
        ("source_key", "data.sources[0] has unknown key 'feild'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, message, tiny_text, tmp_path, capsys):
    run_dir = tmp_path / "run"
    source, extra = str(tiny_text), []
    if case == "empty":
        source = tmp_path / "empty.txt"
        source.write_text("\n\n")
    elif case == "missing_field":
        source = tmp_path / "t.jsonl"
        source.write_text('{"document": "a b c"}\n{"document": "d e"}\n')
        extra = ["--data.sources", f"[{{path: {source}, field: text}}]"]
    elif case == "block_size":
        extra = ["--data.block_size", "1"]
    elif case == "no_mask":
        plain = tmp_path / "tokenizer.json"
        Tokenizer.train([WORDS] * 10, 60).save(plain)
        extra = ["--data.tokenizer", plain]
    elif case == "shape":
        extra = ["--model.n_decoder_layers", "2"]
    elif case == "one_doc":
        source = tmp_path / "one.txt"
        source.write_text("just one document\n")
    elif case == "source_key":
        extra = ["--data.sources", f"[{{path: {source}, feild: text}}]"]
    code, out, err = run(train_args("mlm", run_dir, 4, source, *extra), capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not run_dir.exists()
