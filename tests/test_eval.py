"""eval.py on a tiny trained SFT run: sample files, resuming, eval metrics, the AlpacaEval export, and compare.py."""
import json
import math
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import GenerationConfig

import compare
import eval as eval_py
import sampling
from checkpoints import checkpoint_info
from configuration import ConfigError
from dataloader import DataSpec, LoaderOptions, SFTDataLoader
from errors import HalosError
from judge_server import JudgeServer
from models import load_causal_lm
from train import train
from weights import read_policy_state

REPO_ROOT = Path(__file__).resolve().parent.parent
ALPACA_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "alpaca_eval"
TRAIN = ("loss=sft", "model=tiny", "datasets=[hh]", "mode=train", "exp_name=tiny", "wandb.enabled=false",
         "lr=1e-3", "warmup_steps=2", "n_epochs=null", "n_examples=16", "do_first_eval=false", "n_eval_examples=8")
N_SAMPLES = 10
SHORT = "++model.max_length=144"  # prompt + response budget: short responses keep CPU sampling fast
SAMPLE = ("++mode=sample", f"++n_samples={N_SAMPLES}", SHORT)
REAL_GENERATE_BATCH = sampling.generate_batch


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny SFT run trained in this process: <cache_dir>/tiny with config.yaml, LATEST (exported), tokenizer."""
    cache_dir = tmp_path_factory.mktemp("cache")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=[*TRAIN, f"cache_dir={cache_dir}"])
    train(config, "sft")
    return cache_dir / "tiny"


def run_eval(run_dir: Path, *overrides: str) -> Path:
    """eval.run in this process on the run's saved config, as `eval.py --config-path=run_dir OVERRIDES` does."""
    with initialize_config_dir(config_dir=str(run_dir), version_base=None):
        config = compose(config_name="config", overrides=list(overrides))
    return eval_py.run(config, run_dir, {override.lstrip("+").split("=")[0] for override in overrides})


def eval_cli(run_dir: Path, cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "eval.py"), f"--config-path={run_dir}", *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_samples(run_dir, tmp_path_factory):
    """(working directory, sample file) of `eval.py ++mode=sample ++n_samples=10` run as a subprocess."""
    cwd = tmp_path_factory.mktemp("cli")
    result = eval_cli(run_dir, cwd, *SAMPLE, "++samples_dir=samples/")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, cwd / "samples" / "tiny.json"


def read_samples(path: Path) -> list:
    return json.loads(path.read_text())["samples"]


def test_sample_file_has_the_test_prompts_their_targets_and_nothing_else(run_dir, cli_samples, tiny_tokenizer):
    cwd, path = cli_samples
    content = json.loads(path.read_text())
    assert set(content) == {"sampled_at", "config", "samples"}
    datetime.fromisoformat(content["sampled_at"])
    assert (content["config"]["mode"], content["config"]["exp_name"], content["config"]["n_samples"]) == \
        ("sample", "tiny", N_SAMPLES)
    samples = content["samples"]
    assert len(samples) == N_SAMPLES  # not rounded up to whole batches of eval_batch_size=8
    assert all(set(s) == set(eval_py.SAMPLE_KEYS) and isinstance(s["policy"], str) for s in samples)
    assert [(s["prompt_id"], s["sample_index"]) for s in samples] == [(k, 0) for k in range(N_SAMPLES)]
    assert all(s["prompt_messages"][-1]["role"] == "user" for s in samples)
    assert any(s["policy"] for s in samples)

    # The same prompts, in the same order, as the SFT loader gives for the test split with the run's seed.
    config = content["config"]
    loader = SFTDataLoader(DataSpec(["hh"], local_paths=config["local_datasets"]), tiny_tokenizer, "test",
                           LoaderOptions(batch_size=N_SAMPLES, n_epochs=1, seed=config["seed"],
                                         max_length=config["model"]["max_length"],
                                         max_prompt_length=config["model"]["max_prompt_length"]))
    first_batch = next(iter(loader))
    assert [s["prompt"] for s in samples] == first_batch["prompt_text"]
    assert [s["chosen"] for s in samples] == first_batch["target_text"]
    assert all(s["prompt"].endswith(config["assistant_prefix"]) for s in samples)

    # Hydra wrote nothing of its own, and the partial file is gone once the sample file is complete.
    assert sorted(p.name for p in cwd.iterdir()) == ["samples"]
    assert sorted(p.name for p in (cwd / "samples").iterdir()) == ["tiny.json"]


def test_same_seed_same_samples_other_seed_other_samples(run_dir, cli_samples, tmp_path):
    again = run_eval(run_dir, *SAMPLE, f"++samples_dir={tmp_path / 'a'}")
    assert read_samples(again) == read_samples(cli_samples[1])
    other = run_eval(run_dir, *SAMPLE, f"++samples_dir={tmp_path / 'b'}",
                     "++seed=2")
    assert [s["policy"] for s in read_samples(other)] != [s["policy"] for s in read_samples(again)]


class Interrupted(Exception):
    """Stands for the run being killed between two batches."""


def count_generated_rows(monkeypatch, fail_after_batches=None) -> list:
    """Wraps sampling.generate_batch; returns the list of batch sizes it is called with (optionally failing)."""
    sizes = []

    def counting(policy, tokenizer, prompt_input_ids, *args, **kwargs):
        if fail_after_batches is not None and len(sizes) == fail_after_batches:
            raise Interrupted
        sizes.append(prompt_input_ids.size(0))
        return REAL_GENERATE_BATCH(policy, tokenizer, prompt_input_ids, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_batch", counting)
    return sizes


def test_an_interrupted_run_resumes_with_exactly_the_uninterrupted_samples(run_dir, tmp_path, monkeypatch):
    args = (*SAMPLE, "++model.eval_batch_size=4")
    uninterrupted = read_samples(run_eval(run_dir, *args, f"++samples_dir={tmp_path / 'whole'}"))

    samples_dir = tmp_path / "resumed"
    count_generated_rows(monkeypatch, fail_after_batches=1)
    with pytest.raises(Interrupted):
        run_eval(run_dir, *args, f"++samples_dir={samples_dir}")
    partial = samples_dir / "tiny.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 4  # the settings line and the first batch
    assert not (samples_dir / "tiny.json").exists()
    with partial.open("a") as handle:
        handle.write('{"index": 4, "prompt": "cut sho')  # a crash in the middle of writing a line

    sizes = count_generated_rows(monkeypatch)
    resumed = read_samples(run_eval(run_dir, *args, f"++samples_dir={samples_dir}"))
    assert sizes == [4, 2]  # only the 6 missing samples were generated, in batches 1 and 2
    assert resumed == uninterrupted
    assert len({s["prompt"] for s in resumed}) == N_SAMPLES
    assert not partial.exists()


def test_a_partial_file_from_other_settings_is_refused(run_dir, tmp_path, monkeypatch):
    args = ("++mode=sample", "++n_samples=4", SHORT, "++model.eval_batch_size=2", f"++samples_dir={tmp_path}")
    count_generated_rows(monkeypatch, fail_after_batches=1)
    with pytest.raises(Interrupted):
        run_eval(run_dir, *args)
    with pytest.raises(sampling.SamplingError, match="other settings"):
        run_eval(run_dir, *args, "++top_p=0.5")


def test_eval_mode_reproduces_the_final_eval_of_training(run_dir, tmp_path):
    output = run_eval(run_dir, "++mode=eval", "++n_eval_examples=8", f"++samples_dir={tmp_path}")
    assert output == tmp_path / "tiny.eval.json"
    content = json.loads(output.read_text())
    assert set(content) == {"evaluated_at", "config", "metrics"}
    metrics = content["metrics"]
    assert set(metrics) == {"loss/eval", "logps_eval/chosen"}
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["loss/eval"] == pytest.approx(-metrics["logps_eval/chosen"])
    # Training evaluated the final policy on the same 8 test examples and stored the result in the checkpoint.
    stored = checkpoint_info(run_dir / "LATEST")["metrics"]
    assert metrics["loss/eval"] == pytest.approx(stored["loss/eval"], rel=1e-5)


def test_alpacaeval_exports_every_instruction(run_dir, tmp_path):
    # 3 instructions in batches of 2: the last, smaller batch is sampled too.
    output = run_eval(run_dir, "++mode=alpacaeval", SHORT, f"++local_datasets.alpacaeval={ALPACA_FIXTURE}",
                      "++model.eval_batch_size=2", "++n_samples=1", f"++samples_dir={tmp_path}")
    assert output == tmp_path / "alpaca_tiny.json"
    exported = json.loads(output.read_text())
    rows = json.loads((ALPACA_FIXTURE / "alpaca_eval.json").read_text())
    assert sorted(e["instruction"] for e in exported) == sorted(r["instruction"] for r in rows)
    references = {r["instruction"]: r["output"].strip() for r in rows}
    for entry in exported:
        assert set(entry) == {"instruction", "output", "reference", "generator"}
        assert entry["reference"] == references[entry["instruction"]]
        assert entry["output"] == entry["output"].strip() and entry["generator"] == "tiny"


def test_saved_policy_null_samples_the_base_model(run_dir, cli_samples, tmp_path):
    output = run_eval(run_dir, *SAMPLE, "++saved_policy=null",
                      "++exp_name=tiny_base", f"++samples_dir={tmp_path}")
    assert output == tmp_path / "tiny_base.json"
    base, trained = read_samples(output), read_samples(cli_samples[1])
    assert [s["prompt"] for s in base] == [s["prompt"] for s in trained]
    assert [s["policy"] for s in base] != [s["policy"] for s in trained]


def test_a_hugging_face_model_directory_as_saved_policy(run_dir, cli_samples, tmp_path):
    config = json.loads(cli_samples[1].read_text())["config"]
    model = load_causal_lm(OmegaConf.create(config["model"]), "float32", config["seed"])
    model.load_state_dict(read_policy_state(run_dir / "LATEST"))
    model.save_pretrained(tmp_path / "hf_policy")
    output = run_eval(run_dir, *SAMPLE,
                      f"++saved_policy={tmp_path / 'hf_policy'}", f"++samples_dir={tmp_path / 'out'}")
    assert read_samples(output) == read_samples(cli_samples[1])


def test_bad_mode_is_a_one_line_error(run_dir, tmp_path):
    result = eval_cli(run_dir, tmp_path, "++mode=train")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == \
        "error: invalid config: mode: expected one of sample, eval, alpacaeval (e.g. ++mode=sample), got 'train'"


def test_a_misspelt_key_without_plus_plus_is_the_same_one_line_error(run_dir, tmp_path):
    result = eval_cli(run_dir, tmp_path, "mode=sample", "n_sample=3")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: invalid config: n_sample: unknown key (did you mean n_samples?)"


@pytest.mark.parametrize("overrides, message", [
    (("++mode=sample", "++n_sample=3"), "n_sample: unknown key (did you mean n_samples?)"),
    (("++mode=sample", "++n_samples=0"), "n_samples: expected a positive integer or null"),
    (("++mode=sample", "++saved_policy=no/such.pt"), "saved_policy: no/such.pt not found"),
    (("++mode=eval", "++top_p=2"), "top_p: expected a number in (0, 1]"),
    (("++mode=sample", "++seed=abc"), "seed: expected an integer from 0 to 4294967295, got 'abc'"),
    (("++mode=sample", "++exp_name=../elsewhere"), "exp_name: '../elsewhere' is not a run name"),
    (("++mode=sample", "++samples_dir=config.yaml/samples"), "samples_dir: "),
])
def test_bad_values_are_reported_before_anything_loads(run_dir, overrides, message):
    overrides = tuple(o.replace("config.yaml", str(run_dir / "config.yaml")) for o in overrides)
    with pytest.raises(ConfigError) as info:
        run_eval(run_dir, *overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_run_directory_is_taken_from_the_working_directory_and_checked(tmp_path, monkeypatch):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "config.yaml").write_text("seed: 1\n")
    monkeypatch.chdir(tmp_path)
    argv = eval_py.prepare_argv(["eval.py", "--config-path", "runs/a", "++mode=sample", "hydra.run.dir=elsewhere"])
    assert argv[:3] == ["eval.py", f"--config-path={tmp_path / 'runs' / 'a'}", "++mode=sample"]
    assert "hydra.output_subdir=null" in argv and "hydra.run.dir=." not in argv  # the user's choice wins
    with pytest.raises(eval_py.EvalError, match="runs/b does not exist"):
        eval_py.prepare_argv(["eval.py", "--config-path=runs/b"])
    with pytest.raises(eval_py.EvalError, match="has no config.yaml"):
        eval_py.prepare_argv(["eval.py", "-cp", "runs"])
    with pytest.raises(eval_py.EvalError, match="needs --config-path"):
        eval_py.prepare_argv(["eval.py", "++mode=sample"])


class FakePolicy(torch.nn.Module):
    """Generates fixed token ids after the prompt and records the generation kwargs."""

    def __init__(self, new_ids, end_of_turn_id):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = GenerationConfig(eos_token_id=[end_of_turn_id])
        self.new_ids = torch.tensor(new_ids)
        self.kwargs = None

    def generate(self, input_ids, **kwargs):
        self.kwargs = kwargs
        return torch.cat([input_ids, self.new_ids], dim=1)


def test_generate_batch_decodes_only_the_new_tokens_up_to_eos(tiny_tokenizer):
    eos, end_of_turn = tiny_tokenizer.eos_token_id, 2
    hello, world = (tiny_tokenizer.encode(word, add_special_tokens=False) for word in ("Hello", " world"))
    new_ids = [hello + world + [eos], hello + [eos] + world, world + [end_of_turn] + hello]
    width = max(len(row) for row in new_ids)
    policy = FakePolicy([row + [eos] * (width - len(row)) for row in new_ids], end_of_turn)
    prompts = torch.tensor([[eos, 5, 6], [7, 8, 9], [7, 8, 9]])  # row 0 is left-padded
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    texts = sampling.generate_batch(policy, tiny_tokenizer, prompts, mask, max_length=20, top_p=0.9)
    assert texts == ["Hello world", "Hello", " world"]
    # The budget counts the padded prompt; only nucleus sampling (no top-k) at temperature 1; generation stops at
    # the tokenizer's EOS and at the model's own EOS ids.
    assert policy.kwargs["max_new_tokens"] == 17
    assert {k: policy.kwargs[k] for k in ("do_sample", "top_p", "top_k", "temperature", "eos_token_id")} == \
        {"do_sample": True, "top_p": 0.9, "top_k": 0, "temperature": 1.0, "eos_token_id": [eos, end_of_turn]}


def test_samples_round_trip_through_compare(run_dir, cli_samples, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-secret")
    results = tmp_path / "results.jsonl"
    with JudgeServer() as server:
        argv = ["-f", str(cli_samples[1]), "-r", str(results), "--base_url", server.base_url, "-st", "0",
                "--no-verbose", "--judgments_file", str(tmp_path / "judgments.jsonl")]
        assert compare.main(argv) == 0
    assert len(server.requests) == N_SAMPLES
    [line] = [json.loads(text) for text in results.read_text().splitlines()]
    assert (line["total"], line["exp_name"]) == (N_SAMPLES, "tiny")
    assert len(line["candidate"]["lengths"]) == len(line["baseline"]["lengths"]) == N_SAMPLES
    assert line["config"]["local_run_dir"] == str(run_dir)  # compare.py counted lengths with the run's tokenizer


def test_ppo_eval_mode_loads_the_value_head(tmp_path):
    """The value head's weights live in v_head.pt beside policy.pt; without them the critic metrics would come from
    a freshly initialised head and differ from the final evaluation training stored."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        config = compose(config_name="config", overrides=[
            *[o for o in TRAIN if not o.startswith("loss=")], "loss=ppo", f"cache_dir={tmp_path}"])
    train(config, "ppo")
    output = run_eval(tmp_path / "tiny", "++mode=eval", "++n_eval_examples=8", f"++samples_dir={tmp_path}")
    metrics = json.loads(output.read_text())["metrics"]
    stored = checkpoint_info(tmp_path / "tiny" / "LATEST")["metrics"]
    for key in ("loss_eval/critic", "val_eval/mean", "loss_eval/total"):
        assert metrics[key] == pytest.approx(stored[key], rel=1e-5), key


def test_a_copied_run_directory_is_evaluated_from_its_own_files(run_dir, cli_samples, tmp_path):
    """config.yaml records absolute paths of the original run (cache_dir was absolute); a copy must not silently
    read the original's checkpoint: with its own LATEST broken it fails, naming the copy."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert Path(saved.saved_policy).is_absolute() and saved.saved_policy.startswith(str(run_dir))
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    again = run_eval(copy, *SAMPLE, f"++samples_dir={tmp_path / 'a'}")
    assert read_samples(again) == read_samples(cli_samples[1])
    (copy / "LATEST" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(HalosError, match=f"{copy / 'LATEST'}"):
        run_eval(copy, *SAMPLE, f"++samples_dir={tmp_path / 'b'}")



def test_several_samples_per_prompt_in_one_call_resume_exactly(run_dir, tmp_path, monkeypatch):
    args = ("++mode=sample", "++n_samples=4", SHORT, "++model.eval_batch_size=2", "++num_samples_per_prompt=3",
            "++sample_split=train", "++sampler=hf")
    sizes = count_generated_rows(monkeypatch)
    whole = read_samples(run_eval(run_dir, *args, f"++samples_dir={tmp_path / 'whole'}"))
    assert sizes == [2, 2]  # one generate call per batch of prompts, each prompt drawn 3 times in it
    assert [(s["prompt_id"], s["sample_index"]) for s in whole] == [(p, k) for p in range(4) for k in range(3)]
    assert all(len({s["prompt"] for s in whole[3 * p:3 * p + 3]}) == 1 for p in range(4))
    assert all(s["prompt_messages"] and s["prompt_messages"][-1]["role"] == "user" for s in whole)
    assert len({s["policy"] for s in whole}) > 4  # the samples of one prompt are separate draws
    count_generated_rows(monkeypatch, fail_after_batches=1)
    with pytest.raises(Interrupted):
        run_eval(run_dir, *args, f"++samples_dir={tmp_path / 'resumed'}")
    count_generated_rows(monkeypatch)
    assert read_samples(run_eval(run_dir, *args, f"++samples_dir={tmp_path / 'resumed'}")) == whole


def test_vllm_sampling_where_it_can_run(run_dir, tmp_path):
    from vllm_sampling import vllm_unavailable

    if vllm_unavailable():
        with pytest.raises(HalosError, match="sampler=vllm: .*use sampler=hf"):
            run_eval(run_dir, "++mode=sample", "++n_samples=2", SHORT, "++sampler=vllm",
                     f"++samples_dir={tmp_path}")
        pytest.skip(f"vLLM sampling not tested: {vllm_unavailable()}")
    samples = read_samples(run_eval(run_dir, "++mode=sample", "++n_samples=2", SHORT, "++sampler=vllm",
                                    "++num_samples_per_prompt=2", f"++samples_dir={tmp_path}"))
    assert [(s["prompt_id"], s["sample_index"]) for s in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
