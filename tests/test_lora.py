"""LoRA (model.use_peft): only the adapters train, the reference model is the policy with its adapters disabled and
computes exactly the base model's log-probs, checkpoints hold the adapters and resume bit for bit, the final one
also holds a merged model with the adapted model's logits, eval.py reads either, load_lora_from continues training,
and QLoRA without a GPU is one line. 1 vs 2 processes under FSDP: tests/test_distributed.py."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import checkpoints
import eval as eval_py
import lora
import trainers
import weights
from checkpoints import checkpoint_info, load_checkpoint
from configuration import ConfigError, validate_train_config
from models import load_causal_lm
from train import train

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE_IDS = torch.arange(2, 50).reshape(3, 16)  # (3, 16) token ids to compare logits on
# 32 examples in batches of 4, 2 micro-batches per optimizer step (4 steps); evaluations at 0, 16 and 32; a
# resumable LATEST every 8 examples and step-16. lr=1e-3: LoRA's B starts at 0 and must move well beyond rounding.
RUN = ("model=tiny", "datasets=[hh]", "mode=train", "wandb.enabled=false", "lr=1e-3", "warmup_steps=2",
       "n_epochs=null", "n_examples=32", "n_eval_examples=4", "eval_every=16", "model.batch_size=4",
       "model.eval_batch_size=4", "model.gradient_accumulation_steps=2", "model.max_length=64",
       "model.max_prompt_length=32", "minimum_log_interval_secs=0", "checkpoint_every=8",
       "intermediate_checkpoints=true", "model.use_peft=true", "model.peft.r=4", "model.peft.alpha=8")


def compose_run(cache_dir: Path, exp_name: str, loss: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        return compose(config_name="config", overrides=[*RUN, f"loss={loss}", f"cache_dir={cache_dir}",
                                                         f"exp_name={exp_name}", *overrides])


def keep_trainers(monkeypatch) -> list:
    """The trainer of every train() run from now on, with `initial_state`: a copy of its policy's state dict before
    training."""
    kept, real = [], trainers.BasicTrainer.train

    def keeping(self, resume_from=None):
        self.initial_state = {k: v.clone() for k, v in self.policy.state_dict().items()}
        kept.append(self)
        return real(self, resume_from)

    monkeypatch.setattr(trainers.BasicTrainer, "train", keeping)
    return kept


def record_evaluations(monkeypatch) -> list:
    """The metrics of every evaluation from now on, in order."""
    seen, real = [], trainers.BasicTrainer.evaluate

    def recording(self):
        seen.append(real(self))
        return seen[-1]

    monkeypatch.setattr(trainers.BasicTrainer, "evaluate", recording)
    return seen


def base_model(config) -> torch.nn.Module:
    """The tiny model as a LoRA run builds its base: seeded random weights, float32."""
    return load_causal_lm(config.model, "float32", config.seed)


def adapter_tensors(checkpoint_dir: Path) -> dict:
    return load_file(checkpoint_dir / lora.ADAPTER_DIR / lora.ADAPTER_WEIGHTS)


def base_name(parameter_name: str) -> str:
    """The base model's name of a frozen parameter of the peft model."""
    return parameter_name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """(run directory, its trainer after training, its evaluations) of an uninterrupted LoRA DPO run."""
    cache_dir = tmp_path_factory.mktemp("lora")
    with pytest.MonkeyPatch.context() as monkeypatch:
        kept, evaluations = keep_trainers(monkeypatch), record_evaluations(monkeypatch)
        train(compose_run(cache_dir, "dpo", "dpo"), "dpo")
    return cache_dir / "dpo", kept[0], evaluations


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_lora_trains_only_the_adapters(loss, dpo_run, tmp_path, monkeypatch):
    if loss == "dpo":
        run_dir, trainer, _ = dpo_run
    else:
        kept = keep_trainers(monkeypatch)
        train(compose_run(tmp_path, loss, loss), loss)
        run_dir, trainer = tmp_path / loss, kept[0]
    base = base_model(trainer.config).state_dict()
    adapters = {name: p for name, p in trainer.policy.named_parameters() if "lora_" in name}
    assert adapters and all(p.requires_grad for p in adapters.values())
    frozen = {name: p for name, p in trainer.policy.named_parameters() if name not in adapters}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    for name, parameter in frozen.items():
        assert torch.equal(parameter, base[base_name(name)]), f"{name} changed"
    # B starts at 0; trained, every adapter's B moved far beyond rounding.
    assert min(p.abs().max().item() for name, p in adapters.items() if "lora_B" in name) > 1e-3
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == \
        {id(p) for p in adapters.values()}
    assert (run_dir / "LATEST" / lora.ADAPTER_DIR / lora.ADAPTER_WEIGHTS).is_file()


def test_the_reference_is_the_policy_without_adapters_and_equals_the_base_model_exactly(dpo_run):
    _, trainer, _ = dpo_run
    reference = trainer.reference_model
    assert isinstance(reference, lora.AdapterFreeReference) and not isinstance(reference, torch.nn.Module)
    assert reference.policy is trainer.policy, "no second copy of the weights"
    base = base_model(trainer.config)
    batch = trainer.eval_batches[0]
    with torch.no_grad():
        from_reference, from_base, from_policy = (trainer.forward(model, batch)
                                                  for model in (reference, base, trainer.policy))
    for side in ("chosen", "rejected"):
        assert torch.equal(getattr(from_reference, side).logps, getattr(from_base, side).logps)
        assert not torch.allclose(getattr(from_policy, side).logps, getattr(from_base, side).logps, atol=1e-3)


def test_checkpoints_hold_the_adapters_and_the_final_one_a_merged_model(dpo_run):
    run_dir, trainer, _ = dpo_run
    step = run_dir / "step-16"
    assert {p.name for p in step.iterdir()} >= {lora.ADAPTER_DIR, "trainer_state.pt"}
    assert {p.name for p in (step / lora.ADAPTER_DIR).iterdir()} == {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS}
    assert not (step / "policy.pt").exists() and not (step / "model.safetensors").exists()
    assert weights.find_weights(step).format is weights.ADAPTERS
    latest = run_dir / "LATEST"
    assert {p.name for p in latest.iterdir()} >= {lora.ADAPTER_DIR, "config.json", "model.safetensors"}
    adapters = latest / lora.ADAPTER_DIR
    assert json.loads((adapters / lora.ADAPTER_CONFIG).read_text())["r"] == 4
    saved = adapter_tensors(latest)
    assert len(saved) == 2 * 7 * 2  # A and B of the 7 linear layers of each of the 2 blocks
    # The files are peft's: PeftModel.from_pretrained gives the trained policy's logits bit for bit.
    adapted = PeftModel.from_pretrained(base_model(trainer.config), str(adapters))
    merged = AutoModelForCausalLM.from_pretrained(latest)
    with torch.no_grad():
        adapted_logits = adapted(PROBE_IDS, use_cache=False).logits
        assert torch.equal(adapted_logits, trainer.policy(PROBE_IDS, use_cache=False).logits)
        # Merging adds (alpha/r)·B·A into each float32 weight: a few float32 roundings of logits of size ~1.
        merged_logits = merged(PROBE_IDS, use_cache=False).logits
        torch.testing.assert_close(merged_logits, adapted_logits, rtol=0, atol=1e-5)
        base_logits = base_model(trainer.config)(PROBE_IDS, use_cache=False).logits
    assert (merged_logits - base_logits).abs().max() > 1e-2, "the merged model is the trained one, not the base"


def test_a_crashed_lora_run_resumes_bitwise(dpo_run, tmp_path, monkeypatch):
    """A crash in the 6th batch: LATEST holds the adapters and the optimizer state of the adapters only; resuming
    reaches the uninterrupted run's adapters, merged model and counters exactly."""
    run_dir = dpo_run[0]
    real = trainers.BasicTrainer.train_on_batch

    def crash_in_batch_6(self, batch, metrics, pending):
        if self.batch_counter == 5:
            raise KeyboardInterrupt("crash")
        return real(self, batch, metrics, pending)

    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", crash_in_batch_6)
    with pytest.raises(KeyboardInterrupt):
        train(compose_run(tmp_path, "dpo", "dpo"), "dpo")
    latest = tmp_path / "dpo" / "LATEST"
    assert checkpoints.read_trainer_state(latest)["example_counter"] == 16
    assert not (latest / "policy.pt").exists() and not (latest / "model.safetensors").exists()
    optimizer_state = load_checkpoint(latest / "optimizer.pt")["state"]["state"]
    assert optimizer_state and all("lora_" in name for name in optimizer_state)
    monkeypatch.setattr(trainers.BasicTrainer, "train_on_batch", real)
    train(compose_run(tmp_path, "dpo", "dpo", "resume_from=auto"), "dpo")
    resumed, uninterrupted = (adapter_tensors(d / "LATEST") for d in (tmp_path / "dpo", run_dir))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    merged, expected = (load_file(d / "LATEST" / "model.safetensors") for d in (tmp_path / "dpo", run_dir))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert checkpoint_info(tmp_path / "dpo" / "LATEST") == checkpoint_info(run_dir / "LATEST")


def test_load_lora_from_continues_training_the_saved_adapters(dpo_run, monkeypatch):
    """The new run starts from the saved adapters (its first evaluation is the old run's last, exactly) on the same
    base, with the same reference, and trains them further."""
    run_dir, _, evaluations = dpo_run
    seen = record_evaluations(monkeypatch)
    kept = keep_trainers(monkeypatch)
    train(compose_run(run_dir.parent, "continued", "dpo", "model.load_lora_from=dpo/LATEST", "n_examples=8"), "dpo")
    assert seen[0] == evaluations[-1]
    before, after = (adapter_tensors(d / "LATEST") for d in (run_dir, run_dir.parent / "continued"))
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4
    assert json.loads((run_dir.parent / "continued" / "LATEST" / lora.ADAPTER_DIR / lora.ADAPTER_CONFIG).read_text()
                      )["r"] == 4
    assert isinstance(kept[0].reference_model, lora.AdapterFreeReference)


def test_load_from_a_lora_checkpoint_starts_from_its_merged_adapters(dpo_run, tmp_path):
    """model.load_from may name an adapter directory: the policy (and reference) start from it merged."""
    run_dir, trainer, _ = dpo_run
    config = compose_run(tmp_path, "full", "dpo", "model.use_peft=false", f"model.load_from={run_dir / 'step-16'}")
    validate_train_config(config, "dpo")
    start = weights.locate_in_config(config, "model.load_from")
    merged = start.build(config.model, "float32", config.seed, 4096)
    adapted = PeftModel.from_pretrained(base_model(trainer.config), str(run_dir / "step-16" / lora.ADAPTER_DIR))
    with torch.no_grad():
        torch.testing.assert_close(merged(PROBE_IDS, use_cache=False).logits,
                                   adapted(PROBE_IDS, use_cache=False).logits, rtol=0, atol=1e-5)


def run_eval(run_dir: Path, *overrides: str) -> Path:
    """eval.run in this process on the run's saved config, as `eval.py --config-path=run_dir OVERRIDES` does."""
    with initialize_config_dir(config_dir=str(run_dir), version_base=None):
        config = compose(config_name="config", overrides=list(overrides))
    return eval_py.run(config, run_dir, {override.lstrip("+").split("=")[0] for override in overrides})


def test_eval_samples_from_adapters_or_the_merged_model_alike(dpo_run, tmp_path):
    """A directory holding only the adapters samples what the merged final model samples; eval mode rebuilds the
    adapter-free reference and reproduces training's final evaluation."""
    run_dir = dpo_run[0]
    adapters_only = tmp_path / "adapters"
    shutil.copytree(run_dir / "LATEST" / lora.ADAPTER_DIR, adapters_only)
    sample = ("++mode=sample", "++n_samples=3", "++model.max_length=96")
    from_adapters = run_eval(run_dir, *sample, f"++saved_policy={adapters_only}", f"++samples_dir={tmp_path / 'a'}")
    from_merged = run_eval(run_dir, *sample, f"++samples_dir={tmp_path / 'm'}")
    samples = [[s["policy"] for s in json.loads(path.read_text())["samples"]] for path in (from_adapters, from_merged)]
    assert samples[0] == samples[1] and len(samples[0]) == 3
    output = run_eval(run_dir, "++mode=eval", "++n_eval_examples=4", f"++samples_dir={tmp_path}")
    metrics = json.loads(output.read_text())["metrics"]
    stored = checkpoint_info(run_dir / "LATEST")["metrics"]
    assert metrics.keys() == stored.keys()
    for key in stored:
        assert metrics[key] == pytest.approx(stored[key], rel=1e-5, abs=1e-6), key


def test_ppo_trains_adapters_and_its_value_head_against_the_adapter_free_reference(tmp_path, monkeypatch):
    kept = keep_trainers(monkeypatch)
    train(compose_run(tmp_path, "ppo", "ppo", "n_examples=16"), "ppo")
    trainer = kept[0]
    latest = tmp_path / "ppo" / "LATEST"
    assert {p.name for p in latest.iterdir()} >= {"v_head.pt", lora.ADAPTER_DIR, "model.safetensors"}
    saved_head = load_checkpoint(latest / "v_head.pt")["state"]
    assert all(torch.equal(saved_head[k], v) for k, v in trainer.policy.v_head.state_dict().items())
    assert not torch.equal(saved_head["summary.0.weight"], trainer.initial_state["v_head.summary.0.weight"])
    base = base_model(trainer.config)
    for name, parameter in trainer.policy.pretrained_model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, base.state_dict()[base_name(name)])
    batch = trainer.eval_batches[0]
    with torch.no_grad():
        reference_logps, mask, _, _ = trainer.token_forward(trainer.reference_model, batch)
        base_logps, _, _, _ = trainer.token_forward(base, batch)
    assert torch.equal(reference_logps * mask, base_logps * mask)


def test_with_the_reference_cache_the_adapter_free_reference_runs_once_per_batch(tmp_path, monkeypatch):
    """The cache is filled by one reference pass over every train and eval batch; training and the later
    evaluations then run no reference pass at all."""
    calls = []
    real = lora.AdapterFreeReference.__call__
    monkeypatch.setattr(lora.AdapterFreeReference, "__call__",
                        lambda self, *args, **kwargs: calls.append(1) or real(self, *args, **kwargs))
    kept = keep_trainers(monkeypatch)
    train(compose_run(tmp_path, "cached", "dpo", "cache_reference_logprobs=true", "intermediate_checkpoints=false"),
          "dpo")
    trainer = kept[0]
    assert trainer.reference_model.filled and trainer.reference_model.model is None
    assert len(calls) == len(list(trainer.train_iterator)) + len(trainer.eval_batches) == 8 + 1


def test_lora_settings_are_checked_before_anything_loads(tmp_path):
    config = compose_run(tmp_path, "bad", "dpo", "model.peft.r=0", "model.peft.dropout=1", "++model.peft.rr=4",
                         "model.peft.target_modules=[]", "model.load_lora_from=nowhere")
    with pytest.raises(ConfigError) as info:
        validate_train_config(config, "dpo")
    for expected in ("model.peft.rr: unknown key (did you mean model.peft.r?)",
                     "model.peft.r: must be a positive integer, got 0", "model.peft.dropout: must be in [0, 1), got 1",
                     "model.peft.target_modules: expected all-linear, a module-name regex or a list of module names",
                     "model.load_lora_from: nowhere not found"):
        assert expected in str(info.value)
    config = compose_run(tmp_path, "bad", "dpo", "model.use_peft=false", f"model.load_lora_from={tmp_path}")
    with pytest.raises(ConfigError, match=r"^invalid config: model.load_lora_from: trains LoRA adapters; set "
                                          r"model.use_peft=true$"):
        validate_train_config(config, "dpo")
    config = compose_run(tmp_path, "bad", "dpo", f"model.load_lora_from={REPO_ROOT / 'assets' / 'tiny-llama'}")
    with pytest.raises(ConfigError, match="tiny-llama holds no LoRA adapters"):
        validate_train_config(config, "dpo")


def test_without_peft_installed_use_peft_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(lora, "peft", None)
    with pytest.raises(ConfigError, match=r"^invalid config: model.use_peft: needs the peft package: pip install "
                                          r"peft==0.21.2 \(the `peft` extra\)$"):
        validate_train_config(compose_run(tmp_path, "x", "dpo"), "dpo")


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA runs on a CUDA GPU")
def test_qlora_without_a_gpu_is_one_line(tmp_path):
    config = compose_run(tmp_path, "x", "dpo", "model.peft.load_in_4bit=true", "model.from_config=false")
    with pytest.raises(ConfigError) as info:
        validate_train_config(config, "dpo")
    assert str(info.value) == ("invalid config: model.peft.load_in_4bit: QLoRA needs a CUDA GPU and the bitsandbytes "
                               "package; this machine has no CUDA GPU (train LoRA in full precision with "
                               "model.peft.load_in_4bit=false)")
