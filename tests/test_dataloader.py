"""Tests for dataloader.py and feedback/tokenization.py: tokenisation, truncation, collate, every DataLoader's batches,
mixing by ratio, and the data report.

Toy datasets are registered as `get_<name>` functions in the dataloader module, exactly as a user would add one
(the original's five-argument contract, or `get_<name>(split)` returning conversational Examples). Expected token
ids are built by encoding the pieces separately with the shipped tiny tokenizer (BOS id 0 prepended, EOS id 1,
pad = EOS).
"""

import copy
import hashlib
import json
import pickle
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import dataloader
from dataloader import (CHOSEN_KEYS, GROUP_KEYS, KL_KEYS, PROMPT_KEYS, REJECTED_KEYS, TARGET_KEYS,
                        ConditionalSFTDataLoader, DataError, Dataset, DataSpec, Example, LoaderOptions,
                        PairedPreferenceDataLoader, PrefUnaryDataLoader, ScoredGroupDataLoader, ScoreUnaryDataLoader,
                        SFTDataLoader, SimpleKTODataLoader, UnpairedPreferenceDataLoader)
from feedback.prompt_format import PrefixFormat
from feedback.tokenization import Encoder, collate, truncate_prompt

REPO = Path(__file__).resolve().parent.parent
BOS, EOS = 0, 1
IGNORE = -100
BUNDLED_HH = DataSpec(["hh"], local_paths={"hh": str(REPO / "data" / "hh-rlhf")})


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-llama")
    tok.pad_token_id = tok.eos_token_id
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    return tok


def raw_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_of(k):
    return f"\n<|user|>\nquestion number {k}\n<|assistant|>\n"


def paired_example(k, name="toy", **fields):
    return Example(prompt=prompt_of(k), generations=[f"good answer {k}", f"bad answer {k}"], pairs=[(0, 1)],
                   sft_index=0, dataset_name=name, **fields)


def binary_example(k, desirable, name="toy"):
    return Example(prompt=prompt_of(k), generations=[f"lone answer {k}"], desirable=[desirable],
                   sft_index=0 if desirable else None, dataset_name=name)


def register(monkeypatch, name, examples):
    """Adds get_<name> to the dataloader module, as a user adding a dataset would (the original's contract)."""
    def get_dataset(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix):
        dataset = Dataset(name)
        for example in copy.deepcopy(examples):
            dataset.data[example.prompt] = example
        return dataset
    monkeypatch.setattr(dataloader, f"get_{name}", get_dataset, raising=False)


def make_loader(cls, tokenizer, names=("toy",), spec=None, **overrides):
    options = dict(batch_size=2, n_epochs=1, max_length=64, max_prompt_length=32)
    options.update(overrides)
    return cls(spec or DataSpec(list(names)), tokenizer, "train", LoaderOptions(**options))


def element(tokenizer, prompt, responses, mode="keep_end", max_length=64, max_prompt_length=32, name="toy"):
    """The element of a formatted prompt and its responses ({prefix: text}), as a loader builds it."""
    encoder = Encoder(tokenizer, PrefixFormat(), max_length, max_prompt_length)
    example = Example(prompt=prompt, generations=list(responses.values()), dataset_name=name)
    encoded = encoder.encode([example], lambda e: range(e.num_generations()))[0]
    return encoder.element(encoded.prompt_ids.tolist(), None,
                           {prefix: encoded.responses[i].tolist() for i, prefix in enumerate(responses)}, mode,
                           example.describe)


def unpadded(row_ids, row_mask):
    return row_ids[row_mask.bool()].tolist()


# --------------------------------------------------------------------------------------- tokenisation


def test_tokenize_concatenates_prompt_and_response_ids(tokenizer):
    prompt, generation = "\n<|user|>\nhi there\n<|assistant|>\n", "Hello, friend."
    prompt_ids = [BOS] + raw_ids(tokenizer, prompt)
    response_ids = raw_ids(tokenizer, generation) + [EOS]

    element_ = element(tokenizer, prompt, {"target": generation})

    assert element_["prompt_input_ids"] == prompt_ids
    assert element_["target_input_ids"] == response_ids
    assert element_["target_combined_input_ids"] == prompt_ids + response_ids
    assert element_["target_labels"] == [IGNORE] * len(prompt_ids) + response_ids
    assert element_["target_combined_attention_mask"] == [1] * (len(prompt_ids) + len(response_ids))
    assert (element_["prompt_text"], element_["target_text"]) == (prompt, generation)  # no ' ' + EOS tail (F-10)
    assert element_["target_combined_text"] == prompt + generation
    assert not element_["prompt_truncated"] and not element_["target_truncated"]


def test_long_prompt_is_kept_when_everything_fits(tokenizer):
    prompt = "one two three four five six seven eight nine ten"
    built = element(tokenizer, prompt, {"target": "ok"}, max_prompt_length=4)
    assert built["prompt_input_ids"] == [BOS] + raw_ids(tokenizer, prompt)
    assert not built["prompt_truncated"]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_prompt_truncation_modes(tokenizer, mode):
    prompt = "one two three four five six seven eight nine ten"
    full = [BOS] + raw_ids(tokenizer, prompt)
    response = raw_ids(tokenizer, "fine") + [EOS]
    max_prompt_length = 5
    assert len(full) > max_prompt_length

    built = element(tokenizer, prompt, {"target": "fine"}, mode, len(full), max_prompt_length)

    # keep_end spends one of the 5 slots on BOS and keeps the last 4 prompt tokens
    expected = full[:5] if mode == "keep_start" else [BOS] + full[-4:]
    assert built["prompt_input_ids"] == expected
    assert built["target_combined_input_ids"] == expected + response
    assert built["target_labels"] == [IGNORE] * 5 + response
    assert built["prompt_truncated"] and not built["target_truncated"]


def test_truncate_prompt_keep_end_without_bos():
    assert truncate_prompt([5, 6, 7, 8], "keep_end", 2, bos_token_id=None) == [7, 8]
    assert truncate_prompt([5, 6, 7, 8], "keep_end", 2, bos_token_id=5) == [5, 8]
    assert truncate_prompt([5, 6, 7, 8], "keep_end", 1, bos_token_id=5) == [5]
    assert truncate_prompt([5, 6, 7, 8], "keep_start", 3, bos_token_id=5) == [5, 6, 7]


def test_truncated_response_loses_eos(tokenizer):
    prompt, generation = "Q:", "a rather long answer that will not fit at all"
    prompt_ids = [BOS] + raw_ids(tokenizer, prompt)
    kept = raw_ids(tokenizer, generation)[:4]

    built = element(tokenizer, prompt, {"target": generation}, "keep_end", len(prompt_ids) + 4, len(prompt_ids))

    assert built["target_combined_input_ids"] == prompt_ids + kept  # exactly max_length, no EOS
    assert built["target_labels"] == [IGNORE] * len(prompt_ids) + kept
    assert built["target_text"] == tokenizer.decode(kept)
    assert built["target_truncated"] and not built["prompt_truncated"]


def test_prompt_without_room_for_a_response_is_an_error(tokenizer):
    prompt = "one two three four five six seven eight nine ten"
    with pytest.raises(DataError, match=r"dataset 'toy'.*'one two three.*max_length=4"):
        element(tokenizer, prompt, {"target": "x"}, "keep_start", 4, 6)


def test_unknown_truncation_mode_is_an_error(tokenizer):
    with pytest.raises(DataError, match="truncation_mode.*'keep_middle'"):
        element(tokenizer, "p", {"target": "g"}, "keep_middle")


def test_trailing_eos_of_prompt_is_dropped():
    class EosAppendingTokenizer:
        bos_token_id, eos_token_id = None, 9

        def __call__(self, texts, add_special_tokens=True, **kwargs):
            one = [4, 5, 9] if add_special_tokens else [4, 5]
            return {"input_ids": one if isinstance(texts, str) else [one] * len(texts)}

    example = Example(prompt="anything", generations=["g"])
    encoded = Encoder(EosAppendingTokenizer(), PrefixFormat(), 64, 32).encode([example], lambda e: [0])[0]
    assert encoded.prompt_ids.tolist() == [4, 5] and encoded.responses[0].tolist() == [4, 5, 9]


def test_responses_of_one_element_share_the_truncated_prompt(tokenizer):
    prompt = "one two three four five six seven eight nine ten"
    full = [BOS] + raw_ids(tokenizer, prompt)
    built = element(tokenizer, prompt, {"chosen": "ok", "rejected": "a much longer rejected answer"}, "keep_start",
                    len(full) + 2, 6)
    assert built["prompt_input_ids"] == full[:6]
    assert built["chosen_combined_input_ids"][:6] == built["rejected_combined_input_ids"][:6] == full[:6]


# --------------------------------------------------------------------------------------------- collate


def test_collate_pads_prompts_left_and_the_rest_right():
    batch = [
        {"prompt_input_ids": [0, 5], "prompt_attention_mask": [1, 1], "target_combined_input_ids": [0, 5, 7],
         "target_labels": [IGNORE, IGNORE, 7], "target_text": "a", "target_truncated": False},
        {"prompt_input_ids": [0, 5, 6, 8], "prompt_attention_mask": [1, 1, 1, 1],
         "target_combined_input_ids": [0, 5, 6, 8, 9], "target_labels": [IGNORE] * 4 + [9], "target_text": "b",
         "target_truncated": True},
    ]
    out = collate(batch, pad_token_id=3)
    assert torch.equal(out["prompt_input_ids"], torch.tensor([[3, 3, 0, 5], [0, 5, 6, 8]]))
    assert torch.equal(out["prompt_attention_mask"], torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert torch.equal(out["target_combined_input_ids"], torch.tensor([[0, 5, 7, 3, 3], [0, 5, 6, 8, 9]]))
    assert torch.equal(out["target_labels"], torch.tensor([[IGNORE, IGNORE, 7, IGNORE, IGNORE], [IGNORE] * 4 + [9]]))
    assert out["target_labels"].dtype == torch.long
    assert out["target_text"] == ["a", "b"] and out["target_truncated"] == [False, True]


def test_collate_needs_a_pad_token():
    with pytest.raises(ValueError, match="pad token"):
        collate([{"prompt_input_ids": [1]}], pad_token_id=None)


# ------------------------------------------------------------------------------------ loaders: batches

def keys_of(*groups):
    return {key for group in groups for key in group}


LOADER_KEYS = {
    SFTDataLoader: keys_of(PROMPT_KEYS, TARGET_KEYS, ["original_prompt", "prompt_messages"]),
    ConditionalSFTDataLoader: keys_of(PROMPT_KEYS, TARGET_KEYS, ["status"]),
    SimpleKTODataLoader: keys_of(PROMPT_KEYS, TARGET_KEYS, ["status"]),
    UnpairedPreferenceDataLoader: keys_of(PROMPT_KEYS, TARGET_KEYS, KL_KEYS, ["status", "truncation_mode"]),
    ScoreUnaryDataLoader: keys_of(PROMPT_KEYS, TARGET_KEYS, KL_KEYS, ["status", "truncation_mode"]),
    PrefUnaryDataLoader: keys_of(PROMPT_KEYS, TARGET_KEYS, KL_KEYS, ["status", "truncation_mode"]),
    PairedPreferenceDataLoader: keys_of(PROMPT_KEYS, CHOSEN_KEYS, REJECTED_KEYS),
    ScoredGroupDataLoader: keys_of(PROMPT_KEYS, TARGET_KEYS, GROUP_KEYS),
}


@pytest.mark.parametrize("cls", list(LOADER_KEYS), ids=lambda cls: cls.__name__)
def test_loader_batch_keys_and_shapes(tokenizer, monkeypatch, cls):
    register(monkeypatch, "toy", [paired_example(k, scores=[3, 1]) for k in range(6)])
    loader = make_loader(cls, tokenizer, batch_size=4, chosen_control_token="<good>", rejected_control_token="<bad>")
    batch = next(iter(loader))

    assert set(batch) == LOADER_KEYS[cls]
    for key, value in batch.items():
        assert len(value) == 4, key
        if key.endswith("_input_ids"):
            mask = batch[key.replace("_input_ids", "_attention_mask")]
            assert value.shape == mask.shape and value.dim() == 2, key
    for side in {k[:-len("_labels")] for k in batch if k.endswith("_labels")}:
        assert batch[f"{side}_labels"].shape == batch[f"{side}_combined_input_ids"].shape


def test_sft_skips_prompts_without_target_and_keeps_original_prompt(tokenizer, monkeypatch):
    examples = [binary_example(0, True), binary_example(1, False), binary_example(2, True)]
    examples[0].original_prompt = "question number 0"
    register(monkeypatch, "toy", examples)
    loader = make_loader(SFTDataLoader, tokenizer, batch_size=1)
    batches = list(loader)
    assert loader.examples_per_epoch == 2
    assert sorted(b["target_text"][0] for b in batches) == ["lone answer 0", "lone answer 2"]
    assert sorted(b["original_prompt"][0] for b in batches) == ["", "question number 0"]


@pytest.mark.parametrize("n_epochs, n_examples, expected_batches", [
    (3, None, 6),     # 5 prompts, batch 2: 2 full batches per epoch, the 5th prompt dropped
    (None, 5, 3),     # ceil(5 / 2) batches, running into a second epoch
    (1, 100, 2),      # whichever limit comes first
    (4, 3, 2),
])
def test_epochs_and_examples_limits(tokenizer, monkeypatch, n_epochs, n_examples, expected_batches):
    register(monkeypatch, "toy", [paired_example(k) for k in range(5)])
    loader = make_loader(SFTDataLoader, tokenizer, n_epochs=n_epochs, n_examples=n_examples)
    batches = list(loader)
    assert len(batches) == expected_batches
    assert all(len(b["prompt_text"]) == 2 for b in batches)
    assert loader.examples_per_epoch == 4
    assert loader.total_examples == 2 * expected_batches


def test_each_epoch_visits_distinct_prompts(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(5)])
    batches = list(make_loader(SFTDataLoader, tokenizer, n_epochs=2))
    epochs = [[t for b in batches[i:i + 2] for t in b["prompt_text"]] for i in (0, 2)]
    assert all(len(set(prompts)) == 4 for prompts in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def prompt_order(loader):
    return [text for batch in loader for text in batch["prompt_text"]]


def test_same_seed_gives_identical_batches_independent_of_global_rng(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(20)])
    loader = make_loader(PairedPreferenceDataLoader, tokenizer, n_epochs=2, seed=3)
    random.seed(1)
    first = list(loader)
    random.seed(2)
    second = list(loader)
    twin = list(pickle.loads(pickle.dumps(make_loader(PairedPreferenceDataLoader, tokenizer, n_epochs=2, seed=3))))
    for a, b, c in zip(first, second, twin):
        assert a["prompt_text"] == b["prompt_text"] == c["prompt_text"]
        assert torch.equal(a["chosen_combined_input_ids"], b["chosen_combined_input_ids"])
        assert torch.equal(a["chosen_combined_input_ids"], c["chosen_combined_input_ids"])
    other_seed = make_loader(PairedPreferenceDataLoader, tokenizer, n_epochs=2, seed=4)
    assert prompt_order(other_seed) != prompt_order(first)
    assert sorted(prompt_order(other_seed)) == sorted(prompt_order(first))


# -------------------------------------------------------------------------- loaders: item construction


def statuses(loader):
    return Counter(status for batch in loader for status in batch["status"])


def test_frac_unique_keeps_a_fraction_of_each_class(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(10)])
    loader = make_loader(UnpairedPreferenceDataLoader, tokenizer, batch_size=1, frac_unique_desirable=0.3,
                         frac_unique_undesirable=0.55)
    assert statuses(loader) == {"chosen": 3, "rejected": 6}  # ceil(10 * 0.55) = 6
    assert loader.examples_per_epoch == 9


def test_unpaired_uses_binary_feedback_flags(tokenizer, monkeypatch):
    # feedback_rows: once an example has binary feedback, `desirable` labels all its generations, pairs included
    mixed = Example(prompt=prompt_of(9), generations=["pair good", "pair bad", "extra good"], pairs=[(0, 1)],
                    desirable=[True, False, True], sft_index=0, dataset_name="toy")
    register(monkeypatch, "toy", [binary_example(k, desirable=k < 3) for k in range(7)] + [mixed])
    loader = make_loader(UnpairedPreferenceDataLoader, tokenizer, batch_size=1)
    texts = [(batch["target_text"][0], batch["status"][0]) for batch in loader]
    expected = [(f"lone answer {k}", "chosen" if k < 3 else "rejected") for k in range(7)]
    expected += [("pair good", "chosen"), ("pair bad", "rejected"), ("extra good", "chosen")]
    assert sorted(texts) == sorted(expected)


def test_kl_pairs_prompt_k_with_response_k_plus_1(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(4)])
    batch = next(iter(make_loader(UnpairedPreferenceDataLoader, tokenizer, batch_size=4)))
    for k in range(4):
        nxt = (k + 1) % 4
        assert batch["KL_text"][k] == batch["target_text"][nxt]  # the raw response: no extra spaces (F-10)
        prompt_ids = unpadded(batch["prompt_input_ids"][k], batch["prompt_attention_mask"][k])
        response_ids = unpadded(batch["target_input_ids"][nxt], batch["target_attention_mask"][nxt])
        kl_ids = unpadded(batch["KL_combined_input_ids"][k], batch["KL_combined_attention_mask"][k])
        assert kl_ids == prompt_ids + response_ids


def test_simple_kto_interleaves_chosen_and_rejected(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(6)])
    batches = list(make_loader(SimpleKTODataLoader, tokenizer, batch_size=4))
    assert len(batches) == 3
    assert all(b["status"] == ["chosen", "rejected", "chosen", "rejected"] for b in batches)
    with pytest.raises(ValueError, match="even batch_size"):
        make_loader(SimpleKTODataLoader, tokenizer, batch_size=3)


def test_csft_control_token_stays_in_the_ids_and_is_masked(tokenizer, monkeypatch):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|good|>", "<|bad|>"]})
    good, bad = tok.convert_tokens_to_ids(["<|good|>", "<|bad|>"])
    register(monkeypatch, "toy", [paired_example(k) for k in range(2)])
    loader = make_loader(ConditionalSFTDataLoader, tok, batch_size=4, chosen_control_token="<|good|>",
                         rejected_control_token="<|bad|>")
    batch = next(iter(loader))
    for k in range(4):
        token = good if batch["status"][k] == "chosen" else bad
        prompt_ids = unpadded(batch["prompt_input_ids"][k], batch["prompt_attention_mask"][k])
        assert prompt_ids[-1] == token  # appended to the prompt, in the masked region (F-01)
        combined = batch["target_combined_input_ids"][k].tolist()
        position = combined.index(token)
        assert position == len(prompt_ids) - 1 and batch["target_labels"][k, position] == IGNORE
    with pytest.raises(ValueError, match="chosen_control_token and rejected_control_token"):
        make_loader(ConditionalSFTDataLoader, tok, chosen_control_token="<|good|>")


def test_sft_appends_chosen_control_token(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(0)])
    batch = next(iter(make_loader(SFTDataLoader, tokenizer, batch_size=1, chosen_control_token=" [good]")))
    assert batch["prompt_text"] == [prompt_of(0) + " [good]"]


def test_paired_loader_shares_the_prompt_and_samples_pairs(tokenizer, monkeypatch):
    example = Example(prompt=prompt_of(0), generations=["a", "b", "c"], pairs=[(0, 1), (0, 2), (1, 2)],
                      dataset_name="toy")
    register(monkeypatch, "toy", [example, paired_example(1)])
    assert make_loader(PairedPreferenceDataLoader, tokenizer, batch_size=1).examples_per_epoch == 4
    loader = make_loader(PairedPreferenceDataLoader, tokenizer, batch_size=1, max_prompt_count=1)
    assert loader.examples_per_epoch == 2
    assert len(list(loader)) == 2 and len(example.pairs) == 3  # sampled, not mutated


def test_paired_loader_rejects_binary_only_data(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [binary_example(k, True) for k in range(4)])
    with pytest.raises(DataError, match="paired losses need paired feedback"):
        make_loader(PairedPreferenceDataLoader, tokenizer)


def test_score_unary_reads_score_direction_from_pairs(tokenizer, monkeypatch):
    upvotes = Example(prompt=prompt_of(0), generations=["top", "mid", "low"], scores=[9, 4, 1], pairs=[(0, 1)],
                      dataset_name="toy")
    ranks = Example(prompt=prompt_of(1), generations=["second", "first"], scores=[1, 0], pairs=[(1, 0)],
                    dataset_name="toy")
    assert dataloader.best_and_worst(upvotes) == (0, 2)
    assert dataloader.best_and_worst(ranks) == (1, 0)
    register(monkeypatch, "toy", [upvotes, ranks])
    batch = next(iter(make_loader(ScoreUnaryDataLoader, tokenizer, batch_size=2)))
    expected = {(prompt_of(0), "chosen"): "top", (prompt_of(0), "rejected"): "low",
                (prompt_of(1), "chosen"): "first", (prompt_of(1), "rejected"): "second"}
    assert batch["status"] == ["chosen", "rejected"] or batch["status"] == ["rejected", "chosen"]
    for prompt, status, text in zip(batch["prompt_text"], batch["status"], batch["target_text"]):
        assert text == expected[prompt, status]


def test_score_unary_needs_scores(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(2)])
    with pytest.raises(DataError, match="needs one score per generation"):
        make_loader(ScoreUnaryDataLoader, tokenizer)


def test_pref_unary_alternates_sides_of_first_pairs(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(4)])
    loader = make_loader(PrefUnaryDataLoader, tokenizer, batch_size=1)
    items = {batch["target_text"][0]: batch["status"][0] for batch in loader}
    assert Counter(items.values()) == {"chosen": 2, "rejected": 2}
    assert all(text.startswith("good" if status == "chosen" else "bad") for text, status in items.items())


# ------------------------------------------------------------------------------------ loaders: errors


def test_too_few_items_for_one_batch_is_an_error(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(3)])
    with pytest.raises(DataError, match="3 items.*batch_size=4"):
        make_loader(SFTDataLoader, tokenizer, batch_size=4, n_examples=10, n_epochs=None)


def test_unknown_dataset_lists_available_names(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(0)])
    with pytest.raises(DataError, match=r"unknown dataset 'nope'.*available:.*\bhh\b.*\bshp\b.*\btoy\b"):
        make_loader(SFTDataLoader, tokenizer, names=["nope"])


def test_iteration_needs_a_stopping_rule_and_known_options(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(0)])
    with pytest.raises(ValueError, match="n_epochs or n_examples"):
        make_loader(SFTDataLoader, tokenizer, n_epochs=None)
    with pytest.raises(TypeError, match="frac_unique_desireable"):
        make_loader(SFTDataLoader, tokenizer, frac_unique_desireable=0.5)


def test_the_report_counts_truncation_at_start(tokenizer, monkeypatch):
    long_prompt = Example(prompt="word " * 40, generations=["answer " * 40], sft_index=0, dataset_name="toy")
    register(monkeypatch, "toy", [long_prompt, paired_example(1)])
    loader = make_loader(SFTDataLoader, tokenizer, n_epochs=2, max_length=40, max_prompt_length=16)
    assert loader.report.warnings == ["toy: truncated 1/2 prompts to max_prompt_length=16 and 1/2 responses to fit "
                                      "max_length=40"]
    table = str(loader.report).splitlines()
    assert table[0].startswith("data toy/train: SFTDataLoader, prompts formatted with the prefix strings; "
                               "2 items per epoch = 1 batches of 2")
    assert table[2].split()[:6] == ["toy", "-", "0", "2", "2", "2"]  # rows read unknown: a user function
    assert table[2].split()[-4:] == ["1", "(50.0%)", "1", "(50.0%)"]


def test_no_warning_without_truncation(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(2)])
    assert make_loader(PairedPreferenceDataLoader, tokenizer).report.warnings == []


def test_identical_pairs_are_counted_with_a_warning(tokenizer, monkeypatch):
    """Issue 11.15: DPO on pairs whose chosen equals rejected trained silently with its loss stuck at ln 2."""
    same = Example(prompt=prompt_of(9), generations=["same", "same"], pairs=[(0, 1)], sft_index=0, dataset_name="toy")
    register(monkeypatch, "toy", [paired_example(0), same, copy.deepcopy(same)])
    warnings = make_loader(PairedPreferenceDataLoader, tokenizer, batch_size=1).report.warnings
    assert warnings == ["toy: 1 of 2 pairs have identical chosen and rejected responses; pairwise losses learn "
                        "nothing from them (DPO's loss stays at ln 2)"]


def test_dropped_rows_are_reported_with_their_reasons(tokenizer):
    spec = DataSpec(["shp"], local_paths={"shp": str(REPO / "tests" / "fixtures" / "shp")})
    loader = make_loader(PairedPreferenceDataLoader, tokenizer, spec=spec)
    assert loader.report.warnings[0] == "shp: dropped 2 of 10 rows (score ratio < 2: 2)"


# ------------------------------------------------------------------------------------- loading datasets


def test_same_prompt_in_two_datasets_is_kept_twice(monkeypatch):
    register(monkeypatch, "toy", [paired_example(0, name="toy")])
    register(monkeypatch, "other", [paired_example(0, name="other")])
    examples = dataloader.load_examples(DataSpec(["toy", "other"]), "train")
    assert [(e.dataset_name, e.source) for e in examples] == [("toy", "toy"), ("other", "other")]


def test_local_paths_reach_dataset_functions_and_named_sources(monkeypatch):
    calls = []

    def get_withpath(split, local_path=None):
        calls.append(("withpath", local_path))
        return Dataset("withpath")

    def fake_load_source(spec, split):
        calls.append((spec.name, spec.path, spec.key))
        return Dataset(spec.name)

    register(monkeypatch, "toy", [])
    monkeypatch.setattr(dataloader, "get_withpath", get_withpath, raising=False)
    monkeypatch.setattr(dataloader, "load_source", fake_load_source)
    dataloader.load_examples(DataSpec(["withpath", "mine"], local_paths={"withpath": "a/dir", "mine": "my.jsonl"}),
                             "train")
    assert calls == [("withpath", "a/dir"), ("mine", "my.jsonl", "local_datasets.mine")]
    with pytest.raises(DataError, match="local_datasets.toy is set, but its function takes no local_path"):
        dataloader.load_examples(DataSpec(["toy"], local_paths={"toy": "x.json"}), "train")


def test_a_dataset_function_named_by_dotted_path(tmp_path, monkeypatch, tokenizer):
    """Adding a dataset needs no edit of dataloader.py: a function returning conversational Examples, anywhere."""
    (tmp_path / "my_data.py").write_text(
        "from feedback.examples import Dataset, Message\n"
        "def get_questions(split):\n"
        "    data = Dataset('questions')\n"
        "    for k in range(4):\n"
        "        example = data.conversation([Message('user', f'question number {k}')])\n"
        "        example.add_pair(f'good answer {k}', f'bad answer {k}')\n"
        "        example.sft_index = 0\n"
        "    return data\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    register(monkeypatch, "toy", [paired_example(k) for k in range(4)])
    dotted = make_loader(PairedPreferenceDataLoader, tokenizer, names=["my_data.get_questions"], batch_size=4)
    original = make_loader(PairedPreferenceDataLoader, tokenizer, batch_size=4)
    assert sorted(prompt_order(dotted)) == sorted(prompt_order(original))  # the prefix format renders both alike
    with pytest.raises(DataError, match="'get_answers' is not a function in my_data"):
        make_loader(SFTDataLoader, tokenizer, names=["my_data.get_answers"])
    with pytest.raises(DataError, match="cannot import module 'no_such_module'"):
        make_loader(SFTDataLoader, tokenizer, names=["no_such_module.get_x"])


def test_bundled_hh_data_gives_paired_batches(tokenizer):
    loader = PairedPreferenceDataLoader(BUNDLED_HH, tokenizer, "test", LoaderOptions(batch_size=4, n_examples=8,
                                                                                     max_length=128,
                                                                                     max_prompt_length=64))
    batches = list(loader)
    assert len(batches) == 2 and loader.total_examples == 8
    for batch in batches:
        assert all(text.endswith("\n<|assistant|>\n") for text in batch["prompt_text"])
        for side in ("chosen", "rejected"):
            ids, labels = batch[f"{side}_combined_input_ids"], batch[f"{side}_labels"]
            assert ids.shape[0] == 4 and ids.shape[1] <= 128 and (ids[:, 0] == BOS).all()
            prompt_lengths = batch["prompt_attention_mask"].sum(dim=1)
            for row in range(4):
                n_prompt = int(prompt_lengths[row])
                assert (labels[row, :n_prompt] == IGNORE).all() and labels[row, n_prompt] != IGNORE


# sha256 over every batch (keys sorted, tensors' bytes, other values as JSON) of these loaders on the bundled HH
# train split (batch 8, 96 examples, max_length 256, max_prompt_length 128, seed 1), as the data layer gave them
# before it took a prompt-format object and tokenised at start: the default path still yields the same batches.
BATCHES_BEFORE_PROMPT_FORMAT_OBJECT = {
    SFTDataLoader: "6c92e1b5ae03f0537e10cbb355cd926d6d69ad3e557f3f007d3eae7e4a5187cf",
    PairedPreferenceDataLoader: "943ca19882ea9c03f47fe582d862452a93c48877527f5984634421534dd33e86",
    UnpairedPreferenceDataLoader: "eeaeb342858276ec16046160525ea19ca9a072cd3b00c20686c95683e10833eb",
}


@pytest.mark.parametrize("cls", list(BATCHES_BEFORE_PROMPT_FORMAT_OBJECT), ids=lambda cls: cls.__name__)
def test_default_batches_are_byte_identical_to_before(tokenizer, cls):
    loader = cls(BUNDLED_HH, tokenizer, "train", LoaderOptions(batch_size=8, n_examples=96, max_length=256,
                                                               max_prompt_length=128, seed=1))
    digest = hashlib.sha256()
    for batch in loader:
        for key in sorted(set(batch) - {"prompt_messages"}):  # a key added later (eval.py's samples keep it)
            value = batch[key]
            digest.update(key.encode())
            digest.update(value.numpy().tobytes() if isinstance(value, torch.Tensor) else json.dumps(value).encode())
    assert digest.hexdigest() == BATCHES_BEFORE_PROMPT_FORMAT_OBJECT[cls]


def test_kl_rows_pair_responses_within_their_group(tokenizer, monkeypatch):
    """kl_group_size: batches of 2 whose KL rows come from groups of 4 are the batches of 4, split in two."""
    register(monkeypatch, "toy", [paired_example(k) for k in range(8)])

    def kl_rows(batch_size, group):
        loader = make_loader(UnpairedPreferenceDataLoader, tokenizer, batch_size=batch_size, kl_group_size=group)
        return [unpadded(ids, mask) for batch in loader
                for ids, mask in zip(batch["KL_combined_input_ids"], batch["KL_combined_attention_mask"])]

    assert kl_rows(2, 4) == kl_rows(4, None) != kl_rows(2, None)
    with pytest.raises(ValueError, match="kl_group_size=6 must be a multiple of batch_size=4"):
        make_loader(UnpairedPreferenceDataLoader, tokenizer, batch_size=4, kl_group_size=6)
