"""rounds.py: two rounds of sample -> label -> train on the tiny model from one command; a run crashed in the middle
of a round's sampling and again in its training, then rerun, ends with the policy and summary of an uninterrupted
run."""
import json
from pathlib import Path

import pytest
import torch

import rounds
import sampling
import trainers
from scored_data import write_tiny_reward_model
from weights import read_policy_state

TINY = ["model=tiny", "wandb.enabled=false", "n_epochs=null", "n_examples=8", "n_eval_examples=2",
        "warmup_steps=0", "lr=1e-3", "model.batch_size=4", "model.eval_batch_size=2", "model.max_length=64",
        "model.max_prompt_length=32", "checkpoint_every=4", "do_first_eval=false"]


def rounds_argv(directory: Path, reward_model: Path, loss: str = "dpo"):
    return ["--dir", str(directory), "--rounds", "2", "--loss", loss, "--reward_model", str(reward_model),
            "--prompts", "hh", "--n_prompts", "8", "--num_samples_per_prompt", "2", "--test_every", "4", "--",
            *TINY]


def summary_table(directory: Path) -> str:
    return (directory / "summary.md").read_text().split("\n\nseconds:")[0]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    return write_tiny_reward_model(tmp_path_factory.mktemp("reward_model"))


def test_two_rounds_killed_twice_and_rerun_equal_an_uninterrupted_run(tmp_path, reward_model, monkeypatch):
    rounds.main(rounds_argv(tmp_path / "a", reward_model))
    expected = read_policy_state(tmp_path / "a" / "round-2" / "policy" / "LATEST")
    table = summary_table(tmp_path / "a")
    assert table.splitlines()[0] == "| policy | reward_mean | kl_to_initial |"
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| initial", "| round 1", "| round 2"]
    timings = json.loads((tmp_path / "a" / "timings.json").read_text())
    assert set(timings) == {"round-1", "round-2", "final"} and set(timings["round-1"]) == set(rounds.PHASES)

    real_generate, real_train_on_batch = sampling.HFGenerator.generate, trainers.BasicTrainer.train_on_batch
    calls = {"generate": 0}

    def crashing_generate(self, *args, **kwargs):  # the second batch of round 2's sampling
        calls["generate"] += 1
        if calls["generate"] == 4 + 2:
            raise KeyboardInterrupt("crash while sampling")
        return real_generate(self, *args, **kwargs)

    def crashing_train_on_batch(self, batch, metrics, pending):  # round 2's second training batch
        if "round-2" in self.config.local_run_dir and self.batch_counter == 1:
            raise KeyboardInterrupt("crash while training")
        return real_train_on_batch(self, batch, metrics, pending)

    monkeypatch.setattr(sampling.HFGenerator, "generate", crashing_generate)
    with pytest.raises(KeyboardInterrupt, match="sampling"):
        rounds.main(rounds_argv(tmp_path / "b", reward_model))
    assert (tmp_path / "b" / "round-2" / "samples.partial.jsonl").exists()
    monkeypatch.setattr(sampling.HFGenerator, "generate", real_generate)
    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", crashing_train_on_batch)
    with pytest.raises(KeyboardInterrupt, match="training"):
        rounds.main(rounds_argv(tmp_path / "b", reward_model))
    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", real_train_on_batch)
    rounds.main(rounds_argv(tmp_path / "b", reward_model))

    actual = read_policy_state(tmp_path / "b" / "round-2" / "policy" / "LATEST")
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    for name in ("round-1/samples.json", "round-2/samples.json", "round-2/labels/train.jsonl"):
        samples = [json.loads((tmp_path / run / name).read_text().splitlines()[0]) if name.endswith("jsonl")
                   else json.loads((tmp_path / run / name).read_text())["samples"] for run in ("a", "b")]
        assert samples[0] == samples[1], name
    assert summary_table(tmp_path / "b") == table


def test_two_grpo_rounds_from_scored_labels(tmp_path, reward_model):
    rounds.main(rounds_argv(tmp_path, reward_model, loss="grpo"))
    rows = [json.loads(line) for line in (tmp_path / "round-1" / "labels" / "train.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "completion", "score"}
    assert (tmp_path / "round-2" / "policy" / "LATEST" / "config.json").exists()


def test_overrides_that_rounds_sets_itself_are_refused(tmp_path, reward_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rounds.main([*rounds_argv(tmp_path, reward_model), "datasets=[shp]", "model.load_from=x"])
    assert "datasets=[shp], model.load_from=x: rounds.py sets these keys itself" in str(exit_info.value)
