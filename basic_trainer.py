"""The training loop every loss shares: `BasicTrainer` owns evaluation, accumulation, clipping, logging and when to
checkpoint; its subclasses (trainers.py) implement `get_batch_metrics` and, through it, their forward pass and loss.
Writing and restoring checkpoints is the Checkpointer's job (checkpointer.py): the trainer hands it
`training_state()`.
"""
import itertools
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import checkpoints
import dataloader
import distributed
import logps
import lora
import losses
from checkpointer import Checkpointer, TrainingState
from checkpoints import POLICY
from console import format_metrics
from errors import ConfigError, HalosError
from loss_inputs import SequenceLogps, response_lengths
from reference_cache import CachedReference
from resolve import resolve_class
from utils import IGNORE_INDEX, chunked

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

    What a loss needs is declared as class attributes, which the config check, the model builder and the loop read
    (nothing anywhere tests for a particular loss):

    * `requires_reference_model`: load a reference model (and allow the reference log-prob cache); reference-free
      losses load none.
    * `token_level_logps`: fill `SequenceLogps.token_logps` for the loss (sequence-level losses never build them).
    * `loss_state_class`: a persistent statistic (e.g. loss_state.RunningRewardMean) that observes every training
      micro-batch's loss output, is updated at each optimizer step and is saved in resumable checkpoints.
    * `hyperparameters`: `{key: losses.Rule}` for the `loss.<key>` values the loss reads, checked before anything
      loads (merged along the class hierarchy).
    * `trains_reward_model`: the policy is a reward model (a sequence classifier, models.RewardModel), not a causal
      LM; which weights model.load_from may name follows from it.

    Counters: `example_counter` counts training examples (the x-axis of every log and the N of `step-N`
    checkpoints), `batch_counter` iterator batches (micro-steps), `update_counter` optimizer steps.
    """

    requires_reference_model = False
    reference_logps_cacheable = False  # reference log-probs come only from sequence_logps (cache_reference_logprobs)
    token_level_logps = False
    trains_reward_model = False
    loss_state_class: Optional[type] = None
    hyperparameters: Dict[str, losses.Rule] = {}
    compatible_dataloaders: Tuple[type, ...] = (dataloader.DataLoader,)  # loaders whose batches this trainer reads

    @classmethod
    def config_problems(cls, config: DictConfig) -> List[str]:
        """Trainer-specific config checks, run before anything loads; each problem is `key: message`."""
        problems = []
        if bool(config.loss.use_reference_model) != cls.requires_reference_model:
            problems.append(f"loss.use_reference_model: {cls.__name__} "
                            + ("needs a reference model; set it to true" if cls.requires_reference_model else
                               "uses no reference model; set it to false so that none is loaded"))
        for key, rule in cls.declared_hyperparameters().items():
            problem = losses.rule_problem(rule, config.loss.get(key))
            if problem:
                problems.append(f"loss.{key}: {problem}")
        try:
            loader = resolve_class(str(config.loss.dataloader), "dataloader")
        except ConfigError:
            return problems  # an unresolvable loss.dataloader is reported by the config check itself
        if not issubclass(loader, cls.compatible_dataloaders):
            expected = " or ".join(c.__name__ for c in cls.compatible_dataloaders)
            problems.append(f"loss.dataloader: {cls.__name__} needs batches from {expected}, not {loader.__name__}")
        return problems

    @classmethod
    def declared_hyperparameters(cls) -> Dict[str, losses.Rule]:
        """`hyperparameters` of this class and its bases, a subclass's rule winning."""
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("hyperparameters", {}))
        return merged

    @classmethod
    def caches_reference_logps(cls) -> bool:
        """Whether cache_reference_logprobs can serve every reference log-prob this trainer reads."""
        return cls.requires_reference_model and cls.reference_logps_cacheable and not cls.token_level_logps

    @classmethod
    def wrap_policy(cls, policy: torch.nn.Module, adapt: lora.Adapt) -> torch.nn.Module:
        """The module trained as the policy, built around the loaded causal LM (PPO adds a value head), with LoRA
        adapters where it wants them: `adapt(model, task_type=...)` returns `model` adapted (with model.use_peft)
        or as it is."""
        return adapt(policy)

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
        self.loss_state = self.loss_state_class() if self.loss_state_class is not None else None
        self.unprinted_train_metrics: Optional[Dict[str, float]] = None  # logged, but not yet printed
        self.last_print_time: Optional[float] = None
        # Evaluation reuses the same batches every time, so they are built once.
        self.eval_batches = list(eval_iterator) if eval_iterator is not None else []
        distributed.rank0_print(f"Loaded {len(self.eval_batches)} eval batches of size {config.model.eval_batch_size}")

    # --- hooks -----------------------------------------------------------------------------------------------

    def sequence_logps(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor) -> SequenceLogps:
        """Log-probs of the labelled tokens of (N, T) right-padded rows: sums and token counts (N,), plus
        (N, T) per-token values for token-level losses (logps.py). A cached reference model answers from its cache.
        """
        lengths = response_lengths(labels, torch.float32)
        if isinstance(model, CachedReference):
            live = lambda *args: self.model_logps(*args, token_level=False)[0]  # noqa: E731
            return SequenceLogps(model.sequence_logps(input_ids, attention_mask, labels, live=live), lengths)
        logps, token_logps = self.model_logps(model, input_ids, attention_mask, labels, self.token_level_logps)
        if token_logps is None:
            return SequenceLogps(logps, lengths)
        return SequenceLogps(logps, lengths, token_logps, labels != IGNORE_INDEX)

    def model_logps(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, token_level: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(N,) summed label log-probs of (N, T) rows and, if `token_level`, their (N, T) per-token values
        (logps.model_logps, with this run's packing and prompt sharing)."""
        # The saved config of a run from before share_prompts existed evaluates unshared, as it trained.
        return logps.model_logps(model, input_ids, attention_mask, labels, pad_token_id=self.tokenizer.pad_token_id,
                                 pack=self.config.pack_sequences, token_level=token_level,
                                 share_prompts=self.config.get("share_prompts", False))

    def reference_forward(self, batch: Dict):
        """The subclass's `forward` outputs for the reference model, without gradients.

        With cache_reference_logprobs the first call fills the cache from every train and eval batch (eval.py has no
        train batches), sliced for this process as the loop slices them, and frees the reference model
        (reference_cache.py).
        """
        self.fill_reference_cache()
        with torch.no_grad():
            return self.forward(self.reference_model, batch)

    def fill_reference_cache(self) -> None:
        """With cache_reference_logprobs, fills the cache once (see reference_forward); else does nothing."""
        if isinstance(self.reference_model, CachedReference) and not self.reference_model.filled:
            batches = (distributed.slice_batch_for_rank(batch, self.rank, self.world_size, self.device)
                       for batch in itertools.chain(self.train_iterator or (), self.eval_batches))
            self.reference_model.fill(batches, self.all_reference_logps)

    def all_reference_logps(self, batch: Dict) -> None:
        """Runs every reference log-prob computation the loss makes for `batch` (what the reference cache stores)."""
        self.forward(self.reference_model, batch)

    def training_passes(self, batch: Dict) -> Iterator[Dict]:
        """The batches one training batch turns into, each getting a forward/backward pass (and counting as a
        micro-step of gradient accumulation). One pass by default; PPO makes ppo_epochs passes."""
        yield batch

    def prepare_step(self, batches: List[Dict]) -> None:
        """Called with this process's next gradient_accumulation_steps batches, before the first of them is trained
        on (for one-pass trainers: the micro-batches of one optimizer step), for statistics a loss takes over a whole
        step, such as KTO's reference point. Nothing by default."""

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
        # Only what trains has optimizer state: with LoRA the frozen base model gets none, and checkpoints hold none.
        trainable = [parameter for parameter in self.policy.parameters() if parameter.requires_grad]
        self.optimizer = getattr(torch.optim, config.optimizer)(trainable, lr=config.lr)
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
        # A resumed run starts at the first batch it has not trained on; the skipped ones are never tokenised. The
        # batches of one optimizer step are read together so that prepare_step sees all of them first.
        steps = chunked(self.train_iterator.iter_from(self.batch_counter), config.model.gradient_accumulation_steps)
        with progress, checkpoints.StopRequests() as stop:
            for step_batches in steps:
                local_batches = [distributed.slice_batch_for_rank(batch, self.rank, self.world_size, self.device)
                                 for batch in step_batches]
                for index, batch in enumerate(local_batches):
                    if self.evaluation_due():
                        self.evaluate_and_checkpoint()
                    if index == 0:
                        if pending == 0 and self.resumable_checkpoint_due():
                            self.save_checkpoint("resumable")
                        self.prepare_step(local_batches)
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
        """The forward/backward passes of this process's slice of one batch, stepping the optimizer whenever
        gradient_accumulation_steps micro-steps are pending; returns how many still are."""
        accumulation = self.config.model.gradient_accumulation_steps
        self.policy.train()
        for training_batch in self.training_passes(batch):
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
        if self.loss_state is not None:
            self.loss_state.step()
        self.update_counter += 1
        self.after_optimizer_step()
        return grad_norm

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step, once update_counter counts it (humanline re-syncs its reference model
        here). Nothing by default."""

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
                  "wandb_run_id": self.wandb_run_id(),
                  "loss_state": self.loss_state.state_dict() if self.loss_state is not None else None}
        return TrainingState(self.checkpoint_modules(), self.policy, self.optimizer, self.scheduler, values)

    def load_training_state(self, values: Dict) -> None:
        """Takes back the `values` of training_state() that a checkpoint saved (the modules, optimizer and scheduler
        are restored in place by the Checkpointer)."""
        self.example_counter, self.batch_counter = values["example_counter"], values["batch_counter"]
        self.update_counter = values["update_counter"]
        self.last_eval_at, self.last_eval_metrics = values["last_eval_at"], values["last_eval_metrics"]
        if self.loss_state is not None:
            self.loss_state.load_state_dict(values["loss_state"])

    def save_checkpoint(self, kind: str) -> Path:
        """Has the Checkpointer write a checkpoint of `kind` (intermediate, resumable, final) of the current state;
        every process must call it. Returns the checkpoint directory."""
        return self.checkpointer.save(self.training_state(), kind)

    def wandb_run_id(self) -> Optional[str]:
        if not self.log_to_wandb:
            return None
        import wandb

        return wandb.run.id if wandb.run is not None else None
