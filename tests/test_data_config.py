"""The data keys of the config are checked in the one-pass config check, before anything loads (data_config.py)."""
import json

import pytest

from configuration import ConfigError, validate_train_config
from utils import REPO_ROOT

BASE = ("model=tiny", "exp_name=t", "mode=train")


def problems_of(config, loss="sft"):
    with pytest.raises(ConfigError) as info:
        validate_train_config(config, loss)
    return str(info.value)


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    return path


def test_valid_data_configs_pass(compose_config, jsonl):
    chat = REPO_ROOT / "data" / "hh-rlhf-chat"
    for overrides in (("loss=dpo", "datasets=[hh,mine]", f"++local_datasets.mine={chat}",
                       "++dataset_weights={hh: 0.7, mine: 0.3}", "++dataset_max_examples={hh: 100}"),
                      ("loss=kto", "datasets=[mine]", f"++dataset_sources.mine.path={jsonl}",
                       "++dataset_sources.mine.test_fraction=0.1", "++dataset_sources.mine.columns={messages: null}"),
                      ("loss=sft", "datasets=[ultrachat,feedback_datasets.get_hh]", "sft_all_assistant_turns=true",
                       "model.chat_template=tokenizer")):
        assert validate_train_config(compose_config(*BASE, *overrides), overrides[0].split("=")[1]) == []


@pytest.mark.parametrize("overrides, expected", [
    (("datasets=[hh,nosuch]",), "datasets: unknown dataset 'nosuch' (available: "),
    (("datasets=[nosuchpkg.get_x]",), "datasets: dataset 'nosuchpkg.get_x': cannot import module 'nosuchpkg'"),
    (("datasets=[hh]", "++dataset_weights={hh: -1}"), "dataset_weights: every weight must be a positive number"),
    (("datasets=[hh]", "++dataset_weights={hh: 1, shp: 1}"), "dataset_weights: ['shp'] not in datasets ['hh']"),
    (("datasets=[hh]", "++dataset_max_examples={hh: 0.5}"), "dataset_max_examples: every cap must be a positive"),
    (("datasets=[mine]", "++dataset_sources.mine.pth=x"), "dataset_sources.mine.pth: unknown key"),
    (("datasets=[mine]", "++dataset_sources.mine.subset=x"), "dataset_sources.mine.path: required"),
    (("datasets=[mine]", "++dataset_sources.mine.path=no/such/dir/x.jsonl"),
     "dataset_sources.mine.path: no/such/dir/x.jsonl is neither an existing local path nor a hub dataset id"),
    (("datasets=[mine]", "++dataset_sources.mine.path=org/name", "++dataset_sources.mine.columns={prompt: 3}"),
     "dataset_sources.mine.columns.prompt: expected a column name or null, got 3"),
    (("datasets=[mine]", "++dataset_sources.mine.path=org/name", "++dataset_sources.mine.columns={question: q}"),
     "dataset_sources.mine.columns.question: unknown field (expected one of prompt, chosen"),
    (("datasets=[mine]", "++dataset_sources.mine.path=org/name", "++dataset_sources.mine.splits={dev: x}"),
     "dataset_sources.mine.splits: expected a mapping from train/test"),
    (("datasets=[mine]", "++dataset_sources.mine.path=org/name", "++dataset_sources.mine.test_fraction=1.5"),
     "dataset_sources.mine.test_fraction: expected a fraction strictly between 0 and 1, got 1.5"),
    (("datasets=[hh]", "++dataset_sources.hh.path=org/name"), "dataset_sources.hh: 'hh' is a built-in dataset"),
    (("datasets=[hh]", "model.chat_template=no/such.jinja"),
     "model.chat_template: 'no/such.jinja' is not null, 'tokenizer' or an existing Jinja template file"),
    (("datasets=[hh]", "sft_all_assistant_turns=yes"), "sft_all_assistant_turns: expected true or false, got 'yes'"),
])
def test_each_bad_data_key_is_a_one_line_problem(compose_config, overrides, expected):
    message = problems_of(compose_config(*BASE, "loss=sft", *overrides))
    assert expected in message


def test_every_assistant_turn_is_for_sft_only(compose_config):
    message = problems_of(compose_config(*BASE, "loss=dpo", "datasets=[hh]", "sft_all_assistant_turns=true"), "dpo")
    assert "sft_all_assistant_turns: applies to SFT (SFTDataLoader), not to loss.dataloader=PairedPreferenceDataLoader" \
        in message


def test_one_file_as_both_train_and_test_split_is_refused(compose_config, jsonl, tmp_path):
    """Issue 11.5: one local JSON/JSONL file was silently used as both the train and the test split."""
    message = problems_of(compose_config(*BASE, "loss=dpo", "datasets=[mine]", f"++local_datasets.mine={jsonl}"),
                          "dpo")
    assert (f"local_datasets.mine: the one file {jsonl} would be both the train and the test split, so evaluation "
            f"would measure training data; hold part of it out with ++dataset_sources.mine.test_fraction=0.1") in message
    builtin = problems_of(compose_config(*BASE, "loss=dpo", "datasets=[hh]",
                                         f"++local_datasets.hh={REPO_ROOT / 'tests/fixtures/hh-rlhf/helpful-base/train.jsonl.gz'}"),
                          "dpo")
    assert "local_datasets.hh: the one file" in builtin and "give a directory or a '{split}' path" in builtin
    # A split option makes it explicit: a held-out fraction, or a file per split.
    held_out = compose_config(*BASE, "loss=dpo", "datasets=[mine]", f"++dataset_sources.mine.path={jsonl}",
                              "++dataset_sources.mine.test_fraction=0.2")
    assert validate_train_config(held_out, "dpo") == []
    (tmp_path / "mine-test.jsonl").write_text(jsonl.read_text())
    per_split = compose_config(*BASE, "loss=dpo", "datasets=[mine]",
                               f"++dataset_sources.mine.path='{tmp_path / 'mine-{split}.jsonl'}'",  # quoted: Hydra braces
                               "++dataset_sources.mine.splits={train: train, test: test}")
    (tmp_path / "mine-train.jsonl").write_text(jsonl.read_text())
    assert validate_train_config(per_split, "dpo") == []


@pytest.mark.parametrize("preset, template", [("llama7b", None), ("mistral7b_instruct", None), ("tiny_chat", "tokenizer"),
                                              ("llama3-8b-instruct", "tokenizer"), ("qwen2.5-7b-instruct", "tokenizer"),
                                              ("gemma2-9b-it", "tokenizer")])
def test_presets_choose_the_prompt_format(compose_config, preset, template):
    """The original's presets keep the prefix strings; the instruct presets use their tokenizer's chat template."""
    config = compose_config(f"model={preset}", "exp_name=t", "mode=train", "loss=sft", "datasets=[hh]")
    assert config.model.chat_template == template
