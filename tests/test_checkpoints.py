"""Checkpoints: exact resume (bitwise on CPU), atomic saves, SIGTERM/SIGKILL preemption, Hugging Face export and
loading without pickled code. docs/checkpoints.md quotes the measured results."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

import checkpointer
import checkpoints
import distributed
import train as train_module
import trainers
from builders import build_models
from checkpointer import Checkpointer, TrainingState
from checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from configuration import ConfigError, validate_train_config
from dataloader import DataSpec, LoaderOptions, SFTDataLoader
from errors import HalosError
from models import load_causal_lm, load_tokenizer
from train import prepare_run, train
from weights import read_policy_state

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE_IDS = torch.arange(2, 50).reshape(3, 16)  # (3, 16) token ids to compare logits on
# 32 examples in batches of 4 with 2 micro-batches per optimizer step (4 steps); evaluations at 0, 8, 16, 24 and 32;
# a resumable LATEST after every evaluation and every 8 examples; the newest 2 of step-8, step-16, step-24 kept.
RUN = ("loss=sft", "model=tiny", "datasets=[hh]", "mode=train", "wandb.enabled=false", "lr=1e-3", "warmup_steps=2",
       "n_epochs=null", "n_examples=32", "n_eval_examples=4", "eval_every=8", "model.batch_size=4",
       "model.eval_batch_size=4", "model.gradient_accumulation_steps=2", "model.max_length=64",
       "model.max_prompt_length=32", "minimum_log_interval_secs=0", "print_interval_secs=0", "checkpoint_every=8",
       "intermediate_checkpoints=true", "keep_last_checkpoints=2")


def compose_run(cache_dir: Path, exp_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        return compose(config_name="config", overrides=[*RUN, f"cache_dir={cache_dir}", f"exp_name={exp_name}",
                                                         *overrides])


def weights(checkpoint_dir: Path) -> dict:
    return read_policy_state(checkpoint_dir)


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run directory of the RUN config trained start to end in this process."""
    cache_dir = tmp_path_factory.mktemp("uninterrupted")
    train(compose_run(cache_dir, "run"), "sft")
    return cache_dir / "run"


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same final weights bit for bit, same counters and final eval metrics, same kept step-<N> checkpoints."""
    assert max_abs_diff(weights(resumed / "LATEST"), weights(reference / "LATEST")) == 0.0
    assert all(torch.equal(weights(resumed / "LATEST")[k], v) for k, v in weights(reference / "LATEST").items())
    resumed_state, reference_state = (checkpoints.read_trainer_state(d / "LATEST") for d in (resumed, reference))
    for key in ("example_counter", "batch_counter", "update_counter", "last_eval_at", "last_eval_metrics", "finished"):
        assert resumed_state[key] == reference_state[key], key
    assert [p.name for p in checkpoints.step_dirs(resumed)] == ["step-16", "step-24"]
    assert max_abs_diff(weights(resumed / "step-24"), weights(reference / "step-24")) == 0.0


def test_uninterrupted_run_writes_the_final_layout(uninterrupted):
    latest = uninterrupted / "LATEST"
    assert {p.name for p in latest.iterdir()} >= {"trainer_state.pt", "config.json", "model.safetensors",
                                                   "generation_config.json", "tokenizer.json"}
    assert not (latest / "policy.pt").exists(), "the weights are stored once, in the Hugging Face export"
    assert not (latest / "optimizer.pt").exists(), "a finished run keeps no optimizer state"
    step_24 = uninterrupted / "step-24"
    assert (step_24 / "policy.pt").exists() and not (step_24 / "config.json").exists()
    state = checkpoints.read_trainer_state(latest)
    assert state["finished"] and (state["example_counter"], state["update_counter"]) == (32, 4)
    assert [p.name for p in checkpoints.step_dirs(uninterrupted)] == ["step-16", "step-24"]  # keep_last_checkpoints=2
    assert not list(uninterrupted.glob(".*.tmp")) and not list(uninterrupted.glob(".*.old"))


def test_nan_loss_keeps_the_last_good_checkpoint_and_resuming_matches_bitwise(uninterrupted, tmp_path, monkeypatch):
    """The loss turns NaN in the 6th batch, one micro-batch into an accumulation: the run stops, LATEST is the
    resumable checkpoint after 16 examples, and resuming reaches the uninterrupted run's weights exactly."""
    real = trainers.SFTTrainer.get_batch_metrics

    def nan_in_batch_6(self, batch, mode):
        loss, metrics = real(self, batch, mode)
        return (loss * float("nan"), metrics) if mode == "train" and self.batch_counter == 5 else (loss, metrics)

    monkeypatch.setattr(trainers.SFTTrainer, "get_batch_metrics", nan_in_batch_6)
    with pytest.raises(trainers.TrainingError, match=r"LATEST \(after 16 examples\) is the last good checkpoint"):
        train(compose_run(tmp_path, "run"), "sft")
    state = checkpoints.read_trainer_state(tmp_path / "run" / "LATEST")
    assert not state["finished"] and (state["example_counter"], state["batch_counter"]) == (16, 4)
    assert (tmp_path / "run" / "LATEST" / "optimizer.pt").exists()
    assert not list((tmp_path / "run").glob(".*")), "a half-written checkpoint was left behind"

    monkeypatch.setattr(trainers.SFTTrainer, "get_batch_metrics", real)
    with pytest.raises(CheckpointError, match=r"resume_from=auto"):  # never silently restarted over it
        train(compose_run(tmp_path, "run"), "sft")
    train(compose_run(tmp_path, "run", "resume_from=auto"), "sft")
    assert_same_run(tmp_path / "run", uninterrupted)


def run_cli(cache_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "train.py", *RUN, f"cache_dir={cache_dir}", "exp_name=run", *overrides],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_after_a_resumable_checkpoint_that_resumes_bitwise(uninterrupted, tmp_path):
    process = run_cli(tmp_path)
    for line in process.stdout:  # logged at each optimizer step: after 8, 16, 24 and 32 examples
        if line.startswith("train after 8 examples"):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped_at = checkpoints.read_trainer_state(tmp_path / "run" / "LATEST")["example_counter"]
    assert stopped_at in (8, 16, 24), "the run stops at the first optimizer-step boundary after the signal"
    assert f"stopped by SIGTERM after {stopped_at} examples" in stderr and "++resume_from=auto" in stderr
    assert not checkpoints.read_trainer_state(tmp_path / "run" / "LATEST")["finished"]
    train(compose_run(tmp_path, "run", "resume_from=auto"), "sft")
    assert_same_run(tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_repeated_sigkills_at_random_moments_then_resume_match_bitwise(uninterrupted, tmp_path):
    """SIGKILL three times at random moments (possibly mid-save), each time restarting with resume_from=auto."""
    rng = random.Random()
    kills = []  # (optimizer steps logged by the killed process, delay after the last one, examples in LATEST after)
    for _ in range(3):
        process = run_cli(tmp_path, "resume_from=auto")
        steps, logged = rng.randint(1, 2), 0
        for line in process.stdout:  # killed `steps` optimizer steps into its training, plus a random delay
            logged += line.startswith("train after")
            if logged == steps:
                break
        delay = rng.uniform(0, 0.3)
        time.sleep(delay)
        process.kill()
        process.communicate()
        checkpoints.recover_interrupted_saves(tmp_path / "run")
        state = checkpoints.read_trainer_state(tmp_path / "run" / "LATEST")
        kills.append((logged, round(delay, 2), state and state["example_counter"]))
    print(f"kills (steps logged, delay, examples in LATEST): {kills}")
    process = run_cli(tmp_path, "resume_from=auto")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert_same_run(tmp_path / "run", uninterrupted)


def test_a_crash_inside_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    latest = tmp_path / "LATEST"

    def writes(value):
        def write(directory):
            save_checkpoint(directory / "policy.pt", {"w": torch.tensor([value])}, step_idx=value)
        return write

    checkpoints.write_atomically(latest, writes(1))

    def crash_after_the_first_file(directory):
        writes(2)(directory)
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoints.write_atomically(latest, crash_after_the_first_file)
    assert load_checkpoint(latest / "policy.pt")["step_idx"] == 1

    # A crash between moving the old checkpoint aside and renaming the new one into place.
    real_rename = os.rename

    def crash_on_the_second_rename(source, target):
        if Path(source).name == ".LATEST.tmp":
            raise KeyboardInterrupt("killed")
        real_rename(source, target)

    monkeypatch.setattr(checkpoints.os, "rename", crash_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_atomically(latest, writes(3))
    monkeypatch.setattr(checkpoints.os, "rename", real_rename)
    assert not latest.exists() and (tmp_path / ".LATEST.old").is_dir()
    checkpoints.recover_interrupted_saves(tmp_path)  # what every start of train.py does first
    assert load_checkpoint(latest / "policy.pt")["step_idx"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST"]
    checkpoints.write_atomically(latest, writes(4))
    assert load_checkpoint(latest / "policy.pt")["step_idx"] == 4 and sorted(os.listdir(tmp_path)) == ["LATEST"]


def test_train_py_puts_back_a_checkpoint_left_aside_by_a_crash_before_resuming(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path / "run")
    os.rename(tmp_path / "run" / "LATEST", tmp_path / "run" / ".LATEST.old")  # killed between the two renames
    (tmp_path / "run" / ".LATEST.tmp").mkdir()
    resume = prepare_run(compose_run(tmp_path, "run", "resume_from=auto"))
    assert resume.directory == tmp_path / "run" / "LATEST" and resume.state["example_counter"] == 32
    assert not list((tmp_path / "run").glob(".LATEST.*"))


def checkpoint_of(model: torch.nn.Module, kind: str, cache_dir: Path, *overrides: str) -> Path:
    """A checkpoint of `kind` written by the Checkpointer for `model` (after 8 examples, no optimizer step)."""
    config = compose_run(cache_dir, "run", *overrides)
    validate_train_config(config, "sft")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    values = {"example_counter": 8, "batch_counter": 2, "update_counter": 1, "last_eval_at": 8,
              "last_eval_metrics": {"loss/eval": 1.5}, "wandb_run_id": None}
    state = TrainingState({checkpoints.POLICY: model}, model, optimizer, scheduler, values)
    return Checkpointer(config, load_tokenizer(config.model)).save(state, kind)


@pytest.mark.parametrize("kind, overrides", [("final", ()), ("intermediate", ()),
                                             ("resumable", ("export_intermediate=true",))])
def test_every_checkpoint_holds_the_weights_once_and_they_are_the_models(kind, overrides, tmp_path):
    """The final checkpoint (and with export_intermediate every one) is a Hugging Face model directory giving the
    model's logits bit for bit; the others hold a policy.pt with its state dict. Never both."""
    config = compose_run(tmp_path, "run")
    model = load_causal_lm(config.model, "float32", config.seed)
    directory = checkpoint_of(model, kind, tmp_path, *overrides)
    assert directory.name == ("step-8" if kind == "intermediate" else "LATEST")
    exported = kind != "intermediate"
    assert (directory / "model.safetensors").exists() == exported and (directory / "policy.pt").exists() != exported
    assert checkpoints.checkpoint_info(directory) == {"step_idx": 8, "metrics": {"loss/eval": 1.5}}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in read_policy_state(directory).items())
    if exported:
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(directory)(PROBE_IDS, use_cache=False).logits
            assert torch.equal(logits, model(PROBE_IDS, use_cache=False).logits)
        assert oct((directory / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("load_from", ["run/LATEST", "run/LATEST/policy.pt", "run/step-24"])
def test_load_from_takes_an_hf_directory_a_policy_pt_or_a_checkpoint_directory(uninterrupted, load_from):
    config = compose_run(uninterrupted.parent, "other", f"model.load_from={load_from}")
    validate_train_config(config, "sft")
    policy, _ = build_models(config, torch.device("cpu"), 4096)
    expected = weights(uninterrupted / load_from.removeprefix("run/").removesuffix("/policy.pt"))
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in expected.items())


class WritesAMarker:
    """Unpickling this calls open(path, 'w'): a stand-in for any code a malicious checkpoint could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("name", ["policy.pt", "optimizer.pt", "trainer_state.pt"])
def test_a_checkpoint_carrying_pickled_code_is_refused_without_running_it(tmp_path, name):
    marker = tmp_path / "pwned"
    torch.save({"step_idx": 0, "state": {"x": WritesAMarker(marker)}, "metrics": {}}, tmp_path / name)
    with pytest.raises(CheckpointError, match="cannot load checkpoint .* safely"):
        load_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_resuming_from_a_checkpoint_carrying_pickled_code_fails_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "run" / "LATEST").mkdir(parents=True)
    torch.save({"step_idx": 8, "state": WritesAMarker(marker), "metrics": {}},
               tmp_path / "run" / "LATEST" / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="safely"):
        train(compose_run(tmp_path, "run", "resume_from=auto"), "sft")
    assert not marker.exists()


def never(*args, **kwargs):
    raise AssertionError("reached a step that the error should have prevented")


def test_an_unwritable_cache_dir_fails_before_anything_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(train_module, "load_tokenizer", never)
    with pytest.raises(CheckpointError, match=r"^cache_dir: cannot write the run directory .*a_file/cache/run"):
        train(compose_run(blocker / "cache", "run"), "sft")


def test_too_little_disk_space_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 2**20})())
    monkeypatch.setattr(trainers.BasicTrainer, "train", never)
    with pytest.raises(CheckpointError, match=r"0.00 GiB free, but a checkpoint of this model needs about 0.01 GiB"):
        train(compose_run(tmp_path, "run"), "sft")
    assert not (tmp_path / "run" / "LATEST").exists()


def test_resume_auto_after_the_end_does_nothing(uninterrupted):
    before = (uninterrupted / "LATEST" / "model.safetensors").stat().st_mtime_ns
    assert train(compose_run(uninterrupted.parent, "run", "resume_from=auto"), "sft") == uninterrupted / "LATEST"
    assert (uninterrupted / "LATEST" / "model.safetensors").stat().st_mtime_ns == before


def test_resume_from_refuses_finished_runs_and_changed_data_order(uninterrupted, tmp_path):
    config = compose_run(tmp_path, "fork", f"resume_from={uninterrupted}")
    validate_train_config(config, "sft")
    with pytest.raises(CheckpointError, match="nothing to resume; start a new run from it with"):
        checkpoints.find_resume_point(config)
    state = checkpoints.read_trainer_state(uninterrupted / "LATEST")
    state["finished"] = False
    save_checkpoint(tmp_path / "stopped" / "LATEST" / "trainer_state.pt", state, 32)
    save_checkpoint(tmp_path / "stopped" / "LATEST" / "optimizer.pt", {}, 32)  # what makes it resumable
    config = compose_run(tmp_path, "fork", f"resume_from={tmp_path / 'stopped'}", "seed=2", "lr=1e-4")
    validate_train_config(config, "sft")
    with pytest.raises(CheckpointError, match=r"other values of seed \(1, now 2\)"):
        checkpoints.find_resume_point(config)


def test_checkpoint_settings_are_validated(tmp_path):
    config = compose_run(tmp_path, "run", "checkpoint_every=0", "keep_last_checkpoints=-1", "resume_from=nowhere",
                         "export_intermediate=yes", "model.trust_remote_code=1")
    with pytest.raises(ConfigError) as info:
        validate_train_config(config, "sft")
    for expected in ("checkpoint_every: expected a positive integer or null, got 0",
                     "keep_last_checkpoints: expected a positive integer or null, got -1",
                     "resume_from: nowhere not found", "export_intermediate: expected true or false, got 'yes'",
                     "model.trust_remote_code: expected true or false, got 1"):
        assert expected in str(info.value)


def test_trust_remote_code_reaches_from_pretrained(tmp_path, monkeypatch):
    seen = []
    real = AutoModelForCausalLM.from_config

    def recording(config, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(config, **{k: v for k, v in kwargs.items() if k != "trust_remote_code"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", recording)
    for value in (False, True):
        config = compose_run(tmp_path, "run", f"model.trust_remote_code={value}")
        load_causal_lm(config.model, "float32", config.seed)
    assert seen == [False, True]


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"rng": checkpoints.rng_states()}, 0)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    checkpoints.restore_rng_states(load_checkpoint(tmp_path / "rng.pt")["state"]["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_iter_from_skips_batches_without_tokenising_them(tiny_tokenizer, monkeypatch):
    loader = SFTDataLoader(DataSpec(["hh"], local_paths={"hh": str(REPO_ROOT / "data" / "hh-rlhf")}), tiny_tokenizer,
                           options=LoaderOptions(batch_size=4, n_examples=48, max_length=64, max_prompt_length=32, seed=1))
    full = list(loader)
    tokenised = []
    real = SFTDataLoader.batch_elements
    monkeypatch.setattr(SFTDataLoader, "batch_elements", lambda self, items: tokenised.append(1) or real(self, items))
    resumed = list(loader.iter_from(9))
    assert len(tokenised) == len(resumed) == 3
    assert all(torch.equal(a["target_input_ids"], b["target_input_ids"]) for a, b in zip(full[9:], resumed))


def test_the_first_stop_signal_is_deferred_and_the_second_acts_at_once():
    # raise_signal delivers to this thread before it returns; os.kill(getpid()) may land on another thread later.
    with checkpoints.StopRequests() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.signal_number == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) != stop.handle and signal.getsignal(signal.SIGINT) != stop.handle


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto", "ppo"])
def test_losses_with_a_reference_model_or_value_head_resume_bitwise(loss, tmp_path, monkeypatch):
    """A crash in the 6th batch, then resume_from=auto: every checkpoint file (PPO's v_head.pt too) equals an
    uninterrupted run's bit for bit."""
    overrides = (f"loss={loss}", "lr=1e-4")
    train(compose_run(tmp_path / "a", "run", *overrides), loss)
    real = trainers.BasicTrainer.train_on_batch

    def crash_in_batch_6(self, batch, metrics, pending):
        if self.batch_counter == 5:
            raise KeyboardInterrupt("crash")
        return real(self, batch, metrics, pending)

    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", crash_in_batch_6)
    with pytest.raises(KeyboardInterrupt):
        train(compose_run(tmp_path / "b", "run", *overrides), loss)
    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", real)
    train(compose_run(tmp_path / "b", "run", *overrides, "resume_from=auto"), loss)
    assert checkpoints.is_hf_model_dir(tmp_path / "b" / "run" / "LATEST")  # PPO's: the causal LM alone
    assert max_abs_diff(*(weights(tmp_path / d / "run" / "LATEST") for d in "ba")) == 0.0
    if loss == "ppo":
        expected, resumed = (load_checkpoint(tmp_path / d / "run" / "LATEST" / "v_head.pt")["state"] for d in "ab")
        assert max_abs_diff(resumed, expected) == 0.0


def train_in_process_group(cache_dir: Path, overrides: tuple, crash_at_batch: Optional[int]) -> None:
    """One rank of a 2-process run of the RUN config (distributed.spawn); crashes before batch `crash_at_batch`."""
    if crash_at_batch is not None:
        real = trainers.BasicTrainer.train_on_batch

        def crashing(self, batch, metrics, pending):
            if self.batch_counter == crash_at_batch:
                raise SystemExit(3)
            return real(self, batch, metrics, pending)

        trainers.BasicTrainer.train_on_batch = crashing
    train(compose_run(cache_dir, "run", *overrides), "sft")


@pytest.mark.slow
def test_fsdp_runs_on_two_processes_resume_bitwise(tmp_path):
    """Under FSDP (2 gloo processes) the optimizer state is gathered to rank 0 on save and re-sharded on resume."""
    distributed.spawn(train_in_process_group, (tmp_path / "a", (), None), n_processes=2)
    with pytest.raises(HalosError, match="exited with status 3"):
        distributed.spawn(train_in_process_group, (tmp_path / "b", (), 5), n_processes=2)
    assert checkpoints.read_trainer_state(tmp_path / "b" / "run" / "LATEST")["example_counter"] == 16
    distributed.spawn(train_in_process_group, (tmp_path / "b", ("resume_from=auto",), None), n_processes=2)
    # Both exports were written by rank 0 from the sharded model.
    assert max_abs_diff(weights(tmp_path / "b" / "run" / "LATEST"), weights(tmp_path / "a" / "run" / "LATEST")) == 0.0


def test_an_exported_resumable_checkpoint_resumes_bitwise(uninterrupted, tmp_path, monkeypatch):
    """With export_intermediate the resumable LATEST holds its weights only as a Hugging Face export, and resuming
    reads them from there (the one weights loader, weights.py)."""
    real = trainers.SFTTrainer.get_batch_metrics

    def nan_in_batch_6(self, batch, mode):
        loss, metrics = real(self, batch, mode)
        return (loss * float("nan"), metrics) if mode == "train" and self.batch_counter == 5 else (loss, metrics)

    monkeypatch.setattr(trainers.SFTTrainer, "get_batch_metrics", nan_in_batch_6)
    with pytest.raises(trainers.TrainingError):
        train(compose_run(tmp_path, "run", "export_intermediate=true"), "sft")
    latest = tmp_path / "run" / "LATEST"
    assert {"model.safetensors", "optimizer.pt", "trainer_state.pt"} <= {p.name for p in latest.iterdir()}
    assert not (latest / "policy.pt").exists()
    monkeypatch.setattr(trainers.SFTTrainer, "get_batch_metrics", real)
    train(compose_run(tmp_path, "run", "export_intermediate=true", "resume_from=auto"), "sft")
    assert_same_run(tmp_path / "run", uninterrupted)


def test_an_unwritable_run_dir_mid_run_is_one_line_naming_the_last_good_checkpoint(uninterrupted, tmp_path,
                                                                                  monkeypatch):
    """The second resumable checkpoint cannot be written (permission denied, as when the run directory's file system
    turns read-only): one line names the path and the last good LATEST, which stays resumable."""
    real = checkpointer.save_checkpoint
    refused = []

    def denied_after_the_first_checkpoint(path, state, step_idx, metrics=None):
        if step_idx >= 16:
            refused.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        real(path, state, step_idx, metrics)

    monkeypatch.setattr(checkpointer, "save_checkpoint", denied_after_the_first_checkpoint)
    with pytest.raises(CheckpointError) as info:
        train(compose_run(tmp_path, "run"), "sft")
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"cannot write the checkpoint after 16 examples to {tmp_path / 'run' / 'step-16'}: Permission denied "
        f"({refused[0]})")
    assert f"Nothing else is lost: {tmp_path / 'run' / 'LATEST'} (after 8 examples) is the last good checkpoint" \
        in message
    monkeypatch.setattr(checkpointer, "save_checkpoint", real)
    assert checkpoints.read_trainer_state(tmp_path / "run" / "LATEST")["example_counter"] == 8
    assert not list((tmp_path / "run").glob(".*")), "a half-written checkpoint was left behind"
    train(compose_run(tmp_path, "run", "resume_from=auto"), "sft")
    assert_same_run(tmp_path / "run", uninterrupted)


@pytest.mark.parametrize("content", [b"hello world\n", b"", b"PK\x03\x04 truncated zip"])
def test_a_file_that_is_no_checkpoint_is_called_so(tmp_path, content):
    """torch's own message for these advises retrying with weights_only=False: unsafe, and no help."""
    (tmp_path / "policy.pt").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "policy.pt")
    assert str(info.value) == f"{tmp_path / 'policy.pt'} is not a checkpoint: not a complete file written by torch.save"
    assert "weights_only" not in str(info.value)


def test_resume_from_an_intermediate_checkpoint_says_it_holds_weights_only(uninterrupted, tmp_path):
    config = compose_run(tmp_path, "fork", f"resume_from={uninterrupted / 'step-24'}")
    validate_train_config(config, "sft")
    with pytest.raises(CheckpointError, match=r"holds no resumable checkpoint \(no optimizer.pt: an intermediate "
                                              r"checkpoint holds weights only\); start a new run from it"):
        checkpoints.find_resume_point(config)


def test_a_run_that_fails_its_data_or_config_checks_leaves_no_run_dir(tmp_path):
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi"}\n')
    with pytest.raises(HalosError, match="bad.jsonl"):
        train(compose_run(tmp_path / "cache", "run", "datasets=[mine]", f"++local_datasets.mine={bad_rows}"), "sft")
    with pytest.raises(ConfigError):
        train(compose_run(tmp_path / "cache", "run", "lr=-1"), "sft")
    assert not (tmp_path / "cache").exists()
