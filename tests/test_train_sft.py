"""End-to-end SFT on the tiny model and the bundled HH sample: the loss falls, checkpoints reload, runs repeat."""
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from checkpoints import checkpoint_info
from models import load_causal_lm
from train import train
from weights import locate, read_policy_state

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ("loss=sft", "model=tiny", "datasets=[hh]", "mode=train", "wandb.enabled=false", "lr=1e-3",
        "warmup_steps=2", "n_epochs=null", "n_examples=96", "n_eval_examples=32", "eval_every=48")


def run_sft(compose_config, tmp_path, exp_name, *overrides):
    config = compose_config(*FAST, f"exp_name={exp_name}", f"cache_dir={tmp_path}", *overrides)
    return train(config, "sft"), config


def read_eval_losses(run_dir):
    """(first, last) eval loss: the first is stored in step-48, the last in LATEST (intermediate_checkpoints on)."""
    return tuple(checkpoint_info(run_dir / name)["metrics"]["loss/eval"] for name in ("step-48", "LATEST"))


def test_sft_lowers_the_loss_and_writes_a_reloadable_checkpoint(compose_config, tmp_path):
    checkpoint_dir, config = run_sft(compose_config, tmp_path, "sft", "intermediate_checkpoints=true")
    run_dir = tmp_path / "sft"
    assert checkpoint_dir == run_dir / "LATEST"
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.exp_name == "sft" and saved.saved_policy == str(run_dir / "LATEST")
    assert (run_dir / "tokenizer.json").exists() and (checkpoint_dir / "tokenizer.json").exists()

    info = checkpoint_info(checkpoint_dir)
    assert info["step_idx"] == 96
    assert {"loss/eval", "logps_eval/chosen"} <= set(info["metrics"])
    after_half, final = read_eval_losses(run_dir)
    assert final < after_half, "eval loss did not fall between the two evaluations"

    # The checkpoint reloads into a fresh model bit for bit, also through the original's LATEST/policy.pt path, and
    # it differs from the random initial weights.
    untrained = load_causal_lm(config.model, "float32", config.seed).state_dict()
    reloaded = locate(str(checkpoint_dir / "policy.pt"), config.cache_dir, "model.load_from").build(
        config.model, "float32", config.seed, vocab_size=0).state_dict()
    state = read_policy_state(checkpoint_dir)
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())
    assert any(not torch.equal(untrained[k], v) for k, v in state.items())


def test_same_seed_same_weights_other_seed_other_weights(compose_config, tmp_path):
    weights = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path, _ = run_sft(compose_config, tmp_path, name, f"seed={seed}", "do_first_eval=false")
        weights[name] = read_policy_state(path)
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert any(not torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_load_from_starts_from_a_saved_policy(compose_config, tmp_path):
    first, _ = run_sft(compose_config, tmp_path, "first", "n_examples=16")
    # The original's path, relative to cache_dir as users write it; the finished LATEST holds an export instead.
    relative = os.path.relpath(first / "policy.pt", tmp_path)
    second, _ = run_sft(compose_config, tmp_path, "second", f"model.load_from={relative}", "lr=1e-12",
                        "n_examples=8", "optimizer=SGD")
    start, end = read_policy_state(first), read_policy_state(second)
    assert all(torch.allclose(start[k], end[k], atol=1e-8) for k in start)


def cli(tmp_path, *args, env_extra=None):
    env = {**os.environ, "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run([sys.executable, "train.py", *args, f"cache_dir={tmp_path}"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_run_writes_config_checkpoint_and_offline_wandb(tmp_path):
    result = cli(tmp_path, *FAST, "wandb.enabled=true", "exp_name=cli", "n_examples=16")
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "cli"
    assert (run_dir / "config.yaml").exists() and (run_dir / "LATEST" / "model.safetensors").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb did not log offline"
    assert "loss/train" in result.stdout + result.stderr


def test_cli_config_errors_are_one_line_each_without_traceback(tmp_path):
    result = cli(tmp_path, "loss=sft", "model=tiny", "datasets=[hh,nosuch]", "mode=train", "++lrr=1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: invalid config (3 problems):" in result.stderr
    assert "  - exp_name: required but not set" in result.stderr
    assert "  - lrr: unknown key (did you mean lr?)" in result.stderr
    assert "  - datasets: unknown dataset 'nosuch'" in result.stderr
