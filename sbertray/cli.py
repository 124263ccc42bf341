"""``sbertray`` command line: a thin layer over the library.

sbertray train RECIPE.yaml [key.path=value ...] [--dry-run] [--restart]
sbertray tune RECIPE.yaml [key.path=value ...] [--dry-run]
sbertray evaluate MODEL DATA [--sentence-0 COL --sentence-1 COL --label COL --label-scale X]
sbertray embed CONFIG.yaml [key.path=value ...] [--dry-run] [--replace]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from sbertray import output_paths, storage
from sbertray.cli_search import add_search_command
from sbertray.console import RunLog, console_stream
from sbertray.errors import UserError
from sbertray.ray_runtime import prefer_loopback
from sbertray.report import REPORT_DIR, dev_scores_line


def _config_unless_dry_run(args: argparse.Namespace, schema, dry_run_module: str):
    """The command's config; with ``--dry-run``, prints the plan instead and returns None."""
    from sbertray.config import load_config

    overrides = [
        *args.overrides,
        *(["output.mode=replace"] if getattr(args, "replace", False) else []),
    ]
    config = load_config(schema, args.config, overrides)
    if not args.dry_run:
        return config
    plan = importlib.import_module(dry_run_module).dry_run(config, ray_address=args.address)
    print(plan, file=console_stream())  # the whole plan, not only its first line
    return None


def _cmd_train(args: argparse.Namespace) -> int:
    from sbertray.config import TrainConfig
    from sbertray.train import train

    if (config := _config_unless_dry_run(args, TrainConfig, "sbertray.train.dry_run")) is None:
        return 0
    result = train(config, ray_address=args.address, restart=args.restart)
    if result.kept:
        return 0
    metric = f"{dev_scores_line(result.dev_metrics)}; " if result.dev_metrics else ""
    resumed = f", resumed from step {result.resumed_from_step}" if result.resumed_from_step else ""
    print(
        f"[sbertray] done in {result.wall_time_s:.0f}s: {metric}{result.global_step} steps"
        f"{resumed}; model written to {result.model_url}"
    )
    _publish_log(args, config.output.model, config.storage)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from sbertray.config import TrainConfig
    from sbertray.train.tuning import tune_output, tune_recipe

    if (config := _config_unless_dry_run(args, TrainConfig, "sbertray.train.tuning")) is None:
        return 0
    tune_recipe(config, ray_address=args.address)
    _publish_log(args, tune_output(config), config.storage)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sbertray.config import PairColumns, PairDataConfig, StorageConfig
    from sbertray.train import evaluate

    data = PairDataConfig(
        path=args.data,
        format=args.format,
        columns=PairColumns(
            sentence_0=args.sentence_0, sentence_1=args.sentence_1, label=args.label
        ),
        label_scale=args.label_scale,
        on_bad_row=args.on_bad_row,
        empty_text=args.empty_text,
        name=args.name,
    )
    metrics = evaluate(
        args.model,
        data,
        storage_config=StorageConfig(endpoint_url=args.endpoint_url),
        progress=True,
        retrieval_threshold=args.retrieval_threshold,
        truncate_dims=tuple(args.truncate_dims or ()),
    )
    print(json.dumps(metrics.as_dict(), indent=2))
    print(f"[sbertray] {dev_scores_line(metrics.as_dict())} on {metrics.num_pairs} pairs")
    if (r := metrics.retrieval) is not None:
        print(
            f"[sbertray] retrieval of {r.queries} queries among {r.corpus} texts (relevant: "
            f"label >= {r.threshold:g}): MRR@10={r.mrr_at_10:.4f} NDCG@10={r.ndcg_at_10:.4f} "
            f"recall@1={r.recall_at_1:.4f} recall@10={r.recall_at_10:.4f}"
        )
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from sbertray.config import EmbedConfig
    from sbertray.embed.run import run_embed

    if (config := _config_unless_dry_run(args, EmbedConfig, "sbertray.embed.dry_run")) is None:
        return 0
    summary = run_embed(config, ray_address=args.address)
    print(summary.closing_line())
    _publish_log(
        args, storage.join(output_paths.embed_parts_url(config.output), REPORT_DIR), config.storage
    )
    return 0


def _cmd_nightly(args: argparse.Namespace) -> int:
    from sbertray.config import NightlyConfig, load_config
    from sbertray.nightly import run_nightly

    config = load_config(NightlyConfig, args.config, args.overrides)
    report = run_nightly(config, ray_address=args.address)
    print(
        f"[sbertray nightly] done in {report['seconds']:.0f}s; model {report['model']} "
        f"(hash {report['model_hash'][:12]}); embeddings {report['embed']['output_url']}"
    )
    _publish_log(args, storage.join(config.output, REPORT_DIR), config.storage)
    return 0


def _publish_log(args: argparse.Namespace, folder_url: str, storage_config) -> None:
    print(f"[sbertray] full log: {args.run_log.publish(folder_url, storage_config)}", flush=True)


def _cmd_report(args: argparse.Namespace) -> int:
    from sbertray.config import StorageConfig
    from sbertray.report import summarize

    print(summarize(args.url, StorageConfig(endpoint_url=args.endpoint_url)))
    return 0


_OVERRIDE_EXAMPLES = {
    "train": "training.epochs=1 output.model=runs/x",
    "tune": "tune.trials=4 tune.concurrency=2",
    "embed": "output.path=runs/out compute.precision=fp32",
    "nightly": "output=s3://bucket/nightly",
}


def _add_config_command(sub, name: str, func, *, help: str, example: str) -> None:
    """`sbertray NAME CONFIG.yaml [key.path=value ...] [--address ADDR]`."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help=f"YAML config, e.g. {example}")
    p.add_argument(
        "overrides",
        nargs="*",
        help=f"config keys to change, key.path=value, e.g. {_OVERRIDE_EXAMPLES[name]}",
    )
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS or a local Ray)")
    if name in ("train", "tune", "embed"):
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="check everything, print the plan and a time estimate, write nothing",
        )
    if name == "train":
        p.add_argument(
            "--restart",
            action="store_true",
            help="train from step 0, even if this recipe's model or checkpoints exist",
        )
    if name == "embed":
        p.add_argument(
            "--replace",
            action="store_true",
            help="rewrite an output written with other settings (`output.mode: replace`)",
        )
    p.set_defaults(func=func)


def _add_evaluate_command(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Pearson/Spearman of cosine vs gold labels",
        description="Scores a model on sentence pairs with a similarity label: the Spearman and "
        "Pearson correlation of the pairs' cosine with the labels, which must lie in 0..1 once "
        "multiplied by --label-scale. Example (STS-B, scores 0..5): sbertray evaluate bundled "
        "dev.tsv --sentence-0 sentence1 --sentence-1 sentence2 --label score --label-scale 0.2",
    )
    p.add_argument("model", help="model directory, s3:// path, hub id, or `bundled`")
    p.add_argument("data", help="pairs file or directory (parquet/csv/tsv/jsonl/datasets)")
    p.add_argument("--format", default="auto", help="auto (from the file names), parquet, csv, ...")
    p.add_argument("--sentence-0", default="sentence_0", help="first sentence's column")
    p.add_argument("--sentence-1", default="sentence_1", help="second sentence's column")
    p.add_argument("--label", default="label", help="the label's column")
    p.add_argument(
        "--label-scale", type=float, default=1.0, help="multiplied into labels, e.g. 0.2 for 0..5"
    )
    p.add_argument(
        "--on-bad-row", choices=["fail", "skip"], default="fail", help="skip: drop and count them"
    )
    p.add_argument(
        "--empty-text",
        choices=["bad_row", "keep"],
        default="bad_row",
        help="keep: score pairs with an empty sentence (when the data means it)",
    )
    p.add_argument(
        "--retrieval-threshold",
        type=float,
        help="also score retrieval: each pair's first sentence retrieves its second among all "
        "second sentences, relevant where the (scaled) label is at least this, e.g. 0.8",
    )
    p.add_argument(
        "--truncate-dims",
        type=int,
        nargs="+",
        metavar="N",
        help="also score the vectors cut to their first N dimensions, for each N (what "
        "`output.truncate_dim: N` embeds; Matryoshka-trained models keep most), e.g. 128 64",
    )
    p.add_argument("--name", default="dev", help="the data set's name in the output")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbertray", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    config_commands = (
        ("train", _cmd_train, "fine-tune a model from a recipe on Ray Train", "stsb.yaml"),
        (
            "tune",
            _cmd_tune,
            "search a recipe's training settings (its `tune:` block) on Ray Tune",
            "stsb_tuned.yaml",
        ),
        (
            "embed",
            _cmd_embed,
            "embed Parquet with Ray Data, write embeddings + scores",
            "embed_demo.yaml",
        ),
        (
            "nightly",
            _cmd_nightly,
            "fine-tune if the data changed, embed new shards",
            "nightly_demo.yaml",
        ),
    )
    for name, func, help_text, example in config_commands:
        _add_config_command(sub, name, func, help=help_text, example=f"jobs/configs/{example}")

    _add_evaluate_command(sub)

    add_search_command(sub)

    p = sub.add_parser("report", help="summarize the report.json of a training or embedding run")
    p.add_argument("url", help="a trained model directory or an embedding output, local or s3://")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=_cmd_report)
    return parser


# Commands that run jobs: their console shows sbertray's lines, their log file the rest.
_LOGGED_COMMANDS = ("train", "tune", "embed", "nightly")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with overrides also taken after a flag (``CONFIG --dry-run a=1``):
    argparse ends a ``nargs="*"`` positional at the first flag and would refuse the rest."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and e[0] != "-" for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prefer_loopback(getattr(args, "address", None))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    args.run_log = RunLog(args.command, verbose=args.verbose)
    logged = args.command in _LOGGED_COMMANDS
    try:
        if not logged:
            return args.func(args)
        with args.run_log:
            return args.func(args)
    except UserError as exc:  # fixable from the message: no traceback, exit 2
        log = f"\n(full log: {args.run_log.path})" if logged else ""
        print(f"sbertray {args.command}: error: {exc}{log}", file=sys.stderr)
        return 2
    except (SystemExit, KeyboardInterrupt) as exc:
        if logged:
            print(
                f"sbertray {args.command}: stopped ({type(exc).__name__}); what was committed is "
                f"kept, a rerun finishes the rest (full log: {args.run_log.path})",
                file=sys.stderr,
            )
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C: said above, no traceback
            return 130
        raise
    except BaseException:
        if logged:  # a bug: its traceback follows on the console
            print(f"sbertray {args.command}: full log: {args.run_log.path}", file=sys.stderr)
        raise


def job_main(command: str, argv: list[str] | None = None) -> int:
    """Entry for ``jobs/*.py`` under ``ray job submit``: ``--config FILE [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{command}.py",
        usage="%(prog)s --config FILE [key.path=value ...] [--address ADDR]",
        description=f"`sbertray {command}` for `ray job submit`. Arguments after the config "
        f"change its keys, e.g. {_OVERRIDE_EXAMPLES[command]}; other flags of `sbertray "
        f"{command}` (--dry-run, ...) pass through.",
    )
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--address", help="Ray address (default: $RAY_ADDRESS)")
    args, overrides = parser.parse_known_args(argv)
    address = ["--address", args.address] if args.address else []
    return main([command, args.config, *overrides, *address])


if __name__ == "__main__":
    sys.exit(main())
