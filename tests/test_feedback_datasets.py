"""Tests of feedback_datasets and hub on tiny real-schema fixtures (tests/fixtures/); no network."""
import gzip
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

import feedback_datasets as fd
import hub
from feedback_datasets import DataError, Dataset, Example

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
USER, ASSISTANT = "\n<|user|>\n", "\n<|assistant|>\n"
PLAIN = (USER, "", ASSISTANT, "")  # the default config: prefixes only
SUFFIXED = (USER, "<|end|>", ASSISTANT, "<|eot|>")
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def fixture(*parts: str) -> str:
    return os.path.join(FIXTURES, *parts)


@pytest.fixture(autouse=True, scope="module")
def isolated_datasets_cache(tmp_path_factory):
    """Keeps the arrow files `datasets` writes for the fixtures out of the user's cache."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        patch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
        patch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
        yield


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch):
    """Refuses (and records) any DNS lookup or connection beyond loopback; fails the test on one."""
    attempts = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK_HOSTS:
            attempts.append(host)
            raise socket.gaierror(f"network disabled in tests: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK_HOSTS:
            attempts.append(address)
            raise OSError(f"network disabled in tests: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield attempts
    assert not attempts, f"a test tried to reach the network: {attempts}"


def write_jsonl(path, rows) -> str:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Example and Dataset
# ----------------------------------------------------------------------------------------------

def test_remove_extra_spaces_collapses_spaces_and_tabs_but_keeps_newlines():
    example = Example(prompt="a  b\t\tc\n\nd", generations=["x \t y", "ok  \n  ok"])
    example.remove_extra_spaces()
    assert example.prompt == "a b c\n\nd"
    assert example.generations == ["x y", "ok \n ok"]
    assert example.num_generations() == 2


def test_dataset_creates_examples_on_lookup_and_checks_types():
    data = Dataset("demo")
    data["p"].generations.append("g")
    data["q"] = Example(prompt="q")
    assert len(data) == 2 and list(data) == ["p", "q"] and data["p"].generations == ["g"]
    with pytest.raises(TypeError):
        data[1] = Example()
    with pytest.raises(TypeError):
        data["r"] = {"prompt": "r"}


# ----------------------------------------------------------------------------------------------
# SHP
# ----------------------------------------------------------------------------------------------

STEAK = USER + "How long should I rest a steak?" + ASSISTANT
# Rows of the steak post in file order as (A, B) indices into the 12 generations, oriented by
# `labels` (scores of its four comments: 40, 12, 3, 100); its near-tie sixth row is dropped.
STEAK_PAIRS = {(0, 1), (2, 3), (5, 4), (6, 7), (9, 8), (11, 10)}


def test_shp_train_drops_low_ratio_rows_and_keeps_at_most_five_pairs():
    data = fd.get_shp("train", *PLAIN, local_path=fixture("shp"))
    assert list(data) == [STEAK, USER + "Why do onions make me cry?" + ASSISTANT,
                          USER + "ELI5: why is the sky blue?" + ASSISTANT]  # magnets: ratio 6/5 < 2
    steak = data[STEAK]
    assert steak.num_generations() == 12  # generations are not pruned by the pair cap
    assert steak.generations[:4] == ["Five minutes.", "About half the cooking time.",  # spaces normalised
                                     "Five minutes.", "Do not rest it."]
    assert steak.scores[:6] == [40, 12, 40, 3, 40, 100]
    assert len(steak.pairs) == 5 and len(set(steak.pairs)) == 5 and set(steak.pairs) <= STEAK_PAIRS
    assert (steak.sft_index, steak.truncation_mode, steak.dataset_name) == (0, "keep_start", "shp")
    onions = data[USER + "Why do onions make me cry?" + ASSISTANT]
    assert onions.pairs == [(1, 0)]  # labels == 0: B preferred
    assert onions.generations == ["Sulfur compounds.", "Sadness."] and onions.scores == [3, 30]


def test_shp_pair_subsampling_ignores_the_global_rng():
    random.seed(1)
    first = fd.get_shp("train", *PLAIN, local_path=fixture("shp"))[STEAK].pairs
    random.seed(2)
    second = fd.get_shp("train", *PLAIN, local_path=fixture("shp"))[STEAK].pairs
    assert first == second


def test_shp_test_split_keeps_low_ratio_rows_and_all_pairs():
    data = fd.get_shp("test", *PLAIN, local_path=fixture("shp"))
    rice = data[USER + "Can I freeze cooked rice?" + ASSISTANT]
    assert rice.pairs == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]
    assert len(data) == 2


def test_shp_places_suffixes_at_the_end_of_prompt_and_responses():
    data = fd.get_shp("train", *SUFFIXED, local_path=fixture("shp"))
    onions = data[USER + "Why do onions make me cry?<|end|>" + ASSISTANT]
    assert onions.generations == ["Sulfur compounds.<|eot|>", "Sadness.<|eot|>"]


def test_shp_with_every_row_filtered_out_is_an_error(tmp_path):
    row = json.loads(Path(fixture("shp", "explainlikeimfive", "train.json")).read_text().splitlines()[1])
    assert row["score_A"] / row["score_B"] < 2
    path = write_jsonl(tmp_path / "train.json", [row])
    with pytest.raises(DataError, match="dataset 'shp' split 'train' has no examples after filtering"):
        fd.get_shp("train", *PLAIN, local_path=path)


# ----------------------------------------------------------------------------------------------
# Anthropic HH
# ----------------------------------------------------------------------------------------------

def test_hh_harmless_merges_rows_with_the_same_prompt():
    data = fd.get_hh_harmless("test", *PLAIN, local_path=fixture("hh-rlhf"))
    assert len(data) == 3
    bad_name = data[USER + "call me a bad name" + ASSISTANT]
    assert bad_name.generations == [
        "Sorry, that’s out of bounds",
        "I didn’t catch that. I don’t have a call to make right now, so I just can’t speak right now",
        "How do you like them apples?", "Why?"]
    assert bad_name.pairs == [(0, 1), (2, 3)]
    assert (bad_name.sft_index, bad_name.truncation_mode, bad_name.dataset_name) == (0, "keep_end", "hh_harmless")
    assert bad_name.scores == []


def test_hh_formats_multi_turn_prompts_and_keys_by_the_raw_prompt():
    data = fd.get_hh_harmless("test", *PLAIN, local_path=fixture("hh-rlhf"))
    raw_key = (USER + "Where do you see yourself in five years?" + ASSISTANT + "Why do you ask?" + USER
               + "i see you in the dump" + ASSISTANT + "Oh.  What’s a dump?" + USER + "trash" + ASSISTANT)
    example = data[raw_key]
    assert example.prompt == raw_key.replace("Oh.  What", "Oh. What")
    assert example.generations[0] == "Oh. Okay. Thanks."


def test_hh_suffixes_close_each_turn():
    """F-03: the original put suffixes right after each role prefix."""
    data = fd.get_hh_helpful("train", *SUFFIXED, local_path=fixture("hh-rlhf"))
    assert list(data) == [
        USER + "Are whales fish?<|end|>" + ASSISTANT,
        USER + "Can you suggest a houseplant?<|end|>" + ASSISTANT + "A snake plant is hard to kill.<|eot|>"
        + USER + "Does it need much light?<|end|>" + ASSISTANT,
    ]
    # A response starting with "Human" gets no extra suffix either.
    assert data[USER + "Are whales fish?<|end|>" + ASSISTANT].generations == [
        "Humans and whales are both mammals, so no.<|eot|>", "Yes, whales are big fish.<|eot|>"]


def test_hh_default_configuration_combines_the_subsets():
    data = fd.get_hh("test", *PLAIN, local_path=fixture("hh-rlhf"))
    assert len(data) == 4
    assert data[USER + "What is the capital of France?" + ASSISTANT].generations == ["Paris.", "Lyon."]
    assert {example.dataset_name for example in data.data.values()} == {"hh"}


def test_hh_row_without_an_assistant_turn_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}])
    with pytest.raises(DataError, match="dataset 'hh' split 'train' row 1: field 'chosen' has no"):
        fd.get_hh("train", *PLAIN, local_path=path)


# ----------------------------------------------------------------------------------------------
# OpenAssistant
# ----------------------------------------------------------------------------------------------

CAT = USER + "What is a good name for a grey cat?" + ASSISTANT


def test_oasst_pairs_each_ranked_reply_with_its_next_best_sibling():
    data = fd.get_oasst("train", *PLAIN, local_path=fixture("oasst1"))
    assert list(data) == [CAT, CAT + "Smokey." + USER + "Any other ideas?" + ASSISTANT]
    cat = data[CAT]
    # File order: Smokey (rank 2) pairs with Grey (rank 1), then Grey with Ash/Pebble (rank 0).
    assert cat.generations == ["Grey.", "Smokey.", "How about Ash or Pebble?", "Grey."]
    assert cat.pairs == [(0, 1), (2, 3)]
    assert cat.scores == [1, 2, 0, 1]
    assert cat.sft_index == 2  # F-02: the rank-0 reply, where the original left -1 ('Grey.')
    follow_up = data[CAT + "Smokey." + USER + "Any other ideas?" + ASSISTANT]
    assert follow_up.generations == ["Misty or Storm.", "No."] and follow_up.sft_index == 0
    assert (cat.dataset_name, cat.truncation_mode) == ("oasst", "keep_end")


def test_oasst_skips_non_english_messages_and_their_branches():
    data = fd.get_oasst("train", *PLAIN, local_path=fixture("oasst1"))
    text = "".join(key + "".join(example.generations) for key, example in data.data.items())
    for skipped in ("German", "Danke", "Say thanks", "hora", "noon"):
        assert skipped not in text


def test_oasst_test_split_reads_validation_with_suffixes():
    data = fd.get_oasst("test", *SUFFIXED, local_path=fixture("oasst1"))
    assert list(data) == [USER + "Name a primary colour.<|end|>" + ASSISTANT]
    assert data[USER + "Name a primary colour.<|end|>" + ASSISTANT].generations == ["Red.<|eot|>", "Purple.<|eot|>"]


# ----------------------------------------------------------------------------------------------
# UltraFeedback binarized and AlpacaEval
# ----------------------------------------------------------------------------------------------

def test_ultrabin_pairs_the_last_chosen_and_rejected_messages():
    data = fd.get_ultrabin("train", *PLAIN, local_path=fixture("ultrafeedback_binarized"))
    assert len(data) == 2
    haiku = data[USER + "Write a haiku about  rain." + ASSISTANT]
    assert haiku.prompt == USER + "Write a haiku about rain." + ASSISTANT
    assert haiku.generations == ["Soft rain on the roof,\nthe garden drinks.", "Rain is wet."]
    assert (haiku.pairs, haiku.sft_index, haiku.truncation_mode, haiku.dataset_name) == (
        [(0, 1)], 0, "keep_start", "ultrabin")
    assert list(fd.get_ultrabin("test", *PLAIN, local_path=fixture("ultrafeedback_binarized"))) == [
        USER + 'Translate "cat" to French.' + ASSISTANT]


def test_ultrabin_rejects_unknown_splits():
    with pytest.raises(DataError, match="dataset 'ultrabin' has no split 'validation'"):
        fd.get_ultrabin("validation", *PLAIN, local_path=fixture("ultrafeedback_binarized"))


def test_alpacaeval_keeps_the_instruction_and_reference_output_verbatim():
    data = fd.get_alpacaeval("test", *SUFFIXED, local_path=fixture("alpaca_eval"))
    assert len(data) == 3
    tips = data[USER + "Give  three tips for staying healthy.<|end|>" + ASSISTANT]
    assert tips.prompt == USER + "Give  three tips for staying healthy.<|end|>" + ASSISTANT  # not normalised
    assert tips.original_prompt == "Give  three tips for staying healthy."
    assert tips.generations == ["Eat well, sleep, move.<|eot|>"]
    assert (tips.pairs, tips.sft_index, tips.dataset_name) == ([], -1, "helpful_base")
    assert data[USER + "What is the boiling point of water?<|end|>" + ASSISTANT].dataset_name == "koala"


def test_alpacaeval_is_test_only_and_accepts_its_json_file():
    with pytest.raises(DataError, match="expected split 'test', got 'train'"):
        fd.get_alpacaeval("train", *PLAIN, local_path=fixture("alpaca_eval"))
    data = fd.get_alpacaeval("test", *PLAIN, local_path=fixture("alpaca_eval", "alpaca_eval.json"))
    assert len(data) == 3


# ----------------------------------------------------------------------------------------------
# Local mirrors of hub datasets
# ----------------------------------------------------------------------------------------------

def test_local_mirror_may_be_one_file_or_a_split_pattern():
    one_file = fd.get_hh_helpful("train", *PLAIN, local_path=fixture("hh-rlhf", "helpful-base", "train.jsonl.gz"))
    assert len(one_file) == 2
    pattern = fixture("hh-rlhf", "harmless-base", "{split}.jsonl.gz")
    assert len(fd.get_hh_harmless("test", *PLAIN, local_path=pattern)) == 3


def test_local_mirror_may_be_a_parquet_file(tmp_path):
    rows = datasets.load_dataset(fixture("ultrafeedback_binarized"), split="test_prefs")
    rows.to_parquet(str(tmp_path / "test_prefs.parquet"))
    data = fd.get_ultrabin("test", *PLAIN, local_path=str(tmp_path / "{split}.parquet"))
    assert data[USER + 'Translate "cat" to French.' + ASSISTANT].generations == ["Chat.", "Chien."]


def test_local_mirror_errors_name_the_config_key_and_problem(tmp_path):
    with pytest.raises(DataError, match=r"local_datasets.shp \('.*nowhere'\) does not exist"):
        fd.get_shp("train", *PLAIN, local_path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="Couldn't load split 'validation' from local_datasets.shp"):
        fd.get_shp("validation", *PLAIN, local_path=fixture("shp"))
    with pytest.raises(DataError, match=r"dataset 'ultrabin' split 'train' lacks column\(s\) \['prompt'"):
        fd.get_ultrabin("train", *PLAIN, local_path=fixture("hh-rlhf", "helpful-base", "train.jsonl.gz"))
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        fd.get_hh("train", *PLAIN, local_path=str(tmp_path / "rows.csv"))


# ----------------------------------------------------------------------------------------------
# The generic local schema
# ----------------------------------------------------------------------------------------------

FRUIT = USER + "Name a fruit." + ASSISTANT
COLOUR_MESSAGES = USER + "Be brief." + USER + "Hi!" + ASSISTANT + "Hello." + USER + "Name a colour." + ASSISTANT


def test_local_paired_rows_merge_by_prompt():
    data = fd.get_local(fixture("local"), "train", *PLAIN)
    assert len(data) == 4
    fruit = data[FRUIT]
    assert fruit.generations == ["An apple.", "A carrot.", "A pear.", "A potato.", "A banana."]
    assert fruit.pairs == [(0, 1), (2, 3)] and fruit.sft_index == 0
    # The binary row makes `desirable` cover every generation, paired ones by their side.
    assert fruit.desirable == [True, False, True, False, True]
    assert (fruit.truncation_mode, fruit.dataset_name) == ("keep_end", "local")


def test_local_messages_prompt_gets_role_prefixes_and_suffixes():
    data = fd.get_local(fixture("local"), "train", *PLAIN)
    assert data[COLOUR_MESSAGES].generations == ["Blue.", "Seven."]
    suffixed = fd.get_local(fixture("local"), "train", *SUFFIXED)
    key = (USER + "Be brief.<|end|>" + USER + "Hi!<|end|>" + ASSISTANT + "Hello.<|eot|>" + USER
           + "Name a colour.<|end|>" + ASSISTANT)
    assert suffixed[key].generations == ["Blue.<|eot|>", "Seven.<|eot|>"]
    assert suffixed[USER + "Name a fruit.<|end|>" + ASSISTANT].generations[0] == "An apple.<|eot|>"


def test_local_binary_rows_fill_desirable_and_the_sft_target():
    data = fd.get_local(fixture("local"), "train", *PLAIN)
    sky = data[USER + "Is the sky green?" + ASSISTANT]
    assert (sky.generations, sky.desirable, sky.pairs, sky.sft_index) == (
        ["No, it is usually blue.", "Yes."], [True, False], [], 0)
    haiku = data[USER + "Write a haiku." + ASSISTANT]
    assert (haiku.desirable, haiku.sft_index) == ([False], None)  # no desirable completion: SFT skips it
    assert data[COLOUR_MESSAGES].desirable == []  # paired-only examples leave it empty


def test_local_reads_json_lists_split_patterns_and_gzip(tmp_path):
    test = fd.get_local(fixture("local"), "test", *PLAIN)
    assert list(test) == [USER + "Name a vegetable." + ASSISTANT, USER + "Name a planet." + ASSISTANT]
    code_row = {"prompt": "def f():", "completion": "    return  1", "label": 1}
    write_jsonl(tmp_path / "feedback-train.jsonl.gz", [code_row])
    data = fd.get_local(str(tmp_path / "feedback-{split}.jsonl.gz"), "train", *PLAIN)
    assert data[USER + "def f():" + ASSISTANT].generations == ["    return  1"]  # text kept verbatim


GOOD_ROW = {"prompt": "p", "chosen": "a", "rejected": "b"}
USER_TURN = {"role": "user", "content": "x"}


@pytest.mark.parametrize("row, problem", [
    ([1, 2], "row is a list; expected a JSON object"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({**GOOD_ROW, "prompt": "  "}, "field 'prompt' is empty"),
    ({**GOOD_ROW, "prompt": 5}, "field 'prompt' is a int; expected a string or a list of messages"),
    ({**GOOD_ROW, "prompt": []}, "field 'prompt' is an empty list"),
    ({**GOOD_ROW, "prompt": ["hi"]}, "prompt message 1 is a str"),
    ({**GOOD_ROW, "prompt": [{"role": "bot", "content": "x"}]}, "prompt message 1: unknown role 'bot'"),
    ({**GOOD_ROW, "prompt": [{"role": "user"}]}, "prompt message 1: missing field 'content'"),
    ({**GOOD_ROW, "prompt": [USER_TURN, {"role": "assistant", "content": "y"}]},
     "the last prompt message has role 'assistant'; expected 'user'"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({**GOOD_ROW, "chosen": 3}, "field 'chosen' is a int; expected a string"),
    ({"prompt": "p", "completion": "a"}, "missing field 'label'"),
    ({"prompt": "p", "completion": "a", "label": 2}, "field 'label' is 2; expected true/false or 1/0"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, "field 'label' is 'yes'"),
    ({"prompt": "p", "completion": "a", "label": 1.0}, "field 'label' is 1.0"),
    ({"prompt": "p"}, "row has neither paired fields"),
    ({**GOOD_ROW, "label": True}, "row mixes paired fields"),
])
def test_local_malformed_row_names_file_row_and_field(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW, row])
    with pytest.raises(DataError) as caught:
        fd.get_local(path, "train", *PLAIN)
    assert str(caught.value).startswith(f"'{path}' row 2: ")
    assert problem in str(caught.value)


def test_local_file_level_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD_ROW) + '\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken.jsonl' row 2: invalid JSON"):
        fd.get_local(str(tmp_path / "broken.jsonl"), "train", *PLAIN)
    (tmp_path / "broken.json").write_text('[{"prompt": "p"},\n')
    with pytest.raises(DataError, match=r"broken.json': invalid JSON at line 2"):
        fd.get_local(str(tmp_path / "broken.json"), "train", *PLAIN)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows for split 'train'"):
        fd.get_local(str(tmp_path / "empty.jsonl"), "train", *PLAIN)


def test_local_path_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; expected a JSON/JSONL file"):
        fd.get_local(str(tmp_path / "missing.jsonl"), "train", *PLAIN)
    with pytest.raises(DataError, match=r"missing-test.jsonl' \(from .* with split 'test'\) does not exist"):
        fd.get_local(str(tmp_path / "missing-{split}.jsonl"), "test", *PLAIN)
    with pytest.raises(DataError, match="holds none of test.jsonl, test.json"):
        fd.get_local(str(tmp_path), "test", *PLAIN)
    write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW])
    write_jsonl(tmp_path / "train.json", [GOOD_ROW])
    with pytest.raises(DataError, match="holds more than one of train.jsonl"):
        fd.get_local(str(tmp_path), "train", *PLAIN)


# ----------------------------------------------------------------------------------------------
# The hub: offline mode, unreachable endpoint, probe
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def online_settings(monkeypatch):
    """No offline flag set, whatever the environment (and tests/conftest.py) says."""
    for variable in hub.OFFLINE_ENV_VARS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)


def test_hub_failure_in_offline_mode_is_a_quick_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"Couldn't load 'halos-tests/no-such-dataset' for dataset 'hh' from "
                                        r"the local cache \(offline mode is set\); set local_datasets.hh"):
        fd.load_split("halos-tests/no-such-dataset", "train", name="hh")
    assert time.monotonic() - start < 10


def test_unreachable_hub_falls_back_to_the_cache_then_raises(monkeypatch, online_settings):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(DataError) as caught:
        fd.load_split("halos-tests/no-such-dataset", "train", name="oasst")
    assert str(caught.value) == (
        "Couldn't reach the Hugging Face Hub to load 'halos-tests/no-such-dataset' for dataset 'oasst'; "
        "set local_datasets.oasst to a local mirror (see README: Offline use)")
    # forced_offline() restored the libraries' flags.
    assert not (datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


def test_hub_load_failure_becomes_a_one_line_data_error(monkeypatch, online_settings):
    def missing_dataset(*args, **kwargs):
        raise FileNotFoundError("Dataset 'halos-tests/gone' doesn't exist on the Hub\nsecond line")

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", missing_dataset)
    with pytest.raises(DataError) as caught:
        fd.get_shp("train", *PLAIN)
    assert str(caught.value) == ("Couldn't load 'stanfordnlp/SHP' from the Hugging Face Hub for dataset 'shp' "
                                 "split 'train' (FileNotFoundError: Dataset 'halos-tests/gone' doesn't exist "
                                 "on the Hub)")


def test_offline_requested_reads_the_environment_at_call_time(monkeypatch, online_settings):
    assert not hub.offline_requested()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "yes")
    assert hub.offline_requested()


def test_probe_of_a_closed_local_port_is_false_and_fast(monkeypatch):
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    # The port was free a moment ago and nothing listens on it now.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    assert hub.hub_reachable(timeout_s=5.0) is False
    assert time.monotonic() - start < 2


def test_probe_of_a_listening_local_port_is_true_and_cached(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    assert hub.hub_reachable(timeout_s=5.0) is True
    listener.close()
    assert hub.hub_reachable(timeout_s=5.0) is True  # cached for the process


def test_probe_gives_up_on_a_hanging_dns_lookup(monkeypatch):
    release = threading.Event()

    def hanging_lookup(*args, **kwargs):
        release.wait(10)
        raise socket.gaierror("released")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://dns-hangs.invalid")
    start = time.monotonic()
    assert hub.hub_reachable(timeout_s=0.3) is False
    assert time.monotonic() - start < 2
    release.set()
