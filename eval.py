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
from typing import Any, Iterable, Iterator, List, Optional, Tuple

import hydra
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

import weights
from builders import build_dataloader, build_eval_loader, build_models
from cli import override_key, start, widen_overrides
from configuration import validate_eval_config
from console import format_metrics, route_project_logs
from dataloader import DataLoader
from distributed import choose_cpu_threads
from errors import HalosError
from lora import without_quantization
from models import control_tokens, from_pretrained, load_tokenizer
from resolve import resolve_class
from sampling import HFGenerator, PartialSamples, sample_resumably, stop_token_ids
from utils import register_resolvers
from vllm_sampling import VLLMGenerator, resolve_sampler

register_resolvers()

# The saved config has no hydra section: without these Hydra would write outputs/<date>/ and a log file.
HYDRA_OVERRIDES = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")
# Keys that may differ between the interrupted run and its resumption.
RESUME_FREE_KEYS = ("n_samples", "samples_dir")
SAMPLE_KEYS = ("prompt", "prompt_id", "sample_index", "prompt_messages", "chosen", "policy")  # a sample file's rows
# Paths a saved config holds inside its run directory; eval.py reads them inside the directory it was given.
RUN_PATH_KEYS = ("saved_policy",)


class EvalError(HalosError):
    """A bad eval.py invocation; the message is one line."""


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
    """Hydra's argv for eval.py: the run directory checked and made absolute, plain overrides widened to `++` (so a
    misspelt key reaches the config check, cli.widen_overrides), Hydra's own outputs switched off.

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
    user_keys = {override_key(arg) for arg in rest[1:]}
    hydra_overrides = [override for override in HYDRA_OVERRIDES if override.split("=", 1)[0] not in user_keys]
    return rest[:1] + [f"--config-path={run_dir}"] + widen_overrides(rest[1:], groups=()) + hydra_overrides


# --- the run directory ---------------------------------------------------------------------------------------


def relocate_run(config: DictConfig, run_dir: Path) -> None:
    """Points the config's run paths at `run_dir`, the directory eval.py was given.

    config.yaml records where the run was written (local_run_dir, and saved_policy inside it, absolute when
    cache_dir was): a copied or moved run directory would otherwise be evaluated with the original's checkpoint
    and tokenizer. A path the user set elsewhere (saved_policy outside the run) is kept.
    """
    saved_run_dir = Path(str(config.local_run_dir))
    config.local_run_dir = str(run_dir)
    for key in RUN_PATH_KEYS:
        value = config[key]
        if value is None:
            continue
        path = Path(str(value))
        inside = [path.relative_to(base) for base in (saved_run_dir, saved_run_dir.absolute())
                  if path.is_relative_to(base)]
        if inside:
            config[key] = str(run_dir / inside[0])


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


def policy_weights(config: DictConfig) -> Optional[weights.Weights]:
    """The policy to evaluate: saved_policy; when that is null, in eval mode the model training started from
    (model.load_from, as the reference model), in the sampling modes the bare model.name_or_path (None), as in the
    original."""
    if config.saved_policy is not None:
        return weights.locate_in_config(config, "saved_policy")
    print("saved_policy is null: using the base model")
    return weights.locate_in_config(config, "model.load_from") if config.mode == "eval" else None


def load_policy(config: DictConfig, tokenizer) -> torch.nn.Module:
    """The policy to sample: saved_policy's weights, in full precision (a LoRA checkpoint's adapters merged into
    the model training started from, model.load_from)."""
    located = policy_weights(config)
    policy = weights.load_model(located, without_quantization(config.model), config.model.policy_dtype, config.seed,
                                len(tokenizer), base=weights.locate_in_config(config, "model.load_from"))
    print(f"policy: {located.path if located is not None else config.model.name_or_path}")
    return policy


def build_generator(config: DictConfig, tokenizer):
    """What samples: Hugging Face generate (sampler=hf), or vLLM (vllm; auto where vLLM can run) on a Hugging Face
    directory of the policy: its export, the base model's directory, or an export written for it to samples_dir."""
    if config.sampler == "hf":
        return HFGenerator(load_policy(config, tokenizer).to(eval_device()))
    located = policy_weights(config)
    if located is not None and isinstance(located.format, weights.HuggingFaceDirectory):
        model_dir = located.path
    elif located is None and not config.model.from_config:
        model_dir = Path(config.model.name_or_path)
    else:
        model_dir = Path(config.samples_dir) / f".vllm-{config.exp_name}"
        load_policy(config, tokenizer).save_pretrained(model_dir)
    stop_ids = stop_token_ids(transformers.GenerationConfig.from_model_config(
        transformers.AutoConfig.from_pretrained(model_dir)), tokenizer)
    return VLLMGenerator(model_dir, str(config.local_run_dir), config.model.policy_dtype, config.seed, stop_ids)


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
    """The prompts of `datasets`' sample_split (test by default) in the seed's order, one per batch, each once.

    The SFT loader is used whatever the loss, so every model of a comparison sees the same prompts; csft runs get
    the chosen control token appended to each prompt. Batches of one keep the prompts the loader would drop as an
    incomplete last batch.
    """
    sft_config = OmegaConf.merge(config, {"datasets": datasets, "loss": {"dataloader": "SFTDataLoader"}})
    return build_dataloader(sft_config, tokenizer, str(config.sample_split), batch_size=1, n_epochs=1,
                            n_examples=n_prompts)


def elements_of(loader: DataLoader) -> Iterator[dict]:
    """The un-collated element dicts of a loader whose batches hold one example (so nothing is padded)."""
    for batch in loader:
        yield {key: value[0].tolist() if isinstance(value, torch.Tensor) else value[0] for key, value in batch.items()}


def sample_prompts(config: DictConfig, tokenizer, generator, datasets: List[str], n_prompts: Optional[int],
                   partial_path: Path) -> List[dict]:
    """Samples num_samples_per_prompt responses to each of the first `n_prompts` prompts (all if None), resuming
    from `partial_path`."""
    loader = prompt_loader(config, tokenizer, datasets, n_prompts)
    total = loader.total_examples
    if n_prompts is not None and total < n_prompts:
        print(f"the {config.sample_split} split of {'+'.join(datasets)} has {total} prompts; sampling all of them")
    settings = {k: v for k, v in plain_config(config).items() if k not in RESUME_FREE_KEYS}
    partial = PartialSamples(partial_path, settings)
    n = config.num_samples_per_prompt
    if partial.rows:
        print(f"resuming: {sum(i * n in partial.rows for i in range(total))} of {total} prompts are sampled in "
              f"{partial_path}")
    return sample_resumably(generator, tokenizer, elements_of(loader), partial, total=total,
                            batch_size=config.model.eval_batch_size, max_length=config.model.max_length,
                            top_p=config.top_p, seed=config.seed, num_samples=n)


def run_sample(config: DictConfig, tokenizer, generator) -> Path:
    samples_dir = Path(config.samples_dir)
    partial_path = samples_dir / f"{config.exp_name}.partial.jsonl"
    samples = sample_prompts(config, tokenizer, generator, list(config.datasets), config.n_samples, partial_path)
    output = samples_dir / f"{config.exp_name}.json"
    write_json(output, {"sampled_at": str(datetime.now()), "config": plain_config(config),
                        "samples": [{key: s[key] for key in SAMPLE_KEYS} for s in samples]})
    partial_path.unlink()
    return output


def run_alpacaeval(config: DictConfig, tokenizer, generator) -> Path:
    samples_dir = Path(config.samples_dir)
    partial_path = samples_dir / f"alpaca_{config.exp_name}.partial.jsonl"
    samples = sample_prompts(config, tokenizer, generator, ["alpacaeval"], None, partial_path)
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
    located = policy_weights(config)
    policy, reference = build_models(config, device, len(tokenizer), trainer_cls.wrap_policy, policy_weights=located)
    trainer = trainer_cls(tokenizer, config, None, loader, policy, reference, rank=0, world_size=1, device=device)
    if located is not None:
        for name in weights.load_companions(trainer.checkpoint_modules(), located):  # PPO's v_head.pt
            print(f"loaded {name} from {located.directory}")
    metrics = trainer.evaluate()
    print(f"eval metrics: {format_metrics(metrics)}")
    output = Path(config.samples_dir) / f"{config.exp_name}.eval.json"
    write_json(output, {"evaluated_at": str(datetime.now()), "config": plain_config(config), "metrics": metrics})
    return output


def run(config: DictConfig, run_dir: Optional[Path] = None, command_line_keys: Iterable[str] = ()) -> Path:
    """Runs eval.py's `config.mode` on a run's saved config (with the command line's overrides) and returns the file
    it wrote. `run_dir` is the directory the config was read from: the run's paths are taken inside it."""
    if run_dir is not None:
        relocate_run(config, run_dir)
    for warning in validate_eval_config(config, command_line_keys):
        print(f"warning: {warning}")
    print(OmegaConf.to_yaml(config))
    print(choose_cpu_threads())
    transformers.set_seed(config.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = load_run_tokenizer(config)
    if config.mode == "eval":
        output = run_eval(config, tokenizer)
    else:
        config.sampler = resolve_sampler(str(config.sampler))  # the sample file records which one sampled
        print(f"sampler: {config.sampler}")
        output = (run_sample if config.mode == "sample" else run_alpacaeval)(config, tokenizer,
                                                                             build_generator(config, tokenizer))
    print(f"wrote {output}")
    return output


@hydra.main(version_base=None, config_path=None, config_name="config")
def main(config: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    run_dir = next(Path(source.path) for source in hydra_config.runtime.config_sources if source.provider == "main")
    route_project_logs()
    try:
        run(config, run_dir, {override_key(o) for o in hydra_config.overrides.task})
    except HalosError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # With a run directory, --help is Hydra's (the run's config); without one, this module's usage.
    start(main, prepare_argv, help_text=__doc__ if split_config_path(sys.argv)[0] is None else None)
