"""Train a policy with a human-aware loss.

    python train.py loss=sft model=tiny datasets=[hh] exp_name=tiny_sft mode=train

The config is composed by Hydra from config/ (see README: Configuration) and checked in one pass before anything
loads. One process trains on one GPU, or on the CPU when there is none.
"""
import sys
from pathlib import Path

import hydra
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import distributed
from builders import build_models, build_train_and_eval_loaders, init_wandb
from configuration import resolve_class, validate_train_config
from models import control_tokens, load_tokenizer
from utils import HalosError, register_resolvers

register_resolvers()


def train(config: DictConfig, loss_choice: str) -> Path:
    """Runs training and returns the directory of the final checkpoint."""
    for warning in validate_train_config(config, loss_choice, n_processes=distributed.world_size()):
        distributed.rank0_print(f"warning: {warning}")
    run_dir = Path(config.local_run_dir)
    if config.saved_policy is None:
        config.saved_policy = str(run_dir / "LATEST" / "policy.pt")
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, run_dir / "config.yaml")
        print(OmegaConf.to_yaml(config))
    transformers.set_seed(config.seed)
    torch.backends.cuda.matmul.allow_tf32 = True

    tokenizer = load_tokenizer(config.model, control_tokens(config.loss))
    train_loader, eval_loader = build_train_and_eval_loaders(config, tokenizer)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    policy, reference = build_models(config, device, len(tokenizer))
    trainer_cls = resolve_class(config.loss.trainer, "trainers")
    trainer = trainer_cls(tokenizer, config, train_loader, eval_loader, trainer_cls.wrap_policy(policy), reference,
                          rank=distributed.rank(), world_size=distributed.world_size(), device=device,
                          log_to_wandb=distributed.is_main_process() and init_wandb(config))
    trainer.train()
    checkpoint_dir = trainer.save()
    if trainer.log_to_wandb:
        import wandb

        wandb.finish()
    return checkpoint_dir


@hydra.main(version_base=None, config_path="config", config_name="config")
def main(config: DictConfig) -> None:
    try:
        train(config, HydraConfig.get().runtime.choices.get("loss"))
    except HalosError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
