"""Tests of datasets named in config without code (feedback_rows + data_sources.read_source): TRL's standard and
conversational row formats, column mappings, parquet/CSV/JSON(L) files and hub-layout directories, held-out test
fractions, and one-line errors naming the file, row and field. No network."""
import json

import datasets
import pytest

from feedback.examples import Message, conversation_key
from feedback.rows import load_source
from feedback.sources import SourceSpec, read_source
from feedback_datasets import DataError
from test_feedback_datasets import (ASSISTANT, PLAIN, SUFFIXED, USER, fixture, formatted,  # noqa: F401
                                    isolated_datasets_cache, network_attempts, write_jsonl)
from utils import REPO_ROOT

FRUIT = USER + "Name a fruit." + ASSISTANT
COLOUR_MESSAGES = USER + "Be brief." + USER + "Hi!" + ASSISTANT + "Hello." + USER + "Name a colour." + ASSISTANT


def local(path, split="train", **options):
    return load_source(SourceSpec("local", str(path), **options), split)


# ----------------------------------------------------------------------------------------------
# The fixture file (paired, binary and messages-list rows)
# ----------------------------------------------------------------------------------------------

def test_local_paired_rows_merge_by_prompt():
    data = local(fixture("local"))
    assert len(data) == 4 and data.rows_read == 7
    fruit, generations = formatted(data)[FRUIT]
    assert generations == ["An apple.", "A carrot.", "A pear.", "A potato.", "A banana."]
    assert fruit.pairs == [(0, 1), (2, 3)] and fruit.sft_index == 0
    # The binary row makes `desirable` cover every generation, paired ones by their side.
    assert fruit.desirable == [True, False, True, False, True]
    assert (fruit.truncation_mode, fruit.dataset_name, fruit.origin) == ("keep_end", "local",
                                                                          f"'{fixture('local', 'train.jsonl')}' row 1")


def test_local_messages_prompt_gets_role_prefixes_and_suffixes():
    data = local(fixture("local"))
    assert formatted(data)[COLOUR_MESSAGES][1] == ["Blue.", "Seven."]
    suffixed = formatted(data, SUFFIXED)
    key = (USER + "Be brief.<|end|>" + USER + "Hi!<|end|>" + ASSISTANT + "Hello.<|eot|>" + USER
           + "Name a colour.<|end|>" + ASSISTANT)
    assert suffixed[key][1] == ["Blue.<|eot|>", "Seven.<|eot|>"]
    assert suffixed[USER + "Name a fruit.<|end|>" + ASSISTANT][1][0] == "An apple.<|eot|>"


def test_local_binary_rows_fill_desirable_and_the_sft_target():
    prompts = formatted(local(fixture("local")))
    sky = prompts[USER + "Is the sky green?" + ASSISTANT][0]
    assert (sky.generations, sky.desirable, sky.pairs, sky.sft_index) == (
        ["No, it is usually blue.", "Yes."], [True, False], [], 0)
    haiku = prompts[USER + "Write a haiku." + ASSISTANT][0]
    assert (haiku.desirable, haiku.sft_index) == ([False], None)  # no desirable completion: SFT skips it
    assert prompts[COLOUR_MESSAGES][0].desirable == []  # paired-only examples leave it empty


def test_local_reads_json_lists_split_patterns_and_gzip(tmp_path):
    assert list(formatted(local(fixture("local"), "test"))) == [USER + "Name a vegetable." + ASSISTANT,
                                                                USER + "Name a planet." + ASSISTANT]
    code_row = {"prompt": "def f():", "completion": "    return  1", "label": 1}
    write_jsonl(tmp_path / "feedback-train.jsonl.gz", [code_row])
    data = local(tmp_path / "feedback-{split}.jsonl.gz")
    assert formatted(data)[USER + "def f():" + ASSISTANT][1] == ["    return  1"]  # text kept verbatim


# ----------------------------------------------------------------------------------------------
# TRL's formats: standard and conversational, explicit and implicit prompt
# ----------------------------------------------------------------------------------------------

def messages(*turns):
    return [{"role": role, "content": content} for role, content in turns]


SYSTEM, QUESTION = ("system", "Answer briefly."), ("user", "Why is the sea salty?")
SAME_PAIR = {  # one pair written four ways
    "standard": {"prompt": "Why is the sea salty?", "chosen": "Minerals from rocks.", "rejected": "Tears."},
    "conversational": {"prompt": messages(QUESTION), "chosen": messages(("assistant", "Minerals from rocks.")),
                       "rejected": messages(("assistant", "Tears."))},
    "mixed": {"prompt": messages(QUESTION), "chosen": "Minerals from rocks.", "rejected": "Tears."},
    "implicit": {"chosen": messages(QUESTION, ("assistant", "Minerals from rocks.")),
                 "rejected": messages(QUESTION, ("assistant", "Tears."))},
}


@pytest.mark.parametrize("form", list(SAME_PAIR))
def test_every_form_of_a_pair_gives_the_same_example(tmp_path, form):
    example = next(iter(local(write_jsonl(tmp_path / "train.jsonl", [SAME_PAIR[form]])).data.values()))
    assert example.prompt_messages == [Message("user", "Why is the sea salty?")]
    assert (example.generations, example.pairs, example.sft_index) == (["Minerals from rocks.", "Tears."], [(0, 1)], 0)


def test_multi_turn_implicit_prompts_keep_the_system_message_once(tmp_path):
    history = (SYSTEM, QUESTION, ("assistant", "Minerals."), ("user", "Which ones?"))
    row = {"chosen": messages(*history, ("assistant", "Mostly sodium chloride.")),
           "rejected": messages(*history, ("assistant", "Gold."))}
    example = next(iter(local(write_jsonl(tmp_path / "train.jsonl", [row])).data.values()))
    assert example.prompt_messages == [Message(*turn) for turn in history]
    assert example.generations == ["Mostly sodium chloride.", "Gold."]


def test_demonstrations_and_unpaired_conversational_rows(tmp_path):
    rows = [{"messages": messages(QUESTION, ("assistant", "Minerals."))},
            {"prompt": "Name a colour.", "completion": "Teal."},
            {"prompt": messages(("user", "Name a colour.")), "completion": messages(("assistant", "Mud.")),
             "label": False}]
    data = local(write_jsonl(tmp_path / "train.jsonl", rows))
    sea = data[conversation_key([Message("user", "Why is the sea salty?")])]
    assert (sea.generations, sea.desirable, sea.sft_index) == (["Minerals."], [True], 0)
    colour = data[conversation_key([Message("user", "Name a colour.")])]
    assert (colour.generations, colour.desirable, colour.sft_index) == (["Teal.", "Mud."], [True, False], 0)


# ----------------------------------------------------------------------------------------------
# Malformed rows and files
# ----------------------------------------------------------------------------------------------

GOOD_ROW = {"prompt": "p", "chosen": "a", "rejected": "b"}
USER_TURN = {"role": "user", "content": "x"}
ASSISTANT_TURN = {"role": "assistant", "content": "y"}


@pytest.mark.parametrize("row, problem", [
    ([1, 2], "row is a list; expected a JSON object"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'; field 'chosen' is a string"),
    ({**GOOD_ROW, "prompt": "  "}, "field 'prompt' is empty"),
    ({**GOOD_ROW, "prompt": 5}, "field 'prompt' is a int; expected a string or a list of messages"),
    ({**GOOD_ROW, "prompt": []}, "field 'prompt' is an empty list"),
    ({**GOOD_ROW, "prompt": ["hi"]}, "prompt message 1 is a str"),
    ({**GOOD_ROW, "prompt": [{"role": "bot", "content": "x"}]}, "prompt message 1: unknown role 'bot'"),
    ({**GOOD_ROW, "prompt": [{"role": "user"}]}, "prompt message 1: missing field 'content'"),
    ({**GOOD_ROW, "prompt": [USER_TURN, ASSISTANT_TURN]},
     "the last prompt message has role 'assistant'; expected 'user'"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({**GOOD_ROW, "chosen": 3}, "field 'chosen' is a int; expected a string or a list of messages"),
    ({**GOOD_ROW, "chosen": [USER_TURN, ASSISTANT_TURN]}, "field 'chosen' holds messages with roles [user, assistant]"),
    ({"chosen": [USER_TURN], "rejected": [USER_TURN, ASSISTANT_TURN]}, "field 'chosen' has no final assistant turn"),
    ({"chosen": [ASSISTANT_TURN], "rejected": [USER_TURN, ASSISTANT_TURN]},
     "the final assistant turn follows nothing; expected a user turn"),
    ({"chosen": [USER_TURN, ASSISTANT_TURN], "rejected": [{"role": "user", "content": "z"}, ASSISTANT_TURN]},
     "fields 'chosen' and 'rejected' differ before their final assistant turn"),
    ({"messages": [USER_TURN]}, "field 'messages' has no final assistant turn"),
    ({"prompt": "p", "completion": "a", "label": 2}, "field 'label' is 2; expected true/false or 1/0"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, "field 'label' is 'yes'"),
    ({"prompt": "p", "completion": "a", "label": 1.0}, "field 'label' is 1.0"),
    ({"prompt": "p", "label": True}, "missing field 'completion'"),
    ({"prompt": "p"}, "row has none of the schemas"),
    ({**GOOD_ROW, "label": True}, "row mixes more than one of the schemas"),
    ({**GOOD_ROW, "completion": "c"}, "row mixes more than one of the schemas"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW, row])
    with pytest.raises(DataError) as caught:
        local(path)
    assert str(caught.value).startswith(f"'{path}' row 2: ")
    assert problem in str(caught.value)


def test_local_file_level_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD_ROW) + '\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken.jsonl' row 2: invalid JSON"):
        local(tmp_path / "broken.jsonl")
    (tmp_path / "broken.json").write_text('[{"prompt": "p"},\n')
    with pytest.raises(DataError, match=r"broken.json': invalid JSON at line 2"):
        local(tmp_path / "broken.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"dataset_sources.local: '.*empty.jsonl' has no rows for split 'train'"):
        local(tmp_path / "empty.jsonl")


def test_local_path_errors(tmp_path):
    with pytest.raises(DataError, match="dataset_sources.local: '.*missing.jsonl' does not exist; expected a hub"):
        local(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"missing-test.jsonl' does not exist"):
        local(tmp_path / "missing-{split}.jsonl", "test")
    with pytest.raises(DataError, match="directory '.*' holds no test.jsonl or test.json, and `datasets` could not"):
        local(tmp_path, "test")
    write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW])
    write_jsonl(tmp_path / "train.json", [GOOD_ROW])
    with pytest.raises(DataError, match="holds more than one of train.jsonl, train.json"):
        local(tmp_path)


def test_a_hub_id_offline_is_a_quick_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="Couldn't load 'halos-tests/nothing' for dataset 'local' from the local cache"):
        local("halos-tests/nothing")


# ----------------------------------------------------------------------------------------------
# Column mappings, columnar files, hub-layout directories
# ----------------------------------------------------------------------------------------------

def test_column_mapping_reads_a_csv_with_its_own_names(tmp_path):
    (tmp_path / "kto.csv").write_text("question,answer,good\nIs ice cold?,Yes.,True\nIs fire cold?,Yes.,False\n")
    data = local(tmp_path / "kto.csv", columns={"prompt": "question", "completion": "answer", "label": "good"})
    assert [(e.prompt_messages[0].content, e.generations, e.desirable) for e in data.data.values()] == [
        ("Is ice cold?", ["Yes."], [True]), ("Is fire cold?", ["Yes."], [False])]
    with pytest.raises(DataError, match=r"kto.csv' row 1: no column 'verdict' \(dataset_sources.local.columns.label\); "
                                        r"the row has question, answer, good"):
        local(tmp_path / "kto.csv", columns={"prompt": "question", "completion": "answer", "label": "verdict"})


def test_a_hub_layout_directory_with_split_names_and_a_dropped_column():
    """The bundled UltraFeedback-style mirror read without code: its `prompt` string column is left out so that the
    whole `chosen`/`rejected` conversations give an implicit prompt."""
    spec = dict(splits={"train": "train_prefs", "test": "test_prefs"}, columns={"prompt": None, "messages": None})
    data = local(REPO_ROOT / "data" / "hh-rlhf-ultrafeedback", "test", **spec)
    assert data.rows_read == 64 and all(e.pairs and len(e.prompt_messages) == 1 for e in data.data.values())


def test_parquet_files_and_split_patterns(tmp_path):
    rows = datasets.load_dataset(fixture("ultrafeedback_binarized"), split="train_prefs")
    rows.to_parquet(str(tmp_path / "prefs-train_prefs.parquet"))
    data = local(tmp_path / "prefs-{split}.parquet", splits={"train": "train_prefs"},
                 columns={"prompt": None, "messages": None})
    assert len(data) == 2
    assert [where for where, _ in read_source(SourceSpec("x", str(tmp_path / "prefs-train_prefs.parquet")), "train")][
        -1].endswith("prefs-train_prefs.parquet' row 2")


# ----------------------------------------------------------------------------------------------
# Held-out test fraction
# ----------------------------------------------------------------------------------------------

def test_test_fraction_holds_out_whole_prompts_the_same_way_every_time(tmp_path):
    rows = [{"prompt": f"question {k % 150}", "chosen": f"good {k}", "rejected": f"bad {k}"} for k in range(300)]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    train, test = (local(path, split, test_fraction=0.2) for split in ("train", "test"))
    train_prompts = {e.prompt_messages[0].content for e in train.data.values()}
    test_prompts = {e.prompt_messages[0].content for e in test.data.values()}
    assert not train_prompts & test_prompts and len(train_prompts | test_prompts) == 150
    # 150 prompts each held out with probability 0.2: 30 expected, standard deviation 4.9.
    assert 10 <= len(test_prompts) <= 50
    assert all(len(e.pairs) == 2 for e in test.data.values())  # both rows of a prompt go to the same split
    assert train.dropped == {"in the held-out test split": 2 * len(test_prompts)}
    assert {e.prompt_messages[0].content for e in local(path, "test", test_fraction=0.2).data.values()} == test_prompts
