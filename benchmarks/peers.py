"""sbertray against what users would pick instead, and against this machine's matmul limit.

Contenders, each its own process on the same Parquet files, timed from start to exit:
- sentence-transformers with torch (fp32: the fidelity reference), with ``backend="openvino"``
  and ``backend="onnx"``, each exporting at load and loading an export saved once beforehand
  (what its docs advise);
- fastembed (ONNX Runtime) on that saved ONNX export (it would fetch its model from a hub);
- ``sbertray embed`` with the default config.
The peers run in a virtualenv of their own (``~/.cache/sbertray/peers-venv``, made on first
use): their pins (optimum-intel, another transformers) conflict with sbertray's.

Texts are data the project has never seen, with the repeats real data has: sentences (short)
and paragraphs (long) of the docstrings of the Python files installed here, in a seeded random
order. Printed per contender: wall time, rows/s after load, per-row cosine to fp32 (mean, min)
and the fraction of the limit: OpenVINO (sbertray's CPU runtime) matmul GFLOP/s in bf16 and fp32
measured here on every core, over the model's FLOPs for these texts (real token counts, no
padding). Also the repeat rate and what embedding each distinct text once saves.

    .venv/bin/python benchmarks/peers.py                      # 50k short + 8k long texts
    .venv/bin/python benchmarks/peers.py --rows 3000 --long-rows 500   # a few minutes
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, Timer, record, run_sbertray  # noqa: E402

# Imported here, not where used: a run takes over an hour, and code edited meanwhile must not
# meet modules this process loaded before the edit.
from sbertray.config import ComputeConfig  # noqa: E402
from sbertray.embed import backends  # noqa: E402
from sbertray.hardware import cpu_has_native_bf16  # noqa: E402
from sbertray.modeling import bundled_model_path, cache_root, model_hash  # noqa: E402

PEER_PINS = ("sentence-transformers[openvino,onnx]==5.7.0", "fastembed==0.9.1", "pyarrow")
PEERS = (
    "st-torch",
    "st-openvino-export",
    "st-openvino-saved",
    "st-onnx-export",
    "st-onnx-saved",
    "fastembed",
)
REFERENCE = "st-torch"
# The default config, and the opt-in int8 (ONNX Runtime; quality guarded by the tests).
SBERTRAY = {"sbertray": {}, "sbertray-int8": {"precision": "int8"}}
SHORT_WORDS = 25  # short texts: docstring sentences of 3 to 25 words
# Long texts: docstring paragraphs of 50 to 100 words, most within the model's 256 tokens (a
# peer that truncates elsewhere, as fastembed at 512, would embed other text past it).
LONG_WORDS = 100
REPEAT_SAMPLE = 5000
SHARDS = 8


def peers_venv() -> Path:
    """The peers' virtualenv, made once: torch 2.13.0 first (the CPU wheel on this disk; a bare
    requirement would pull a CUDA build), then the peers at the pinned versions."""
    venv = cache_root() / "peers-venv"
    python, marker = venv / "bin" / "python", venv / "pins.json"
    if marker.exists() and json.loads(marker.read_text()) == list(PEER_PINS):
        return python
    print(f"making the peers' virtualenv {venv} (once, a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *PEER_PINS], check=True)
    marker.write_text(json.dumps(list(PEER_PINS)))
    return python


def docstring_texts() -> tuple[list[str], list[str]]:
    """Sentences (3-40 words) and paragraphs (50-200 words) of the docstrings of the Python
    standard library and this virtualenv's packages, cached after the first call (~3 min)."""
    cache = cache_root() / "bench-texts.json"
    if cache.exists():
        texts = json.loads(cache.read_text())
        return texts["short"], texts["long"]
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    files = sorted(
        {p for root in roots for p in root.rglob("*.py") if "site-packages" not in p.parts}
        | set(Path(paths["purelib"]).rglob("*.py"))
    )
    short, long = [], []
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                    para = re.sub(r"\s+", " ", para).strip()
                    if not para[:1].isalpha():
                        continue
                    if 50 <= len(para.split()) <= 200:
                        long.append(para)
                    short += [
                        s for s in re.split(r"(?<=[.!?]) ", para) if 3 <= len(s.split()) <= 40
                    ]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"short": short, "long": long}))
    return short, long


def sample(texts: list[str], rows: int, seed: int) -> list[str]:
    if rows > len(texts):
        sys.exit(f"only {len(texts):,} texts of this kind here; ask for fewer rows")
    return random.Random(seed).sample(texts, rows)


def write_shards(root: Path, texts: list[str]) -> None:
    root.mkdir(parents=True)
    for n, part in enumerate(np.array_split(np.arange(len(texts)), SHARDS)):
        table = pa.table({"id": pa.array(part, pa.int64()), "text": [texts[i] for i in part]})
        pq.write_table(table, root / f"shard-{n}.parquet", row_group_size=1024)


def matmul_gflops(precision: str, windows: int = 10) -> float:
    """OpenVINO CPU matmul throughput on every core, at MiniLM's FFN shape and a batch of 1,024
    tokens (the CPU token budget): the best of ``windows`` half-second windows, since a limit
    is what the machine reaches when nothing else gets in the way."""
    import openvino as ov
    import openvino.opset13 as ops

    tokens, hidden, inner = 1024, 384, 1536
    x = ops.parameter([tokens, hidden], np.float32)
    y = ops.matmul(x, ops.constant(np.random.rand(hidden, inner).astype(np.float32)), False, False)
    compiled = ov.Core().compile_model(
        ov.Model([y], [x]),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request, feed = compiled.create_infer_request(), np.random.rand(tokens, hidden).astype("f4")
    request.infer([feed])  # warm-up
    best = 0.0
    for _ in range(windows):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.5:
            request.infer([feed])
            done += 1
        best = max(best, 2 * tokens * hidden * inner * done / (time.perf_counter() - start) / 1e9)
    return best


def model_flops(texts: list[str], model_dir: str) -> tuple[float, float]:
    """Mean forward FLOPs and tokens per text: the encoder's matmuls at each text's real token count (no
    padding), attention scores included."""
    from tokenizers import Tokenizer

    config = json.loads((Path(model_dir) / "config.json").read_text())
    limit = json.loads((Path(model_dir) / "sentence_bert_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=limit["max_seq_length"])
    n = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)], dtype=np.float64)
    d, inner = config["hidden_size"], config["intermediate_size"]
    per_layer = 2 * n * (4 * d * d + 2 * d * inner) + 4 * n * n * d
    return float((config["num_hidden_layers"] * per_layer).mean()), float(n.mean())


def vectors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Ids and fp32 vectors of an output file or folder, sorted by id."""
    table = pq.read_table(path, columns=["id", "embedding"])
    ids = table.column("id").to_numpy()
    flat = table.column("embedding").combine_chunks().flatten().to_numpy()
    order = np.argsort(ids)
    return ids[order], flat.reshape(len(ids), -1)[order].astype(np.float32)


def fidelity(reference: Path, path: Path) -> tuple[float, float]:
    ref_ids, ref = vectors(reference)
    ids, got = vectors(path)
    if not np.array_equal(ref_ids, ids):
        raise AssertionError(f"{path}: ids differ from the reference's")
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return float(cos.mean()), float(cos.min())


def run_peer(python: Path, contender: str, model: str, exports: Path, data: Path, out: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with Timer() as t:
        proc = subprocess.run(
            [str(python), str(ROOT / "benchmarks/peer_embed.py"), "run", contender, model,
             str(exports), str(data), str(out)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
    if proc.returncode:
        sys.exit(f"{contender} failed:\n{proc.stderr[-3000:]}")
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    return t.seconds, timing["rows"] / timing["after_load_s"]


def run_sbertray_config(
    data: Path, out: Path, work: Path, compute: dict
) -> tuple[float, float, dict]:
    """One ``sbertray embed`` process: wall seconds, rows/s from the first unit's start to the
    last unit's commit, and the manifest's timings."""
    config = work / f"{out.name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"path": str(data), "id_column": "id", "text_column": "text"},
                "output": {"path": str(out)},
                "compute": compute,
            }
        )
    )
    seconds, _ = run_sbertray("embed", str(config))
    timings = json.loads((out / "_manifest.json").read_text())["timings"]
    return seconds, timings["embedded_rows"] / timings["units_span_s"], timings


def repeat_speedup(texts: list[str], model: str) -> tuple[float, float]:
    """The repeat rate of ``texts`` and the model step's speedup from the stage's rule: every
    row against each distinct text once, same encoder, in this process."""
    spec = backends.encoder_spec(
        ComputeConfig(), model=model, model_hash=model_hash(model), device="cpu",
        threads=None, exportable=True,
    )  # fmt: skip
    encoder = backends.build_encoder(spec, model)
    encoder.encode(texts[:64])  # warm-up: the runtime's first batches
    with Timer() as every:
        encoder.encode(texts)
    with Timer() as distinct:
        unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
        encoder.encode(list(unique)).embeddings[inverse]
    return 1 - len(unique) / len(texts), every.seconds / distinct.seconds


def contest(name: str, texts: list[str], python: Path, exports: Path, work: Path) -> dict:
    model = bundled_model_path()
    data = work / f"{name}-in"
    write_shards(data, texts)
    flops, mean_tokens = model_flops(texts, model)
    print(f"\n{name}: {len(texts):,} texts, mean {mean_tokens:.1f} tokens", flush=True)
    rows, manifests = {}, {}

    def done(contender: str, wall: float, rate: float, out: Path) -> None:
        """Records a contender, its fidelity to the reference (the first to run) at once."""
        reference = rows[REFERENCE]["out"] if rows else out
        mean, low = fidelity(reference, out)
        rows[contender] = {
            "wall_s": wall, "rows_per_s_after_load": rate, "cosine_mean": mean,
            "cosine_min": low, "out": out,
        }  # fmt: skip
        print(f"  {contender:<20} {wall:7.1f} s  {rate:8,.0f} rows/s after load  "
              f"cosine to fp32 mean {mean:.5f} min {low:.5f}", flush=True)  # fmt: skip

    for contender in PEERS:
        out = work / f"{name}-{contender}.parquet"
        done(contender, *run_peer(python, contender, model, exports, data, out), out)
    for contender, compute in SBERTRAY.items():
        out = work / f"{name}-{contender}"
        wall, rate, manifests[contender] = run_sbertray_config(data, out, work, compute)
        done(contender, wall, rate, out)
    for row in rows.values():
        del row["out"]
    return {
        "rows": len(texts),
        "mean_tokens": round(mean_tokens, 1),
        "mflop_per_text": round(flops / 1e6, 2),
        "repeat_rate": round(1 - len(set(texts)) / len(texts), 4),
        "texts_embedded": manifests["sbertray"]["texts_embedded"],
        "contenders": rows,
        "flops_per_text": flops,
    }


def report(name: str, result: dict, limit_gflops: dict[str, float]) -> dict:
    """Prints the table of one text set; returns the ratios that the goals are stated in."""
    rows, flops = result["contenders"], result.pop("flops_per_text")
    limits = {p: g * 1e9 / flops for p, g in limit_gflops.items()}
    strongest = min((r for r in PEERS if r != REFERENCE), key=lambda r: rows[r]["wall_s"])
    print(f"\n{name}: {result['rows']:,} texts, mean {result['mean_tokens']} tokens, "
          f"{result['mflop_per_text']} MFLOP each; repeat rate {result['repeat_rate']:.1%}; "
          f"limit {limits['bf16']:,.0f} rows/s (bf16), {limits['fp32']:,.0f} (fp32)")  # fmt: skip
    print(f"  {'contender':<20} {'wall':>8} {'rows/s':>8} {'cos mean':>9} {'cos min':>8} "
          f"{'of bf16':>8} {'of fp32':>8}")  # fmt: skip
    for contender, r in rows.items():
        r["of_bf16_limit"] = r["rows_per_s_after_load"] / limits["bf16"]
        r["of_fp32_limit"] = r["rows_per_s_after_load"] / limits["fp32"]
        print(f"  {contender:<20} {r['wall_s']:7.1f}s {r['rows_per_s_after_load']:8,.0f} "
              f"{r['cosine_mean']:9.5f} {r['cosine_min']:8.5f} {r['of_bf16_limit']:8.1%} "
              f"{r['of_fp32_limit']:8.1%}")  # fmt: skip
    ratio = rows[strongest]["wall_s"] / rows["sbertray"]["wall_s"]
    print(f"  sbertray vs the strongest peer ({strongest}) on wall time: {ratio:.2f}x")
    return {"strongest_peer": strongest, "sbertray_vs_strongest": round(ratio, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="short texts")
    parser.add_argument("--long-rows", type=int, default=8_000, help="long texts (0: none)")
    args = parser.parse_args()

    python = peers_venv()
    short, long = docstring_texts()
    short = [t for t in short if len(t.split()) <= SHORT_WORDS]
    sets = {"short": sample(short, args.rows, 0)}
    if args.long_rows:
        sets["long"] = sample([t for t in long if len(t.split()) <= LONG_WORDS], args.long_rows, 1)
    limit = {p: matmul_gflops(p) for p in ("bf16", "fp32")}
    print(f"OpenVINO matmul on {os.cpu_count()} cores: bf16 {limit['bf16']:.0f} GFLOP/s, "
          f"fp32 {limit['fp32']:.0f} GFLOP/s"
          + ("" if cpu_has_native_bf16() else " (no native bf16 on this CPU: the bf16 hint runs fp32)"),
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sbertray-peers-") as tmp:
        work = Path(tmp)
        exports = work / "exports"
        with Timer() as t:
            subprocess.run(
                [str(python), str(ROOT / "benchmarks/peer_embed.py"), "prepare",
                 bundled_model_path(), str(exports)],
                check=True, capture_output=True,
            )  # fmt: skip
        print(f"peers' exports saved once (untimed): {t.seconds:.1f} s", flush=True)
        first = sets["short"][:REPEAT_SAMPLE]
        repeats, speedup = repeat_speedup(first, bundled_model_path())
        print(f"repeated texts embedded once: {speedup:.2f}x on the model step (first "
              f"{len(first):,} short texts, repeat rate {repeats:.1%})", flush=True)  # fmt: skip
        results = {
            name: contest(name, texts, python, exports, work) for name, texts in sets.items()
        }
    # Measured before and after the contenders: the better of the two, in case the machine's
    # other load (it is shared) held the first one back.
    limit = {p: max(g, matmul_gflops(p)) for p, g in limit.items()}
    print(f"\nlimit used: bf16 {limit['bf16']:.0f} GFLOP/s, fp32 {limit['fp32']:.0f} GFLOP/s")
    ratios = {name: report(name, result, limit) for name, result in results.items()}
    record(
        "peers",
        {
            "matmul_gflops": {k: round(v, 1) for k, v in limit.items()},
            "results": results,
            "ratios": ratios,
            "repeat_sample": {
                "rows": len(first),
                "rate": round(repeats, 4),
                "speedup": round(speedup, 3),
            },
        },
    )


if __name__ == "__main__":
    main()
