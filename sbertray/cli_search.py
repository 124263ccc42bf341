"""`sbertray search OUTPUT "text" [-k 10] [--where SQL] [--json] [--file queries.txt]`: the
command-line face of ``sbertray.search``."""

from __future__ import annotations

import argparse
import json

from sbertray.search import SearchError, SearchResult

_DESCRIPTION = (
    "Embeds each query with the model and backend the output's manifest records and prints the "
    "nearest rows: id, cosine score and the output's other columns. A Lance output "
    "(`output.format: lance`) is searched through its vector index, a Parquet output exactly."
)


def add_search_command(sub) -> None:
    help_line = "the rows of an embed output nearest to query texts"
    p = sub.add_parser("search", help=help_line, description=_DESCRIPTION)
    p.add_argument("output", help="an embed run's `output.path`, local or s3://")
    p.add_argument("query", nargs="?", help="the text to search for")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--where", help="SQL filter on the output's columns, e.g. \"language = 'en'\"")
    p.add_argument("--file", help="queries, one a line (instead of QUERY)")
    p.add_argument("--json", action="store_true", help="one JSON object a query")
    p.add_argument("--exact", action="store_true", help="scan every vector, not the index")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: argparse.Namespace) -> int:
    from sbertray.config import StorageConfig
    from sbertray.search import OutputSearcher

    queries = _queries(args)
    if args.k < 1:
        raise SearchError(f"-k {args.k}: ask for at least one result")
    searcher = OutputSearcher(
        args.output, StorageConfig(endpoint_url=args.endpoint_url), exact=args.exact
    )
    for result in searcher.search(queries, k=args.k, where=args.where):
        print(_as_json(result) if args.json else _as_text(result))
    return 0


def _queries(args: argparse.Namespace) -> list[str]:
    if args.query is not None and args.file is not None:
        raise SearchError("give a QUERY text or --file, not both")
    if args.query is None and args.file is None:
        raise SearchError("give a QUERY text, or --file with one query a line")
    if args.query is not None:
        return [args.query]
    try:
        with open(args.file, encoding="utf-8") as handle:
            queries = [line.strip() for line in handle if line.strip()]
    except OSError as exc:
        raise SearchError(f"--file {args.file}: {exc.strerror or exc}") from None
    if not queries:
        raise SearchError(f"--file {args.file}: no queries (one a line)")
    return queries


def _as_json(result: SearchResult) -> str:
    record = {"query": result.query, "method": result.method, "hits": result.hits}
    return json.dumps(record, default=str, ensure_ascii=False)


def _as_text(result: SearchResult) -> str:
    header = f"query: {result.query!r} ({result.method}, {result.seconds * 1000:.0f} ms)"
    if not result.hits:
        return f"{header}\n  no rows match"
    columns = list(result.hits[0])
    cells = [[_cell(hit[c]) for c in columns] for hit in result.hits]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(["#", *columns], [2, *widths], strict=True))]
    for rank, row in enumerate(cells, 1):
        lines.append(
            "  ".join(v.ljust(w) for v, w in zip([str(rank), *row], [2, *widths], strict=True))
        )
    return "\n".join([header, *("  " + line.rstrip() for line in lines)])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)
