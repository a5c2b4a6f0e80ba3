"""Dataloaders beyond the original's: mixing datasets by ratio (weights, caps, oversampling, resuming), standard and
conversational rows giving the same tokens, SFT on every assistant turn, loaders built from config, and the README's
add-a-dataset examples. Helpers and toy datasets as in test_dataloader.py."""
import json
import math
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

import dataloader
from dataloader import (DataError, Dataset, DataSpec, Example, PairedPreferenceDataLoader, SFTDataLoader,
                        SimpleKTODataLoader)
from feedback.examples import Message
from feedback.prompt_format import ChatTemplateFormat, PrefixFormat
from test_dataloader import IGNORE, REPO, make_loader, paired_example, prompt_order, register, tokenizer  # noqa: F401


# -------------------------------------------------------------------------------------------- mixing


def named_examples(name, n):
    return [Example(prompt=f"\n<|user|>\n{name} question {k}\n<|assistant|>\n", generations=[f"{name} answer {k}"],
                    sft_index=0, dataset_name=name) for k in range(n)]


def mixed_loader(tokenizer, monkeypatch, weights=None, caps=None, **options):
    register(monkeypatch, "small", named_examples("small", 40))
    register(monkeypatch, "large", named_examples("large", 120))
    spec = DataSpec(["small", "large"], weights=weights or {}, max_examples=caps or {})
    return make_loader(SFTDataLoader, tokenizer, spec=spec, **options)


def sources_of(batches):
    return [text.split()[0] for batch in batches for text in batch["target_text"]]


def test_mixing_proportions_follow_the_weights(tokenizer, monkeypatch):
    """10k draws at weights 0.7/0.3 from datasets of 40 and 120 items: the small one is oversampled 2.8x. Each epoch
    holds exactly round(0.7 x 160) = 112 small items, so the fraction is within binomial error of 0.7 (and tighter)."""
    loader = mixed_loader(tokenizer, monkeypatch, {"small": 0.7, "large": 0.3}, batch_size=50, n_epochs=None,
                          n_examples=10_000)
    drawn = Counter(sources_of(loader))
    n = sum(drawn.values())
    assert n == 10_000
    assert abs(drawn["small"] / n - 0.7) <= 3 * math.sqrt(0.7 * 0.3 / n)
    assert loader.examples_per_epoch == 150  # 160 items per epoch, 3 full batches of 50
    assert "small: oversampled 2.80x to reach its weight: 112 items per epoch from 40" in loader.report.warnings[0]


def test_mixing_is_deterministic_per_seed_and_resumes_on_the_same_examples(tokenizer, monkeypatch):
    weights = {"small": 1.0, "large": 1.0}
    loader = mixed_loader(tokenizer, monkeypatch, weights, batch_size=8, n_epochs=3, seed=5)
    full = list(loader)
    assert prompt_order(mixed_loader(tokenizer, monkeypatch, weights, batch_size=8, n_epochs=3, seed=5)) == \
        prompt_order(full)
    assert prompt_order(mixed_loader(tokenizer, monkeypatch, weights, batch_size=8, n_epochs=3, seed=6)) != \
        prompt_order(full)
    resumed = list(loader.iter_from(13))  # mid-epoch: 20 batches per epoch
    assert len(full) == 60 and prompt_order(resumed) == prompt_order(full[13:])
    assert all(torch.equal(a["target_input_ids"], b["target_input_ids"]) for a, b in zip(full[13:], resumed))
    epochs = [Counter(sources_of(full[k:k + 20])) for k in (0, 20, 40)]
    assert all(epoch == {"small": 80, "large": 80} for epoch in epochs)
    subsets = [{t for t in prompt_order(full[k:k + 20]) if t.startswith("\n<|user|>\nlarge")} for k in (0, 20)]
    assert subsets[0] != subsets[1]  # the under-sampled dataset shows another subset every epoch


def test_caps_limit_a_dataset_without_weights(tokenizer, monkeypatch):
    loader = mixed_loader(tokenizer, monkeypatch, caps={"large": 24}, batch_size=8, n_epochs=2)
    epochs = [Counter(sources_of(batches)) for batches in (list(loader)[:8], list(loader)[8:])]
    assert epochs == [{"small": 40, "large": 24}] * 2
    assert len(set(prompt_order(loader))) == 64  # the same 24 large items in both epochs
    assert "large: capped at 24 of its 120 items (dataset_max_examples)" in loader.report.warnings


@pytest.mark.parametrize("weights, caps, problem", [
    ({"small": -1, "large": 1}, None, "dataset_weights: every weight must be a positive number"),
    ({"small": 1, "other": 1}, None, "dataset_weights: ['other'] not in datasets ['small', 'large']"),
    ({"small": 1}, None, "dataset_weights: no weight for ['large']"),
    (None, {"large": 0}, "dataset_max_examples: every cap must be a positive integer"),
])
def test_bad_weights_and_caps_are_one_line_errors(tokenizer, monkeypatch, weights, caps, problem):
    with pytest.raises(DataError) as caught:
        mixed_loader(tokenizer, monkeypatch, weights, caps)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_simple_kto_refuses_weights(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(4)])
    with pytest.raises(ValueError, match="SimpleKTODataLoader pairs chosen and rejected items one for one"):
        make_loader(SimpleKTODataLoader, tokenizer, spec=DataSpec(["toy"], weights={"toy": 1.0}))


# ------------------------------------------------------------------------- conversations and formats


SAME_TEXT_ROWS = {
    "standard": {"prompt": "Why is the sea salty?", "chosen": "Minerals from rocks.", "rejected": "Tears."},
    "conversational": {"prompt": [{"role": "user", "content": "Why is the sea salty?"}],
                       "chosen": [{"role": "assistant", "content": "Minerals from rocks."}],
                       "rejected": [{"role": "assistant", "content": "Tears."}]},
    "implicit": {"chosen": [{"role": "user", "content": "Why is the sea salty?"},
                            {"role": "assistant", "content": "Minerals from rocks."}],
                 "rejected": [{"role": "user", "content": "Why is the sea salty?"},
                              {"role": "assistant", "content": "Tears."}]},
}


@pytest.mark.parametrize("template", [None, "tiny-chat"])
def test_conversational_and_standard_rows_give_identical_tokens(tokenizer, tmp_path, template):
    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-chat") if template else tokenizer
    tok.pad_token_id = tok.eos_token_id
    prompt_format = ChatTemplateFormat(tok, tok.chat_template, "tiny-chat's template") if template else PrefixFormat()
    batches = {}
    for form, row in SAME_TEXT_ROWS.items():
        (tmp_path / f"{form}.jsonl").write_text(json.dumps(row) + "\n")
        spec = DataSpec([form], prompt_format, local_paths={form: str(tmp_path / f"{form}.jsonl")})
        batches[form] = next(iter(make_loader(PairedPreferenceDataLoader, tok, spec=spec, batch_size=1)))
    for form in ("conversational", "implicit"):
        assert batches[form].keys() == batches["standard"].keys()
        for key, value in batches["standard"].items():
            assert torch.equal(value, batches[form][key]) if isinstance(value, torch.Tensor) \
                else value == batches[form][key], (form, key)


def test_sft_on_every_assistant_turn_labels_the_prompts_own_turns(tokenizer, monkeypatch):
    conversation = [Message("user", "Hi!"), Message("assistant", "Hello, how can I help?"),
                    Message("user", "Name a colour.")]

    def get_chat(split):
        data = Dataset("chat")
        example = data.conversation(conversation)
        example.generations.append("Blue.")
        example.sft_index = 0
        return data

    monkeypatch.setattr(dataloader, "get_chat", get_chat, raising=False)
    final_only = next(iter(make_loader(SFTDataLoader, tokenizer, names=["chat"], batch_size=1)))
    every_turn = next(iter(make_loader(SFTDataLoader, tokenizer, names=["chat"], batch_size=1,
                                       sft_all_assistant_turns=True)))
    assert torch.equal(final_only["target_combined_input_ids"], every_turn["target_combined_input_ids"])
    labelled = every_turn["target_labels"][0]
    labelled_text = tokenizer.decode(labelled[labelled != IGNORE].tolist())
    assert labelled_text == "Hello, how can I help?" + "Blue.</s>"  # the earlier turn's text, then the response
    final_labels = final_only["target_labels"][0]
    assert tokenizer.decode(final_labels[final_labels != IGNORE].tolist()) == "Blue.</s>"
    with pytest.raises(ValueError, match="sft_all_assistant_turns applies to SFTDataLoader only"):
        make_loader(PairedPreferenceDataLoader, tokenizer, names=["chat"], sft_all_assistant_turns=True)


def test_the_original_contract_cannot_use_a_chat_template(tokenizer, monkeypatch):
    register(monkeypatch, "toy", [paired_example(k) for k in range(2)])
    spec = DataSpec(["toy"], ChatTemplateFormat(tokenizer, "{{ messages }}", "a template"))
    with pytest.raises(DataError, match="dataset 'toy': its function formats prompts itself .* cannot use a template"):
        make_loader(SFTDataLoader, tokenizer, spec=spec)


# ------------------------------------------------------------------------------------- built from config


def test_n_eval_examples_beyond_the_test_split_evaluates_each_example_once(compose_config, capsys):
    """Issue 11.5: n_eval_examples larger than the test split used to repeat its examples silently."""
    from builders import build_eval_loader
    from models import load_tokenizer
    config = compose_config("loss=sft", "model=tiny", "datasets=[hh]", "exp_name=t", "mode=train",
                            "n_eval_examples=1000")
    loader = build_eval_loader(config, load_tokenizer(config.model), batch_size=8)
    prompts = prompt_order(loader)
    assert len(prompts) == loader.total_examples == 312 and len(set(prompts)) == len(prompts)
    assert ("warning: n_eval_examples=1000 exceeds the 312 examples of one pass over the test split (hh/test); "
            "evaluating on those, once each") in capsys.readouterr().out


def readme_example(name: str) -> str:
    """The code block that follows `<!-- example: NAME -->` in the README."""
    readme = (REPO / "README.md").read_text()
    start = readme.index(f"<!-- example: {name} -->\n```python\n") + len(f"<!-- example: {name} -->\n```python\n")
    return readme[start:readme.index("```", start)]


@pytest.mark.parametrize("example", ["mydata.py", "original_contract.py"])
def test_readme_add_a_dataset_examples_run_as_written(tokenizer, tmp_path, monkeypatch, example):
    module = example.removesuffix(".py")
    (tmp_path / example).write_text(readme_example(example))
    monkeypatch.syspath_prepend(str(tmp_path))
    loader = make_loader(PairedPreferenceDataLoader, tokenizer, names=[f"{module}.get_mydata"], batch_size=2)
    batch = next(iter(loader))
    assert sorted(batch["prompt_text"]) == ["\n<|user|>\nDo fish sleep?\n<|assistant|>\n",
                                            "\n<|user|>\nIs the sea salty?\n<|assistant|>\n"]


def test_weights_shape_the_train_split_only(compose_config):
    from builders import build_dataloader, build_eval_loader
    from models import load_tokenizer
    config = compose_config("loss=sft", "model=tiny", "datasets=[hh,hh_harmless]", "exp_name=t", "mode=train",
                            "n_eval_examples=null", "++dataset_weights={hh: 3, hh_harmless: 1}")
    tokenizer = load_tokenizer(config.model)
    train = build_dataloader(config, tokenizer, "train", 8, 1, None)
    assert train.mixture.shares({"hh": 1998, "hh_harmless": 1998}) == {"hh": 2997, "hh_harmless": 999}
    evaluation = build_eval_loader(config, tokenizer, 8)
    assert not evaluation.mixture.active and evaluation.total_examples == 624  # both copies of the 312, once each
