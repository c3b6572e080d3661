"""The `aiayn` command: demo, info, train, translate, evaluate, average.

Every user error ends as one line, `error: <what is wrong and what to do>`, and exit status 1
(2 for a malformed command line); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aiayn import __version__
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
    cfg = TransformerConfig.from_preset(args.preset, **overrides)
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
    result = run_demo(Path(args.out), cfg, progress=not args.quiet)
    print(format_result(result))
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from aiayn.experiment import Experiment

    exp = Experiment.from_yaml(args.config, overrides)
    if exp.task == "pretrain":
        from aiayn.tasks.pretrain import train_pretrain as train_task
    else:
        from aiayn.tasks.translation import train_translation as train_task
    metrics = train_task(exp, resume=args.resume, progress=not args.quiet)
    summary = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    print(f"finished {exp.run_dir}: {summary}")
    return 0


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


def _write_output(lines: Sequence[str], path: str | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
        return
    target = Path(path)
    if not target.parent.is_dir():
        what = "is a file, not a folder" if target.parent.exists() else "does not exist"
        raise DataError(
            f"cannot write {target}: {target.parent} {what}; create the folder or choose "
            "another --output"
        )
    # Write beside the target and rename: an interrupted run never leaves half a file behind.
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # a failed write leaves nothing behind
        raise DataError(f"cannot write {target}: {exc.strerror}; choose another --output") from None


def _translator(args: argparse.Namespace):
    """The checkpoint's translator, after checking the decoding options (before any work)."""
    import torch

    from aiayn.tasks.translation import Translator

    if args.beam_size is not None and args.beam_size < 1:
        raise ConfigError(f"--beam-size must be 1 or more (1 is greedy), got {args.beam_size}")
    if args.length_penalty is not None and args.length_penalty < 0:
        raise ConfigError(
            f"--length-penalty must be >= 0 (the paper's is 0.6), got {args.length_penalty}"
        )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    return Translator.from_checkpoint(args.checkpoint, device=args.device)


def cmd_translate(args: argparse.Namespace) -> int:
    translator = _translator(args)
    sentences = _read_input(args.input)
    outputs = translator.translate(
        sentences, beam_size=args.beam_size, length_penalty=args.length_penalty
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

    pairs = read_parallel(args.src, args.ref)
    translator = _translator(args)
    hyps = translator.translate(
        [s for s, _ in pairs], beam_size=args.beam_size, length_penalty=args.length_penalty
    )
    if args.output:
        _write_output(hyps, args.output)
    result = corpus_bleu(hyps, [r for _, r in pairs])
    if args.json:
        print(
            json.dumps(
                {
                    "bleu": result.bleu,
                    "chrf": result.chrf,
                    "signature": result.signature,
                    "chrf_signature": result.chrf_signature,
                    "sentences": len(pairs),
                }
            )
        )
    else:
        print(f"BLEU {result.bleu:.2f}  ({result.signature})")
        print(f"chrF {result.chrf:.2f}  ({result.chrf_signature})")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from aiayn import checkpoint as ckpt

    if args.last < 1:
        raise ConfigError(f"--last must be 1 or more (the paper averages 5), got {args.last}")
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
        paths = found[-args.last :]
    out = ckpt.average_checkpoints(paths, Path(args.output))
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) into {out}")
    return 0


# --------------------------------------------------------------------------- parser


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
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument("--output", default=None, help="write output here instead of stdout")

    p = sub.add_parser("translate", parents=[common], help="translate lines from stdin or --input")
    decoding_options(p)
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
    p.add_argument("--src", required=True, help="source sentences, one a line (plain or .gz)")
    p.add_argument("--ref", required=True, help="reference translations, line-aligned with --src")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")

    p = sub.add_parser("average", parents=[common], help="average checkpoints (§6.1: the last 5)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoints", nargs="+", help="checkpoint folders to average")
    group.add_argument("--run-dir", help="average the last --last checkpoints of this run")
    p.add_argument(
        "--last", type=int, default=5, help="how many of the run's checkpoints (default 5)"
    )
    p.add_argument("--output", required=True, help="folder for the averaged checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    commands = {
        "info": cmd_info,
        "demo": cmd_demo,
        "translate": cmd_translate,
        "evaluate": cmd_evaluate,
        "average": cmd_average,
    }
    try:
        if args.command == "train":
            return cmd_train(args, extra)
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
