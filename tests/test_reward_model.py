"""loss=bradley-terry: a scalar-head reward model learns a known reward, exports as a Hugging Face sequence
classifier whose scores are training's, is read back by eval.py, resumes exactly, and is refused where a causal LM is
needed; with LoRA, the same, the adapters (peft's SEQ_CLS task, the score head saved with them) beside the merged
classifier. 1 vs 2 processes under FSDP: tests/test_distributed.py."""
import json
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import eval as eval_py
import lora
import weights
from builders import build_dataloader
from checkpoints import checkpoint_info, is_hf_model_dir
from configuration import ConfigError
from crash_resume import crash_and_resume
from dataloader import CHOSEN_KEYS, REJECTED_KEYS
from models import RewardModel, load_causal_lm, load_tokenizer
from reward_scoring import RewardScorer
from train import train
from trainers import concatenate_rows
from weights import read_policy_state

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ("good", "bad")
N_WORDS = 12  # 4,096 possible responses, so the held-out pairs are new pairs of mostly new responses


def known_reward(text: str) -> int:
    """The true reward of a synthetic response: how many times it says 'good'."""
    return text.split().count("good")


def write_pairs(path: Path, count: int, rng: random.Random) -> None:
    """`count` pairs of random good/bad responses to one prompt, the one with the higher true reward chosen."""
    with open(path, "w") as handle:
        written = 0
        while written < count:
            first, second = (" ".join(rng.choice(WORDS) for _ in range(N_WORDS)) for _ in range(2))
            if known_reward(first) == known_reward(second):
                continue
            chosen, rejected = sorted((first, second), key=known_reward, reverse=True)
            handle.write(json.dumps({"prompt": "How was it?", "chosen": chosen, "rejected": rejected}) + "\n")
            written += 1


def compose_run(cache_dir: Path, data_dir: Path, exp_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        return compose(config_name="config", overrides=[
            "loss=bradley-terry", "model=tiny", "datasets=[known_reward]", "mode=train", f"exp_name={exp_name}",
            f"cache_dir={cache_dir}", f"++local_datasets.known_reward={data_dir}", "wandb.enabled=false",
            "optimizer=AdamW", "lr=3e-3", "warmup_steps=0", "model.batch_size=16", "model.eval_batch_size=16",
            "n_eval_examples=null", "eval_every=128", "minimum_log_interval_secs=0", "print_interval_secs=1000",
            *overrides])


@pytest.fixture(scope="module")
def known_reward_run(tmp_path_factory):
    """(run directory, data directory) of a reward model trained one epoch on 256 pairs; 64 held-out pairs."""
    root = tmp_path_factory.mktemp("bradley_terry")
    data_dir = root / "data"
    data_dir.mkdir()
    rng = random.Random(0)
    write_pairs(data_dir / "train.jsonl", 256, rng)
    write_pairs(data_dir / "test.jsonl", 64, rng)
    train(compose_run(root, data_dir, "rm"), "bradley-terry")
    return root / "rm", data_dir


def test_a_finished_reward_model_run_points_at_label_py(known_reward_run, tmp_path, capsys):
    _, data_dir = known_reward_run
    latest = train(compose_run(tmp_path, data_dir, "rm", "n_epochs=null", "n_examples=16", "do_first_eval=false"),
                   "bradley-terry")
    assert f"next: python label.py -f SAMPLES.json -o DATA_DIR --reward_model {latest}" in capsys.readouterr().out


def test_the_reward_model_learns_the_known_reward(known_reward_run):
    run_dir, _ = known_reward_run
    metrics = checkpoint_info(run_dir / "LATEST")["metrics"]
    assert metrics["rewards_eval/accuracies"] >= 0.9  # held-out pairwise accuracy
    assert metrics["rewards_eval/margins"] > 0


def held_out_batches(run_dir: Path):
    config = OmegaConf.load(run_dir / "config.yaml")
    tokenizer = load_tokenizer(config.model)
    return tokenizer, build_dataloader(config, tokenizer, "test", 16, 1, None)


def test_the_export_is_a_sequence_classifier_scoring_as_training_did(known_reward_run):
    """Hugging Face's own forward on each response alone (no padding, no packing) gives the scores of training's
    packed forward within 1e-5, and their mean is the final evaluation's logged chosen reward."""
    run_dir, _ = known_reward_run
    assert is_hf_model_dir(run_dir / "LATEST")
    classifier = AutoModelForSequenceClassification.from_pretrained(run_dir / "LATEST").eval()
    assert classifier.config.num_labels == 1
    tokenizer, loader = held_out_batches(run_dir)
    reward_model = RewardModel(classifier)
    chosen_scores = []
    with torch.no_grad():
        for batch in loader:
            input_ids, attention_mask, _ = concatenate_rows(batch, (CHOSEN_KEYS, REJECTED_KEYS),
                                                            tokenizer.pad_token_id)
            trained = reward_model(input_ids, attention_mask, pack=True)
            alone = torch.stack([classifier(row[mask.bool()].unsqueeze(0)).logits[0, 0]
                                 for row, mask in zip(input_ids, attention_mask)])
            torch.testing.assert_close(trained, alone, rtol=0, atol=1e-5)
            chosen_scores += trained[:batch[CHOSEN_KEYS.labels].size(0)].tolist()
    logged = checkpoint_info(run_dir / "LATEST")["metrics"]["rewards_eval/chosen"]
    assert sum(chosen_scores) / len(chosen_scores) == pytest.approx(logged, abs=1e-5)


def test_a_reward_model_is_refused_where_a_causal_lm_is_needed(known_reward_run, tmp_path):
    run_dir, data_dir = known_reward_run
    with initialize_config_dir(config_dir=str(run_dir), version_base=None):
        config = compose(config_name="config", overrides=["++mode=sample", f"++samples_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="saved_policy: .*holds a reward model .a sequence classifier., which this "
                                          "run cannot use .reward models score samples with label.py."):
        eval_py.run(config, run_dir)
    dpo = compose_run(tmp_path, data_dir, "dpo", "loss=dpo", f"++model.load_from={run_dir / 'LATEST'}")
    with pytest.raises(ConfigError, match="model.load_from: .*holds a reward model"):
        train(dpo, "dpo")


def test_a_reward_model_can_start_from_a_reward_model(known_reward_run, tmp_path):
    """model.load_from naming a reward model keeps its head: with a negligible learning rate nothing moves."""
    run_dir, data_dir = known_reward_run
    again = train(compose_run(tmp_path, data_dir, "again", f"++model.load_from={run_dir / 'LATEST'}", "lr=1e-12",
                              "n_epochs=null", "n_examples=16", "optimizer=SGD", "do_first_eval=false"),
                  "bradley-terry")
    start, end = read_policy_state(run_dir / "LATEST"), read_policy_state(again)
    assert start.keys() == end.keys() and "score.weight" in end
    assert all(torch.allclose(start[k], end[k], atol=1e-8) for k in start)


def test_a_reward_model_run_resumes_bitwise(known_reward_run, tmp_path, monkeypatch):
    """A crash in the 5th batch (the last resumable checkpoint came after the evaluation at 48 examples), then
    resume_from=auto: the final export equals an uninterrupted run's bit for bit."""
    _, data_dir = known_reward_run
    short = ("n_epochs=null", "n_examples=96", "checkpoint_every=32", "eval_every=48")
    uninterrupted = train(compose_run(tmp_path / "a", data_dir, "rm", *short), "bradley-terry")
    resumed_from, resumed = crash_and_resume(
        lambda *extra: compose_run(tmp_path / "b", data_dir, "rm", *short, *extra), "bradley-terry", monkeypatch,
        crash_before_batch=4)
    assert resumed_from == 48
    expected, actual = read_policy_state(uninterrupted), read_policy_state(resumed)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


LORA = ("++model.use_peft=true", "model.peft.r=4")


@pytest.fixture(scope="module")
def lora_reward_run(known_reward_run, tmp_path_factory):
    """The run directory of a LoRA reward model trained as known_reward_run's was, on its data."""
    root = tmp_path_factory.mktemp("lora_bradley_terry")
    train(compose_run(root, known_reward_run[1], "rm", *LORA), "bradley-terry")
    return root / "rm"


def test_a_lora_reward_model_learns_the_known_reward(lora_reward_run):
    metrics = checkpoint_info(lora_reward_run / "LATEST")["metrics"]
    assert metrics["rewards_eval/accuracies"] >= 0.9
    assert metrics["rewards_eval/margins"] > 0


def test_a_lora_reward_model_saves_its_adapters_with_the_score_head_and_exports_the_merged_classifier(
        lora_reward_run):
    """LATEST holds peft's SEQ_CLS adapters (the score head among the saved modules) and the merged classifier;
    peft's own loading of the adapters and the merged export score alike, and the merged export's mean chosen score
    is the final evaluation's."""
    latest = lora_reward_run / "LATEST"
    adapters = latest / lora.ADAPTER_DIR
    assert json.loads((adapters / lora.ADAPTER_CONFIG).read_text())["task_type"] == lora.SEQ_CLS
    saved = load_file(adapters / lora.ADAPTER_WEIGHTS)
    assert any(key.endswith("score.weight") for key in saved) and any("lora_B" in key for key in saved)
    assert weights.find_weights(latest).format is weights.FORMATS[1]  # the merged sequence classifier
    assert weights.ADAPTERS.holds_reward_model(adapters)
    config = OmegaConf.load(lora_reward_run / "config.yaml")
    tokenizer, loader = held_out_batches(lora_reward_run)
    base = RewardModel.classifier_from(load_causal_lm(config.model, "float32", config.seed))
    base.config.pad_token_id = tokenizer.pad_token_id
    adapted = RewardModel(PeftModel.from_pretrained(base, str(adapters)).eval())
    merged = AutoModelForSequenceClassification.from_pretrained(latest).eval()
    assert merged.config.pad_token_id == tokenizer.pad_token_id
    chosen_scores = []
    with torch.no_grad():
        for batch in loader:
            input_ids, attention_mask, _ = concatenate_rows(batch, (CHOSEN_KEYS, REJECTED_KEYS),
                                                            tokenizer.pad_token_id)
            from_adapters = adapted(input_ids, attention_mask)
            # Merging adds (alpha/r)·B·A into each float32 weight: a few float32 roundings of scores of size ~1.
            torch.testing.assert_close(RewardModel(merged)(input_ids, attention_mask), from_adapters, rtol=0,
                                       atol=1e-5)
            chosen_scores += from_adapters[:batch[CHOSEN_KEYS.labels].size(0)].tolist()
    logged = checkpoint_info(latest)["metrics"]["rewards_eval/chosen"]
    assert sum(chosen_scores) / len(chosen_scores) == pytest.approx(logged, abs=1e-5)
    # label.py's scorer reads it as any reward model: all 'good' scores above all 'bad'.
    good, bad = RewardScorer.load(str(latest)).score([("How was it?", " ".join([word] * N_WORDS)) for word in WORDS])
    assert good > bad


@pytest.mark.parametrize("run", ["known_reward_run", "lora_reward_run"])
def test_eval_py_reads_a_lora_or_whole_reward_model_back(run, request, tmp_path):
    run_dir = request.getfixturevalue(run)
    run_dir = run_dir[0] if isinstance(run_dir, tuple) else run_dir
    with initialize_config_dir(config_dir=str(run_dir), version_base=None):
        config = compose(config_name="config", overrides=["++mode=eval", "++n_eval_examples=null",
                                                           f"++samples_dir={tmp_path}"])
    metrics = json.loads(eval_py.run(config, run_dir).read_text())["metrics"]
    stored = checkpoint_info(run_dir / "LATEST")["metrics"]
    for key in ("rewards_eval/accuracies", "loss/eval", "rewards_eval/chosen"):
        assert metrics[key] == pytest.approx(stored[key], abs=1e-5), key


def test_a_lora_reward_model_run_resumes_bitwise(known_reward_run, tmp_path, monkeypatch):
    """As test_a_reward_model_run_resumes_bitwise, with LoRA: the resumable LATEST holds the adapters and score
    head only; resuming reaches the uninterrupted run's adapters and merged classifier exactly."""
    _, data_dir = known_reward_run
    short = ("n_epochs=null", "n_examples=96", "checkpoint_every=32", "eval_every=48", *LORA)
    uninterrupted = train(compose_run(tmp_path / "a", data_dir, "rm", *short), "bradley-terry")
    resumed_from, resumed = crash_and_resume(
        lambda *extra: compose_run(tmp_path / "b", data_dir, "rm", *short, *extra), "bradley-terry", monkeypatch,
        crash_before_batch=4)
    assert resumed_from == 48
    for read in (read_policy_state, lambda d: read_policy_state(d / lora.ADAPTER_DIR)):
        expected, actual = read(uninterrupted), read(resumed)
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_causal_lm_adapters_are_refused_for_a_reward_model(known_reward_run, tmp_path):
    """model.load_lora_from naming a causal LM's adapters: one line saying what they are for, before anything loads."""
    _, data_dir = known_reward_run
    source = tmp_path / "lm_adapters"
    config = compose_run(tmp_path, data_dir, "rm", *LORA)
    peft_lm = lora.add_adapters(load_causal_lm(config.model, "float32", config.seed), config.model, None, "tiny")
    peft_lm.save_pretrained(str(source))
    with pytest.raises(ConfigError, match=r"^invalid config: model.load_lora_from: .*lm_adapters: these adapters are "
                                          r"for a causal LM, but this run trains a reward model \(a sequence "
                                          r"classifier, loss=bradley-terry\)$"):
        train(compose_run(tmp_path, data_dir, "rm", *LORA, f"++model.load_lora_from={source}"), "bradley-terry")
    assert not (tmp_path / "rm").exists()
