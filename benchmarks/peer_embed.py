"""One peer contender of ``benchmarks/peers.py``, run in the peers' own virtualenv (their pins
conflict with sbertray's): what a user writes instead of sbertray, Parquet in, Parquet out.

    python peer_embed.py prepare MODEL EXPORTS        # the saved exports, once, untimed
    python peer_embed.py run CONTENDER MODEL EXPORTS INPUT_DIR OUTPUT_FILE

``run`` prints one JSON line: the rows and the seconds of loading (imports and model) and of
the rest (reading, encoding, writing). Only pyarrow, numpy and the peer libraries are imported.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

FASTEMBED_NAME = "sbertray-bench/all-MiniLM-L6-v2"


def sentence_transformer(model: str, exports: Path, contender: str):
    from sentence_transformers import SentenceTransformer

    backend = contender.split("-")[1]  # st-openvino-saved -> openvino
    if backend == "torch":
        return SentenceTransformer(model, device="cpu")
    source = str(exports / backend) if contender.endswith("-saved") else model
    return SentenceTransformer(source, device="cpu", backend=backend)


def fastembed_model(exports: Path):
    """fastembed on the saved ONNX export (it fetches its own models from a hub otherwise)."""
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    TextEmbedding.add_custom_model(
        model=FASTEMBED_NAME,
        pooling=PoolingType.MEAN,
        normalization=True,
        sources=ModelSource(hf=FASTEMBED_NAME),
        dim=384,
        model_file="onnx/model.onnx",
    )
    return TextEmbedding(FASTEMBED_NAME, specific_model_path=str(exports / "onnx"))


def prepare(model: str, exports: Path) -> None:
    """Each backend's export saved once, as sentence-transformers' docs advise."""
    from sentence_transformers import SentenceTransformer

    for backend in ("openvino", "onnx"):
        SentenceTransformer(model, device="cpu", backend=backend).save_pretrained(
            str(exports / backend)
        )


def run(contender: str, model: str, exports: Path, input_dir: Path, output: Path) -> dict:
    if contender == "fastembed":
        embedder = fastembed_model(exports)

        def encode(texts):
            return np.stack(list(embedder.embed(texts)))
    else:
        st = sentence_transformer(model, exports, contender)

        def encode(texts):
            return st.encode(texts, batch_size=32, normalize_embeddings=True)

    loaded = time.perf_counter()
    table = pa.concat_tables(pq.read_table(f) for f in sorted(input_dir.glob("*.parquet")))
    vectors = np.asarray(encode(table.column("text").to_pylist()), dtype=np.float32)
    pq.write_table(
        pa.table(
            {
                "id": table.column("id"),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.reshape(-1)), vectors.shape[1]
                ),
            }
        ),
        output,
    )
    done = time.perf_counter()
    return {
        "rows": table.num_rows,
        "load_s": round(loaded - STARTED, 2),
        "after_load_s": round(done - loaded, 2),
    }


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "prepare":
        prepare(args[0], Path(args[1]))
    else:
        contender, model, exports, input_dir, output = args
        print(json.dumps(run(contender, model, Path(exports), Path(input_dir), Path(output))))
