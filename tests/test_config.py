"""Config composition and validation: every problem is reported at once, before anything loads."""
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from configuration import CONFIG_DIR, ConfigError, validate_eval_config, validate_train_config
from models import attention_implementation, attention_unavailable

BASE = ("loss=sft", "model=tiny", "datasets=[hh]", "exp_name=t", "mode=train")


def problems_of(config, loss="sft", n_processes=1):
    with pytest.raises(ConfigError) as info:
        validate_train_config(config, loss, n_processes)
    return str(info.value)


def test_valid_tiny_config_passes_and_points_hh_at_bundled_data(compose_config):
    config = compose_config(*BASE)
    assert validate_train_config(config, "sft") == []
    assert Path(config.local_datasets.hh, "harmless-base", "train.jsonl.gz").exists()
    assert Path(config.model.name_or_path, "config.json").exists()


def test_real_presets_use_the_hub_not_the_bundled_data(compose_config):
    config = compose_config("loss=sft", "model=llama7b", "datasets=[hh]", "exp_name=t", "mode=train")
    assert config.model.name_or_path == "huggyllama/llama-7b"
    assert config.model.block_name == "LlamaDecoderLayer"
    assert dict(config.local_datasets) == {}


def test_missing_required_keys_are_reported_together(compose_config):
    message = problems_of(compose_config("loss=sft", "model=tiny"))
    assert "3 problems" in message
    for key in ("datasets", "exp_name", "mode"):
        assert f"{key}: required but not set" in message


def test_misspelt_keys_name_the_key_and_suggest_the_right_one(compose_config):
    message = problems_of(compose_config(*BASE, "++lrr=1e-3", "++model.batch_sizee=4", "++loss.betta=0.1"))
    assert "lrr: unknown key (did you mean lr?)" in message
    assert "model.batch_sizee: unknown key (did you mean model.batch_size?)" in message
    assert "loss.betta: unknown key" in message
    assert "3 problems" in message


@pytest.mark.parametrize("overrides, expected", [
    (("model.batch_size=0",), "model.batch_size: expected a positive integer, got 0"),
    (("model.max_prompt_length=256",), "model.max_prompt_length: 256 must be below model.max_length=256"),
    (("model.policy_dtype=float33",), "model.policy_dtype: 'float33' is not a torch dtype"),
    (("optimizer=Adamm",), "optimizer: 'Adamm' is not a torch.optim optimizer"),
    (("lr=-1",), "lr: expected a positive number"),
    (("n_epochs=null",), "n_epochs: n_epochs and n_examples are both null"),
    (("eval_every=4",), "eval_every: 4 is smaller than model.batch_size=8"),
    (("frac_unique_desirable=1.5",), "frac_unique_desirable: expected a fraction in (0, 1]"),
    (("mode=sample",), "mode: train.py needs mode=train, got 'sample'"),
    (("datasets=[hh,nosuch]",), "datasets: unknown dataset 'nosuch' (available: "),
    (("++local_datasets.mine=does/not/exist.jsonl", "datasets=[mine]"), "local_datasets.mine: does/not/exist.jsonl does not exist"),
    (("model.load_from=nowhere/policy.pt",), "model.load_from: nowhere/policy.pt not found"),
    (("loss.trainer=NoSuchTrainer",), "loss.trainer: 'NoSuchTrainer' is not a class in trainers"),
    (("loss.dataloader=nosuchpkg.Loader",), "loss.dataloader: cannot import module 'nosuchpkg'"),
    (("loss.trainer=SFTDataLoader",), "loss.trainer: 'SFTDataLoader' is not a class in trainers"),
])
def test_each_invalid_value_gets_a_one_line_message(compose_config, overrides, expected):
    overridden = {o.split("=")[0].lstrip("+") for o in overrides}
    base = [b for b in BASE if b.split("=")[0] not in overridden]
    assert expected in problems_of(compose_config(*base, *overrides))


def test_batch_sizes_must_divide_over_processes(compose_config):
    message = problems_of(compose_config(*BASE, "model.eval_batch_size=4"), n_processes=3)
    assert "model.batch_size: 8 does not divide over 3 processes" in message
    assert "model.eval_batch_size: 4 does not divide over 3 processes" in message


def test_eval_every_is_rounded_down_to_a_multiple_of_the_batch_size(compose_config):
    config = compose_config(*BASE, "eval_every=100")
    warnings = validate_train_config(config, "sft")
    assert config.eval_every == 96
    assert warnings == ["eval_every=100 is not a multiple of model.batch_size=8; evaluating every 96 examples instead"]


def _config_files():
    return sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_key_has_a_comment(path):
    for line in path.read_text().splitlines():
        if re.match(r"^\s*[A-Za-z_][\w-]*:\s*\S", line) and not line.lstrip().startswith("-"):
            assert "#" in line, f"{path.name}: key without a comment: {line!r}"


def test_presets_only_override_known_model_keys():
    known = set(yaml.safe_load((CONFIG_DIR / "model" / "base_model.yaml").read_text()))
    for path in (CONFIG_DIR / "model").glob("*.yaml"):
        keys = set(yaml.safe_load(path.read_text())) - {"defaults"}
        assert keys <= known, f"{path.name} sets keys base_model.yaml does not define: {keys - known}"


def test_every_config_key_is_read_by_the_code():
    """A key nobody reads is dead config; each one must appear in the framework's source."""
    source = "\n".join(p.read_text() for p in CONFIG_DIR.parent.glob("*.py"))
    for path in (CONFIG_DIR / "config.yaml", CONFIG_DIR / "model" / "base_model.yaml"):
        for key in set(yaml.safe_load(path.read_text())) - {"defaults", "hydra"}:
            assert re.search(rf"\b{key}\b", source), f"{path.name}: '{key}' is never read"


@pytest.mark.parametrize("name, expected", [
    ("../escaped", "exp_name: '../escaped' is not a run name"), ("''", "exp_name: '' is not a run name"),
    (".", "exp_name: '.' is not a run name"), ("a/b", "exp_name: 'a/b' is not a run name"),
    ("-x", "exp_name: '-x' is not a run name"),
    ("wandb", "exp_name: 'wandb' is the name of a directory HALOs keeps in cache_dir"),
])
def test_a_run_name_is_one_plain_directory_name(compose_config, name, expected):
    base = [b for b in BASE if not b.startswith("exp_name")]
    assert expected in problems_of(compose_config(*base, f"exp_name={name}"))


def test_run_names_of_the_original_still_pass(compose_config):
    for name in ("archangel_sft+kto_llama7b", "llama7b_sft", "run-2.1", "7"):
        validate_train_config(compose_config(*[b for b in BASE if not b.startswith("exp_name")], f"exp_name={name}"),
                              "sft")


def test_local_run_dir_may_not_be_cache_dir_itself(compose_config, tmp_path):
    message = problems_of(compose_config(*BASE, f"cache_dir={tmp_path}", f"local_run_dir={tmp_path}/."))
    assert f"local_run_dir: {tmp_path}/. is cache_dir itself" in message


@pytest.mark.parametrize("seed", ["abc", "-1", "1.5", "4294967296", "true"])
def test_seed_is_an_integer_numpy_accepts(compose_config, seed):
    assert "seed: expected an integer from 0 to 4294967295" in problems_of(compose_config(*BASE, f"seed={seed}"))


@pytest.mark.skipif(attention_unavailable("flash_attention_2") is None, reason="flash-attention is available here")
def test_a_preset_asking_for_flash_attention_falls_back_to_sdpa_before_anything_loads(compose_config):
    config = compose_config("loss=sft", "model=llama7b", "datasets=[hh]", "exp_name=t", "mode=train")
    assert config.model.use_flash_attention
    warnings = validate_train_config(config, "sft")
    assert warnings == ["model.use_flash_attention: flash_attention_2 needs the flash-attn package and a CUDA GPU, "
                        "which this machine lacks; using sdpa attention instead"]
    assert attention_implementation(config.model) == "sdpa" and not config.model.use_flash_attention
    explicit = compose_config("loss=sft", "model=llama7b", "datasets=[hh]", "exp_name=t", "mode=train",
                              "model.use_flash_attention=true")
    with pytest.raises(ConfigError, match="drop the override to use sdpa"):
        validate_train_config(explicit, "sft", command_line_keys=["model.use_flash_attention"])


def test_eval_mode_uses_the_same_table_with_its_own_keys(compose_config):
    config = compose_config(*[b for b in BASE if b != "mode=train"], "mode=sample", "n_samples=0", "top_p=2",
                            "++lrr=1", "seed=abc")
    with pytest.raises(ConfigError) as info:
        validate_eval_config(config)
    message = str(info.value)
    for expected in ("lrr: unknown key (did you mean lr?)", "seed: expected an integer",
                     "n_samples: expected a positive integer or null", "top_p: expected a number in (0, 1]"):
        assert expected in message
    assert "mode: train.py needs mode=train" not in message
