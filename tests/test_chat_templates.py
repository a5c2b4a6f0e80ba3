"""Chat-template formatting (feedback/prompt_format.py, feedback/tokenization.py): the prefix property over every bundled row, one BOS
and one EOS, system prompts kept once, clear errors for templates that break the property, and training, eval.py
sampling and the reference cache all using the same formatting."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

import dataloader
import eval as eval_py
from builders import build_dataloader
from data_config import data_spec
from dataloader import DataSpec, LoaderOptions, PairedPreferenceDataLoader, SFTDataLoader
from feedback.examples import DataError, Dataset, Example, Message
from feedback.prompt_format import (FALLBACK_TEMPLATE, ChatTemplateFormat, PrefixFormat, config_fingerprint,
                           prompt_format_from_config)
from feedback.tokenization import Encoder
from train import train

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
BUNDLED_ROWS = {  # dataset name -> its local path: every bundled data file and fixture that holds conversations
    "hh": REPO / "data" / "hh-rlhf", "hhchat": REPO / "data" / "hh-rlhf-chat",
    "ultrafeedback": REPO / "data" / "hh-rlhf-ultrafeedback", "shp": FIXTURES / "shp", "oasst": FIXTURES / "oasst1",
    "hh_helpful": FIXTURES / "hh-rlhf", "ultrabin": FIXTURES / "ultrafeedback_binarized",
    "ultrafeedback_armorm": FIXTURES / "ultrafeedback_armorm", "ultrachat": FIXTURES / "ultrachat_200k",
    "local": FIXTURES / "local",
}
SPLITS = {"alpacaeval": ("test",)}


def tokenizer_of(name: str):
    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / name)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


@pytest.fixture(scope="module", params=["tiny-chat", "fallback"])
def chat_format(request):
    """tiny-chat with its own template (special role tokens, BOS written by the template), and the tiny tokenizer
    (no template of its own) with the shipped fallback (plain-text role markers, BOS added by the tokenizer)."""
    if request.param == "tiny-chat":
        tokenizer = tokenizer_of("tiny-chat")
        return ChatTemplateFormat(tokenizer, tokenizer.chat_template, "tiny-chat's template")
    return ChatTemplateFormat(tokenizer_of("tiny-llama"), FALLBACK_TEMPLATE.read_text(), "the fallback template")


def independent_ids(tokenizer, template: str, conversations) -> list:
    """The ids of whole conversations, each tokenised at once, as a user would with apply_chat_template."""
    texts = [tokenizer.apply_chat_template([m._asdict() for m in messages], tokenize=False, chat_template=template)
             for messages in conversations]
    bos = [tokenizer.bos_token_id]
    return [ids if ids[:1] == bos else bos + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("name", sorted(BUNDLED_ROWS) + ["alpacaeval"])
def test_templated_prompt_tokens_are_a_prefix_of_every_bundled_rows_tokens(chat_format, name):
    tokenizer, bos, eos = chat_format.tokenizer, chat_format.tokenizer.bos_token_id, chat_format.tokenizer.eos_token_id
    path = FIXTURES / "alpaca_eval" if name == "alpacaeval" else BUNDLED_ROWS[name]
    spec = DataSpec([name], chat_format, local_paths={name: str(path)})
    encoder = Encoder(tokenizer, chat_format, max_length=4096, max_prompt_length=2048)
    checked = 0
    for split in SPLITS.get(name, ("train", "test")):
        encoded = encoder.encode(dataloader.load_examples(spec, split), lambda e: range(e.num_generations()))
        pieces = [(item, index) for item in encoded for index in item.responses]
        wholes = independent_ids(tokenizer, chat_format.template,
                                 [[*item.example.prompt_messages, Message("assistant", item.example.generations[index])]
                                  for item, index in pieces])
        for (item, index), whole in zip(pieces, wholes):
            prompt, response = item.prompt_ids.tolist(), item.responses[index].tolist()
            assert prompt[0] == bos and bos not in prompt[1:]  # exactly one BOS
            assert response[-1] == eos and eos not in response[:-1]  # exactly one EOS, at the end
            assert whole[:len(prompt) + len(response)] == prompt + response
            assert not tokenizer.decode(whole[len(prompt) + len(response):]).strip()  # only the newline after
            checked += 1
    assert checked >= {"hh": 4600, "hhchat": 640}.get(name, 2)


def test_system_prompt_is_rendered_once(chat_format):
    example = Example(prompt_messages=[Message("system", "Answer like a pirate."), Message("user", "Hello?")],
                      generations=["Arr, hello."], dataset_name="toy")
    encoded = Encoder(chat_format.tokenizer, chat_format, 256, 128).encode([example], lambda e: [0])[0]
    text = chat_format.tokenizer.decode(encoded.prompt_ids.tolist() + encoded.responses[0].tolist())
    assert text.count("Answer like a pirate.") == 1 and text.count("Arr, hello.") == 1


def loader_with(template: str, tokenizer, origin="'chat.jsonl' row 7", content="the answer."):
    def get_chat(split):
        data = Dataset("chat")
        example = data.conversation([Message("user", "Say something.")], origin)
        example.add_pair(content, "no.")
        return data

    spec = DataSpec(["chat"], ChatTemplateFormat(tokenizer, template, "the chat template 'broken.jinja'"))
    dataloader.get_chat = get_chat
    try:
        return PairedPreferenceDataLoader(spec, tokenizer, "train", LoaderOptions(batch_size=1, n_epochs=1))
    finally:
        del dataloader.get_chat


def test_a_template_rendering_the_prompt_differently_is_a_one_line_error():
    tokenizer = tokenizer_of("tiny-llama")
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:\n\n{% endif %}")  # two newlines, but one in the turn itself
    with pytest.raises(DataError) as caught:
        loader_with(template, tokenizer)
    message = str(caught.value)
    assert message.startswith("dataset 'chat' 'chat.jsonl' row 7 (prompt 'Say something.'): the chat template "
                              "'broken.jinja' breaks the prefix property") and "\n" not in message


def test_a_template_whose_tokens_merge_across_the_boundary_is_a_one_line_error():
    """The generation prompt ends inside a word ('th' + 'e answer.'), so tokenising the whole conversation gives
    other tokens at the boundary than tokenising the prompt: training would see ids that sampling never produces."""
    tokenizer = tokenizer_of("tiny-llama")
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% else %}th{{ m['content'] }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}th{% endif %}")
    with pytest.raises(DataError, match=r"'chat.jsonl' row 7 .*: with the chat template 'broken.jinja', the prompt's "
                                        r"tokens are not a prefix of prompt \+ response's tokens"):
        loader_with(template, tokenizer)


def test_a_template_that_raises_names_the_row():
    tokenizer = tokenizer_of("tiny-llama")
    with pytest.raises(DataError, match=r"row 7 .*failed to render it \(TemplateError: roles must alternate\)"):
        loader_with("{{ raise_exception('roles must alternate') }}", tokenizer)


# ---------------------------------------------------------------------------------- from the config


BASE = ("loss=dpo", "datasets=[hhchat]", "exp_name=chat", "mode=train", "wandb.enabled=false", "n_epochs=null",
        "n_examples=16", "n_eval_examples=8", "do_first_eval=false", "lr=1e-4", "warmup_steps=2",
        f"++local_datasets.hhchat={REPO / 'data' / 'hh-rlhf-chat'}")


def composed(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_the_config_chooses_the_format_and_the_cache_key_follows_it(tmp_path):
    tiny_chat, tiny = composed(*BASE, "model=tiny_chat"), composed(*BASE, "model=tiny")
    assert isinstance(prompt_format_from_config(tiny, tokenizer_of("tiny-llama")), PrefixFormat)
    own = prompt_format_from_config(tiny_chat, tokenizer_of("tiny-chat"))
    assert own.template == tokenizer_of("tiny-chat").chat_template
    fallback = prompt_format_from_config(composed(*BASE, "model=tiny", "model.chat_template=tokenizer"),
                                         tokenizer_of("tiny-llama"))
    assert fallback.template == FALLBACK_TEMPLATE.read_text() and "fallback" in fallback.name
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    from_file = composed(*BASE, "model=tiny", f"model.chat_template={tmp_path / 't.jinja'}")
    assert prompt_format_from_config(from_file, tokenizer_of("tiny-llama")).template == "{{ messages[0]['content'] }}"
    keys = [config_fingerprint(c) for c in (tiny, tiny_chat, from_file, composed(*BASE, "model=tiny", "human_prefix=Q:"))]
    assert len({json.dumps(key, sort_keys=True) for key in keys}) == 4


def test_training_and_eval_sampling_use_the_same_template(tmp_path):
    """DPO on the bundled conversational JSONL with the chat-template tokenizer, then eval.py sampling from the run:
    eval.py's prompts are token for token the templated prompts the training-side loaders build."""
    config = composed(*BASE, "model=tiny_chat", f"cache_dir={tmp_path}")
    train(config, "dpo")
    run_dir = tmp_path / "chat"
    with initialize_config_dir(config_dir=str(run_dir), version_base=None):
        saved = compose(config_name="config", overrides=["++mode=sample", "++n_samples=3", "++model.max_length=160",
                                                         f"++samples_dir={tmp_path / 'samples'}"])
    samples = json.loads(eval_py.run(saved).read_text())["samples"]
    tokenizer = eval_py.load_run_tokenizer(saved)
    sampled = next(iter(eval_py.prompt_loader(saved, tokenizer, ["hhchat"], 3)))
    reference = SFTDataLoader(data_spec(config, tokenizer_of("tiny-chat"), "test"), tokenizer_of("tiny-chat"), "test",
                              LoaderOptions(batch_size=1, n_epochs=1, seed=config.seed, max_length=160,
                                            max_prompt_length=config.model.max_prompt_length))
    first = next(iter(reference))
    assert sampled["prompt_input_ids"].tolist() == first["prompt_input_ids"].tolist()
    assert samples[0]["prompt"] == first["prompt_text"][0]
    assert samples[0]["prompt"].startswith("<|user|>\n") and samples[0]["prompt"].endswith("<|assistant|>\n")


def test_a_data_error_stops_training_before_anything_is_written(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                                          + json.dumps({"prompt": [{"role": "robot", "content": "x"}],
                                                        "chosen": "a", "rejected": "b"}) + "\n")
    (tmp_path / "test.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    config = composed(*BASE, "model=tiny_chat", f"cache_dir={tmp_path / 'cache'}",
                      f"++local_datasets.hhchat={tmp_path}")
    with pytest.raises(DataError, match=r"train.jsonl' row 2: prompt message 1: unknown role 'robot'"):
        train(config, "dpo")
    assert not (tmp_path / "cache" / "chat").exists(), "no run directory for a run that never started"


def test_build_dataloader_prints_the_report(capsys):
    config = composed(*BASE, "model=tiny_chat")
    build_dataloader(config, tokenizer_of("tiny-chat"), "test", 8, 1, None)
    out = capsys.readouterr().out
    assert "data hhchat/test: PairedPreferenceDataLoader, prompts formatted with the tokenizer's chat template" in out


@pytest.mark.slow
def test_readme_data_commands_run_as_written(tmp_path):
    """Every `python train.py`/`eval.py` command of the README's conversational-data block, with its run directory
    under tmp_path and wandb off."""
    import re
    import subprocess
    import sys
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme[readme.index("**Your own data, no code.**"):
                                                      readme.index("**Mixing by ratio.**")], re.S)
    commands = [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(commands) == 5
    for command in commands:
        command = command.split("#")[0].replace(".cache/", f"{tmp_path}/").replace("python ", f"{sys.executable} ", 1)
        if "train.py" in command:
            command += f" cache_dir={tmp_path} wandb.enabled=false"
        else:
            command += f" ++samples_dir={tmp_path}/samples"
        result = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    samples = json.loads((tmp_path / "samples" / "chat_dpo.json").read_text())["samples"]
    assert all(s["prompt"].endswith("<|assistant|>\n") for s in samples)
