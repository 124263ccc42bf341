"""The GPU embedding actor's batch path without Ray (Ray is too big to carry to a lent GPU
machine): sentences/s of the actors' ``TextEncoder`` in bf16 against plain ``SentenceTransformer.encode``
in fp32 and fp16, on STS-B-length sentences.

Like an embedding actor, the encoder gets blocks (units) from two threads at once, so one
block is tokenized while the other runs on the GPU.

    python benchmarks/gpu_encode.py --rows 1000000            # on a GPU machine
    python benchmarks/gpu_encode.py --rows 4000 --device cpu  # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import Timer, record, stsb_sentences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=50_000, help="rows per unit")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from sbertray.embed.backends import encoder_for_model
    from sbertray.embed.encoder import batch_defaults
    from sbertray.modeling import bundled_model_path

    texts = stsb_sentences(args.rows)
    cuda = args.device.startswith("cuda")
    rate = {}

    def timed(name, run):
        run(texts[:2000])  # warm-up: kernels, allocator
        if cuda:
            torch.cuda.synchronize()
        with Timer() as t:
            run(texts)
            if cuda:
                torch.cuda.synchronize()
        rate[name] = len(texts) / t.seconds
        print(f"{name:<34} {rate[name]:>10,.0f} sentences/s", flush=True)

    plain = SentenceTransformer(bundled_model_path(), device=args.device)
    timed("plain encode fp32 (batch 32)", lambda x: plain.encode(x, batch_size=32))
    if cuda:
        plain.half()
        timed("plain encode fp16 (batch 32)", lambda x: plain.encode(x, batch_size=32))
        timed("plain encode fp16 (batch 512)", lambda x: plain.encode(x, batch_size=512))

    precision = "bf16" if cuda else "fp32"
    token_budget, max_batch_rows = batch_defaults(args.device)
    encoder = encoder_for_model(
        SentenceTransformer(bundled_model_path(), device=args.device),
        device=args.device,
        precision=precision,
        token_budget=token_budget,
        max_batch_rows=max_batch_rows,
    )

    def actor_path(x):
        units = [x[i : i + args.block] for i in range(0, len(x), args.block)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(encoder.encode, units))

    timed(f"sbertray actor path {precision}", actor_path)
    record("gpu_encode", {"rows": len(texts), "device": args.device, "sentences_per_s": rate})


if __name__ == "__main__":
    main()
