"""Train a policy with a human-aware loss.

    python train.py loss=sft model=tiny datasets=[hh] exp_name=tiny_sft mode=train

The config is composed by Hydra from config/ (see README: Configuration) and checked in one pass before anything
loads. One process trains on one GPU, or on the CPU when there is none; with several GPUs (use_fsdp=true) one
process per GPU shards the models with FSDP, started here or by torchrun (see docs/distributed.md).
A stopped run continues with `++resume_from=auto`; SIGTERM/SIGINT save a resumable checkpoint first and exit with
status 143/130 (see docs/checkpoints.md).
"""
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import hydra
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import checkpoints
import distributed
from builders import build_models, build_train_and_eval_loaders, init_wandb
from cli import override_key, prepare_train_argv, start, train_help
from configuration import validate_train_config
from console import route_project_logs
from errors import HalosError
from models import control_tokens, load_tokenizer
from resolve import resolve_class
from trainers import TrainingInterrupted
from utils import register_resolvers

register_resolvers()


def prepare_run(config: DictConfig) -> Optional[checkpoints.ResumePoint]:
    """Undoes what an interrupted save left in an existing run directory, proves the run directory writable
    (creating nothing: a run that fails its checks leaves no directory behind), and returns the checkpoint to resume
    from (resume_from), if any."""
    run_dir = Path(config.local_run_dir)
    if distributed.is_main_process():
        checkpoints.check_run_dir_writable(run_dir)
        checkpoints.recover_interrupted_saves(run_dir)
    distributed.barrier()
    return checkpoints.find_resume_point(config)


def create_run_dir(config: DictConfig, tokenizer) -> None:
    """The run directory with the resolved config.yaml and the tokenizer (eval.py reads both; the tokenizer with
    csft's control tokens). Made once the config, the data and the models have loaded without error."""
    if distributed.is_main_process():
        run_dir = Path(config.local_run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, run_dir / "config.yaml")
        tokenizer.save_pretrained(run_dir)
    distributed.barrier()


def train(config: DictConfig, loss_choice: str, search_dirs: Sequence[str] = (),
          command_line_keys: Iterable[str] = ()) -> Path:
    """Runs training and returns the directory of the final checkpoint.

    `loss_choice` names the loss config (config/loss/<name>.yaml); `search_dirs` are extra config directories
    (hydra.searchpath) where users keep their own loss configs; `command_line_keys` are the keys the command line
    set (what the user asked for explicitly, e.g. model.use_flash_attention).
    """
    for warning in validate_train_config(config, loss_choice, distributed.world_size(), search_dirs,
                                         command_line_keys):
        distributed.rank0_print(f"warning: {warning}")
    run_dir = Path(config.local_run_dir)
    if config.saved_policy is None:
        config.saved_policy = str(run_dir / checkpoints.LATEST)
    resume = prepare_run(config)
    if resume is not None and resume.state["finished"]:  # e.g. a requeued job whose run had already finished
        distributed.rank0_print(f"{resume.directory} holds this run's final checkpoint "
                                f"({resume.state['example_counter']} examples): nothing to resume")
        return resume.directory
    distributed.rank0_print(OmegaConf.to_yaml(config))
    distributed.rank0_print(distributed.choose_cpu_threads())
    transformers.set_seed(config.seed)
    torch.backends.cuda.matmul.allow_tf32 = True

    tokenizer = load_tokenizer(config.model, control_tokens(config.loss))
    train_loader, eval_loader = build_train_and_eval_loaders(config, tokenizer)
    device = distributed.device()
    trainer_cls = resolve_class(config.loss.trainer, "trainers")
    policy, reference = build_models(config, device, len(tokenizer), trainer_cls.wrap_policy)
    if distributed.is_main_process():
        checkpoints.check_free_space(run_dir, policy)
    create_run_dir(config, tokenizer)
    wandb_run_id = resume.state["wandb_run_id"] if resume is not None else None
    trainer = trainer_cls(tokenizer, config, train_loader, eval_loader, policy, reference,
                          rank=distributed.rank(), world_size=distributed.world_size(), device=device,
                          log_to_wandb=distributed.is_main_process() and init_wandb(config, wandb_run_id))
    trainer.train(resume.directory if resume is not None else None)
    checkpoint_dir = trainer.save_checkpoint("final")
    if trainer.log_to_wandb:
        import wandb

        wandb.finish()
    if trainer_cls.trains_reward_model:
        distributed.rank0_print(f"next: python label.py -f SAMPLES.json -o DATA_DIR --reward_model {checkpoint_dir}  "
                                "(labels samples with the reward model; docs/online.md)")
    else:
        distributed.rank0_print(f"next: python eval.py --config-path={run_dir} ++mode=sample  (samples the policy; "
                                "docs/evaluation.md)")
    return checkpoint_dir


def train_or_exit(config: DictConfig, loss_choice: str, search_dirs: Sequence[str],
                  command_line_keys: Sequence[str]) -> None:
    """train() in this process; a user error ends the process with one line on stderr and exit status 1, a stop by
    SIGTERM/SIGINT (after writing a resumable checkpoint) with 128 + the signal's number."""
    try:
        train(config, loss_choice, search_dirs, command_line_keys)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except HalosError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base=None, config_path="config", config_name="config")
def main(config: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    search_dirs = [p.removeprefix("file://") for p in hydra_config.searchpath if p.startswith("file://")]
    command_line_keys = sorted({override_key(o) for o in hydra_config.overrides.task})
    route_project_logs()
    try:
        distributed.launch(train_or_exit, config, hydra_config.runtime.choices.get("loss"), search_dirs,
                           command_line_keys, use_fsdp=config.use_fsdp, port=config.fsdp_port)
    except HalosError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    start(main, prepare_train_argv, help_text=train_help(__doc__))
