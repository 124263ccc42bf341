"""A one-layer all-MiniLM-L6-v2 for tests of mechanics (units, commit, resume, reuse, faults,
multi-node): MiniLM's tokenizer, embeddings and first layer, mean pooling and Normalize, so its
vectors are 384-wide and its export runs on every backend, at about a sixth of MiniLM's cost.
Tests that assert quality use the real model."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path


@functools.cache
def tiny_model_path() -> str:
    """Built once per test run, in the model cache its pytest workers share
    (``conftest.model_cache``): the first worker to finish building it renames it into place."""
    target = Path(os.environ["SBERTRAY_CACHE"]) / "tiny-minilm"
    if not (target / "modules.json").exists():
        from sentence_transformers import SentenceTransformer

        from sbertray.modeling import bundled_model_path

        model = SentenceTransformer(bundled_model_path(), device="cpu")
        bert = model[0].auto_model
        bert.encoder.layer = bert.encoder.layer[:1]
        bert.config.num_hidden_layers = 1
        staging = tempfile.mkdtemp(prefix="tiny-minilm.partial-", dir=target.parent)
        model.save(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another worker's is in place
            shutil.rmtree(staging)
    return str(target)
