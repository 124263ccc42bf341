"""The GPU embedding actor's batch path without Ray (Ray is too big to carry to a lent GPU
machine): sentences/s of the actors' ``TextEncoder`` in bf16 against plain ``SentenceTransformer.encode``
in fp32 and fp16, on STS-B-length sentences.

Like an embedding actor, the encoder gets blocks (units) from two threads at once, so one
block is tokenized while the other runs on the GPU. ``--actors 1,4,16`` then runs the actor path
in that many processes at once, sharing the GPU as the pool's GPU actors do (one per CPU of a
node's CPUs per GPU), each with a share of the rows: their sentences/s together, from a common
start to the last one's end.

    python benchmarks/gpu_encode.py --rows 1000000            # on a GPU machine
    python benchmarks/gpu_encode.py --rows 4000 --device cpu --actors 2  # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import Timer, record, stsb_sentences  # noqa: E402


def actor_encoder(device: str):
    """The encoder a GPU actor builds (bf16 and GPU batch sizes on CUDA)."""
    from sentence_transformers import SentenceTransformer

    from sbertray.embed.backends import encoder_for_model
    from sbertray.embed.encoder import batch_defaults
    from sbertray.modeling import bundled_model_path

    token_budget, max_batch_rows = batch_defaults(device)
    return encoder_for_model(
        SentenceTransformer(bundled_model_path(), device=device),
        device=device,
        precision="bf16" if device.startswith("cuda") else "fp32",
        token_budget=token_budget,
        max_batch_rows=max_batch_rows,
    )


def encode_units(encoder, texts: list[str], block: int) -> None:
    """As an actor does: units from two threads at once."""
    units = [texts[i : i + block] for i in range(0, len(texts), block)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(encoder.encode, units))


def one_actor(rows: int, block: int, device: str, start, done) -> None:
    """A process of ``--actors``: loads and warms up, waits for the others, encodes its rows."""
    import torch

    texts = stsb_sentences(rows)
    encoder = actor_encoder(device)
    encode_units(encoder, texts[:2000], block)
    start.wait()
    encode_units(encoder, texts, block)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    done.put(time.perf_counter())


def shared_gpu_rate(actors: int, rows: int, block: int, device: str) -> float:
    """Sentences/s of ``actors`` processes encoding ``rows`` between them at once."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    start, done = context.Barrier(actors + 1), context.Queue()
    procs = [
        context.Process(target=one_actor, args=(rows // actors, block, device, start, done))
        for _ in range(actors)
    ]
    for proc in procs:
        proc.start()
    start.wait()
    began = time.perf_counter()
    ends = [done.get() for _ in procs]
    for proc in procs:
        proc.join()
    return actors * (rows // actors) / (max(ends) - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=50_000, help="rows per unit")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--actors",
        type=lambda v: [int(n) for n in v.split(",") if n],
        default=[1, 4, 16],
        help="processes sharing the device at once, comma-separated ('' for none)",
    )
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

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

    encoder = actor_encoder(args.device)
    precision = "bf16" if cuda else "fp32"
    timed(f"sbertray actor path {precision}", lambda x: encode_units(encoder, x, args.block))
    for actors in args.actors:
        name = f"sbertray, {actors} actor(s) sharing it"
        rate[name] = shared_gpu_rate(actors, args.rows, args.block, args.device)
        print(f"{name:<34} {rate[name]:>10,.0f} sentences/s", flush=True)
    record("gpu_encode", {"rows": len(texts), "device": args.device, "sentences_per_s": rate})


if __name__ == "__main__":
    main()
