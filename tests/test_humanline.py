"""Humanline DPO and KTO (loss.humanline): the clamp reaches the loss, the reference model is re-synced to the policy
every sync_freq optimizer steps, the synced reference is part of the resumable state, and bad settings are one-line
errors before anything loads."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import trainers
from checkpoints import REFERENCE, checkpoint_info, load_checkpoint
from configuration import ConfigError
from crash_resume import crash_and_resume
from train import train
from weights import read_policy_state

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN = ("model=tiny", "datasets=[hh]", "mode=train", "wandb.enabled=false", "lr=1e-3", "warmup_steps=0",
       "n_epochs=null", "n_examples=24", "n_eval_examples=8", "model.batch_size=4", "model.eval_batch_size=4",
       "model.max_length=64", "model.max_prompt_length=32", "eval_every=12", "checkpoint_every=4",
       "minimum_log_interval_secs=0", "print_interval_secs=1000")
FLOAT64 = ("model.policy_dtype=float64", "model.reference_dtype=float64")
SYNCS = []  # (optimizer step, largest |reference - policy| weight difference just after it), appended by the trainer
GRAD_NORMS = []  # each optimizer step's gradient norm before clipping


class RecordingDPOTrainer(trainers.DPOTrainer):
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        policy, reference = dict(self.policy.named_parameters()), dict(self.reference_model.named_parameters())
        SYNCS.append((self.update_counter, max((policy[n] - reference[n]).abs().max().item() for n in policy)))

    def clip_gradient(self) -> float:
        GRAD_NORMS.append(super().clip_gradient())
        return GRAD_NORMS[-1]


def compose_run(cache_dir: Path, loss: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        return compose(config_name="config", overrides=[f"loss={loss}", *RUN, "exp_name=run", f"cache_dir={cache_dir}",
                                                         *overrides])


def test_the_reference_takes_the_policys_weights_every_sync_freq_steps(tmp_path):
    SYNCS.clear()
    train(compose_run(tmp_path, "dpo", "loss.trainer=test_humanline.RecordingDPOTrainer", "loss.humanline=true",
                      "loss.sync_freq=2"), "dpo")
    assert [step for step, _ in SYNCS] == [1, 2, 3, 4, 5, 6]
    assert [difference == 0.0 for _, difference in SYNCS] == [False, True, False, True, False, True]


def test_the_clamp_reaches_the_loss(tmp_path):
    """Bounds [0, 0] clamp every token's log-ratio to 0. At the first step every log-ratio is exactly 0, the bound
    itself, where a clamp passes the gradient on (as PPO's clipping does); after it, none passes: no gradient at all.
    Bounds far away clamp nothing: the run is plain DPO's (float64, so the two ways of summing agree to ~1e-13)."""
    GRAD_NORMS.clear()
    train(compose_run(tmp_path / "frozen", "dpo", "loss.trainer=test_humanline.RecordingDPOTrainer",
                      "loss.humanline=true", "loss.log_epsilon_P=0", "loss.log_epsilon_R=0", "loss.sync_freq=1000"),
          "dpo")
    assert GRAD_NORMS[0] > 0 and GRAD_NORMS[1:] == [0.0] * 5
    wide, plain = (checkpoint_info(train(compose_run(tmp_path / name, "dpo", *FLOAT64, *extra), "dpo"))["metrics"]
                   for name, extra in (("wide", ("loss.humanline=true", "loss.log_epsilon_P=-1000",
                                                 "loss.log_epsilon_R=1000", "loss.sync_freq=1000")), ("plain", ())))
    assert wide["rewards_eval/margins"] != 0
    for key in plain:
        assert wide[key] == pytest.approx(plain[key], rel=1e-9, abs=1e-9), key


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_a_humanline_run_resumes_bitwise_with_its_synced_reference(loss, tmp_path, monkeypatch):
    """sync_freq=4 with resumable checkpoints every 4 examples (every step, batches of 4): the crash leaves a
    checkpoint between two syncs, whose reference.pt is the policy of the last sync, not the starting model."""
    overrides = ("loss.humanline=true", "loss.sync_freq=4")
    expected = read_policy_state(train(compose_run(tmp_path / "a", loss, *overrides), loss))
    resumed_from, resumed = crash_and_resume(lambda *extra: compose_run(tmp_path / "b", loss, *overrides, *extra),
                                             loss, monkeypatch, crash_before_batch=5)
    assert resumed_from == 20  # 5 steps: synced after step 4, so the reference is neither policy nor start
    actual = read_policy_state(resumed)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    assert not (resumed / REFERENCE).exists()  # a finished run keeps no reference


def test_a_resumable_humanline_checkpoint_holds_the_synced_reference(tmp_path):
    config = compose_run(tmp_path, "dpo", "loss.humanline=true", "loss.sync_freq=2", "n_examples=12",
                         "checkpoint_every=8", "eval_every=1000")
    run_dir = Path(config.local_run_dir)
    saved = {}
    real = trainers.BasicTrainer.save_checkpoint

    def keep_reference(self, kind):
        directory = real(self, kind)
        if kind == "resumable":
            saved[self.update_counter] = load_checkpoint(directory / REFERENCE)["state"]
            saved["policy"] = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        return directory

    trainers.BasicTrainer.save_checkpoint = keep_reference
    try:
        train(config, "dpo")
    finally:
        trainers.BasicTrainer.save_checkpoint = real
    assert 2 in saved  # after 8 examples = 2 steps: synced, so the reference is the policy
    assert all(torch.equal(saved[2][k], saved["policy"][k]) for k in saved[2])
    assert not (run_dir / "LATEST" / REFERENCE).exists()


@pytest.mark.parametrize("loss, overrides, message", [
    ("dpo", ("loss.humanline=true", "loss.log_epsilon_P=0.5"), "loss.log_epsilon_P: must be <= 0, got 0.5"),
    ("kto", ("loss.humanline=true", "loss.log_epsilon_R=-1"), "loss.log_epsilon_R: must be >= 0, got -1"),
    ("dpo", ("loss.humanline=true", "loss.sync_freq=0"), "loss.sync_freq: must be a positive integer, got 0"),
    ("dpo", ("loss.humanline=yes",), "loss.humanline: expected true or false, got 'yes'"),
    ("dpo", ("loss.humanline=true", "cache_reference_logprobs=true"),
     "cache_reference_logprobs: humanline re-syncs the reference model to the policy"),
    ("dpo", ("loss.humanline=true", "loss.trainer=IPOTrainer", "++loss.tau=0.1"),
     "loss.humanline: IPOTrainer offers no humanline variant"),
    ("ipo", ("++loss.humanline=true",), "loss.humanline: unknown key"),
    ("kto", ("loss.humanline=true", "++model.use_peft=true"),
     "model.use_peft: humanline re-syncs a reference model of its own to the policy"),
])
def test_bad_humanline_settings_are_one_line_errors(loss, overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(compose_run(tmp_path, loss, *overrides), loss)
    assert not (tmp_path / "run").exists()
