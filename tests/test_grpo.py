"""Scored feedback and loss=grpo: the scored row schema, the group loader's statistics, training from the command
line, exact resume. The token mean's invariance to accumulation and processes is in tests/test_distributed.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import distributed
import lora
import distributed_worker as worker
from crash_resume import crash_and_resume
from dataloader import DataSpec, LoaderOptions, ScoredGroupDataLoader
from feedback.examples import DataError
from feedback.rows import load_source
from feedback.sources import SourceSpec
from scored_data import write_scored_dataset
from train import train
from weights import read_policy_state

REPO_ROOT = Path(__file__).resolve().parent.parent
CAT = "Name a cat."


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_scored_rows_form_one_group_per_prompt(tmp_path):
    """Rows of one prompt (a string or the same message list) merge into one Example with a score per response;
    the best-scored one is the SFT target."""
    rows = [{"prompt": CAT, "completion": "Tom.", "score": 0.5},
            {"prompt": [{"role": "user", "content": CAT}], "completion": "Felix.", "score": 2},
            {"prompt": CAT, "completion": "A dog.", "score": -1.0},
            {"prompt": "Name a dog.", "completion": "Rex.", "score": 1.0}]
    data = load_source(SourceSpec("scored", str(write_jsonl(tmp_path / "train.jsonl", rows))), "train")
    cats, dogs = data.data.values()
    assert (cats.generations, cats.scores, cats.sft_index) == (["Tom.", "Felix.", "A dog."], [0.5, 2.0, -1.0], 1)
    assert (cats.pairs, cats.desirable, dogs.scores) == ([], [], [1.0])


@pytest.mark.parametrize("row, problem", [
    ({"prompt": CAT, "completion": "Tom.", "score": "high"}, "field 'score' is 'high'; expected a finite number"),
    ({"prompt": CAT, "completion": "Tom.", "score": float("nan")}, "expected a finite number"),
    ({"prompt": CAT, "completion": "Tom.", "score": 1, "label": True}, "row mixes more than one of the schemas"),
    ({"prompt": CAT, "chosen": "Tom.", "rejected": "Rex."}, "this prompt has both scored and other feedback rows"),
])
def test_malformed_scored_rows_are_one_line_errors(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": CAT, "completion": "Felix.", "score": 1.0}, row])
    with pytest.raises(DataError) as caught:
        load_source(SourceSpec("scored", str(path)), "train")
    assert str(caught.value).startswith(f"'{path}' row 2: ") and problem in str(caught.value)


def test_the_group_loader_gives_every_response_its_whole_groups_statistics(tmp_path, tiny_tokenizer):
    """Each response carries its score and the mean and population std of all scores given to its prompt, however
    the batches split the group; a prompt with a single scored response has no group and is left out."""
    rows = [{"prompt": CAT, "completion": text, "score": score} for text, score in (("Tom.", 1.0), ("Felix.", 3.0),
                                                                                      ("A dog.", 2.0))]
    rows.append({"prompt": "Name a dog.", "completion": "Rex.", "score": 5.0})
    write_jsonl(tmp_path / "train.jsonl", rows)
    loader = ScoredGroupDataLoader(DataSpec(["scored"], local_paths={"scored": str(tmp_path)}), tiny_tokenizer,
                                   "train", LoaderOptions(batch_size=1, n_epochs=1, max_length=64, max_prompt_length=32))
    seen = sorted((batch["target_text"][0], batch["score"][0], batch["group_mean"][0], batch["group_std"][0])
                  for batch in loader)
    std = math.sqrt(2 / 3)
    assert seen == [("A dog.", 2.0, 2.0, std), ("Felix.", 3.0, 2.0, std), ("Tom.", 1.0, 2.0, std)]


def test_the_group_loader_refuses_feedback_without_scores(tiny_tokenizer):
    spec = DataSpec(["hh"], local_paths={"hh": str(REPO_ROOT / "data" / "hh-rlhf")})
    with pytest.raises(DataError, match="group losses need one score per generation, it has 0 scores for 2 "
                                        "generations .scored feedback rows give them"):
        ScoredGroupDataLoader(spec, tiny_tokenizer, "train", LoaderOptions(batch_size=4, n_epochs=1))


def grpo_overrides(data_dir: Path, cache_dir: Path, exp_name: str):
    return ["loss=grpo", "model=tiny", "datasets=[scored]", "mode=train", f"exp_name={exp_name}",
            f"cache_dir={cache_dir}", f"++local_datasets.scored={data_dir}", "wandb.enabled=false", "lr=1e-4",
            "warmup_steps=0", "n_epochs=null", "n_examples=48", "n_eval_examples=8", "model.batch_size=8",
            "eval_every=24", "checkpoint_every=16", "model.max_length=128", "model.max_prompt_length=64"]


def test_grpo_trains_from_the_command_line(tmp_path):
    data_dir = write_scored_dataset(tmp_path / "scored")
    result = subprocess.run([sys.executable, "train.py", *grpo_overrides(data_dir, tmp_path, "grpo")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ScoredGroupDataLoader" in result.stdout and "rewards_train/advantages=" in result.stdout
    final = read_policy_state(tmp_path / "grpo" / "LATEST")
    assert set(final) >= {"lm_head.weight", "model.embed_tokens.weight"}


def test_grpo_resumes_bitwise(tmp_path, monkeypatch):
    data_dir = write_scored_dataset(tmp_path / "scored")

    def compose_run(cache_dir: Path, *extra: str):
        with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
            return compose(config_name="config", overrides=[*grpo_overrides(data_dir, cache_dir, "grpo"), *extra])

    expected = read_policy_state(train(compose_run(tmp_path / "a"), "grpo"))
    resumed_from, resumed = crash_and_resume(lambda *extra: compose_run(tmp_path / "b", *extra), "grpo", monkeypatch,
                                             crash_before_batch=4)
    assert resumed_from == 24  # the checkpoint after the evaluation at 24 examples
    actual = read_policy_state(resumed)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def grpo_recorded_overrides(data_dir: Path, *extra: str) -> List[str]:
    """A recorded float64 run (tests/distributed_worker.py) of grpo on scored groups."""
    return ["datasets=[scored]", f"++local_datasets.scored={data_dir}", "model.max_length=128",
            "model.max_prompt_length=64", *extra]


def test_grpo_token_mean_is_invariant_to_accumulation_and_processes(tmp_path):
    """The step's token mean (prepare_step's all-reduced token count) makes 4 x 1 == 1 x 4 == 2 processes x 2: the
    same losses, gradient norms and weights within float64 summation-order slack (tests/test_distributed.py)."""
    data_dir = write_scored_dataset(tmp_path / "scored")
    shape = lambda batch_size, accumulation: grpo_recorded_overrides(  # noqa: E731
        data_dir, "n_examples=8", f"model.batch_size={batch_size}",
        f"model.gradient_accumulation_steps={accumulation}", "do_first_eval=false")
    one = worker.run_recorded("grpo", "grpo-4x1", tmp_path, shape(4, 1)).parent
    accumulated = worker.run_recorded("grpo", "grpo-1x4", tmp_path, shape(1, 4)).parent
    distributed.spawn(worker.run_recorded, ("grpo", "grpo-2p", tmp_path, shape(4, 1)), n_processes=2)
    for other in (accumulated, tmp_path / "grpo-2p"):
        differences = worker.compare_runs(one, other)
        assert differences.pop("steps") == 2
        assert max(differences.values()) <= 1e-5, (other.name, differences)
    initial, final = worker.tiny_model().state_dict(), read_policy_state(one / "LATEST")
    assert max((final[k] - initial[k]).abs().max().item() for k in final) > 1e-3  # the runs did train


def test_grpo_with_shared_prompts_equals_grpo_without(tmp_path):
    """A group's responses share their prompt, so with share_prompts each step runs every prompt once; the recorded
    runs agree within the same float64 slack as the other shared-prompt runs (tests/test_shared_prompts.py)."""
    data_dir = write_scored_dataset(tmp_path / "scored")
    overrides = grpo_recorded_overrides(data_dir, "n_examples=8", "model.batch_size=4", "do_first_eval=false")
    unshared = worker.run_recorded("grpo", "unshared", tmp_path, [*overrides, "share_prompts=false"]).parent
    shared = worker.run_recorded("grpo", "shared", tmp_path, [*overrides, "share_prompts=true"]).parent
    differences = worker.compare_runs(unshared, shared)
    assert differences.pop("steps") == 2
    assert max(differences.values()) <= 1e-5, differences


def test_grpo_trains_lora_adapters_against_the_adapter_free_reference(tmp_path):
    data_dir = write_scored_dataset(tmp_path / "scored")
    overrides = grpo_recorded_overrides(data_dir, "n_examples=8", "model.batch_size=4", "++model.use_peft=true")
    latest = worker.run_recorded("grpo", "lora", tmp_path, overrides)
    adapters = load_file(latest / lora.ADAPTER_DIR / lora.ADAPTER_WEIGHTS)
    # B starts at 0, so only training moves it.
    assert min(t.abs().max().item() for name, t in adapters.items() if "lora_B" in name) > 1e-5
    steps = worker.read_steps(latest.parent)
    assert len(steps) == 2 and all(math.isfinite(step["loss/train"]) for step in steps)
