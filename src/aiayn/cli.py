"""The `aiayn` command: demo, info, train, finetune, translate, evaluate, classify, summarize,
generate, average, embeddings.

Every user error ends as one line, `error: <what is wrong and what to do>`, and exit status 1
(2 for a malformed command line); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from aiayn import __version__, atomic
from aiayn.errors import AiaynError, ConfigError, DataError

logger = logging.getLogger("aiayn")


# --------------------------------------------------------------------------- commands


def cmd_info(args: argparse.Namespace) -> int:
    from aiayn.config import TransformerConfig
    from aiayn.model import Transformer

    if args.vocab_size < 1:
        raise ConfigError(
            f"--vocab-size must be a positive integer, got {args.vocab_size}; the paper's is 37000"
        )
    overrides = {"vocab_size": args.vocab_size}
    if args.separate_vocab:
        overrides["shared_vocab"] = False
    import torch

    cfg = TransformerConfig.from_preset(args.preset, **overrides)
    with torch.device("meta"):  # shapes only: counting needs no memory, however large
        model = Transformer(cfg)
    total, body = model.num_parameters(), model.num_parameters(include_embeddings=False)
    enc = sum(p.numel() for p in model.encoder.parameters()) if model.encoder else 0
    dec = sum(p.numel() for p in model.decoder.parameters()) if model.decoder else 0
    vocab = "one shared" if cfg.shared_vocab else "separate source and target"
    tied = "tied to the output layer" if cfg.tie_embeddings else "untied"
    print(
        f"preset {args.preset}: N={cfg.n_encoder_layers}+{cfg.n_decoder_layers} d_model={cfg.d_model} "
        f"d_ff={cfg.d_ff} h={cfg.n_heads} d_k={cfg.d_k} P_drop={cfg.dropout}"
    )
    print(
        f"parameters: {total:,} ({total / 1e6:.1f}M) with {vocab} {args.vocab_size:,}-token vocabulary, {tied}"
    )
    print(f"  embeddings {total - body:,} | encoder {enc:,} | decoder {dec:,}")
    if args.preset in PAPER_PARAMETERS:
        print(
            f"Table 3 of the paper gives {PAPER_PARAMETERS[args.preset]} for {args.preset}; "
            "docs/paper-map.md explains the difference"
        )
    return 0


PAPER_PARAMETERS = {"base": "65M", "big": "213M"}  # Table 3, "params" column


def cmd_demo(args: argparse.Namespace) -> int:
    from aiayn.tasks.demo import DemoConfig, format_result, run_demo

    cfg = DemoConfig(seed=args.seed) if args.seed is not None else DemoConfig()
    existing = next(p for p in (Path(args.out), *Path(args.out).parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"--out {args.out} cannot be a folder: {existing} is a file; pass another --out"
        )
    result = run_demo(Path(args.out), cfg, progress=not args.quiet)
    print(format_result(result))
    return 0


def _train_task(exp):
    """The training function of the experiment's task."""
    if exp.task == "classification":
        from aiayn.tasks.classification import train_classification

        return train_classification
    if exp.task == "pretrain":
        from aiayn.tasks.pretrain import train_pretrain

        return train_pretrain
    if exp.task == "summarization":
        from aiayn.tasks.summarization import train_summarization

        return train_summarization
    from aiayn.tasks.translation import train_translation

    return train_translation


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from aiayn.experiment import Experiment

    exp = Experiment.from_yaml(args.config, overrides)
    metrics = _train_task(exp)(exp, resume=args.resume, progress=not args.quiet)
    if _rank() == 0:  # under torchrun the other processes have no metrics to report
        summary = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        print(f"finished {exp.run_dir}: {summary}")
    return 0


def _rank() -> int:
    """This process's rank in a `torchrun` job (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    """`aiayn finetune --from SOURCE CONFIG`: `aiayn train CONFIG --finetune.source SOURCE`."""
    return cmd_train(args, [*overrides, "--finetune.source", args.source])


def _read_input(path: str | None) -> list[str]:
    """Sentences, one a line, from a file or stdin; refuses binary and empty input."""
    if path is not None:
        from aiayn.data.corpus import read_lines

        lines = read_lines(path)
    else:
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(
                f"stdin line {line} is not UTF-8 text: give plain text, one sentence a line"
            ) from None
        if "\x00" in text:
            raise DataError(
                "stdin holds binary data (NUL bytes): give plain text, one sentence a line"
            )
        lines = [line.strip() for line in text.split("\n")]
        if lines and lines[-1] == "":
            lines.pop()
    if not any(lines):
        raise DataError(
            "no input sentences: give text on stdin or with --input, one sentence a line"
        )
    return lines


def _check_output(path: str | None, option: str = "--output") -> None:
    """Refuse an output file that cannot be written, before any work is done for it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise DataError(f"cannot write {target}: it is a folder; give {option} a file name")
    if not target.parent.is_dir():
        what = "is a file, not a folder" if target.parent.exists() else "does not exist"
        raise DataError(
            f"cannot write {target}: {target.parent} {what}; create the folder or choose "
            f"another {option}"
        )


def _write_output(lines: Sequence[str], path: str | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
        return
    target = Path(path)  # checked by the command before its work (_check_output)
    try:
        atomic.write_text(target, text)  # an interrupted run never leaves half a file behind
    except OSError as exc:
        raise DataError(f"cannot write {target}: {exc.strerror}; choose another --output") from None


def _device(name: str) -> str:
    """--device of the inference commands: "auto" is a CUDA GPU where one is visible (the
    fixed-shape search replays CUDA graphs there), else the CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    return name


def _translator(args: argparse.Namespace, task: str = "translation"):
    """The checkpoint's translator (or summarizer), after checking the decoding options."""
    if task == "summarization":
        from aiayn.tasks.summarization import Summarizer as Translator
    else:
        from aiayn.tasks.translation import Translator

    if getattr(args, "no_repeat_ngram", None) is not None and args.no_repeat_ngram < 0:
        raise ConfigError(f"--no-repeat-ngram must be >= 0 (0: off), got {args.no_repeat_ngram}")
    if args.beam_size is not None and args.beam_size < 1:
        raise ConfigError(f"--beam-size must be 1 or more (1 is greedy), got {args.beam_size}")
    if args.length_penalty is not None and not 0 <= args.length_penalty < math.inf:
        raise ConfigError(
            f"--length-penalty must be a finite number >= 0 (the paper's is 0.6), got "
            f"{args.length_penalty}"
        )
    device = _device(args.device)
    translator = Translator.from_checkpoint(args.checkpoint, device=device)
    if getattr(args, "no_cuda_graphs", False):
        translator.decode = dataclasses.replace(translator.decode, cuda_graphs=False)
    return translator


def cmd_translate(args: argparse.Namespace) -> int:
    _check_output(args.output)
    _check_output(args.attention, "--attention")
    translator = _translator(args)
    sentences = _read_input(args.input)
    outputs = translator.translate(
        sentences,
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram,
    )
    _write_output(outputs, args.output)
    if args.attention:
        from aiayn.plots import attention_heatmap

        sentence = next(s for s in sentences if s)
        weights, src_tokens, tgt_tokens = translator.attention(sentence, beam_size=args.beam_size)
        attention_heatmap(
            weights,
            src_tokens,
            tgt_tokens,
            args.attention,
            title="encoder-decoder attention, last layer, mean over heads",
        )
        print(f"attention heatmap written to {args.attention}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from aiayn.data.corpus import read_parallel
    from aiayn.metrics import corpus_bleu

    pairs = read_parallel(args.src, args.ref[0])
    more = [read_parallel(args.src, ref) for ref in args.ref[1:]]  # each aligned with --src
    _check_output(args.output)
    translator = _translator(args)
    hyps = translator.translate(
        [s for s, _ in pairs],
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram,
    )
    if args.output:
        _write_output(hyps, args.output)
    result = corpus_bleu(
        hyps, [r for _, r in pairs], more_references=[[r for _, r in p] for p in more]
    )
    if args.json:
        print(
            json.dumps(
                {
                    "bleu": result.bleu,
                    "chrf": result.chrf,
                    "signature": result.signature,
                    "chrf_signature": result.chrf_signature,
                    "sentences": len(pairs),
                    "references": len(args.ref),
                }
            )
        )
    else:
        print(f"BLEU {result.bleu:.2f}  ({result.signature})")
        print(f"chrF {result.chrf:.2f}  ({result.chrf_signature})")
    return 0


def cmd_summarize(args: argparse.Namespace, overrides: Sequence[str] = ()) -> int:
    """`overrides` (`--section.key value`, e.g. `--data.path DIR`) apply to --config."""
    from aiayn.tasks.summarization import SummarizationData, lead_n, rouge_f1

    if args.lead is not None and args.lead < 1:
        raise ConfigError(f"--lead must be 1 or more (sentences), got {args.lead}")
    if args.max_len is not None and args.max_len < 1:
        raise ConfigError(f"--max-len must be 1 or more (tokens), got {args.max_len}")
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max-examples must be 1 or more, got {args.max_examples}")
    if args.max_examples is not None and args.split is None:
        raise ConfigError("--max-examples limits --split's examples: add --split or drop it")
    if args.split is not None and (args.input is not None or args.ref is not None):
        raise ConfigError(
            "--split reads documents and references from the data section: drop --input/--ref"
        )
    if args.split is not None and args.checkpoint is None and args.config is None:
        raise ConfigError(
            "--lead with --split needs --config, the experiment whose data section names the "
            "data, e.g. --config configs/bbc_headline.yaml"
        )
    _check_output(args.output)
    data = None
    if args.config is not None:
        from aiayn.experiment import Experiment

        exp = Experiment.from_yaml(args.config, list(overrides))
        if exp.task != "summarization":
            raise ConfigError(f"{args.config} is a {exp.task} experiment, not a summarization one")
        data = SummarizationData.from_dict(exp.data)
    summarizer = _translator(args, "summarization") if args.checkpoint is not None else None

    references = None
    if args.split is not None:
        try:
            pairs = (data or summarizer.data).read(args.split)[: args.max_examples]
        except DataError as exc:
            if data is not None:
                raise
            # The run's own data section, whose paths may be relative to where it trained.
            raise DataError(
                f"{exc} (the data section of {args.checkpoint}'s run; to read the data from "
                "elsewhere add --config CONFIG --data.path PATH)"
            ) from None
        documents, references = [d for d, _ in pairs], [r for _, r in pairs]
    else:
        documents = _read_input(args.input)
        empty = [i for i, d in enumerate(documents, start=1) if not d]
        if empty:
            raise DataError(
                f"{args.input or 'stdin'} line {empty[0]} is an empty document: give one "
                "document per line, with no blank lines"
            )
        if args.ref is not None:
            from aiayn.data.corpus import read_lines

            references = read_lines(args.ref)
            if len(references) != len(documents):
                raise DataError(
                    f"{len(documents)} documents but {len(references)} references in "
                    f"{args.ref}: give one reference summary per document, line by line"
                )
            empty = [i for i, r in enumerate(references, start=1) if not r]
            if empty:  # it would score 0 and count, as --split's data would not
                raise DataError(
                    f"{args.ref} line {empty[0]} is an empty reference: give every document "
                    "its reference summary, or leave the document out"
                )
    if summarizer is None:
        outputs = [lead_n(d, args.lead) for d in documents]
    else:
        outputs = summarizer.summarize(
            documents,
            beam_size=args.beam_size,
            length_penalty=args.length_penalty,
            max_len=args.max_len,
            no_repeat_ngram_size=args.no_repeat_ngram,
        )
    if references is None:
        _write_output(outputs, args.output)
        return 0
    if args.output:
        _write_output(outputs, args.output)
    scores = rouge_f1(outputs, references)
    system = f"lead-{args.lead}" if summarizer is None else str(args.checkpoint)
    if args.json:
        print(json.dumps({**scores, "documents": len(documents), "system": system}))
    else:
        print(
            f"ROUGE-1 {scores['rouge1']:.2f}  ROUGE-2 {scores['rouge2']:.2f}  "
            f"ROUGE-L {scores['rougeL']:.2f}  ROUGE-Lsum {scores['rougeLsum']:.2f}  "
            f"({system}, {len(documents)} documents; "
            "rouge-score F1, Porter stemmer)"
        )
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from aiayn.tasks.classification import Classifier, Ensemble, read_table_examples

    device = _device(args.device)
    _check_output(args.output)
    if args.eval is not None and args.input is not None:
        raise ConfigError("give --eval FILE (labelled) or --input FILE (texts), not both")
    if args.json and args.eval is None:
        raise ConfigError("--json prints --eval's scores: add --eval FILE or drop --json")
    if args.eval is not None and not Path(args.eval).is_file():
        raise DataError(f"--eval {args.eval} does not exist; give a TSV/CSV/JSONL file")
    if len(args.checkpoint) == 1:
        classifier = Classifier.from_checkpoint(args.checkpoint[0], device=device)
    else:
        classifier = Ensemble.from_checkpoints(args.checkpoint, device=device)
    if args.eval is not None:
        text_field = args.text_field or classifier.data.get("text_field", "sentence")
        label_field = args.label_field or classifier.data.get("label_field", "label")
        examples = read_table_examples(Path(args.eval), text_field, label_field)
        result = classifier.evaluate(examples)
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"accuracy {result['accuracy']:.2f}  macro-F1 {result['macro_f1']:.2f}  "
                f"({result['examples']} examples, {args.eval})"
            )
        return 0
    texts = _read_input(args.input)
    empty = [i + 1 for i, text in enumerate(texts) if not text.strip()]
    if empty:
        where = args.input or "stdin"
        raise DataError(f"{where} line {empty[0]} is empty: give one text a line, none blank")
    predictions = classifier.predict(texts)
    _write_output([f"{label}\t{prob:.4f}" for label, prob in predictions], args.output)
    return 0


SAMPLE_SEPARATOR = "\n---\n"  # between two texts of `aiayn generate`


def cmd_generate(args: argparse.Namespace) -> int:
    from aiayn.tasks.generation import TextGenerator

    _check_output(args.output)
    if args.prompt is not None and args.input is not None:
        raise ConfigError("give prompts with --prompt or with --input, not both")
    generator = TextGenerator.from_checkpoint(args.checkpoint, device=_device(args.device))
    prompts = args.prompt if args.prompt is not None else _read_input(args.input)
    samples = generator.generate(
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    if args.jsonl:
        lines = [
            json.dumps({"prompt": prompt, "sample": i, "text": text}, ensure_ascii=False)
            for prompt, texts in zip(prompts, samples, strict=True)
            for i, text in enumerate(texts)
        ]
    else:  # a text may hold line breaks: a line of its own between two texts
        lines = [SAMPLE_SEPARATOR.join(text.rstrip() for texts in samples for text in texts)]
    _write_output(lines, args.output)
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from aiayn import checkpoint as ckpt

    if args.last is not None and args.last < 1:
        raise ConfigError(f"--last must be 1 or more (the paper averages 5), got {args.last}")
    if args.checkpoints and args.last is not None:
        raise ConfigError("--last picks from --run-dir's checkpoints: with --checkpoints, drop it")
    if args.checkpoints:
        paths = [Path(p) for p in args.checkpoints]
    else:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise ConfigError(
                f"--run-dir {run_dir} is not a folder; pass the run_dir of a training run"
            )
        found = ckpt.list_checkpoints(run_dir)
        if not found:
            raise AiaynError(
                f"{run_dir} has no checkpoints to average; pass a run that saved checkpoints "
                "(checkpoints/step_*), or name them with --checkpoints"
            )
        paths = found[-(args.last or 5) :]
    out = ckpt.average_checkpoints(paths, Path(args.output))
    what = f"{len(paths)} checkpoint{'s' if len(paths) > 1 else ''}"
    print(f"averaged {what} ({', '.join(p.name for p in paths)}) into {out}")
    return 0


def cmd_embeddings(args: argparse.Namespace) -> int:
    import torch

    from aiayn.data.corpus import is_table, read_lines, read_table
    from aiayn.data.embeddings import init_embeddings, token_counts
    from aiayn.data.tokenizer import Tokenizer

    if args.d_model < 1:
        raise ConfigError(f"--d-model must be a positive integer, got {args.d_model}")
    if not args.column and is_table(args.vocab_from):
        raise ConfigError(
            f"--vocab-from {args.vocab_from} is a table: name its text column with --column "
            "(read as plain text, its header and other columns would count as words)"
        )
    if args.column:
        texts = [text for text, _ in read_table(args.vocab_from, args.column, args.column)]
    else:
        texts = [line for line in read_lines(args.vocab_from) if line]
    tok = Tokenizer.train_words(texts, args.vocab_size, args.min_frequency, args.lowercase)
    embedding = torch.nn.Embedding(len(tok), args.d_model)
    report = init_embeddings(
        embedding, tok, args.file, counts=token_counts(tok, texts), format=args.format
    )
    print(
        f"vocabulary: {len(tok):,} word-level tokens from {len(texts):,} texts of {args.vocab_from}"
    )
    print(report.summary())
    return 0


# --------------------------------------------------------------------------- parser


DEVICE_HELP = "auto (a CUDA GPU if one is visible, else the CPU), cpu or cuda (default: auto)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiayn",
        description="The Transformer of 'Attention Is All You Need', from scratch: train, translate, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"aiayn {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    common.add_argument("--quiet", action="store_true", help="no progress bars or info logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo", parents=[common], help="train the offline English->German number-words demo"
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=None, help="random seed")

    p = sub.add_parser("info", parents=[common], help="print a preset's size and parameter count")
    p.add_argument("--preset", default="base", help="base, big or tiny (default: base)")
    p.add_argument("--vocab-size", type=int, default=37000, help="vocabulary size (default: 37000)")
    p.add_argument(
        "--separate-vocab", action="store_true", help="separate source and target vocabularies"
    )

    p = sub.add_parser(
        "train",
        parents=[common],
        help="train from a YAML config",
        description="Train from a YAML config. Override any value with --section.key value, "
        "e.g. --train.max_steps 1000 --run_dir runs/x.",
    )
    p.add_argument("config", help="experiment YAML, e.g. configs/multi30k_de_en.yaml")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run_dir from its latest checkpoint",
    )

    def no_repeat_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--no-repeat-ngram",
            type=int,
            default=None,
            metavar="N",
            help="no output repeats one of its N-grams (default: the run's, 0 = off)",
        )

    def decoding_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--checkpoint",
            required=True,
            help="a checkpoint folder, or a run folder (uses its best)",
        )
        p.add_argument(
            "--beam-size",
            type=int,
            default=None,
            help="beam size (1: greedy; default: the run's, 4)",
        )
        p.add_argument(
            "--length-penalty", type=float, default=None, help="alpha of Wu et al. (default 0.6)"
        )
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument(
            "--no-cuda-graphs",
            action="store_true",
            help="search with the reference code instead of the fixed-shape search (CUDA "
            "graphs on a GPU, a frozen copy of the decoder on a CPU; the same results; "
            "decode.cuda_graphs)",
        )
        p.add_argument("--output", default=None, help="write output here instead of stdout")

    p = sub.add_parser("translate", parents=[common], help="translate lines from stdin or --input")
    decoding_options(p)
    no_repeat_option(p)
    p.add_argument("--input", default=None, help="read sentences from this file instead of stdin")
    p.add_argument(
        "--attention",
        default=None,
        metavar="PNG",
        help="write the first sentence's attention heatmap",
    )

    p = sub.add_parser(
        "evaluate", parents=[common], help="sacreBLEU and chrF of a checkpoint on a test set"
    )
    decoding_options(p)
    no_repeat_option(p)
    p.add_argument("--src", required=True, help="source sentences, one a line (plain or .gz)")
    p.add_argument(
        "--ref",
        required=True,
        action="append",
        help="reference translations, line-aligned with --src; repeat --ref for several "
        "references per sentence (multi-reference BLEU and chrF)",
    )
    p.add_argument("--json", action="store_true", help="print the scores as JSON")

    p = sub.add_parser(
        "summarize",
        parents=[common],
        help="summarize documents (one a line), or score ROUGE against references",
        description="Summarize documents, one a line, from stdin or --input; with --ref (or "
        "--split) print ROUGE-1/2/L. --lead N scores the lead-N baseline without a model.",
    )
    system = p.add_mutually_exclusive_group(required=True)
    system.add_argument("--checkpoint", help="a checkpoint folder, or a run folder (its best)")
    system.add_argument("--lead", type=int, help="no model: the first N sentences (baseline)")
    p.add_argument("--beam-size", type=int, default=None, help="beam size (default: the run's)")
    p.add_argument("--length-penalty", type=float, default=None, help="alpha (default: the run's)")
    p.add_argument("--max-len", type=int, default=None, help="most tokens in a summary")
    no_repeat_option(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--input", default=None, help="documents, one a line (default: stdin)")
    p.add_argument("--output", default=None, help="write the summaries here")
    p.add_argument("--ref", default=None, help="reference summaries, line-aligned: print ROUGE")
    p.add_argument(
        "--split",
        choices=("train", "valid", "test"),
        default=None,
        help="summarize and score this split of the data section (the checkpoint's or --config's)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="experiment YAML whose data section to use; --section.key value after it "
        "overrides a value (e.g. --data.path DIR)",
    )
    p.add_argument("--max-examples", type=int, default=None, help="only the first N of --split")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")

    p = sub.add_parser(
        "finetune",
        parents=[common],
        help="train from a YAML config, starting from pre-trained weights",
        description="Train the task of CONFIG starting from SOURCE: a classifier takes its "
        "encoder (an aiayn checkpoint or run folder of any task, or a Hugging Face "
        "BERT-family folder), a translation or summarization model its whole encoder-decoder "
        "(an aiayn run such as configs/pretrain_denoise.yaml's). Override any value with "
        "--section.key value.",
    )
    p.add_argument(
        "--from", dest="source", required=True, help="aiayn checkpoint/run folder or HF BERT folder"
    )
    p.add_argument("config", help="experiment YAML, e.g. configs/sst2_minilm.yaml")
    p.add_argument("--resume", action="store_true", help="continue the run in run_dir")

    p = sub.add_parser(
        "classify",
        parents=[common],
        help="classify lines from stdin or --input, or score a labelled --eval file",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="a checkpoint folder, or a run folder (uses its best); several: an ensemble "
        "(their class probabilities averaged)",
    )
    p.add_argument("--input", default=None, help="texts, one a line (default: stdin)")
    p.add_argument("--output", default=None, help="write label<TAB>probability lines here")
    p.add_argument("--eval", default=None, metavar="FILE", help="labelled TSV/CSV/JSONL to score")
    p.add_argument("--text-field", default=None, help="--eval's text column (default: the run's)")
    p.add_argument("--label-field", default=None, help="--eval's label column (default: the run's)")
    p.add_argument("--json", action="store_true", help="print --eval's scores as JSON")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="continue prompts with a pre-trained causal language model (sampling)",
        description="Continue each prompt (--prompt, or one a line from --input or stdin) "
        "with text drawn from a causal language model (aiayn train "
        "configs/pretrain_causal.yaml). Texts are separated by a line '---' (or one JSON "
        "object a line with --jsonl).",
    )
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder, or a run folder (its best)"
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a text to continue; repeat for several; '' starts a document from nothing",
    )
    p.add_argument("--input", default=None, help="prompts, one a line (default: stdin)")
    p.add_argument(
        "--max-new-tokens", type=int, default=100, help="most tokens added (default 100)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="divide the logits by this (default 1; 0: always the most probable token, "
        "--top-k and --top-p then change nothing)",
    )
    p.add_argument("--top-k", type=int, default=0, help="draw from the k most probable (0: off)")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="draw from the smallest set of tokens holding this probability (1: off)",
    )
    p.add_argument("--num-samples", type=int, default=1, help="texts per prompt (default 1)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed: the same texts for the same seed"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--output", default=None, help="write the texts here instead of stdout")
    p.add_argument(
        "--jsonl", action="store_true", help='one {"prompt", "sample", "text"} object a line'
    )

    p = sub.add_parser("average", parents=[common], help="average checkpoints (§6.1: the last 5)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoints", nargs="+", help="checkpoint folders to average")
    group.add_argument("--run-dir", help="average the last --last checkpoints of this run")
    p.add_argument(
        "--last", type=int, default=None, help="how many of the run's checkpoints (default 5)"
    )
    p.add_argument("--output", required=True, help="folder for the averaged checkpoint")

    p = sub.add_parser(
        "embeddings",
        parents=[common],
        help="coverage of pre-trained word vectors (GloVe, word2vec) on a word vocabulary",
    )
    p.add_argument("--file", required=True, help="GloVe or word2vec file (text, .gz or binary)")
    p.add_argument(
        "--vocab-from", required=True, help="texts to build the word vocabulary from (.txt/.gz)"
    )
    p.add_argument(
        "--column", default=None, help="read this column of a .tsv/.csv/.jsonl --vocab-from"
    )
    p.add_argument(
        "--vocab-size", type=int, default=10000, help="specials included (default 10000)"
    )
    p.add_argument("--min-frequency", type=int, default=1, help="least count of a word (default 1)")
    p.add_argument("--lowercase", action="store_true", help="lowercase the text (GloVe 6B is)")
    p.add_argument("--d-model", type=int, default=512, help="model dimension (default 512)")
    p.add_argument("--format", default="auto", help="auto, glove, word2vec or word2vec-bin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "finetune", "summarize"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra and args.command == "summarize" and args.config is None:
        parser.error(
            f"unrecognized arguments: {' '.join(extra)} (overrides such as --data.path "
            "value need --config)"
        )
    # Under torchrun only rank 0 logs progress; every process logs warnings and errors.
    quiet = args.quiet or _rank() != 0
    level = logging.DEBUG if args.debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    commands = {
        "info": cmd_info,
        "demo": cmd_demo,
        "translate": cmd_translate,
        "evaluate": cmd_evaluate,
        "summarize": cmd_summarize,
        "average": cmd_average,
        "embeddings": cmd_embeddings,
        "classify": cmd_classify,
        "generate": cmd_generate,
    }
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "finetune":
            return cmd_finetune(args, extra)
        if args.command == "summarize":
            return cmd_summarize(args, extra)
        return commands[args.command](args)
    except AiaynError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError, RuntimeError) as exc:
        if args.debug:
            raise
        print(
            f"error: {type(exc).__name__}: {exc} (run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
