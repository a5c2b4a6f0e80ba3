"""Sample from a trained policy, compute its eval metrics, or export AlpacaEval outputs.

    python eval.py --config-path=RUN_DIR ++mode=sample ++n_samples=512 ++model.eval_batch_size=32 ++samples_dir=samples/
    python eval.py --config-path=RUN_DIR ++mode=eval ++n_eval_examples=null
    python eval.py --config-path=RUN_DIR ++mode=alpacaeval

RUN_DIR is a run directory written by train.py (its config.yaml is the config; a relative RUN_DIR is taken from
the working directory). Outputs go to samples_dir: `{exp_name}.json` (sample), `{exp_name}.eval.json` (eval),
`alpaca_{exp_name}.json` (alpacaeval). Sampling resumes after an interruption: rerun the same command.
Formats and differences from the original: docs/evaluation.md.
"""
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import hydra
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from builders import build_dataloader, build_eval_loader, build_models
from checkpoints import POLICY, load_weights
from configuration import CONFIG_DIR, CONFIG_GROUPS, is_positive_int, unknown_keys, yaml_keys
from dataloader import DataLoader
from errors import HalosError
from models import control_tokens, from_pretrained, grow_embeddings, load_causal_lm, load_tokenizer
from resolve import resolve_class, resolve_path
from sampling import PartialSamples, sample_resumably
from utils import formatted_dict, register_resolvers

register_resolvers()

MODES = ("sample", "eval", "alpacaeval")
# The saved config has no hydra section: without these Hydra would write outputs/<date>/ and a log file.
HYDRA_OVERRIDES = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")
# Keys that may differ between the interrupted run and its resumption.
RESUME_FREE_KEYS = ("n_samples", "samples_dir")


class EvalError(HalosError):
    """A bad eval.py invocation or config; the message is one line."""


# --- command line --------------------------------------------------------------------------------------------


def split_config_path(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    """The value of --config-path (or -cp), None if absent, and argv without that option."""
    for i, arg in enumerate(argv):
        for flag in ("--config-path", "-cp"):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1], argv[:i] + argv[i + 2:]
            if arg.startswith(flag + "="):
                return arg[len(flag) + 1:], argv[:i] + argv[i + 1:]
    return None, argv


def prepare_argv(argv: List[str]) -> List[str]:
    """Hydra's argv for eval.py: the run directory checked and made absolute, Hydra's own outputs switched off.

    Hydra resolves a relative --config-path against the script's directory; users mean the working directory.
    Hydra keys that the command line sets itself are left to it.
    """
    value, rest = split_config_path(argv)
    if value is None:
        raise EvalError("eval.py needs --config-path=RUN_DIR, the run directory written by train.py")
    run_dir = Path(value).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        what = "has no config.yaml" if run_dir.is_dir() else "does not exist"
        raise EvalError(f"--config-path {value} {what}; pass a run directory written by train.py "
                        f"(<cache_dir>/<exp_name>)")
    user_keys = {arg.lstrip("+~").split("=", 1)[0] for arg in rest[1:]}
    hydra_overrides = [override for override in HYDRA_OVERRIDES if override.split("=", 1)[0] not in user_keys]
    return rest[:1] + [f"--config-path={run_dir}"] + rest[1:] + hydra_overrides


# --- config --------------------------------------------------------------------------------------------------


def saved_policy_problem(config: DictConfig) -> Optional[str]:
    if config.saved_policy is None:
        return None
    location = resolve_path(str(config.saved_policy), config.cache_dir)
    if location is None:
        return (f"saved_policy: {config.saved_policy} not found (looked under cache_dir={config.cache_dir} and the "
                f"working directory); pass ++saved_policy=null to use the base model")
    if location.is_dir() and not (location / "config.json").is_file():
        return (f"saved_policy: {location} is a directory without config.json; expected a policy.pt checkpoint "
                f"or a Hugging Face model directory")
    return None


def config_problems(config: DictConfig) -> List[str]:
    """Every problem of an eval-time config, each as `key: message`."""
    if config.get("mode") not in MODES:
        return [f"mode: expected one of {', '.join(MODES)} (e.g. ++mode=sample), got {config.get('mode')!r}"]
    problems = [f"{key}: required but not set" for key in sorted(OmegaConf.missing_keys(config))]
    problems += unknown_keys("", config.keys(), yaml_keys(CONFIG_DIR / "config.yaml") | CONFIG_GROUPS)
    problems += unknown_keys("model.", config.model.keys(), yaml_keys(CONFIG_DIR / "model" / "base_model.yaml"))
    if config.n_samples is not None and not is_positive_int(config.n_samples):
        problems.append(f"n_samples: expected a positive integer or null (all test prompts), got {config.n_samples!r}")
    if config.n_eval_examples is not None and not is_positive_int(config.n_eval_examples):
        problems.append(f"n_eval_examples: expected a positive integer or null, got {config.n_eval_examples!r}")
    if not is_positive_int(config.model.eval_batch_size):
        problems.append(f"model.eval_batch_size: expected a positive integer, got {config.model.eval_batch_size!r}")
    if not isinstance(config.top_p, (int, float)) or not 0 < config.top_p <= 1:
        problems.append(f"top_p: expected a number in (0, 1], got {config.top_p!r}")
    if config.mode == "eval" and config.model.load_from is not None \
            and resolve_path(str(config.model.load_from), config.cache_dir) is None:
        problems.append(f"model.load_from: {config.model.load_from} not found (looked under "
                        f"cache_dir={config.cache_dir} and the working directory)")
    return problems + list(filter(None, [saved_policy_problem(config)]))


def check_config(config: DictConfig) -> None:
    problems = config_problems(config)
    if problems:
        raise EvalError("; ".join(problems))


# --- models --------------------------------------------------------------------------------------------------


def eval_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_run_tokenizer(config: DictConfig):
    """The tokenizer training saved in local_run_dir (with any added tokens), else the model's."""
    run_dir = Path(config.local_run_dir)
    if not (run_dir / "tokenizer_config.json").is_file():
        print(f"no tokenizer saved in {run_dir}; using the model's")
        return load_tokenizer(config.model, control_tokens(config.loss))
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, str(run_dir), "local_run_dir")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def load_policy(config: DictConfig, tokenizer, base: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """The policy to evaluate: `base` (default: model.name_or_path) with saved_policy's weights.

    saved_policy may also be a Hugging Face model directory, which then replaces the base model; null keeps the
    base model as it is.
    """
    location = None if config.saved_policy is None else resolve_path(str(config.saved_policy), config.cache_dir)
    if location is not None and location.is_dir():
        print(f"loading the policy from the Hugging Face model directory {location}")
        hf_model = OmegaConf.merge(config.model, {"name_or_path": str(location), "from_config": False})
        return load_causal_lm(hf_model, config.model.policy_dtype, config.seed)
    policy = base if base is not None else load_causal_lm(config.model, config.model.policy_dtype, config.seed)
    if location is None:
        print("saved_policy is null: using the base model")
        return policy
    grow_embeddings(policy, len(tokenizer))  # a run that added tokens saved grown embeddings
    info = load_weights(policy, location)
    print(f"loaded the policy from {location} (trained on {info['step_idx']} examples)")
    return policy


def load_companion_weights(trainer, config: DictConfig) -> None:
    """Loads the files saved beside saved_policy's policy.pt into the trainer's other modules (PPO's v_head.pt)."""
    location = None if config.saved_policy is None else resolve_path(str(config.saved_policy), config.cache_dir)
    if location is None:
        return
    checkpoint_dir = location if location.is_dir() else location.parent
    for filename, module in trainer.checkpoint_modules().items():
        if filename != POLICY and (checkpoint_dir / filename).exists():
            load_weights(module, checkpoint_dir / filename)
            print(f"loaded {filename} from {checkpoint_dir}")


# --- modes ---------------------------------------------------------------------------------------------------


def write_json(path: Path, content: Any) -> None:
    """Writes JSON via a temporary file, so a crash never leaves a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


def plain_config(config: DictConfig) -> dict:
    return OmegaConf.to_container(config, resolve=True)


def prompt_loader(config: DictConfig, tokenizer, datasets: List[str], n_prompts: Optional[int]) -> DataLoader:
    """The test prompts of `datasets` in the seed's order, one per batch, each prompt once.

    The SFT loader is used whatever the loss, so every model of a comparison sees the same prompts; csft runs get
    the chosen control token appended to each prompt. Batches of one keep the prompts the loader would drop as an
    incomplete last batch.
    """
    sft_config = OmegaConf.merge(config, {"datasets": datasets, "loss": {"dataloader": "SFTDataLoader"}})
    return build_dataloader(sft_config, tokenizer, "test", batch_size=1, n_epochs=1, n_examples=n_prompts)


def elements_of(loader: DataLoader) -> Iterator[dict]:
    """The un-collated element dicts of a loader whose batches hold one example (so nothing is padded)."""
    for batch in loader:
        yield {key: value[0].tolist() if isinstance(value, torch.Tensor) else value[0] for key, value in batch.items()}


def sample_prompts(config: DictConfig, tokenizer, policy: torch.nn.Module, datasets: List[str],
                   n_prompts: Optional[int], partial_path: Path) -> List[dict]:
    """Samples the policy on the first `n_prompts` test prompts (all if None), resuming from `partial_path`."""
    loader = prompt_loader(config, tokenizer, datasets, n_prompts)
    total = loader.total_examples
    if n_prompts is not None and total < n_prompts:
        print(f"the test split of {'+'.join(datasets)} has {total} prompts; sampling all of them")
    settings = {k: v for k, v in plain_config(config).items() if k not in RESUME_FREE_KEYS}
    partial = PartialSamples(partial_path, settings)
    if partial.rows:
        print(f"resuming: {sum(i in partial.rows for i in range(total))} of {total} samples are in {partial_path}")
    return sample_resumably(policy, tokenizer, elements_of(loader), partial, total=total,
                            batch_size=config.model.eval_batch_size, max_length=config.model.max_length,
                            top_p=config.top_p, seed=config.seed)


def run_sample(config: DictConfig, tokenizer, policy: torch.nn.Module) -> Path:
    samples_dir = Path(config.samples_dir)
    partial_path = samples_dir / f"{config.exp_name}.partial.jsonl"
    samples = sample_prompts(config, tokenizer, policy, list(config.datasets), config.n_samples, partial_path)
    output = samples_dir / f"{config.exp_name}.json"
    write_json(output, {"sampled_at": str(datetime.now()), "config": plain_config(config),
                        "samples": [{key: s[key] for key in ("prompt", "chosen", "policy")} for s in samples]})
    partial_path.unlink()
    return output


def run_alpacaeval(config: DictConfig, tokenizer, policy: torch.nn.Module) -> Path:
    samples_dir = Path(config.samples_dir)
    partial_path = samples_dir / f"alpaca_{config.exp_name}.partial.jsonl"
    samples = sample_prompts(config, tokenizer, policy, ["alpacaeval"], None, partial_path)
    output = samples_dir / f"alpaca_{config.exp_name}.json"
    write_json(output, [{"instruction": s["original_prompt"], "output": s["policy"].strip(),
                         "reference": s["chosen"].strip(), "generator": config.exp_name} for s in samples])
    partial_path.unlink()
    return output


def run_eval(config: DictConfig, tokenizer) -> Path:
    """The loss's eval metrics of the policy (reference model built as in training), written to JSON."""
    device = eval_device()
    loader = build_eval_loader(config, tokenizer, config.model.eval_batch_size)
    trainer_cls = resolve_class(config.loss.trainer, "trainers")
    policy, reference = build_models(config, device, len(tokenizer))
    # saved_policy holds the causal LM's weights; the trainer's wrapper (PPO's value head) goes around it after.
    policy = trainer_cls.wrap_policy(load_policy(config, tokenizer, base=policy)).to(device)
    trainer = trainer_cls(tokenizer, config, None, loader, policy, reference, rank=0, world_size=1, device=device)
    load_companion_weights(trainer, config)
    metrics = trainer.evaluate()
    print(f"eval metrics: {formatted_dict(metrics)}")
    output = Path(config.samples_dir) / f"{config.exp_name}.eval.json"
    write_json(output, {"evaluated_at": str(datetime.now()), "config": plain_config(config), "metrics": metrics})
    return output


def run(config: DictConfig) -> Path:
    """Runs eval.py's `config.mode` on a composed run config and returns the file it wrote."""
    check_config(config)
    print(OmegaConf.to_yaml(config))
    transformers.set_seed(config.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = load_run_tokenizer(config)
    if config.mode == "eval":
        output = run_eval(config, tokenizer)
    else:
        policy = load_policy(config, tokenizer).to(eval_device())
        output = (run_sample if config.mode == "sample" else run_alpacaeval)(config, tokenizer, policy)
    print(f"wrote {output}")
    return output


@hydra.main(version_base=None, config_path=None, config_name="config")
def main(config: DictConfig) -> None:
    try:
        run(config)
    except HalosError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv) and split_config_path(sys.argv)[0] is None:
        print(__doc__)
        sys.exit(0)
    try:
        sys.argv = prepare_argv(sys.argv)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    main()
