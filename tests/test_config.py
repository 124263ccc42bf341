from pathlib import Path

import pytest

from sbertray.config import ConfigError, EmbedConfig, TrainConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "jobs" / "configs"

# (recipe, global batch, epochs, max_seq_length, Normalize) exactly as the seed cards state.
SEED_RECIPES = [
    ("courses.yaml", 32, 3, 256, True),  # seed 000
    ("stsb.yaml", 16, 16, 256, True),  # seed 001
    ("concepts.yaml", 10, 5, 256, True),  # seed 002
    ("web_sections.yaml", 16, 5, 512, False),  # seed 003
    ("resume_roles.yaml", 8, 3, 256, True),  # seed 004
]


@pytest.mark.parametrize("recipe,batch,epochs,max_seq,normalize", SEED_RECIPES)
def test_seed_recipes_reproduce_card_hyperparameters(recipe, batch, epochs, max_seq, normalize):
    config = load_config(TrainConfig, RECIPES / recipe)
    t = config.training
    assert (t.batch_size, t.epochs, t.max_seq_length, t.normalize) == (
        batch,
        epochs,
        max_seq,
        normalize,
    )
    assert (t.learning_rate, t.lr_scheduler, t.seed, t.max_grad_norm) == (5e-5, "linear", 42, 1.0)
    assert (t.warmup_ratio, t.warmup_steps, t.weight_decay) == (0.0, 0, 0.0)
    assert config.base_model == "sentence-transformers/all-MiniLM-L6-v2"


def _minimal(**extra) -> dict:
    return {"name": "x", "train": {"path": "a.csv"}, "output": {"model": "out"}, **extra}


def test_the_searched_recipes_carry_their_search():
    tuned = load_config(TrainConfig, RECIPES / "stsb_tuned.yaml")
    assert tuned.training.epochs <= 4 and tuned.tune.metric == "spearman_cosine"
    retrieval = load_config(TrainConfig, RECIPES / "stsb_retrieval.yaml")
    assert (retrieval.training.loss, retrieval.train.min_label) == ("mnrl", 0.8)
    assert retrieval.tune.metric == retrieval.training.select_metric == "mrr@10"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(
        ConfigError, match=r"unknown key `training.epoch` \(did you mean `epochs`\?\)"
    ):
        parse_config(TrainConfig, _minimal(training={"epoch": 3}))


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="missing required key `output`"):
        parse_config(TrainConfig, {"name": "x", "train": {"path": "a.csv"}})


def test_batch_size_must_divide_across_workers():
    with pytest.raises(
        ConfigError,
        match=r"`training.batch_size` \(10\) must be divisible by `scaling.num_workers` \(4\)",
    ):
        parse_config(TrainConfig, _minimal(training={"batch_size": 10}, scaling={"num_workers": 4}))


def test_a_run_in_the_driver_has_no_worker_restarts_and_no_tune_trials():
    scaling = parse_config(TrainConfig, _minimal(scaling={"num_workers": 0})).scaling
    assert scaling.in_driver and scaling.world_size == 1
    with pytest.raises(ConfigError, match=r"`scaling.max_failures` restarts Ray Train workers"):
        parse_config(TrainConfig, _minimal(scaling={"num_workers": 0, "max_failures": 1}))
    tune = {"search": {"epochs": [1, 2]}}
    recipe = _minimal(scaling={"num_workers": 0}, dev={"path": "b.csv"}, tune=tune)
    with pytest.raises(ConfigError, match=r"`tune` runs each trial as a Ray Train run"):
        parse_config(TrainConfig, recipe)


def test_half_precision_needs_gpu_or_native_bf16_cpu(monkeypatch):
    import sbertray.config.train as train_config

    with pytest.raises(ConfigError, match="`training.precision: fp16` needs `scaling.use_gpu"):
        parse_config(TrainConfig, _minimal(training={"precision": "fp16"}))
    monkeypatch.setattr(train_config, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ConfigError, match="CPUs with native bf16 .* this CPU has neither"):
        parse_config(TrainConfig, _minimal(training={"precision": "bf16"}))
    for gpu, native in ((True, False), (False, True)):
        monkeypatch.setattr(train_config, "cpu_has_native_bf16", lambda native=native: native)
        cfg = parse_config(
            TrainConfig, _minimal(training={"precision": "bf16"}, scaling={"use_gpu": gpu})
        )
        assert cfg.training.precision == "bf16"


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        ({"precision": "int8", "backend": "torch"}, "int8` needs `compute.backend: onnx"),
        ({"backend": "openvino", "precision": "fp16"}, "openvino` runs on CPU in fp32 or bf16"),
        ({"backend": "onnx", "precision": "bf16"}, "onnx` runs on CPU in fp32 or int8"),
        ({"backend": "onnx", "device": "cuda"}, "onnx` runs on CPU"),
        ({"precision": "fp16", "device": "cpu"}, "fp16` needs a GPU"),
        ({"backend": "tensorrt"}, "`compute.backend: tensorrt` is not a backend; use auto or one"),
        ({"precision": "fp8"}, "`compute.precision: fp8` is not a precision; use auto or one"),
    ],
)
def test_embed_backend_and_precision_combinations(compute, message):
    """Checked against the backend registry where the embed plan is made."""
    from sbertray.embed import backends

    embed = {"input": {"path": "in/"}, "output": {"path": "out/"}}
    with pytest.raises(ConfigError, match=message):
        backends.check_config(parse_config(EmbedConfig, {**embed, "compute": compute}).compute)
    backends.check_config(
        parse_config(EmbedConfig, {**embed, "compute": {"precision": "int8"}}).compute
    )


def test_bad_literal_shows_value():
    with pytest.raises(ConfigError, match=r"`train.on_bad_row`.*got 'ignore'"):
        parse_config(TrainConfig, _minimal(train={"path": "a.csv", "on_bad_row": "ignore"}))


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain: {path: a.csv}\noutput: {model: out}\n")
    cfg = load_config(
        TrainConfig, path, ["training.epochs=2", "scaling.num_workers=2", "train.limit=100"]
    )
    assert cfg.training.epochs == 2 and cfg.scaling.num_workers == 2 and cfg.train.limit == 100
    with pytest.raises(ConfigError, match="must look like `key.path=value`"):
        load_config(TrainConfig, path, ["training.epochs"])


def test_env_references(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\ntrain: {path: '${DATA_ROOT}/a.csv'}\noutput: {model: out}\n"
        "storage: {endpoint_url: '${S3_ENDPOINT:-http://127.0.0.1:9000}'}\n"
    )
    monkeypatch.setenv("DATA_ROOT", "s3://bucket")
    cfg = load_config(TrainConfig, path)
    assert cfg.train.path == "s3://bucket/a.csv"
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    monkeypatch.delenv("DATA_ROOT")
    with pytest.raises(ConfigError, match=r"`train.path` references \$\{DATA_ROOT\}"):
        load_config(TrainConfig, path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(TrainConfig, "nope.yaml")


def test_losses_and_the_data_they_need():
    unlabelled = {"path": "a.csv", "columns": {"label": None}}
    with pytest.raises(ConfigError, match=r"`training.loss: cosine` learns from labelled pairs"):
        parse_config(TrainConfig, _minimal(train=unlabelled))
    with pytest.raises(ConfigError, match=r"set `train.min_label` \(e.g. 0.8\)"):
        parse_config(TrainConfig, _minimal(training={"loss": "mnrl"}))
    for train in (unlabelled, {"path": "a.csv", "min_label": 0.8}):
        config = parse_config(TrainConfig, _minimal(train=train, training={"loss": "cached_mnrl"}))
        assert config.training.loss == "cached_mnrl"
    with pytest.raises(ConfigError, match=r"`training.select_metric: mrr@10` is a retrieval"):
        parse_config(TrainConfig, _minimal(training={"select_metric": "mrr@10"}))
