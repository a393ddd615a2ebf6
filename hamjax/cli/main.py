"""`hamjax train | eval`: errors in what the user asked for print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys

from hamjax.cli.flags import add_config_flags, config_from_flags


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _train(args) -> int:
    from hamjax.train import NonFiniteLoss, train

    config = config_from_flags(args)
    try:
        summary = train(config, progress=not args.quiet)
    except NonFiniteLoss as error:
        print(f"hamjax train: {error}", file=sys.stderr)
        return 1
    if summary.status == "interrupted":
        print(f"interrupted at step {summary.step}: checkpoint saved in {config.run_dir}; "
              "run the same command again to resume")
        return 130
    v = summary.validation
    print(
        f"step {summary.step}: validation {v.bpb:.3f} bits per byte (loss {v.loss:.3f} nats/token), "
        f"KV fraction per HAM layer {[round(f, 3) for f in v.kv_fraction]}; "
        f"{summary.tokens_per_s:,.0f} tokens/s, MFU {summary.mfu:.1%}, {summary.seconds:.0f} s; run folder {config.run_dir}"
    )
    return 0


def _eval(args) -> int:
    from hamjax.train import evaluate_checkpoint

    step, result = evaluate_checkpoint(args.run_dir, args.step, args.batches)
    print(json.dumps({"run_dir": args.run_dir, "step": step, **result._asdict()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hamjax", description="Hybrid Associative Memory models in JAX.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = commands.add_parser("train", help="train (or resume) a language model")
    add_config_flags(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="validation loss and KV fraction of a checkpoint")
    evaluate.add_argument("--run_dir", required=True, help="the run folder written by `hamjax train`")
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    evaluate.add_argument("--batches", type=int, default=0, help="validation batches (default 0: all)")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"hamjax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hamjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
