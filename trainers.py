"""Trainers: `BasicTrainer` owns the loop (evaluation, accumulation, clipping, logging, when to checkpoint);
subclasses implement `get_batch_metrics` and, through it, their forward pass and loss. Writing and restoring
checkpoints is the Checkpointer's job (checkpointer.py): the trainer hands it `training_state()`.

Add a loss by subclassing a trainer, overriding `loss` (a thin call into `losses.py`), and naming the class in a
`config/loss/NAME.yaml` (see README: "Adding a loss").
"""
import itertools
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import checkpoints
import dataloader
import distributed
import losses
from checkpointer import Checkpointer, TrainingState
from checkpoints import POLICY, V_HEAD
from console import format_metrics
from dataloader import CHOSEN_KEYS, KL_KEYS, REJECTED_KEYS, STATUS_KEY, TARGET_KEYS
from errors import ConfigError, HalosError
from models import CausalLMWithValueHead
from reference_cache import CachedReference
from resolve import resolve_class
from utils import IGNORE_INDEX, get_token_logps, next_token_labels, pack_rows, pad_to_length, summed_label_logps

Metrics = Dict[str, torch.Tensor]


class TrainingError(HalosError):
    """Training cannot continue (e.g. a non-finite loss)."""


class TrainingInterrupted(HalosError):
    """SIGTERM or SIGINT stopped training after a resumable checkpoint was written. `exit_code` is 128 + the
    signal's number, the status a shell reports for a process that signal ended (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class BasicTrainer:
    """The training loop shared by every loss.

    Counters: `example_counter` counts training examples (the x-axis of every log and the N of `step-N`
    checkpoints), `batch_counter` iterator batches (micro-steps), `update_counter` optimizer steps.
    """

    requires_reference_model = False  # subclasses whose loss needs reference log-probs set this
    reference_logps_cacheable = False  # reference log-probs come only from sequence_logps (cache_reference_logprobs)
    compatible_dataloaders: Tuple[type, ...] = (dataloader.DataLoader,)  # loaders whose batches this trainer reads

    @classmethod
    def config_problems(cls, config: DictConfig) -> List[str]:
        """Trainer-specific config checks, run before anything loads; each problem is `key: message`."""
        problems = []
        if cls.requires_reference_model and not config.loss.use_reference_model:
            problems.append(f"loss.use_reference_model: {cls.__name__} needs a reference model; set it to true")
        try:
            loader = resolve_class(str(config.loss.dataloader), "dataloader")
        except ConfigError:
            return problems  # an unresolvable loss.dataloader is reported by the config check itself
        if not issubclass(loader, cls.compatible_dataloaders):
            expected = " or ".join(c.__name__ for c in cls.compatible_dataloaders)
            problems.append(f"loss.dataloader: {cls.__name__} needs batches from {expected}, not {loader.__name__}")
        return problems

    @classmethod
    def wrap_policy(cls, policy: torch.nn.Module) -> torch.nn.Module:
        """The module trained as the policy, built around the loaded causal LM (PPO adds a value head)."""
        return policy

    def __init__(self, tokenizer, config: DictConfig, train_iterator, eval_iterator, policy: torch.nn.Module,
                 reference_model: Optional[torch.nn.Module] = None, rank: int = 0, world_size: int = 1,
                 device: Optional[torch.device] = None, log_to_wandb: bool = False,
                 checkpointer: Optional[Checkpointer] = None):
        self.tokenizer = tokenizer
        self.config = config
        self.train_iterator = train_iterator
        self.policy = policy
        self.reference_model = reference_model
        self.rank, self.world_size = rank, world_size
        self.device = device or next(policy.parameters()).device
        self.log_to_wandb = log_to_wandb
        self.run_dir = Path(config.local_run_dir)
        self.is_main = rank == 0
        self.checkpointer = checkpointer or Checkpointer(config, tokenizer, is_main=self.is_main)
        self.optimizer = self.scheduler = None  # built by train()
        self.example_counter = self.batch_counter = self.update_counter = 0
        self.last_eval_metrics, self.last_eval_at = {}, None
        self.unprinted_train_metrics: Optional[Dict[str, float]] = None  # logged, but not yet printed
        self.last_print_time: Optional[float] = None
        # Evaluation reuses the same batches every time, so they are built once.
        self.eval_batches = list(eval_iterator) if eval_iterator is not None else []
        distributed.rank0_print(f"Loaded {len(self.eval_batches)} eval batches of size {config.model.eval_batch_size}")

    # --- hooks -----------------------------------------------------------------------------------------------

    def sequence_logps(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """(B,) summed log-probs of the labelled tokens of (B, T) right-padded sequences.

        The model computes logits only where the next token is labelled (`logits_to_keep`), so its lm_head skips
        prompt and padding positions; with pack_sequences the rows are packed first (utils.pack_rows), so the
        padding tokens are not run at all. A cached reference model answers from its cache. No KV cache: training
        needs none (and packed rows need none).
        """
        if isinstance(model, CachedReference):
            return model.sequence_logps(input_ids, attention_mask, labels, live=self.sequence_logps)
        n_rows = input_ids.size(0)
        rows = torch.arange(n_rows, device=input_ids.device).unsqueeze(1).expand_as(input_ids)
        layout = {"attention_mask": attention_mask}
        # Packed rows need the block-diagonal causal mask Hugging Face builds from position_ids for sdpa and eager
        # attention; flash-attention would need one single packed row, so it runs padded.
        packed = pack_rows(input_ids, attention_mask, labels, self.tokenizer.pad_token_id) \
            if self.config.pack_sequences and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager") \
            else None
        if packed is not None:
            input_ids, labels, rows, layout = packed.input_ids, packed.labels, packed.rows, \
                {"position_ids": packed.position_ids}
        next_labels = next_token_labels(labels)
        logits = model(input_ids, logits_to_keep=next_labels != IGNORE_INDEX, use_cache=False, **layout).logits
        return summed_label_logps(logits, next_labels, rows, n_rows)

    def reference_forward(self, batch: Dict):
        """The subclass's `forward` outputs for the reference model, without gradients.

        With cache_reference_logprobs the first call fills the cache from every train and eval batch (eval.py has no
        train batches), sliced for this process as the loop slices them, and frees the reference model
        (reference_cache.py).
        """
        if isinstance(self.reference_model, CachedReference) and not self.reference_model.filled:
            batches = (distributed.slice_batch_for_rank(batch, self.rank, self.world_size, self.device)
                       for batch in itertools.chain(self.train_iterator or (), self.eval_batches))
            self.reference_model.fill(batches, lambda batch: self.forward(self.reference_model, batch))
        with torch.no_grad():
            return self.forward(self.reference_model, batch)

    def training_passes(self, batch: Dict) -> Iterator[Dict]:
        """The batches one training batch turns into, each getting a forward/backward pass (and counting as a
        micro-step of gradient accumulation). One pass by default; PPO makes ppo_epochs passes."""
        yield batch

    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Metrics]:
        """Loss to backpropagate (a scalar: the mean over this rank's examples) and per-example metric tensors.

        Metric values are (n,) tensors for this rank's n examples or 0-dim per-batch values; the loop gathers them
        across ranks. Keys follow the original: `loss/{mode}`, `logps_{mode}/chosen`, `rewards_{mode}/margins`...
        """
        raise NotImplementedError

    # --- loop ------------------------------------------------------------------------------------------------

    def train(self, resume_from: Optional[Path] = None) -> None:
        """Trains to the end of the data; given a resumable checkpoint directory, exactly from where it was written.

        A resumable LATEST (weights, optimizer and scheduler state, RNG states, data position; docs/checkpoints.md)
        is written at the first optimizer-step boundary after each evaluation and every checkpoint_every examples.
        SIGTERM or SIGINT lets the current optimizer step finish, writes one and raises TrainingInterrupted.
        """
        config = self.config
        self.optimizer = getattr(torch.optim, config.optimizer)(self.policy.parameters(), lr=config.lr)
        # Linear warmup from lr/(warmup+1) to lr over warmup_steps optimizer steps, then constant.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1)))
        if resume_from is not None:
            self.load_training_state(self.checkpointer.restore(self.training_state(), resume_from))
            distributed.rank0_print(f"resumed from {resume_from} after {self.example_counter} examples "
                                    f"({self.batch_counter} batches, {self.update_counter} optimizer steps)")
        pending = 0  # micro-steps whose gradients wait for the next optimizer step
        metrics = defaultdict(list)
        last_log_time = None
        progress = tqdm(total=self.train_iterator.total_examples, initial=self.example_counter, unit="ex",
                        desc="train", disable=not self.is_main)
        with progress, checkpoints.StopRequests() as stop:
            # A resumed run starts at the first batch it has not trained on; the skipped ones are never tokenised.
            for batch in self.train_iterator.iter_from(self.batch_counter):
                if self.evaluation_due():
                    self.evaluate_and_checkpoint()
                if pending == 0 and self.resumable_checkpoint_due():
                    self.save_checkpoint("resumable")
                start = time.time()
                pending = self.train_on_batch(batch, metrics, pending)
                batch_size = config.model.batch_size
                metrics["examples_per_second"].append(batch_size / (time.time() - start))
                self.batch_counter += 1
                self.example_counter += batch_size
                progress.update(batch_size)
                if pending == 0 and (last_log_time is None
                                     or time.time() - last_log_time > config.minimum_log_interval_secs):
                    self.log_train_metrics(metrics, progress)
                    metrics.clear()
                    last_log_time = time.time()
                if pending == 0 and self.stop_requested(stop):
                    self.stop_after_signal(stop.signal_number or signal.SIGTERM)
        self.print_train_metrics()  # the last logged metrics, if the print interval held them back
        if pending:
            distributed.rank0_print(f"warning: the data ended {pending} micro-batches into a gradient accumulation of "
                                    f"{config.model.gradient_accumulation_steps}; those gradients were not applied")
        if self.last_eval_at != self.example_counter:  # the original never evaluated the final policy
            self.evaluate_and_checkpoint(save_intermediate=False)

    def train_on_batch(self, batch: Dict, metrics: Dict[str, list], pending: int) -> int:
        """The forward/backward passes of one global batch, stepping the optimizer whenever
        gradient_accumulation_steps micro-steps are pending; returns how many still are."""
        accumulation = self.config.model.gradient_accumulation_steps
        self.policy.train()
        local_batch = distributed.slice_batch_for_rank(batch, self.rank, self.world_size, self.device)
        for training_batch in self.training_passes(local_batch):
            loss, batch_metrics = self.get_batch_metrics(training_batch, mode="train")
            self.check_finite(loss)
            (loss / accumulation).backward()
            self.record(metrics, batch_metrics)
            pending += 1
            if pending == accumulation:
                metrics["grad_norm"].append(self.optimizer_step())
                pending = 0
        return pending

    def evaluation_due(self) -> bool:
        """Every eval_every examples (and before the first batch with do_first_eval), once per example count: a
        run resumed from a checkpoint written just after an evaluation does not repeat it."""
        n = self.example_counter
        return n % self.config.eval_every == 0 and (n > 0 or self.config.do_first_eval) and self.last_eval_at != n

    def resumable_checkpoint_due(self) -> bool:
        """After an evaluation (so that LATEST carries its metrics) and checkpoint_every examples after the last
        resumable checkpoint; never with debug=true."""
        saved_at = self.checkpointer.resumable_at or 0
        if self.config.debug or self.example_counter == saved_at:
            return False
        evaluated = self.last_eval_at is not None and self.last_eval_at > saved_at
        every = self.config.checkpoint_every
        return evaluated or (every is not None and self.example_counter - saved_at >= every)

    def stop_requested(self, stop: checkpoints.StopRequests) -> bool:
        """Whether any process received SIGTERM/SIGINT: all of them must stop after the same optimizer step."""
        return distributed.all_reduce_mean(torch.tensor(float(stop.requested), device=self.device)).item() > 0

    def stop_after_signal(self, signal_number: int) -> None:
        distributed.rank0_print(f"received {signal.Signals(signal_number).name}: writing a resumable checkpoint after "
                                f"{self.example_counter} examples (send it again to stop at once)")
        self.save_checkpoint("resumable")
        raise TrainingInterrupted(f"stopped by {signal.Signals(signal_number).name} after {self.example_counter} "
                                  f"examples; {self.checkpointer.latest} holds a resumable checkpoint: run the same "
                                  "command with ++resume_from=auto to continue", signal_number)

    def optimizer_step(self) -> float:
        grad_norm = self.clip_gradient()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.update_counter += 1
        return grad_norm

    def clip_gradient(self) -> float:
        """Clips the policy's global gradient norm to model.max_grad_norm and returns the norm before clipping."""
        return distributed.clip_grad_norm(self.policy.parameters(), self.config.model.max_grad_norm)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stops on a NaN/inf loss before it reaches the weights; the last resumable checkpoint stays as it was."""
        if not torch.isfinite(loss).all():
            raise TrainingError(f"the training loss became {loss.item()} at example {self.example_counter} "
                                f"(batch {self.batch_counter}); lower lr or check the data. "
                                f"{self.checkpointer.last_good()}")

    def record(self, store: Dict[str, list], batch_metrics: Metrics) -> None:
        """Appends every rank's values of each metric to `store` (floats)."""
        for key, value in batch_metrics.items():
            store[key].extend(distributed.all_gather_if_needed(value.detach()).float().reshape(-1).cpu().tolist())

    def log_train_metrics(self, metrics: Dict[str, list], progress: tqdm) -> None:
        """Means of the metrics since the last log: to wandb and the progress bar every time, printed as a line at
        most every print_interval_secs (a log file gets a readable history, not one line a second)."""
        means = {k: sum(v) / len(v) for k, v in metrics.items() if v}
        means["counters/examples"] = self.example_counter
        means["counters/updates"] = self.update_counter
        if self.is_main:
            progress.set_postfix({k: f"{means[k]:.4g}" for k in ("loss/train", "grad_norm") if k in means})
        self.wandb_log(means)
        self.unprinted_train_metrics = means
        if self.last_print_time is None or time.time() - self.last_print_time >= self.config.print_interval_secs:
            self.print_train_metrics()

    def print_train_metrics(self) -> None:
        if self.unprinted_train_metrics is not None:  # printed with the example count they were logged at
            distributed.rank0_print(f"train after {self.unprinted_train_metrics['counters/examples']} examples: "
                                    f"{format_metrics(self.unprinted_train_metrics)}")
            self.unprinted_train_metrics, self.last_print_time = None, time.time()

    def evaluate(self) -> Dict[str, float]:
        """Mean of every metric over all eval batches (gathered over ranks)."""
        self.policy.eval()
        store = defaultdict(list)
        for batch in tqdm(self.eval_batches, desc="eval", leave=False, disable=not self.is_main):
            local_batch = distributed.slice_batch_for_rank(batch, self.rank, self.world_size, self.device)
            with torch.no_grad():
                _, batch_metrics = self.get_batch_metrics(local_batch, mode="eval")
            self.record(store, batch_metrics)
        return {k: sum(v) / len(v) for k, v in store.items() if v}

    def evaluate_and_checkpoint(self, save_intermediate: bool = True) -> None:
        """Evaluates, logs, and (after the first example, if configured) saves a step-<examples> checkpoint."""
        if self.eval_batches:
            self.last_eval_metrics = self.evaluate()
            distributed.rank0_print(f"eval after {self.example_counter} examples: "
                                    f"{format_metrics(self.last_eval_metrics)}")
            self.wandb_log(self.last_eval_metrics)
        self.last_eval_at = self.example_counter
        if save_intermediate and self.example_counter > 0 and self.config.intermediate_checkpoints \
                and not self.config.debug:
            self.save_checkpoint("intermediate")

    def wandb_log(self, values: Dict[str, float]) -> None:
        if self.log_to_wandb and self.is_main:
            import wandb

            wandb.log(values, step=self.example_counter)

    # --- state ---------------------------------------------------------------------------------------------

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        """Each weights file of a checkpoint and the module it holds; policy.pt is always the plain causal LM."""
        return {POLICY: self.policy}

    def training_state(self) -> TrainingState:
        """Everything a checkpoint holds of this trainer (checkpointer.TrainingState); `values` are plain values."""
        values = {"example_counter": self.example_counter, "batch_counter": self.batch_counter,
                  "update_counter": self.update_counter, "last_eval_at": self.last_eval_at,
                  "last_eval_metrics": {k: float(v) for k, v in self.last_eval_metrics.items()},
                  "wandb_run_id": self.wandb_run_id()}
        return TrainingState(self.checkpoint_modules(), self.policy, self.optimizer, self.scheduler, values)

    def load_training_state(self, values: Dict) -> None:
        """Takes back the `values` of training_state() that a checkpoint saved (the modules, optimizer and scheduler
        are restored in place by the Checkpointer)."""
        self.example_counter, self.batch_counter = values["example_counter"], values["batch_counter"]
        self.update_counter = values["update_counter"]
        self.last_eval_at, self.last_eval_metrics = values["last_eval_at"], values["last_eval_metrics"]

    def save_checkpoint(self, kind: str) -> Path:
        """Has the Checkpointer write a checkpoint of `kind` (intermediate, resumable, final) of the current state;
        every process must call it. Returns the checkpoint directory."""
        return self.checkpointer.save(self.training_state(), kind)

    def wandb_run_id(self) -> Optional[str]:
        if not self.log_to_wandb:
            return None
        import wandb

        return wandb.run.id if wandb.run is not None else None


def concatenate_rows(batch: Dict, key_groups: Tuple, pad_token_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacks several groups of (B, T_i) sequences into one (G*B, max T_i) batch for a single forward pass.

    One pass instead of G is faster, and under FSDP it gathers each layer's weights once instead of G times.

    Returns:
        input_ids, attention_mask, labels, each (G*B, T), right-padded (pad id / 0 / IGNORE_INDEX).
    """
    length = max(batch[keys.combined_input_ids].size(1) for keys in key_groups)
    fields = (("combined_input_ids", pad_token_id), ("combined_attention_mask", 0), ("labels", IGNORE_INDEX))
    input_ids, attention_mask, labels = (
        torch.cat([pad_to_length(batch[getattr(keys, field)], length, pad) for keys in key_groups])
        for field, pad in fields)
    return input_ids, attention_mask, labels


def check_loss_output(trainer: "BasicTrainer", output: Tuple, n_chosen: int, n_rejected: int, n_losses: int) -> None:
    """A `loss` override must return (losses, chosen_rewards, rejected_rewards) with one value per row."""
    name = f"{type(trainer).__name__}.loss"
    if not isinstance(output, tuple) or len(output) < 3:
        raise TrainingError(f"{name} must return (losses, chosen_rewards, rejected_rewards), got {type(output).__name__}")
    for what, value, n in zip(("losses", "chosen_rewards", "rejected_rewards"), output, (n_losses, n_chosen, n_rejected)):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TrainingError(f"{name} returned {what} of shape {shape}; expected ({n},) for this batch")


class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning (sft), and conditional SFT (csft) whose control tokens live in the data."""

    compatible_dataloaders = (dataloader.SFTDataLoader, dataloader.ConditionalSFTDataLoader)

    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Metrics]:
        policy_logps = self.sequence_logps(self.policy, batch[TARGET_KEYS.combined_input_ids],
                                           batch[TARGET_KEYS.combined_attention_mask], batch[TARGET_KEYS.labels])
        per_example = losses.sft_loss(policy_logps)
        return per_example.mean(), {f"logps_{mode}/chosen": policy_logps.detach(), f"loss/{mode}": per_example.detach()}


class PairedPreferenceTrainer(BasicTrainer):
    """Losses over (chosen, rejected) pairs of responses to one prompt. Subclasses implement `loss`."""

    compatible_dataloaders = (dataloader.PairedPreferenceDataLoader,)
    reference_logps_cacheable = True

    def forward(self, model: torch.nn.Module, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B,) chosen and (B,) rejected sequence log-probs from one concatenated forward pass."""
        input_ids, attention_mask, labels = concatenate_rows(batch, (CHOSEN_KEYS, REJECTED_KEYS),
                                                             self.tokenizer.pad_token_id)
        logps = self.sequence_logps(model, input_ids, attention_mask, labels)
        n_pairs = batch[CHOSEN_KEYS.labels].size(0)
        return logps[:n_pairs], logps[n_pairs:]

    def loss(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: Optional[torch.Tensor], reference_rejected_logps: Optional[torch.Tensor]
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses (B,) and chosen/rejected rewards (B,), all from (B,) sequence log-probs."""
        raise NotImplementedError

    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Metrics]:
        policy_chosen_logps, policy_rejected_logps = self.forward(self.policy, batch)
        reference_chosen_logps = reference_rejected_logps = None
        if self.reference_model is not None:
            reference_chosen_logps, reference_rejected_logps = self.reference_forward(batch)
        output = self.loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        n_pairs = policy_chosen_logps.size(0)
        check_loss_output(self, output, n_pairs, n_pairs, n_pairs)
        per_pair, chosen_rewards, rejected_rewards = output[:3]
        return per_pair.mean(), {
            f"rewards_{mode}/chosen": chosen_rewards.detach(),
            f"rewards_{mode}/rejected": rejected_rewards.detach(),
            f"rewards_{mode}/accuracies": losses.paired_reward_accuracies(chosen_rewards, rejected_rewards),
            f"rewards_{mode}/margins": (chosen_rewards - rejected_rewards).detach(),
            f"logps_{mode}/chosen": policy_chosen_logps.detach(),
            f"logps_{mode}/rejected": policy_rejected_logps.detach(),
            f"loss/{mode}": per_pair.detach(),
        }


class UnpairedPreferenceTrainer(BasicTrainer):
    """Losses over single responses labelled desirable ('chosen') or undesirable ('rejected').

    Subclasses implement `loss`. With `uses_kl_rows`, each batch's mismatched (prompt, other response) rows also run
    through the model (without gradients) and their mean policy/reference log-ratio, averaged over processes, reaches
    `loss` as `kl_estimate`.
    """

    compatible_dataloaders = (dataloader.UnpairedPreferenceDataLoader, dataloader.SimpleKTODataLoader)
    uses_kl_rows = False
    reference_logps_cacheable = True

    def forward(self, model: torch.nn.Module, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Chosen (n_c,), rejected (n_r,) and, with uses_kl_rows, KL-row (B,) log-probs.

        The KL rows get a forward pass of their own without gradients: the KL estimate is detached
        (losses.kto_kl_estimate), so backpropagating through them, as one concatenated pass would, spends a third of
        KTO's policy compute on zeros.
        """
        pad_token_id = self.tokenizer.pad_token_id
        target_logps = self.sequence_logps(model, *concatenate_rows(batch, (TARGET_KEYS,), pad_token_id))
        chosen = torch.tensor([status == "chosen" for status in batch[STATUS_KEY]], device=target_logps.device)
        kl_logps = None
        if self.uses_kl_rows:
            with torch.no_grad():
                kl_logps = self.sequence_logps(model, *concatenate_rows(batch, (KL_KEYS,), pad_token_id))
        return target_logps[chosen], target_logps[~chosen], kl_logps

    def loss(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: Optional[torch.Tensor], reference_rejected_logps: Optional[torch.Tensor],
             **kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Losses (n_c + n_r,), chosen rewards (n_c,) and rejected rewards (n_r,) from sequence log-probs."""
        raise NotImplementedError

    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Metrics]:
        policy_chosen_logps, policy_rejected_logps, policy_kl_logps = self.forward(self.policy, batch)
        reference_chosen_logps = reference_rejected_logps = None
        extra, metrics = {}, {}
        if self.reference_model is not None:
            reference_chosen_logps, reference_rejected_logps, reference_kl_logps = self.reference_forward(batch)
            if self.uses_kl_rows:
                # The reference point is a mean over the whole global batch, so it is averaged over processes.
                extra["kl_estimate"] = distributed.all_reduce_mean(
                    losses.kto_kl_estimate(policy_kl_logps, reference_kl_logps))
                metrics[f"rewards_{mode}/KL_estimate"] = extra["kl_estimate"]
        output = self.loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, **extra)
        n_chosen, n_rejected = policy_chosen_logps.size(0), policy_rejected_logps.size(0)
        check_loss_output(self, output, n_chosen, n_rejected, n_chosen + n_rejected)
        per_example, chosen_rewards, rejected_rewards = output[:3]
        metrics.update({
            f"rewards_{mode}/chosen": chosen_rewards.detach(),
            f"rewards_{mode}/rejected": rejected_rewards.detach(),
            f"rewards_{mode}/margins": self.global_margin(chosen_rewards, rejected_rewards),
            f"logps_{mode}/chosen": policy_chosen_logps.detach(),
            f"logps_{mode}/rejected": policy_rejected_logps.detach(),
            f"loss/{mode}": per_example.detach(),
        })
        return per_example.mean(), metrics

    @staticmethod
    def global_margin(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
        """Mean chosen minus mean rejected reward over all processes' rows (a class with no rows counts as 0)."""
        def mean_or_zero(values: torch.Tensor) -> torch.Tensor:
            values = distributed.all_gather_if_needed(values.detach())
            return values.mean() if values.numel() else values.new_zeros(())
        return mean_or_zero(chosen_rewards) - mean_or_zero(rejected_rewards)


class DPOTrainer(PairedPreferenceTrainer):
    """Direct Preference Optimization (Rafailov et al., 2023)."""

    requires_reference_model = True

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return losses.dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, beta=self.config.loss.beta)


class CDPOTrainer(PairedPreferenceTrainer):
    """Conservative DPO: DPO with an assumed rate epsilon of flipped preference labels."""

    requires_reference_model = True

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return losses.cdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                reference_rejected_logps, beta=self.config.loss.beta, epsilon=self.config.loss.epsilon)


class SLiCTrainer(PairedPreferenceTrainer):
    """SLiC-HF: a hinge on the chosen/rejected log-prob margin plus an NLL regulariser; no reference model."""

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return losses.slic_loss(policy_chosen_logps, policy_rejected_logps, beta=self.config.loss.beta,
                                lambda_coef=self.config.loss.lambda_coef)


class KTOTrainer(UnpairedPreferenceTrainer):
    """Kahneman-Tversky Optimization with the mismatched-pair KL estimate as reference point."""

    requires_reference_model = True
    compatible_dataloaders = (dataloader.UnpairedPreferenceDataLoader,)  # it builds the KL rows
    uses_kl_rows = True

    @classmethod
    def config_problems(cls, config: DictConfig) -> List[str]:
        problems = super().config_problems(config)
        for key in ("batch_size", "eval_batch_size"):
            if isinstance(config.model[key], int) and config.model[key] < 2:
                problems.append(f"model.{key}: KTO pairs each prompt with another example's response to estimate "
                                f"its reference point, so batches need at least 2 examples, got {config.model[key]}")
        return problems

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             kl_estimate):
        config = self.config.loss
        return losses.kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, kl_estimate, beta=config.beta,
                               desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight)


class SimpleKTOTrainer(UnpairedPreferenceTrainer):
    """KTO whose reference points are the opposite class's mean reward in the microbatch."""

    requires_reference_model = True

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return losses.simple_kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                      reference_rejected_logps, beta=self.config.loss.beta)


class KTOZeroTrainer(UnpairedPreferenceTrainer):
    """KTO with a reference point of zero."""

    requires_reference_model = True

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return losses.kto_zero_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                    reference_rejected_logps, beta=self.config.loss.beta)


class Rollout(NamedTuple):
    """What offline PPO fixes for a batch before its optimisation passes; every field is (B, T-1)."""

    mask: torch.Tensor  # True at response tokens
    reference_logps: torch.Tensor  # the frozen reference model's token log-probs (PPO's "old" policy here)
    values: torch.Tensor  # the value head's estimates before the update
    advantages: torch.Tensor  # GAE advantages, whitened over the batch's response tokens
    returns: torch.Tensor  # critic targets: GAE returns (advantages + values)


class PPOTrainer(BasicTrainer):
    """Offline PPO: each response earns +1 (desirable) or -1 (undesirable) at its last token; the policy is updated
    with PPO's clipped objective against the frozen reference model and a value head learns the returns. The
    KL_coef term is KL_coef·⟨log π_ref − log π_θ⟩ over the data's response tokens, as in the original: its gradient
    only raises log π_θ of every response, desirable or not (an NLL push); it does not keep the policy near the
    reference. Saves the causal LM as the policy and the value head as `v_head.pt`."""

    requires_reference_model = True
    compatible_dataloaders = (dataloader.UnpairedPreferenceDataLoader,)

    @classmethod
    def wrap_policy(cls, policy: torch.nn.Module) -> torch.nn.Module:
        return CausalLMWithValueHead(policy)

    def token_forward(self, model: torch.nn.Module, batch: Dict):
        """Token log-probs (B, T-1), response mask (B, T-1), logits (B, T-1, V) and values (B, T-1) or None."""
        input_ids, attention_mask = batch[TARGET_KEYS.combined_input_ids], batch[TARGET_KEYS.combined_attention_mask]
        output = model(input_ids, attention_mask=attention_mask, use_cache=False)
        logits, values = output if isinstance(output, tuple) else (output.logits, None)
        token_logps, mask = get_token_logps(logits, batch[TARGET_KEYS.labels])
        return token_logps, mask, logits[:, :-1], (values[:, :-1] if values is not None else None)

    def rollout(self, batch: Dict) -> Rollout:
        """Rewards, values and advantages of a batch, computed once without gradients."""
        config = self.config.loss
        with torch.no_grad():
            reference_logps, mask, _, _ = self.token_forward(self.reference_model, batch)
            _, _, _, values = self.token_forward(self.policy, batch)
            scores = torch.tensor([1.0 if s == "chosen" else -1.0 for s in batch[STATUS_KEY]], device=values.device)
            last_token = mask.size(1) - 1 - mask.flip(1).int().argmax(1)
            rewards = torch.zeros_like(values)
            rewards[torch.arange(rewards.size(0), device=rewards.device), last_token] = scores
            gae = losses.gae_advantages(values, rewards, mask, gamma=config.gamma, lam=config.lam)
        return Rollout(mask, reference_logps, values, losses.whiten(gae.advantages, mask), gae.returns)

    def training_passes(self, batch: Dict) -> Iterator[Dict]:
        rollout = self.rollout(batch)
        for _ in range(self.config.loss.ppo_epochs):
            yield {**batch, "rollout": rollout}

    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Metrics]:
        rollout = batch.get("rollout") or self.rollout(batch)
        config = self.config.loss
        token_logps, mask, logits, values = self.token_forward(self.policy, batch)
        output = losses.ppo_loss(token_logps, values, rollout.reference_logps, rollout.reference_logps,
                                 rollout.advantages, rollout.returns, mask, cliprange=config.cliprange,
                                 critic_coef=config.critic_coef, kl_coef=config.KL_coef)
        # The original's PPO names carry no mode; evaluation metrics get an _eval suffix on the group instead.
        group = (lambda name: name) if mode == "train" else (lambda name: name.replace("/", "_eval/", 1))
        metrics = {
            "loss/total": output.loss.detach(), "loss/critic": output.critic_loss, "loss/policy": output.policy_loss,
            "clipfrac/policy": output.clipfrac, "loss/policykl": output.kl_penalty, "loss/seqratio": output.seq_ratio,
            "loss/entropy": losses.entropy_from_logits(logits.detach(), mask),
            "returns/mean": losses.masked_mean(rollout.returns, mask), "returns/var": losses.masked_var(rollout.returns, mask),
            "val/mean": losses.masked_mean(rollout.values, mask), "val/var": losses.masked_var(rollout.values, mask),
        }
        return output.loss, {group(k): v for k, v in metrics.items()}

    def clip_gradient(self) -> float:
        """Clips the language model and the value head separately; returns the sum of their pre-clip norms."""
        model = self.config.model
        return (distributed.clip_grad_norm(self.policy.pretrained_model.parameters(), model.max_grad_norm)
                + distributed.clip_grad_norm(self.policy.v_head.parameters(), model.v_head_max_grad_norm))

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        return {POLICY: self.policy.pretrained_model, V_HEAD: self.policy.v_head}
