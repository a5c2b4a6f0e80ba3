"""Every loss end to end on the tiny model, the README's add-a-loss walkthrough, trainer errors, and a check that
SFT followed by each preference loss really aligns the policy on a synthetic preference task."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import checkpoint_info, load_checkpoint
from configuration import ConfigError
from dataloader import CHOSEN_KEYS, REJECTED_KEYS, DataSpec, LoaderOptions, PairedPreferenceDataLoader
from models import load_causal_lm, load_tokenizer
from train import train
from trainers import TrainingError, concatenate_rows
from utils import get_batch_logps
from weights import read_policy_state

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ("model=tiny", "datasets=[hh]", "mode=train", "wandb.enabled=false", "n_epochs=null",
        "n_examples=16", "n_eval_examples=8", "do_first_eval=false", "minimum_log_interval_secs=0", "lr=1e-4")
COMMON_METRICS = {"grad_norm", "examples_per_second", "counters/examples", "counters/updates"}
PAIRED = {"rewards_train/chosen", "rewards_train/rejected", "rewards_train/accuracies", "rewards_train/margins",
          "logps_train/chosen", "logps_train/rejected", "loss/train"}
UNPAIRED = {"rewards_train/chosen", "rewards_train/rejected", "rewards_train/margins", "loss/train"}
TRAIN_METRICS = {
    "sft": {"logps_train/chosen", "loss/train"},
    "csft": {"logps_train/chosen", "loss/train"},
    **{loss: PAIRED for loss in ("dpo", "cdpo", "rdpo", "ipo", "simpo", "orpo", "slic", "hinge", "nca", "apo-zero",
                                 "apo-down", "sppo-hard", "dpo-norm", "bco-pair")},
    "kto": UNPAIRED | {"rewards_train/KL_estimate"},
    **{loss: UNPAIRED for loss in ("kto-simple", "kto-zero", "apo-zero-unpaired", "bco")},
    "ppo": {"loss/total", "loss/critic", "loss/policy", "loss/entropy", "loss/policykl", "loss/seqratio",
            "clipfrac/policy", "returns/mean", "returns/var", "val/mean", "val/var"},
}


def logged_train_metrics(stdout: str) -> dict:
    """The last `train after N examples: key=value ...` line printed by the trainer."""
    lines = [line for line in stdout.splitlines() if line.startswith("train after")]
    return dict(pair.split("=", 1) for pair in lines[-1].split(": ", 1)[1].split())


@pytest.mark.parametrize("loss", sorted(TRAIN_METRICS))
def test_every_loss_trains_on_the_tiny_model(loss, compose_config, tmp_path, capsys):
    checkpoint_dir = train(compose_config(f"loss={loss}", f"exp_name={loss}", f"cache_dir={tmp_path}", *TINY), loss)
    metrics = logged_train_metrics(capsys.readouterr().out)
    assert TRAIN_METRICS[loss] | COMMON_METRICS <= set(metrics), f"missing: {TRAIN_METRICS[loss] - set(metrics)}"
    loss_key = "loss/total" if loss == "ppo" else "loss/train"
    assert torch.isfinite(torch.tensor(float(metrics[loss_key])))
    assert metrics["counters/examples"] == "16" and metrics["counters/updates"] == "2"

    info, state = checkpoint_info(checkpoint_dir), read_policy_state(checkpoint_dir)
    assert info["step_idx"] == 16 and info["metrics"], "final evaluation metrics are stored with the policy"
    config = compose_config(f"loss={loss}", "exp_name=x", *TINY)
    initial = load_causal_lm(config.model, "float32", config.seed).state_dict()
    changed = [k for k, v in state.items() if v.shape == initial[k].shape and not torch.equal(v, initial[k])]
    assert changed, "no parameter changed"
    if loss == "ppo":
        assert set(load_checkpoint(checkpoint_dir / "v_head.pt")["state"]) == {
            f"summary.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    if loss == "csft":
        assert state["model.embed_tokens.weight"].shape[0] == 4098, "two control tokens were added"


def readme_example(name: str) -> str:
    """The code block that follows `<!-- example: NAME -->` in the README."""
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```\w+\n(.*?)```", readme, re.S)
    assert match, f"README has no example {name}"
    return match.group(1)


def test_readme_add_a_loss_walkthrough_runs_as_written(tmp_path):
    (tmp_path / "mylosses.py").write_text(readme_example("mylosses.py"))
    config_dir = tmp_path / "myconfig"
    (config_dir / "loss").mkdir(parents=True)
    (config_dir / "loss" / "my-kto.yaml").write_text(readme_example("config/loss/my-kto.yaml"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "train.py", "loss=my-kto", *TINY, "exp_name=my_kto", f"cache_dir={tmp_path}",
         f"hydra.searchpath=[file://{config_dir}]"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "my_kto" / "LATEST" / "model.safetensors").exists()
    assert "rewards_train/margins" in result.stdout


def test_a_loss_returning_wrong_shapes_gets_a_clear_error(compose_config, tmp_path, monkeypatch):
    """A loss override returning one loss per batch instead of one per example."""
    (tmp_path / "badlosses.py").write_text(
        "from trainers import PairedPreferenceTrainer\n"
        "class ScalarLossTrainer(PairedPreferenceTrainer):\n"
        "    def loss(self, pc, pr, rc, rr):\n"
        "        return (pr - pc).mean(), pc.detach(), pr.detach()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = compose_config("loss=slic", "loss.trainer=badlosses.ScalarLossTrainer", "exp_name=bad",
                            f"cache_dir={tmp_path}", *TINY)
    with pytest.raises(TrainingError, match=r"ScalarLossTrainer.loss returned losses of shape \(\); expected \(8,\)"):
        train(config, "slic")


@pytest.mark.parametrize("overrides, message", [
    (("loss=dpo", "loss.dataloader=UnpairedPreferenceDataLoader"),
     "loss.dataloader: DPOTrainer needs batches from PairedPreferenceDataLoader, not UnpairedPreferenceDataLoader"),
    (("loss=kto", "loss.dataloader=PairedPreferenceDataLoader"),
     "loss.dataloader: KTOTrainer needs batches from UnpairedPreferenceDataLoader, not PairedPreferenceDataLoader"),
    (("loss=kto", "model.batch_size=1"), "model.batch_size: KTO pairs each prompt with another example's response"),
    (("loss=dpo", "loss.use_reference_model=false"), "loss.use_reference_model: DPOTrainer needs a reference model"),
    (("loss=dpo", "loss.trainer=NoSuchTrainer"), "loss.trainer: 'NoSuchTrainer' is not a class in trainers"),
])
def test_mismatched_loss_configs_fail_before_loading(overrides, message, compose_config, tmp_path):
    config = compose_config(*overrides, "exp_name=bad", f"cache_dir={tmp_path}", *TINY)
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(config, overrides[0].split("=")[1])


# --- alignment on a synthetic preference task ------------------------------------------------------------

WORDS = ("apple river stone cloud music garden window candle forest bridge paper silver ocean market winter lamp "
         "tiger violin desert harbor pencil mirror castle rocket").split()


def write_synthetic_preferences(directory: Path, n_train: int = 64, n_test: int = 32) -> None:
    """Chosen responses are friendly and on topic, rejected ones curt refusals; test prompts are unseen."""
    rng = random.Random(0)
    for split, n, first_id in (("train", n_train, 0), ("test", n_test, 10_000)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for i in range(first_id, first_id + n):
                a, b = rng.choice(WORDS), rng.choice(WORDS)
                f.write(json.dumps({"prompt": f"Tell me about the {a} and the {b} (#{i}).",
                                    "chosen": f"The {a} is lovely. I am glad to help you with the {b}!",
                                    "rejected": f"No. The {b} is boring and I will not talk about it."}) + "\n")


def held_out_preferences(config, policy_path: Path, reference_path: Path):
    """Reward accuracy and mean (chosen - rejected) log-prob of policy and reference on the test pairs."""
    tokenizer = load_tokenizer(config.model)
    loader = PairedPreferenceDataLoader(DataSpec(["synth"], local_paths={"synth": config.local_datasets.synth}),
                                        tokenizer, "test", LoaderOptions(batch_size=8, n_epochs=1,
                                                                         max_length=config.model.max_length,
                                                                         max_prompt_length=config.model.max_prompt_length))
    logps = {}
    for name, path in (("policy", policy_path), ("reference", reference_path)):
        model = load_causal_lm(config.model, "float32", config.seed)
        model.load_state_dict(read_policy_state(path))
        chosen, rejected = [], []
        with torch.no_grad():
            for batch in loader:
                input_ids, attention_mask, labels = concatenate_rows(batch, (CHOSEN_KEYS, REJECTED_KEYS),
                                                                     tokenizer.pad_token_id)
                sequence_logps = get_batch_logps(model(input_ids, attention_mask=attention_mask).logits, labels)
                chosen.append(sequence_logps[:8])
                rejected.append(sequence_logps[8:])
        logps[name] = torch.cat(chosen), torch.cat(rejected)
    (policy_chosen, policy_rejected), (reference_chosen, reference_rejected) = logps["policy"], logps["reference"]
    accuracy = ((policy_chosen - reference_chosen) > (policy_rejected - reference_rejected)).float().mean().item()
    return accuracy, (policy_chosen - policy_rejected).mean().item(), (reference_chosen - reference_rejected).mean().item()


@pytest.fixture(scope="module")
def synthetic_sft(tmp_path_factory):
    """An SFT run on the synthetic task: the starting point (policy and reference) of DPO and KTO."""
    directory = tmp_path_factory.mktemp("synth")
    write_synthetic_preferences(directory)
    return directory


def synthetic_overrides(directory: Path):
    return ("model=tiny", "datasets=[synth]", "mode=train", "wandb.enabled=false", f"cache_dir={directory}",
            f"++local_datasets.synth={directory}", "do_first_eval=false", "n_eval_examples=32",
            "eval_every=100000", "warmup_steps=5")


ALIGNING_LOSSES = ("dpo", "cdpo", "rdpo", "ipo", "simpo", "orpo", "slic", "hinge", "nca", "apo-zero", "apo-down",
                   "sppo-hard", "dpo-norm", "bco-pair", "kto", "kto-zero", "bco")


@pytest.mark.parametrize("loss", ALIGNING_LOSSES)
def test_sft_then_preference_training_aligns_the_policy(loss, synthetic_sft, compose_config):
    common = synthetic_overrides(synthetic_sft)
    if not (synthetic_sft / "sft" / "LATEST").exists():
        train(compose_config("loss=sft", "exp_name=sft", "lr=1e-3", "n_epochs=2", *common), "sft")
    train(compose_config(f"loss={loss}", f"exp_name={loss}", "lr=1e-4", "n_epochs=1",
                         "model.load_from=sft/LATEST/policy.pt", *common), loss)
    config = compose_config(f"loss={loss}", f"exp_name={loss}", *common)
    accuracy, policy_margin, reference_margin = held_out_preferences(
        config, synthetic_sft / loss / "LATEST", synthetic_sft / "sft" / "LATEST")
    # Measured: accuracy 1.0 for every loss; over the SFT model's 73 nats the margin rises by 4.3 (sppo-hard) to 42
    # (kto), 17 for DPO. A loss that changed nothing would leave it where it was.
    assert accuracy >= 0.85, f"held-out reward accuracy {accuracy:.2f} (chance is 0.5)"
    assert policy_margin - reference_margin >= 2.0, \
        f"chosen-minus-rejected log-prob went from {reference_margin:.1f} to only {policy_margin:.1f}"
