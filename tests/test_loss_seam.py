"""The seam between trainers and losses: what a loss declares (reference model, token-level log-probs, persistent
state, hyperparameter rules) and what it is handed (sums, token counts, per-token values), checked end to end on the
tiny model; and that every declaration is enforced before anything loads."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

import checkpoints
import humanline
import losses
import trainers
import weights
from configuration import CONFIG_DIR, ConfigError, validate_train_config
from dataloader import KL_KEYS, DataSpec, LoaderOptions, UnpairedPreferenceDataLoader
from loss_state import RunningRewardMean
from resolve import resolve_class
from test_performance import bare_trainer, right_padded_batch
from train import train
from utils import IGNORE_INDEX, get_token_logps

TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"
TINY_SETTINGS = {"model": "tiny", "datasets": "[hh]", "mode": "train", "wandb.enabled": "false", "n_epochs": "null",
                 "n_examples": "16", "n_eval_examples": "8", "do_first_eval": "false",
                 "minimum_log_interval_secs": "0", "lr": "1e-4"}


def tiny(**changes: str) -> list:
    """Overrides of a short tiny-model run; `changes` replace or add settings (dots written as __)."""
    settings = {**TINY_SETTINGS, **{key.replace("__", "."): value for key, value in changes.items()}}
    return [f"{key}={value}" for key, value in settings.items()]


TINY = tiny()
STRUCTURAL_LOSS_KEYS = {"name", "trainer", "dataloader", "use_reference_model"}
DATALOADER_LOSS_KEYS = {"chosen_control_token", "rejected_control_token"}  # read by csft's dataloader
LOSS_FILES = sorted((CONFIG_DIR / "loss").glob("*.yaml"))


@pytest.mark.parametrize("path", LOSS_FILES, ids=lambda p: p.stem)
def test_each_loss_yaml_holds_exactly_the_hyperparameters_its_trainer_declares(path):
    settings = yaml.safe_load(path.read_text())
    trainer = resolve_class(settings["trainer"], "trainers")
    declared = set(trainer.declared_hyperparameters())
    if getattr(trainer, "humanline_capable", False) and "humanline" in settings:
        declared |= set(humanline.KEYS)  # the humanline option's keys (humanline.py)
    assert set(settings) - STRUCTURAL_LOSS_KEYS - DATALOADER_LOSS_KEYS == declared
    assert settings["use_reference_model"] == trainer.requires_reference_model


@pytest.mark.parametrize("loss, override, message", [
    ("dpo", "loss.beta=0", "loss.beta: must be > 0, got 0"),
    ("dpo", "loss.beta=-0.1", "loss.beta: must be > 0, got -0.1"),
    ("cdpo", "loss.epsilon=0.7", "loss.epsilon: must be in [0, 0.5], got 0.7"),
    ("rdpo", "loss.epsilon=0.5", "loss.epsilon: must be in [0, 0.5), got 0.5"),
    ("ipo", "loss.tau=0", "loss.tau: must be > 0, got 0"),
    ("simpo", "loss.gamma=-1", "loss.gamma: must be >= 0, got -1"),
    ("orpo", "loss.lambda_coef=-0.5", "loss.lambda_coef: must be >= 0, got -0.5"),
    ("kto", "loss.desirable_weight=-1", "loss.desirable_weight: must be >= 0, got -1"),
    ("kto", "loss.undesirable_weight=-2.0", "loss.undesirable_weight: must be >= 0, got -2.0"),
    ("slic", "loss.beta=-1", "loss.beta: must be >= 0, got -1"),
    ("ppo", "loss.cliprange=0", "loss.cliprange: must be in (0, 1], got 0"),
    ("ppo", "loss.ppo_epochs=0", "loss.ppo_epochs: must be a positive integer, got 0"),
    ("bco", "loss.beta=abc", "loss.beta: expected a number > 0, got 'abc'"),
    ("simpo", "loss.use_reference_model=true", "loss.use_reference_model: SimPOTrainer uses no reference model"),
    ("ipo", "loss.use_reference_model=false", "loss.use_reference_model: IPOTrainer needs a reference model"),
])
def test_bad_loss_settings_are_one_line_errors_naming_the_key(loss, override, message, compose_config, tmp_path):
    config = compose_config(f"loss={loss}", override, "exp_name=bad", f"cache_dir={tmp_path}", *TINY)
    with pytest.raises(ConfigError) as info:
        validate_train_config(config, loss)
    assert str(info.value).startswith(f"invalid config: {message}"), "one problem, on one line"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("loss", ["simpo", "orpo", "slic"])
def test_reference_free_losses_load_no_reference_model_and_skip_the_cache(loss, compose_config, tmp_path, monkeypatch,
                                                                           capsys):
    loaded = []
    real = weights.load_model
    monkeypatch.setattr(weights, "load_model", lambda *args: loaded.append(args) or real(*args))
    train(compose_config(f"loss={loss}", f"exp_name={loss}", f"cache_dir={tmp_path}", "cache_reference_logprobs=true",
                         *TINY), loss)
    assert len(loaded) == 1, "only the policy is loaded"
    assert not (tmp_path / "reference_logps").exists()
    assert f"loss {loss} uses no reference model; there is nothing to cache" in capsys.readouterr().out


def float64_tiny_model(attention: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR), attn_implementation=attention,
                                            dtype=torch.float64)


@pytest.mark.parametrize("pack", [False, True])
def test_sequence_logps_hold_token_counts_and_on_request_the_per_token_values(pack):
    """Against the plain (B, T, V) computation in float64 (agreement to ~1e-13; asserted 1e-9): the sums, the number
    of labelled tokens, and for a token-level trainer every token's log-prob at its own position, with gradients."""
    model = float64_tiny_model()
    batch = right_padded_batch([37, 120, 5, 64, 90, 12])
    input_ids, attention_mask, labels = batch
    expected_tokens, expected_mask = get_token_logps(model(input_ids, attention_mask=attention_mask).logits, labels)
    weights = torch.rand(expected_tokens.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (expected_tokens * weights).sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    sequence = bare_trainer(pack).sequence_logps(model, *batch)
    assert sequence.token_logps is None and sequence.token_mask is None, "never built for sequence-level losses"
    torch.testing.assert_close(sequence.logps, expected_tokens.sum(1), rtol=1e-9, atol=1e-9)
    assert torch.equal(sequence.lengths, (labels != IGNORE_INDEX).sum(1).float())
    assert sequence.lengths.tolist() == [25, 80, 4, 43, 60, 8]

    tokens = bare_trainer(pack, token_level=True).sequence_logps(model, *batch)
    assert tokens.token_logps.shape == labels.shape
    assert torch.equal(tokens.token_mask[:, 1:], expected_mask) and not tokens.token_mask[:, 0].any()
    torch.testing.assert_close(tokens.token_logps[:, 1:], expected_tokens, rtol=1e-9, atol=1e-9)
    assert torch.equal(tokens.token_logps[~tokens.token_mask], torch.zeros((~tokens.token_mask).sum().item(),
                                                                           dtype=torch.float64))
    (tokens.token_logps[:, 1:] * weights).sum().backward()
    for expected, parameter in zip(expected_grads, model.parameters()):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


class TokenLevelMeanTrainer(trainers.PairedPreferenceTrainer):
    """A token-level loss for the seam test: DPO on per-token means computed from the per-token log-probs."""

    requires_reference_model = True
    token_level_logps = True
    hyperparameters = {"beta": losses.POSITIVE}
    seen = []

    def loss_from(self, policy, reference):
        chosen, rejected = (side.token_logps.sum(1) / side.token_mask.sum(1) for side in policy)
        # The reference passes through the same path, so its per-token values are there too.
        reference_chosen, reference_rejected = (side.token_logps.sum(1) / side.token_mask.sum(1) for side in reference)
        self.seen.append(max((a.mean_logps() - b).abs().max().item()
                             for a, b in zip(policy, (chosen, rejected))))
        return losses.dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=self.config.loss.beta)


def test_a_token_level_trainer_gets_per_token_log_probs_end_to_end_and_cannot_cache(compose_config, tmp_path):
    TokenLevelMeanTrainer.seen.clear()
    overrides = ("loss=dpo", "loss.trainer=test_loss_seam.TokenLevelMeanTrainer", f"cache_dir={tmp_path}", *TINY)
    train(compose_config(*overrides, "exp_name=token"), "dpo")
    assert len(TokenLevelMeanTrainer.seen) == 2 + 1, "2 train batches, 1 eval batch"
    assert max(TokenLevelMeanTrainer.seen) < 1e-5, "per-token values sum to the sequence sums (float32)"
    with pytest.raises(ConfigError, match="cache_reference_logprobs: TokenLevelMeanTrainer reads reference log-probs"):
        validate_train_config(compose_config(*overrides, "exp_name=cached", "cache_reference_logprobs=true"), "dpo")


class OverridingLossTrainer(trainers.DPOTrainer):
    """A user's DPO variant through the original's four-tensor contract: its `loss` wins over DPO's loss_function."""

    calls = 0

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        OverridingLossTrainer.calls += 1
        return losses.dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, beta=0.5)


def test_an_overridden_loss_wins_over_an_inherited_loss_function(compose_config, tmp_path):
    OverridingLossTrainer.calls = 0
    train(compose_config("loss=dpo", "loss.trainer=test_loss_seam.OverridingLossTrainer", "exp_name=o",
                         f"cache_dir={tmp_path}", *TINY), "dpo")
    assert OverridingLossTrainer.calls == 3


def output(chosen, rejected):
    return losses.LossOutput(torch.zeros(len(chosen) + len(rejected)), torch.tensor(chosen), torch.tensor(rejected))


def test_the_running_reward_mean_moves_only_at_optimizer_steps_and_round_trips_bitwise():
    state = RunningRewardMean()
    assert state.mean.item() == 0.0
    state.observe(output([1.0, 2.0], [3.0]))
    state.observe(output([], [-2.0]))
    assert state.mean.item() == 0.0, "a step's rewards count only once it ends"
    state.step()
    assert state.mean.item() == 1.0  # (1 + 2 + 3 - 2) / 4
    state.observe(output([11.0], []))
    state.step()
    assert state.mean.item() == 3.0  # (4 + 11) / 5
    restored = RunningRewardMean()
    restored.load_state_dict(state.state_dict())
    assert torch.equal(restored.mean, state.mean) and restored.loss_inputs().keys() == {"delta"}


@pytest.mark.parametrize("loss", ["bco", "bco-pair"])
def test_bco_resumes_bitwise_with_its_running_mean(loss, compose_config, tmp_path, monkeypatch):
    """A crash in batch 5 of 8, then resume_from=auto: final weights and the running mean equal an uninterrupted
    run's bit for bit (the mean is part of the resumable state; without it the resumed run would start from 0)."""
    overrides = (f"loss={loss}", "exp_name=run", "checkpoint_every=8",
                 *tiny(n_examples="32", model__batch_size="4", lr="1e-3"))
    train(compose_config(*overrides, f"cache_dir={tmp_path / 'a'}"), loss)
    real = trainers.BasicTrainer.train_on_batch

    def crash_in_batch_5(self, batch, metrics, pending):
        if self.batch_counter == 4:
            raise KeyboardInterrupt("crash")
        return real(self, batch, metrics, pending)

    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", crash_in_batch_5)
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(*overrides, f"cache_dir={tmp_path / 'b'}"), loss)
    saved = checkpoints.read_trainer_state(tmp_path / "b" / "run" / "LATEST")["loss_state"]
    assert saved["count"].item() == 16 * (2 if loss == "bco-pair" else 1), "the 4 steps before batch 5, 4 examples each"
    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", real)
    train(compose_config(*overrides, f"cache_dir={tmp_path / 'b'}", "resume_from=auto"), loss)
    finals = [checkpoints.read_trainer_state(tmp_path / run / "run" / "LATEST") for run in ("a", "b")]
    assert finals[0]["loss_state"]["count"].item() > saved["count"].item()
    for key in ("total", "count"):
        assert torch.equal(finals[0]["loss_state"][key], finals[1]["loss_state"][key])
    policies = [weights.read_policy_state(tmp_path / run / "run" / "LATEST") for run in ("a", "b")]
    assert all(torch.equal(policies[0][name], policies[1][name]) for name in policies[0])


def test_kl_rows_pair_responses_within_the_optimizer_step_not_the_micro_batch(compose_config, tiny_tokenizer):
    """Batches of 2 with KL groups of 4 (2 micro-batches per step) carry the KL rows of batches of 4."""
    config = compose_config("loss=kto", "exp_name=x", *TINY)
    spec = DataSpec(["hh"], local_paths=dict(config.local_datasets))

    def loader(batch_size, group):
        options = LoaderOptions(batch_size=batch_size, kl_group_size=group, n_examples=16, max_length=64,
                                max_prompt_length=32)
        return UnpairedPreferenceDataLoader(spec, tiny_tokenizer, "train", options)

    def kl_rows(batch_size, group):
        return [row[row != tiny_tokenizer.pad_token_id].tolist()
                for batch in loader(batch_size, group) for row in batch[KL_KEYS.combined_input_ids]]

    whole = kl_rows(4, 4)
    assert kl_rows(2, 4) == whole
    assert kl_rows(2, 2) != whole, "pairing within micro-batches of 2 would give other rows"
    with pytest.raises(ValueError, match="kl_group_size=6 must be a multiple of batch_size=4"):
        loader(4, 6)


def test_kto_reads_one_reference_point_per_optimizer_step(compose_config, tmp_path, monkeypatch):
    """With 2 micro-batches per step, both read the z that prepare_step computed over the step's 16 KL rows."""
    estimates, seen = [], []
    real_estimate, real_loss = trainers.UnpairedPreferenceTrainer.kl_estimate, losses.kto_loss

    def recording_estimate(self, batches):
        value = real_estimate(self, batches)
        estimates.append((len(batches), value.item()))
        return value

    monkeypatch.setattr(trainers.UnpairedPreferenceTrainer, "kl_estimate", recording_estimate)
    monkeypatch.setattr(trainers.KTOTrainer, "loss_function",
                        lambda *args, kl_estimate, **kwargs: seen.append(kl_estimate.item()) or real_loss(
                            *args, kl_estimate=kl_estimate, **kwargs))
    train(compose_config("loss=kto", "exp_name=z", f"cache_dir={tmp_path}", "model.gradient_accumulation_steps=2",
                         *TINY), "kto")
    train_estimates = [value for n_batches, value in estimates if n_batches == 2]
    assert len(train_estimates) == 1, "16 examples in batches of 8: one optimizer step of 2 micro-batches"
    assert seen[:2] == [train_estimates[0]] * 2


def readme_example(name: str) -> str:
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```\w+\n(.*?)```", readme, re.S)
    assert match, f"README has no example {name}"
    return match.group(1)


def test_readme_length_normalised_loss_walkthrough_runs_as_written(tmp_path):
    """The README's second walkthrough (a reference-free loss on per-token log-probs, one class and one YAML) as a
    user runs it: its declared hyperparameter is checked before anything loads, then it trains."""
    (tmp_path / "mynormlosses.py").write_text(readme_example("mynormlosses.py"))
    config_dir = tmp_path / "myconfig"
    (config_dir / "loss").mkdir(parents=True)
    (config_dir / "loss" / "slic-norm.yaml").write_text(readme_example("config/loss/slic-norm.yaml"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "train.py", "loss=slic-norm", *TINY, "exp_name=slic_norm",
                               f"cache_dir={tmp_path}", f"hydra.searchpath=[file://{config_dir}]", *extra],
                              cwd=CONFIG_DIR.parent, env=env, capture_output=True, text=True, timeout=300)

    result = run("loss.margin=-1")
    assert result.returncode == 1 and "loss.margin: must be >= 0, got -1" in result.stderr, result.stderr[-2000:]
    result = run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert weights.find_weights(tmp_path / "slic_norm" / "LATEST") is not None
    assert "rewards_train/accuracies" in result.stdout


def test_every_loss_trains_from_the_command_line(tmp_path):
    """`python train.py loss=NAME model=tiny datasets=[hh] exp_name=... mode=train` for every config/loss/*.yaml, as
    one Hydra multirun (one interpreter start for all of them); grpo, which needs scored data, is run from the command
    line in tests/test_grpo.py."""
    names = [path.stem for path in LOSS_FILES if path.stem != "grpo"]
    result = subprocess.run([sys.executable, "train.py", "-m", f"loss={','.join(names)}", *TINY,
                             "exp_name=cli_${loss.name}", f"cache_dir={tmp_path}",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            cwd=CONFIG_DIR.parent, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    missing = [name for name in names if weights.find_weights(tmp_path / f"cli_{name}" / "LATEST") is None]
    assert not missing, f"no final checkpoint for {missing}"
