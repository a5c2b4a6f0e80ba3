"""Turning a validated config into the objects a run needs: tokenizer, dataloaders, models, wandb."""
import functools
import netrc
import os
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

import dataloader
import lora
import weights
from checkpoints import TRAINER_STATE, checkpoint_info
from data_config import data_spec, loader_options
from distributed import rank0_print, shard_model, world_size
from hub import endpoint_reachable
from reference_cache import CachedReference, LogpStore, cache_fingerprint, cache_path
from resolve import resolve_class

WANDB_DEFAULT_URL = "https://api.wandb.ai"
WANDB_PROBE_SECONDS = 5.0  # a TCP connection to the wandb server must open within this...
WANDB_INIT_SECONDS = 30.0  # ...and wandb.init finish within this (wandb's default: 90 s of retries)


def build_dataloader(config: DictConfig, tokenizer, split: str, batch_size: int, n_epochs: Optional[int],
                     n_examples: Optional[int], kl_group_size: Optional[int] = None) -> dataloader.DataLoader:
    """The loss's dataloader class (loss.dataloader) over config.datasets for one split; prints its data report.
    Unpaired loaders pair KL rows within groups of kl_group_size examples (default: one batch)."""
    loader_cls = resolve_class(config.loss.dataloader, "dataloader")
    loader = loader_cls(data_spec(config, tokenizer, split), tokenizer, split,
                        loader_options(config, batch_size, n_epochs, n_examples, kl_group_size))
    rank0_print(str(loader.report))
    return loader


def build_eval_loader(config: DictConfig, tokenizer, batch_size: int) -> dataloader.DataLoader:
    """The test split, at most one pass of it: n_eval_examples examples, or all of them when it is null or larger
    (a warning then says so; examples are never repeated)."""
    loader = build_dataloader(config, tokenizer, "test", batch_size, 1, config.n_eval_examples)
    if config.n_eval_examples is not None and config.n_eval_examples > loader.examples_per_epoch:
        rank0_print(f"warning: n_eval_examples={config.n_eval_examples} exceeds the {loader.examples_per_epoch} "
                    f"examples of one pass over the test split ({loader.name}); evaluating on those, once each")
    return loader


def build_train_and_eval_loaders(config: DictConfig, tokenizer) -> Tuple[dataloader.DataLoader, dataloader.DataLoader]:
    # KL rows pair examples of the same optimizer step, however it is split into accumulation micro-batches.
    train = build_dataloader(config, tokenizer, "train", config.model.batch_size, config.n_epochs, config.n_examples,
                             config.model.batch_size * config.model.gradient_accumulation_steps)
    return train, build_eval_loader(config, tokenizer, config.model.eval_batch_size)


def build_models(config: DictConfig, device: torch.device, vocab_size: int,
                 wrap_policy: Callable[[torch.nn.Module, lora.Adapt], torch.nn.Module] = lambda lm, adapt: adapt(lm),
                 policy_weights: Optional[weights.Weights] = None) -> Tuple[torch.nn.Module, Optional[Callable]]:
    """Policy and (if the loss uses one) reference model, both starting from model.load_from when it is set (any
    location weights.py reads: a policy.pt, a checkpoint directory, a Hugging Face model or LoRA adapter directory).

    `policy_weights` gives the policy other weights than load_from's (eval.py: saved_policy). Embeddings grow to
    `vocab_size` (the tokenizer's length, which includes any control tokens), so checkpoints of csft runs load into
    them. `wrap_policy` (the trainer's) builds the trained module around the causal LM, e.g. PPO's value head,
    and puts the LoRA adapters where that module wants them, before sharding so that the head is sharded and
    synchronised too. With several processes the models are
    sharded with FSDP (distributed.shard_model); in one process they move to `device`. With
    cache_reference_logprobs the reference comes wrapped in a reference_cache.CachedReference.

    With model.use_peft the policy is load_from's model with LoRA adapters (lora.py): new ones, model.load_lora_from's,
    or those of `policy_weights`; the reference model is that policy with its adapters disabled
    (lora.AdapterFreeReference), so no second copy of the weights is loaded.
    """
    start = weights.locate_in_config(config, "model.load_from")
    policy_weights = policy_weights or start
    adapted = lora.uses_peft(config.model)
    uses_reference = bool(config.loss.use_reference_model)
    base_weights = start if adapted else policy_weights
    policy = weights.load_model(base_weights, config.model, config.model.policy_dtype, config.seed, vocab_size)
    reference = weights.load_model(start, config.model, config.model.reference_dtype, config.seed, vocab_size) \
        if uses_reference and not adapted else None
    for name, loaded in (("policy", base_weights), ("reference model", start if reference is not None else None)):
        if loaded is not None:
            rank0_print(f"{name}: loaded {loaded.path}{training_history(loaded)}")
    if config.model.activation_checkpointing:
        # Recompute each block's activations during backward instead of storing them; the reference model runs
        # without gradients and has nothing to save.
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if reference is not None:
        reference.requires_grad_(False).eval()
    if config.cache_reference_logprobs and not uses_reference:
        rank0_print(f"cache_reference_logprobs: loss {config.loss.name} uses no reference model; "
                    "there is nothing to cache")
    # Hashed before sharding, while every process holds all the weights; with LoRA the reference is the base model.
    fingerprint = cache_fingerprint(config, reference if reference is not None else policy) \
        if uses_reference and config.cache_reference_logprobs else None
    adapt: lora.Adapt = lora.no_adapters
    if adapted:
        base_name = str(start.path) if start is not None else str(config.model.name_or_path)
        adapt = functools.partial(lora.add_adapters, model_config=config.model, base_name=base_name,
                                  adapters=adapters_to_load(config, policy_weights, start))
    policy = wrap_policy(policy, adapt)
    for model in filter(None, (policy, reference)):
        if world_size() > 1:
            # Sharding also moves the weights to this process's device, block by block.
            shard_model(model, config.model.block_name, config.model.fsdp_policy_mp)
        elif not getattr(model, "is_loaded_in_4bit", False):  # QLoRA's weights were loaded onto the GPU
            model.to(device)
    if adapted and uses_reference:
        reference = lora.AdapterFreeReference(policy)
    if fingerprint is not None:
        reference = CachedReference(reference, LogpStore(cache_path(config.cache_dir, fingerprint), fingerprint))
    return policy, reference


def adapters_to_load(config: DictConfig, policy_weights: Optional[weights.Weights],
                     start: Optional[weights.Weights]) -> Optional[Path]:
    """The LoRA adapters the policy starts with: those of `policy_weights` when it is not the starting model
    (eval.py's saved_policy), else model.load_lora_from's; None for new adapters."""
    if policy_weights is not None and (start is None or policy_weights.path != start.path):
        adapters = lora.adapter_location(policy_weights.directory)
        if adapters is None:
            raise lora.AdapterError(f"{policy_weights.key}: {policy_weights.path} holds no LoRA adapters, but "
                                    "model.use_peft=true (pass ++model.use_peft=false to evaluate it as a full model)")
        return adapters
    if config.model.load_lora_from is None:
        return None
    return lora.locate_adapters(str(config.model.load_lora_from), config.cache_dir)


def training_history(loaded: weights.Weights) -> str:
    """` (trained on N examples)` when the weights are a HALOs checkpoint's (its small trainer_state.pt says), else
    nothing (e.g. a model from the hub)."""
    if not (loaded.directory / TRAINER_STATE).is_file():
        return ""
    return f" (trained on {checkpoint_info(loaded.directory)['step_idx']} examples)"


def wandb_mode() -> str:
    """online with a stored login, offline without one (runs never fail for lack of a wandb account).

    An explicit WANDB_MODE in the environment wins.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_login = False
    return "online" if has_login else "offline"


def init_wandb(config: DictConfig, run_id: Optional[str] = None) -> bool:
    """Starts the wandb run on the main process; returns whether metrics should be logged.

    Online mode needs the wandb server: a TCP connection must open within WANDB_PROBE_SECONDS and wandb.init finish
    within WANDB_INIT_SECONDS (WANDB_INIT_TIMEOUT overrides it), else the run logs offline, said in one line, instead
    of wandb retrying for minutes and failing with a traceback. `run_id` (a resumed run's, from its checkpoint)
    continues that wandb run instead of starting a new one.
    """
    if not config.wandb.enabled or config.debug:
        return False
    import wandb

    mode = wandb_mode()
    offline_reason = "no login found" if mode == "offline" else None
    server = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)
    if mode == "online" and not endpoint_reachable(server, WANDB_PROBE_SECONDS):
        mode, offline_reason = "offline", f"{server} is unreachable"
    os.makedirs(config.cache_dir, exist_ok=True)
    os.environ.setdefault("WANDB_CACHE_DIR", config.cache_dir)
    # Passed explicitly: wandb reads its environment once per process, at the first wandb.init.
    settings = wandb.Settings(base_url=server,
                              init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_SECONDS)))

    def start(mode: str) -> None:
        wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name, mode=mode,
                   dir=config.cache_dir, config=OmegaConf.to_container(config, resolve=True), id=run_id,
                   resume="allow", settings=settings)

    if mode == "online":
        try:
            start(mode)
        except wandb.errors.Error as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            mode, offline_reason = "offline", f"wandb.init failed ({first_line})"
    if mode == "offline":
        start(mode)
    if offline_reason:
        rank0_print(f"wandb: {offline_reason}; logging offline under {config.cache_dir}/wandb "
                    "(upload later with `wandb sync`)")
    return True
