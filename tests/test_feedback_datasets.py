"""Tests of feedback_datasets, data_sources and hub on tiny real-schema fixtures (tests/fixtures/); no network."""
import gzip
import hashlib
import json
import logging
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
from feedback.examples import Message, conversation_key
from feedback.prompt_format import PrefixFormat
from feedback.sources import load_split
from feedback_datasets import DataError, Dataset, Example

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
USER, ASSISTANT = "\n<|user|>\n", "\n<|assistant|>\n"
PLAIN = (USER, "", ASSISTANT, "")  # the default config: prefixes only
SUFFIXED = (USER, "<|end|>", ASSISTANT, "<|eot|>")
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
BUNDLED_HH = os.path.join(os.path.dirname(FIXTURES), os.pardir, "data", "hh-rlhf")


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


def formatted(data: Dataset, strings=PLAIN) -> dict:
    """Formatted prompt -> (Example, formatted generations), as the prefix format renders them."""
    prompt_format = PrefixFormat(*strings)
    out = {}
    for example in data.data.values():
        rendered = prompt_format.render(example, range(example.num_generations()))
        out[rendered.prompt] = (example, [rendered.responses[i] for i in range(example.num_generations())])
    return out


# sha256 of [prompt, generations, pairs, sft_index, scores, truncation_mode, dataset_name, original_prompt] of every
# Example, as the data layer produced them before prompt formatting moved out of the dataset functions (the
# original's behaviour, pinned by the literal expectations below): the defaults still give byte-identical prompts.
BEFORE_PROMPT_FORMAT_OBJECT = {
    ("shp", "shp", "train", "plain"): "b705fbbfd1e80ead7c5f0fd29ad5e7717e3e03c871b76fe824673020399c1480",
    ("shp", "shp", "train", "suffixed"): "c497530ef2c412a141c0fda94ec072b29cc4c4548b519c2ece103f0ca9b2a3e3",
    ("shp", "shp", "test", "plain"): "fa0cf66b1dc9abb6791e224742c3682f73eb6ae771b657072bc07d8cc02f40c6",
    ("shp", "shp", "test", "suffixed"): "b6dc1d2e2aaaebed858bbce84e9de2064d1259d7541d006e30c181087c2b711c",
    ("hh", "hh-rlhf", "train", "plain"): "e140d705126e9b61b9a11da1a54d7275a238e63d72cdd8ed668851494317944a",
    ("hh", "hh-rlhf", "train", "suffixed"): "010cc3aa633641984c05ac8135136a7ed3f2cd857f211f0548eb48617849aa58",
    ("hh", "hh-rlhf", "test", "plain"): "eaad8c6782cdc28efee1af6c438160f5a5e55765fa9defc880ee40784a9d9448",
    ("hh", "hh-rlhf", "test", "suffixed"): "2933a172cc47776eb0ae743d6096645ea67ed2191300de56884ec89f64cfc292",
    ("hh_helpful", "hh-rlhf", "train", "plain"): "adf32602278f60332c38015cbf5eec74dc65d118a3b3ff4f3baa0948e0024671",
    ("hh_helpful", "hh-rlhf", "train", "suffixed"): "c8e29c554e08faaab830d8cbe28d07f2a35c5326a071a46cb24215e97aa99706",
    ("hh_helpful", "hh-rlhf", "test", "plain"): "1bbd3b0e05e21eaa66d1bac2258663d5c7b8586044ad71a86497ac48a4c191f0",
    ("hh_helpful", "hh-rlhf", "test", "suffixed"): "795bf76ac865a55bebc56b2927d9c0b2aba93eb74fbe139210a9109e7d948f11",
    ("hh_harmless", "hh-rlhf", "train", "plain"): "f38e87fca12466acdce23a32b622cbde73f35ffa7668293bd2a79c24fe6b525d",
    ("hh_harmless", "hh-rlhf", "train", "suffixed"): "805d29e5d9434a653f5c2a4ff528034fbc59a85cd50ffe20f68ff92adf92a758",
    ("hh_harmless", "hh-rlhf", "test", "plain"): "11d7b6c014f57dfd35e35a40a393fc27be99fc6537960da5f212d94e884652a2",
    ("hh_harmless", "hh-rlhf", "test", "suffixed"): "4c2b5a4752558d4620683aa2cdfb86fc75e31e48ad27ea8738e95ad7de54d42c",
    ("oasst", "oasst1", "train", "plain"): "950d977d77b3d99939dc7d552bc4423b303fb80d170e4c0cbfa029c78b2e8ce9",
    ("oasst", "oasst1", "train", "suffixed"): "2ceab5bd86b00501c0d00ee5e550a2b974b30582dda7abb2f510cfe2d5aa12c7",
    ("oasst", "oasst1", "test", "plain"): "4996110e69f82060b967e9b353399e63d187eb9a94296106606367604cc39f77",
    ("oasst", "oasst1", "test", "suffixed"): "9916b356ea57af224d3f9d401360a6b24f2f0c6ab10536a8fcf0a35f15137157",
    ("ultrabin", "ultrafeedback_binarized", "train", "plain"):
        "4d2203cf5bfc9e8c1f08e4da1ea85498e3fa763963eef1b66a3c0d396a6a0059",
    ("ultrabin", "ultrafeedback_binarized", "train", "suffixed"):
        "7fa20af907be97ca8aee4990450626b06f0b86e65db88c7e6f235d651016d1b5",
    ("ultrabin", "ultrafeedback_binarized", "test", "plain"):
        "ebffc823f1df9bfe46dd1c793db459b2a57ec897376d1696f5c651fc6179f67a",
    ("ultrabin", "ultrafeedback_binarized", "test", "suffixed"):
        "74e01be20b0e5476f091af843ab4f841e568fee436f8d6de91c6577f5d951537",
    ("alpacaeval", "alpaca_eval", "test", "plain"): "034b5a2cc71664e2e7c9eaca88febada4f63f02548955d58f1c287853da071e1",
    ("alpacaeval", "alpaca_eval", "test", "suffixed"): "7416e7886e74402ff5c66db88aac0faeb2c7d09f0890f1bc1b8394617c64c533",
    ("hh", "bundled", "train", "plain"): "bb0bd610a0276af51856e0906ed1062825c41ef14bcc14ad48d012e72cea73f1",
    ("hh", "bundled", "train", "suffixed"): "54cd32e26dd746ce9e4678910c9dd6d3d2521eae5fbeb3e484f778c7c4b7b1bc",
    ("hh", "bundled", "test", "plain"): "587c9b7f18d9cbc244fd626d386bcc8f14ff486a46766b9219690268e8a09289",
    ("hh", "bundled", "test", "suffixed"): "5ea1039f6376cfa237566370cd4adb137a0058e4c87c89a0ff4ff529f2c9f317",
}


@pytest.mark.parametrize("name, where, split, strings", list(BEFORE_PROMPT_FORMAT_OBJECT),
                         ids=lambda value: value if isinstance(value, str) else None)
def test_default_formatting_is_byte_identical_to_the_original_data_layer(name, where, split, strings):
    path = BUNDLED_HH if where == "bundled" else fixture(where)
    data = getattr(fd, f"get_{name}")(split, local_path=path)
    rows = [[prompt, generations, [list(pair) for pair in e.pairs], e.sft_index, e.scores, e.truncation_mode,
             e.dataset_name, e.original_prompt]
            for prompt, (e, generations) in formatted(data, PLAIN if strings == "plain" else SUFFIXED).items()]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == BEFORE_PROMPT_FORMAT_OBJECT[name, where, split, strings]


# ----------------------------------------------------------------------------------------------
# Example and Dataset
# ----------------------------------------------------------------------------------------------

def test_remove_extra_spaces_collapses_spaces_and_tabs_but_keeps_newlines():
    example = Example(prompt="a  b\t\tc\n\nd", prompt_messages=[Message("user", "x  y")],
                      generations=["x \t y", "ok  \n  ok"])
    example.remove_extra_spaces()
    assert example.prompt == "a b c\n\nd" and example.prompt_messages == [Message("user", "x y")]
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
    first = data.conversation([Message("user", "hi")], origin="row 1")
    assert data.conversation([Message("user", "hi")], origin="row 2") is first and first.origin == "row 1"


# ----------------------------------------------------------------------------------------------
# SHP
# ----------------------------------------------------------------------------------------------

STEAK = USER + "How long should I rest a steak?" + ASSISTANT
# Rows of the steak post in file order as (A, B) indices into the 12 generations, oriented by
# `labels` (scores of its four comments: 40, 12, 3, 100); its near-tie sixth row is dropped.
STEAK_PAIRS = {(0, 1), (2, 3), (5, 4), (6, 7), (9, 8), (11, 10)}


def test_shp_train_drops_low_ratio_rows_and_keeps_at_most_five_pairs():
    data = fd.get_shp("train", local_path=fixture("shp"))
    prompts = formatted(data)
    assert list(prompts) == [STEAK, USER + "Why do onions make me cry?" + ASSISTANT,
                             USER + "ELI5: why is the sky blue?" + ASSISTANT]  # magnets: ratio 6/5 < 2
    steak, generations = prompts[STEAK]
    assert steak.num_generations() == 12  # generations are not pruned by the pair cap
    assert generations[:4] == ["Five minutes.", "About half the cooking time.",  # spaces normalised
                               "Five minutes.", "Do not rest it."]
    assert steak.scores[:6] == [40, 12, 40, 3, 40, 100]
    assert len(steak.pairs) == 5 and len(set(steak.pairs)) == 5 and set(steak.pairs) <= STEAK_PAIRS
    assert (steak.sft_index, steak.truncation_mode, steak.dataset_name) == (0, "keep_start", "shp")
    onions, onion_generations = prompts[USER + "Why do onions make me cry?" + ASSISTANT]
    assert onions.pairs == [(1, 0)]  # labels == 0: B preferred
    assert onion_generations == ["Sulfur compounds.", "Sadness."] and onions.scores == [3, 30]
    assert data.dropped == {"score ratio < 2": 2} and data.rows_read == 10


def test_shp_pair_subsampling_ignores_the_global_rng():
    random.seed(1)
    first = formatted(fd.get_shp("train", local_path=fixture("shp")))[STEAK][0].pairs
    random.seed(2)
    second = formatted(fd.get_shp("train", local_path=fixture("shp")))[STEAK][0].pairs
    assert first == second


def test_shp_test_split_keeps_low_ratio_rows_and_all_pairs():
    prompts = formatted(fd.get_shp("test", local_path=fixture("shp")))
    assert prompts[USER + "Can I freeze cooked rice?" + ASSISTANT][0].pairs == [(0, 1), (2, 3), (4, 5), (6, 7),
                                                                                  (8, 9), (10, 11)]
    assert len(prompts) == 2


def test_shp_places_suffixes_at_the_end_of_prompt_and_responses():
    prompts = formatted(fd.get_shp("train", local_path=fixture("shp")), SUFFIXED)
    assert prompts[USER + "Why do onions make me cry?<|end|>" + ASSISTANT][1] == ["Sulfur compounds.<|eot|>",
                                                                                 "Sadness.<|eot|>"]


def test_shp_with_every_row_filtered_out_is_an_error(tmp_path):
    row = json.loads(Path(fixture("shp", "explainlikeimfive", "train.json")).read_text().splitlines()[1])
    assert row["score_A"] / row["score_B"] < 2
    path = write_jsonl(tmp_path / "train.json", [row])
    with pytest.raises(DataError, match="dataset 'shp' split 'train' has no examples after filtering"):
        fd.get_shp("train", local_path=path)


# ----------------------------------------------------------------------------------------------
# Anthropic HH
# ----------------------------------------------------------------------------------------------

def test_hh_harmless_merges_rows_with_the_same_prompt():
    data = fd.get_hh_harmless("test", local_path=fixture("hh-rlhf"))
    assert len(data) == 3
    bad_name, generations = formatted(data)[USER + "call me a bad name" + ASSISTANT]
    assert generations == [
        "Sorry, that’s out of bounds",
        "I didn’t catch that. I don’t have a call to make right now, so I just can’t speak right now",
        "How do you like them apples?", "Why?"]
    assert bad_name.pairs == [(0, 1), (2, 3)]
    assert (bad_name.sft_index, bad_name.truncation_mode, bad_name.dataset_name) == (0, "keep_end", "hh_harmless")
    assert bad_name.scores == [] and bad_name.origin == "split 'test' row 1"


def test_hh_turns_become_messages_keyed_by_the_raw_text():
    data = fd.get_hh_harmless("test", local_path=fixture("hh-rlhf"))
    raw = [Message("user", "Where do you see yourself in five years?"), Message("assistant", "Why do you ask?"),
           Message("user", "i see you in the dump"), Message("assistant", "Oh.  What’s a dump?"),
           Message("user", "trash")]
    example = data[conversation_key(raw)]
    assert example.prompt_messages[3] == Message("assistant", "Oh. What’s a dump?")  # normalised after keying
    assert example.generations[0] == "Oh. Okay. Thanks."


def test_hh_suffixes_close_each_turn():
    """F-03: the original put suffixes right after each role prefix."""
    prompts = formatted(fd.get_hh_helpful("train", local_path=fixture("hh-rlhf")), SUFFIXED)
    assert list(prompts) == [
        USER + "Are whales fish?<|end|>" + ASSISTANT,
        USER + "Can you suggest a houseplant?<|end|>" + ASSISTANT + "A snake plant is hard to kill.<|eot|>"
        + USER + "Does it need much light?<|end|>" + ASSISTANT,
    ]
    # A response starting with "Human" gets no extra suffix either.
    assert prompts[USER + "Are whales fish?<|end|>" + ASSISTANT][1] == [
        "Humans and whales are both mammals, so no.<|eot|>", "Yes, whales are big fish.<|eot|>"]


def test_hh_default_configuration_combines_the_subsets():
    data = fd.get_hh("test", local_path=fixture("hh-rlhf"))
    assert len(data) == 4
    assert formatted(data)[USER + "What is the capital of France?" + ASSISTANT][1] == ["Paris.", "Lyon."]
    assert {example.dataset_name for example in data.data.values()} == {"hh"}


def test_hh_row_without_an_assistant_turn_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}])
    with pytest.raises(DataError, match="dataset 'hh' split 'train' row 1: field 'chosen' has no"):
        fd.get_hh("train", local_path=path)


# ----------------------------------------------------------------------------------------------
# OpenAssistant
# ----------------------------------------------------------------------------------------------

CAT = USER + "What is a good name for a grey cat?" + ASSISTANT


def test_oasst_pairs_each_ranked_reply_with_its_next_best_sibling():
    data = fd.get_oasst("train", local_path=fixture("oasst1"))
    prompts = formatted(data)
    assert list(prompts) == [CAT, CAT + "Smokey." + USER + "Any other ideas?" + ASSISTANT]
    cat, generations = prompts[CAT]
    # File order: Smokey (rank 2) pairs with Grey (rank 1), then Grey with Ash/Pebble (rank 0).
    assert generations == ["Grey.", "Smokey.", "How about Ash or Pebble?", "Grey."]
    assert cat.pairs == [(0, 1), (2, 3)]
    assert cat.scores == [1, 2, 0, 1]
    assert cat.sft_index == 2  # F-02: the rank-0 reply, where the original left -1 ('Grey.')
    follow_up, follow_up_generations = prompts[CAT + "Smokey." + USER + "Any other ideas?" + ASSISTANT]
    assert follow_up_generations == ["Misty or Storm.", "No."] and follow_up.sft_index == 0
    assert (cat.dataset_name, cat.truncation_mode) == ("oasst", "keep_end")
    assert set(data.dropped) == {"not English", "next-best sibling or an ancestor missing"}


def test_oasst_skips_non_english_messages_and_their_branches():
    prompts = formatted(fd.get_oasst("train", local_path=fixture("oasst1")))
    text = "".join(prompt + "".join(generations) for prompt, (_, generations) in prompts.items())
    for skipped in ("German", "Danke", "Say thanks", "hora", "noon"):
        assert skipped not in text


def test_oasst_test_split_reads_validation_with_suffixes():
    prompts = formatted(fd.get_oasst("test", local_path=fixture("oasst1")), SUFFIXED)
    assert list(prompts) == [USER + "Name a primary colour.<|end|>" + ASSISTANT]
    assert prompts[USER + "Name a primary colour.<|end|>" + ASSISTANT][1] == ["Red.<|eot|>", "Purple.<|eot|>"]


# ----------------------------------------------------------------------------------------------
# UltraFeedback, UltraChat and AlpacaEval
# ----------------------------------------------------------------------------------------------

def test_ultrabin_pairs_the_last_chosen_and_rejected_messages():
    data = fd.get_ultrabin("train", local_path=fixture("ultrafeedback_binarized"))
    assert len(data) == 2
    haiku, generations = formatted(data)[USER + "Write a haiku about rain." + ASSISTANT]
    assert generations == ["Soft rain on the roof,\nthe garden drinks.", "Rain is wet."]
    assert (haiku.pairs, haiku.sft_index, haiku.truncation_mode, haiku.dataset_name) == (
        [(0, 1)], 0, "keep_start", "ultrabin")
    assert list(formatted(fd.get_ultrabin("test", local_path=fixture("ultrafeedback_binarized")))) == [
        USER + 'Translate "cat" to French.' + ASSISTANT]


def test_ultrabin_rejects_unknown_splits():
    with pytest.raises(DataError, match="dataset 'ultrabin' has no split 'validation'"):
        fd.get_ultrabin("validation", local_path=fixture("ultrafeedback_binarized"))


def test_ultrafeedback_keeps_conversations_scores_and_text_verbatim():
    data = fd.get_ultrafeedback("train", local_path=fixture("ultrafeedback_binarized"))
    haiku = data[conversation_key([Message("user", "Write a haiku about  rain.")])]  # not normalised
    assert haiku.generations == ["Soft rain on the roof,\nthe garden drinks.", "Rain is wet."]
    assert (haiku.pairs, haiku.scores, haiku.sft_index, haiku.truncation_mode) == ([(0, 1)], [8.5, 3.0], 0, "keep_end")
    assert len(fd.get_ultrafeedback("test", local_path=fixture("ultrafeedback_binarized"))) == 1


def test_ultrafeedback_drops_rows_whose_histories_differ(tmp_path):
    rows = datasets.load_dataset(fixture("ultrafeedback_binarized"), split="train_prefs").to_list()
    rows[0]["rejected"][0]["content"] = "Another question."
    rows[1]["chosen"] = [{"role": "bot", "content": "?"}]
    path = write_jsonl(tmp_path / "train_prefs.jsonl", rows)
    with pytest.raises(DataError, match="dataset 'ultrafeedback' split 'train' has no examples after filtering"):
        fd.get_ultrafeedback("train", local_path=path)
    test_rows = datasets.load_dataset(fixture("ultrafeedback_binarized"), split="test_prefs").to_list()
    data = fd.get_ultrafeedback("train", local_path=write_jsonl(tmp_path / "train_prefs.jsonl", rows + test_rows))
    assert data.dropped == {"chosen and rejected histories differ": 1, "malformed conversation": 1}
    assert (data.rows_read, len(data)) == (3, 1)


def test_ultrafeedback_armorm_keeps_every_scored_response():
    data = fd.get_ultrafeedback_armorm("train", local_path=fixture("ultrafeedback_armorm"))
    snail = data[conversation_key([Message("user", "Suggest a name for a  pet snail.")])]
    assert snail.generations == ["Sheldon.", "Turbo, because it is not.", "Snail.", "Gary.", "Slimy."]
    assert snail.scores == [0.11, 0.16, 0.02, 0.09, 0.05]
    assert (snail.pairs, snail.sft_index, snail.dataset_name) == ([(1, 2)], 1, "ultrafeedback_armorm")
    assert len(data) == 2 and data.dropped == {"all scores tied": 1}
    assert len(fd.get_ultrafeedback_armorm("test", local_path=fixture("ultrafeedback_armorm"))) == 1


def test_ultrachat_targets_the_final_assistant_turn():
    data = fd.get_ultrachat("train", local_path=fixture("ultrachat_200k"))
    picnic = data[conversation_key([Message("user", "Plan a picnic for two."),
                                    Message("assistant", "Bring bread, cheese and fruit."),
                                    Message("user", "And drinks?")])]
    assert (picnic.generations, picnic.sft_index, picnic.pairs) == (["Lemonade  and water."], 0, [])
    assert len(data) == 2 and data.dropped == {"no final assistant turn after a user turn": 1}
    test = fd.get_ultrachat("test", local_path=fixture("ultrachat_200k"))
    assert next(iter(test.data.values())).prompt_messages[0] == Message("system", "You answer in one word.")
    with pytest.raises(DataError, match="dataset 'ultrachat' has no split 'validation'"):
        fd.get_ultrachat("validation", local_path=fixture("ultrachat_200k"))


def test_alpacaeval_keeps_the_instruction_and_reference_output_verbatim():
    prompts = formatted(fd.get_alpacaeval("test", local_path=fixture("alpaca_eval")), SUFFIXED)
    assert len(prompts) == 3
    tips, generations = prompts[USER + "Give  three tips for staying healthy.<|end|>" + ASSISTANT]  # not normalised
    assert tips.original_prompt == "Give  three tips for staying healthy."
    assert generations == ["Eat well, sleep, move.<|eot|>"]
    assert (tips.pairs, tips.sft_index, tips.dataset_name) == ([], -1, "helpful_base")
    assert prompts[USER + "What is the boiling point of water?<|end|>" + ASSISTANT][0].dataset_name == "koala"


def test_alpacaeval_is_test_only_and_accepts_its_json_file():
    with pytest.raises(DataError, match="expected split 'test', got 'train'"):
        fd.get_alpacaeval("train", local_path=fixture("alpaca_eval"))
    assert len(fd.get_alpacaeval("test", local_path=fixture("alpaca_eval", "alpaca_eval.json"))) == 3


# ----------------------------------------------------------------------------------------------
# Local mirrors of hub datasets
# ----------------------------------------------------------------------------------------------

def test_local_mirror_may_be_one_file_or_a_split_pattern():
    one_file = fd.get_hh_helpful("train", local_path=fixture("hh-rlhf", "helpful-base", "train.jsonl.gz"))
    assert len(one_file) == 2
    pattern = fixture("hh-rlhf", "harmless-base", "{split}.jsonl.gz")
    assert len(fd.get_hh_harmless("test", local_path=pattern)) == 3


def test_local_mirror_may_be_a_parquet_or_csv_file(tmp_path):
    rows = datasets.load_dataset(fixture("ultrafeedback_binarized"), split="test_prefs")
    rows.to_parquet(str(tmp_path / "test_prefs.parquet"))
    data = fd.get_ultrabin("test", local_path=str(tmp_path / "{split}.parquet"))
    assert formatted(data)[USER + 'Translate "cat" to French.' + ASSISTANT][1] == ["Chat.", "Chien."]
    hh = datasets.load_dataset(fixture("hh-rlhf"), data_dir="harmless-base", split="test")
    hh.to_csv(str(tmp_path / "hh.csv"))
    assert len(fd.get_hh("test", local_path=str(tmp_path / "hh.csv"))) == 3


def test_local_mirror_errors_name_the_config_key_and_problem(tmp_path):
    with pytest.raises(DataError, match=r"local_datasets.shp \('.*nowhere'\) does not exist"):
        fd.get_shp("train", local_path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="Couldn't load split 'validation' from local_datasets.shp"):
        fd.get_shp("validation", local_path=fixture("shp"))
    with pytest.raises(DataError, match=r"dataset 'ultrabin' split 'train' lacks column\(s\) \['prompt'"):
        fd.get_ultrabin("train", local_path=fixture("hh-rlhf", "helpful-base", "train.jsonl.gz"))
    (tmp_path / "rows.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match="unsupported file type"):
        fd.get_hh("train", local_path=str(tmp_path / "rows.tsv"))


def test_reading_a_mirror_with_a_plain_readme_logs_no_repo_card_warning(capfd, caplog):
    """Issue 11.7: every split of a directory whose README.md has no hub metadata block logged "Repo card metadata
    block was not found" (the bundled data/hh-rlhf does)."""
    with caplog.at_level(logging.WARNING):
        fd.get_hh("test", local_path=BUNDLED_HH)
    assert "Repo card metadata" not in capfd.readouterr().err
    assert not [r for r in caplog.records if "Repo card metadata" in r.getMessage()]


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
        load_split("halos-tests/no-such-dataset", "train", name="hh")
    assert time.monotonic() - start < 10


def test_unreachable_hub_falls_back_to_the_cache_then_raises(monkeypatch, online_settings):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(DataError) as caught:
        load_split("halos-tests/no-such-dataset", "train", name="oasst")
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
        fd.get_shp("train")
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
