"""`hamjax train | prepare | eval | generate | bench`: errors in what the user asked for print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from hamjax.cli.flags import add_config_flags, config_from_flags


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _start_processes() -> bool:
    """jax.distributed start-up where the environment asks for it (hamjax.train.distributed);
    True in the process that reports (process 0, or the only one)."""
    import jax

    from hamjax.train.distributed import initialize_if_requested

    initialize_if_requested()
    return jax.process_index() == 0


def _train(args) -> int:
    config = config_from_flags(args)
    reports = _start_processes()
    from hamjax.train import NonFiniteLoss, train

    try:
        summary = train(config, progress=not args.quiet)
    except NonFiniteLoss as error:
        print(f"hamjax train: {error}", file=sys.stderr)
        return 1
    if not reports:
        return 0 if summary.status == "finished" else 130
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


def _prepare(args) -> int:
    from hamjax.data.prepared import prepared_folder
    from hamjax.train.loop import load_corpus

    config = config_from_flags(args)
    d = config.data
    if d.streaming:
        raise ValueError("--streaming reads the documents as it trains: there is nothing to prepare")
    folder = prepared_folder(d.source, d.tokenizer, seq_len=d.seq_len, validation_fraction=d.validation_fraction,
                             text_field=d.text_field, cache_dir=d.cache_dir or None)
    done = (folder / "meta.json").exists()
    corpus = load_corpus(config, progress=not args.quiet, processes=args.processes)
    print(f"{'already prepared' if done else 'prepared'} {folder}: {len(corpus.train.tokens):,} train and "
          f"{len(corpus.validation.tokens):,} validation rows of {d.seq_len + 1} tokens")
    return 0


def _eval(args) -> int:
    reports = _start_processes()
    from hamjax.train import evaluate_checkpoint

    step, result = evaluate_checkpoint(args.run_dir, args.step, args.batches, args.recall_ngram)
    if reports:
        print(json.dumps({"run_dir": args.run_dir, "step": step, **result._asdict()}))
    return 0


def _generate(args) -> int:
    from hamjax.data import load_tokenizer
    from hamjax.generate import CachePolicy, SamplingConfig, cache_memory, generate
    from hamjax.train import load_model

    prompts = list(args.prompt)
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"--prompt {i + 1} is empty: give some text to continue")
    policy = CachePolicy(args.capacity, args.evict, args.tau, args.budget_bytes)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    model, config, step = load_model(args.checkpoint, args.step)
    tokenizer = load_tokenizer(config.data.tokenizer)
    stop_tokens = []
    for text in args.stop:
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"--stop {text!r} is {len(ids)} tokens; a stop must be exactly one token")
        stop_tokens.append(int(ids[0]))
    encoded = [tokenizer.encode(p) for p in prompts]
    out = generate(
        model, encoded, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
        seed=args.seed, policy=policy,
    )
    taus = [round(float(t), 4) for t in out.taus.reshape(len(model.ham_layers), -1).mean(axis=1)]
    print(f"checkpoint {args.checkpoint} step {step}; HAM thresholds {taus}, KV fraction "
          f"{[round(float(f), 3) for f in out.kv_fraction]}")
    for row, (prompt, ids) in enumerate(zip(prompts, encoded)):
        n = int(out.lengths[row])
        print(f"\n--- prompt {row + 1} ({len(ids)} tokens) + {n} generated ---")
        print(prompt + tokenizer.decode(out.tokens[row, :n]))
        context = len(ids) + n  # every generated token is fed back
        print(f"cache after {context} tokens, keys and values in {model.config.kv_cache_dtype} (per layer; full "
              f"attention: a layer of the same heads, sizes and dtype holding every token):")
        print(f"{'layer':>5} {'kind':>9} {'KV entries':>10} {'slots':>8} {'KV bytes held':>13} "
              f"{'allocated':>11} {'state bytes':>11} {'full attention':>14} {'held/full':>9}")
        for i, layer in enumerate(cache_memory(model, out.cache, context, row)):
            ratio = layer.used_bytes / layer.full_attention_bytes
            print(f"{i:>5} {layer.kind:>9} {layer.entries:>10,} {layer.slots:>8,} {layer.used_bytes:>13,} "
                  f"{layer.kv_bytes:>11,} {layer.state_bytes:>11,} {layer.full_attention_bytes:>14,} {ratio:>9.2f}")
    return 0


def _bench(args) -> int:
    from hamjax.bench import run_suite

    run_suite(args.output_dir, quick=args.quick, only=args.only)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hamjax", description="Hybrid Associative Memory models in JAX.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = commands.add_parser("train", help="train (or resume) a language model")
    add_config_flags(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)
    prepare = commands.add_parser("prepare", help="tokenize and pack a run's corpus on disk (train does it too)")
    add_config_flags(prepare)
    prepare.add_argument("--quiet", action="store_true", help="no progress bars")
    prepare.add_argument("--processes", type=int, default=min(8, os.cpu_count() or 1),
                         help="tokenizing processes (default: the cores, at most 8)")
    prepare.set_defaults(run=_prepare)
    evaluate = commands.add_parser("eval", help="validation loss and KV fraction of a checkpoint")
    evaluate.add_argument("--run_dir", required=True, help="the run folder written by `hamjax train`")
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    evaluate.add_argument("--batches", type=int, default=0, help="validation batches (default 0: all)")
    evaluate.add_argument("--recall_ngram", type=int, default=None, metavar="N",
                          help="also report bits per byte on the recall hits (targets whose preceding N tokens "
                               "occurred earlier in their document) and on the rest")
    evaluate.set_defaults(run=_eval)
    gen = commands.add_parser("generate", help="continue a prompt with a trained model; report its cache")
    gen.add_argument("--checkpoint", required=True, help="the run folder written by `hamjax train`")
    gen.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    gen.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    gen.add_argument("--max_new_tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top_k", type=int, default=None)
    gen.add_argument("--top_p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="a one-token text that ends generation (repeatable)")
    gen.add_argument("--capacity", type=int, default=None, help="HAM KV slots per layer and head")
    gen.add_argument("--evict", action="store_true", help="a full HAM cache evicts its least-surprising entry")
    gen.add_argument("--tau", type=float, default=None, help="one threshold for every HAM layer")
    gen.add_argument("--budget_bytes", type=int, default=None, help="HAM KV-cache bytes per sequence")
    gen.set_defaults(run=_generate)
    bench = commands.add_parser("bench", help="the benchmark suite: results JSON and a Markdown report")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: about 2 minutes on 2 CPU cores")
    bench.add_argument("--only", nargs="+", default=None, help="benchmarks to run (default: all)")
    bench.add_argument("--output_dir", default="runs/bench", help="where the results go (default runs/bench)")
    bench.set_defaults(run=_bench)
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
