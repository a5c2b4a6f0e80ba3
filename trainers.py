"""Trainers: `BasicTrainer` owns the loop (evaluation, accumulation, clipping, logging, checkpoints); subclasses
implement `get_batch_metrics` and, through it, their forward pass and loss.

Add a loss by subclassing a trainer, overriding `loss` (a thin call into `losses.py`), and naming the class in a
`config/loss/NAME.yaml` (see README: "Adding a loss").
"""
import itertools
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import checkpoints
import dataloader
import distributed
import losses
from checkpoints import LATEST, OPTIMIZER, POLICY, SCHEDULER, TRAINER_STATE, V_HEAD, load_checkpoint, save_checkpoint
from dataloader import CHOSEN_KEYS, KL_KEYS, REJECTED_KEYS, STATUS_KEY, TARGET_KEYS
from errors import ConfigError, HalosError
from loss_inputs import PairedLogps, SequenceLogps, UnpairedLogps, response_lengths
from loss_state import RunningRewardMean
from models import CausalLMWithValueHead
from reference_cache import CachedReference
from resolve import resolve_class
from utils import (IGNORE_INDEX, chunked, formatted_dict, get_token_logps, label_logps, next_token_labels, pack_rows,
                   pad_to_length)

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

    Counters: `example_counter` counts training examples (the x-axis of every log and the N of `step-N`
    checkpoints), `batch_counter` iterator batches (micro-steps), `update_counter` optimizer steps.
    """

    requires_reference_model = False
    reference_logps_cacheable = False  # reference log-probs come only from sequence_logps (cache_reference_logprobs)
    token_level_logps = False
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
    def wrap_policy(cls, policy: torch.nn.Module) -> torch.nn.Module:
        """The module trained as the policy, built around the loaded causal LM (PPO adds a value head)."""
        return policy

    def __init__(self, tokenizer, config: DictConfig, train_iterator, eval_iterator, policy: torch.nn.Module,
                 reference_model: Optional[torch.nn.Module] = None, rank: int = 0, world_size: int = 1,
                 device: Optional[torch.device] = None, log_to_wandb: bool = False):
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
        self.example_counter = self.batch_counter = self.update_counter = 0
        self.last_eval_metrics, self.last_eval_at = {}, None
        self.last_save_at = 0  # example_counter of the last resumable checkpoint (or of the one resumed from)
        self.loss_state = self.loss_state_class() if self.loss_state_class is not None else None
        # Evaluation reuses the same batches every time, so they are built once.
        self.eval_batches = list(eval_iterator) if eval_iterator is not None else []
        distributed.rank0_print(f"Loaded {len(self.eval_batches)} eval batches of size {config.model.eval_batch_size}")

    # --- hooks -----------------------------------------------------------------------------------------------

    def sequence_logps(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor) -> SequenceLogps:
        """Log-probs of the labelled tokens of (N, T) right-padded rows: sums and token counts (N,), plus
        (N, T) per-token values for token-level losses.

        The model computes logits only where the next token is labelled (`logits_to_keep`), so its lm_head skips
        prompt and padding positions; with pack_sequences the rows are packed first (utils.pack_rows), so the
        padding tokens are not run at all. A cached reference model answers from its cache. No KV cache: training
        needs none (and packed rows need none).
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
        """(N,) summed label log-probs of (N, T) rows and, if `token_level`, their (N, T) per-token values."""
        n_rows, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        rows = torch.arange(n_rows, device=input_ids.device).unsqueeze(1).expand_as(input_ids)
        columns = positions.unsqueeze(0).expand_as(input_ids)
        layout = {"attention_mask": attention_mask}
        # Packed rows need the block-diagonal causal mask Hugging Face builds from position_ids for sdpa and eager
        # attention; flash-attention would need one single packed row, so it runs padded.
        packed = pack_rows(input_ids, attention_mask, labels, self.tokenizer.pad_token_id) \
            if self.config.pack_sequences and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager") \
            else None
        if packed is not None:
            # A packed sequence's position ids are its columns in its padded row.
            input_ids, labels, rows, columns = packed.input_ids, packed.labels, packed.rows, packed.position_ids
            layout = {"position_ids": packed.position_ids}
        next_labels = next_token_labels(labels)
        keep = next_labels != IGNORE_INDEX
        logits = model(input_ids, logits_to_keep=keep, use_cache=False, **layout).logits
        # The logits' storage is reused for their gradient: nothing else reads them.
        token_logps = label_logps(logits, next_labels[keep], overwrite_logits=True)
        sums = token_logps.new_zeros(n_rows).index_add(0, rows[keep], token_logps)
        if not token_level:
            return sums, None
        # The logits at position t score the token at t + 1.
        per_token = token_logps.new_zeros(n_rows, length).index_put((rows[keep], columns[keep] + 1), token_logps)
        return sums, per_token

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
        self.optimizer = getattr(torch.optim, config.optimizer)(self.policy.parameters(), lr=config.lr)
        # Linear warmup from lr/(warmup+1) to lr over warmup_steps optimizer steps, then constant.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1)))
        if resume_from is not None:
            self.restore(resume_from)
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
                            self.save_resumable()
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
        if self.config.debug or self.example_counter == self.last_save_at:
            return False
        evaluated = self.last_eval_at is not None and self.last_eval_at > self.last_save_at
        every = self.config.checkpoint_every
        return evaluated or (every is not None and self.example_counter - self.last_save_at >= every)

    def stop_requested(self, stop: checkpoints.StopRequests) -> bool:
        """Whether any process received SIGTERM/SIGINT: all of them must stop after the same optimizer step."""
        return distributed.all_reduce_mean(torch.tensor(float(stop.requested), device=self.device)).item() > 0

    def stop_after_signal(self, signal_number: int) -> None:
        distributed.rank0_print(f"received {signal.Signals(signal_number).name}: writing a resumable checkpoint after "
                                f"{self.example_counter} examples (send it again to stop at once)")
        self.save_resumable()
        raise TrainingInterrupted(f"stopped by {signal.Signals(signal_number).name} after {self.example_counter} "
                                  f"examples; {self.run_dir / LATEST} holds a resumable checkpoint: run the same "
                                  "command with ++resume_from=auto to continue", signal_number)

    def optimizer_step(self) -> float:
        grad_norm = self.clip_gradient()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.loss_state is not None:
            self.loss_state.step()
        self.update_counter += 1
        return grad_norm

    def clip_gradient(self) -> float:
        """Clips the policy's global gradient norm to model.max_grad_norm and returns the norm before clipping."""
        return distributed.clip_grad_norm(self.policy.parameters(), self.config.model.max_grad_norm)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stops on a NaN/inf loss before it reaches the weights; the last resumable checkpoint stays as it was."""
        if not torch.isfinite(loss).all():
            saved = f"{self.run_dir / LATEST} (after {self.last_save_at} examples) is the last good checkpoint" \
                if self.last_save_at else "no resumable checkpoint was written yet"
            raise TrainingError(f"the training loss became {loss.item()} at example {self.example_counter} "
                                f"(batch {self.batch_counter}); {saved}. Lower lr or check the data")

    def record(self, store: Dict[str, list], batch_metrics: Metrics) -> None:
        """Appends every rank's values of each metric to `store` (floats)."""
        for key, value in batch_metrics.items():
            store[key].extend(distributed.all_gather_if_needed(value.detach()).float().reshape(-1).cpu().tolist())

    def log_train_metrics(self, metrics: Dict[str, list], progress: tqdm) -> None:
        means = {k: sum(v) / len(v) for k, v in metrics.items() if v}
        means["counters/examples"] = self.example_counter
        means["counters/updates"] = self.update_counter
        if self.is_main:
            progress.set_postfix({k: means[k] for k in ("loss/train", "grad_norm") if k in means})
            progress.write(f"train stats after {self.example_counter} examples: {formatted_dict(means)}")
        self.wandb_log(means)

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
            distributed.rank0_print(f"eval after {self.example_counter} examples: {formatted_dict(self.last_eval_metrics)}")
            self.wandb_log(self.last_eval_metrics)
        self.last_eval_at = self.example_counter
        if save_intermediate and self.example_counter > 0 and self.config.intermediate_checkpoints \
                and not self.config.debug:
            self.save(self.run_dir / f"step-{self.example_counter}", self.last_eval_metrics)
            if self.is_main:
                checkpoints.prune_step_dirs(self.run_dir, self.config.keep_last_checkpoints)

    def wandb_log(self, values: Dict[str, float]) -> None:
        if self.log_to_wandb and self.is_main:
            import wandb

            wandb.log(values, step=self.example_counter)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        """Each weights file of a checkpoint and the module it holds; policy.pt is always the plain causal LM."""
        return {POLICY: self.policy}

    def save(self, output_dir: Optional[Path] = None, metrics: Optional[Dict[str, float]] = None) -> Path:
        """Writes a checkpoint of the weights (+ tokenizer) to `output_dir` and returns it.

        The default, <run_dir>/LATEST, is the finished run's: it also gets a trainer_state.pt marked finished and a
        Hugging Face export. Other directories (step-<N>) get an export only with export_intermediate.
        """
        output_dir = Path(output_dir or self.run_dir / LATEST)
        kind = "final" if output_dir == self.run_dir / LATEST else "intermediate"
        self.write_checkpoint(output_dir, metrics if metrics is not None else self.last_eval_metrics, kind)
        return output_dir

    def save_resumable(self) -> None:
        """Writes <run_dir>/LATEST with everything `restore` needs to continue from this optimizer-step boundary."""
        self.write_checkpoint(self.run_dir / LATEST, self.last_eval_metrics, "resumable")
        self.last_save_at = self.example_counter

    def write_checkpoint(self, output_dir: Path, metrics: Dict[str, float], kind: str) -> None:
        """Writes a checkpoint directory atomically (checkpoints.write_atomically); every rank must call this.

        kind: "intermediate" (weights and tokenizer), "resumable" (also optimizer.pt, scheduler.pt and
        trainer_state.pt) or "final" (weights, trainer_state.pt marked finished, always a Hugging Face export).
        """
        states = {name: distributed.full_state_dict(module) for name, module in self.checkpoint_modules().items()}
        optimizer_state = distributed.full_optimizer_state_dict(self.policy, self.optimizer) \
            if kind == "resumable" else None
        if self.is_main:
            def write(directory: Path) -> None:
                for name, state in states.items():
                    save_checkpoint(directory / name, state, self.example_counter, metrics)
                if optimizer_state is not None:
                    save_checkpoint(directory / OPTIMIZER, optimizer_state, self.example_counter)
                    save_checkpoint(directory / SCHEDULER, self.scheduler.state_dict(), self.example_counter)
                if kind != "intermediate":
                    save_checkpoint(directory / TRAINER_STATE, self.trainer_state(finished=kind == "final"),
                                    self.example_counter, metrics)
                self.tokenizer.save_pretrained(directory)
                if kind == "final" or self.config.export_intermediate:
                    checkpoints.export_hf(self.checkpoint_modules()[POLICY], states[POLICY], directory)

            checkpoints.write_atomically(output_dir, write)
            print(f"saved {kind} checkpoint after {self.example_counter} examples to {output_dir}")
        distributed.barrier()

    def trainer_state(self, finished: bool) -> Dict:
        """trainer_state.pt: the data position (counters), the last evaluation, RNG states, the wandb run and the
        config, all plain values that torch.load(weights_only=True) reads."""
        return {"example_counter": self.example_counter, "batch_counter": self.batch_counter,
                "update_counter": self.update_counter, "last_eval_at": self.last_eval_at,
                "last_eval_metrics": {k: float(v) for k, v in self.last_eval_metrics.items()},
                "rng": checkpoints.rng_states(), "wandb_run_id": self.wandb_run_id(), "finished": finished,
                "loss_state": self.loss_state.state_dict() if self.loss_state is not None else None,
                "config": OmegaConf.to_container(self.config, resolve=True)}

    def wandb_run_id(self) -> Optional[str]:
        if not self.log_to_wandb:
            return None
        import wandb

        return wandb.run.id if wandb.run is not None else None

    def restore(self, checkpoint_dir: Path) -> None:
        """Continues from a resumable checkpoint: weights, optimizer and scheduler state, counters, last evaluation
        and RNG states. Under FSDP rank 0 reads the weights and optimizer state and sends each rank its shards."""
        def main_state(name: str) -> Dict:
            return load_checkpoint(checkpoint_dir / name)["state"] if self.is_main else {}

        try:
            for name, module in self.checkpoint_modules().items():
                distributed.load_full_state_dict(module, main_state(name))
            distributed.load_full_optimizer_state_dict(self.policy, self.optimizer, main_state(OPTIMIZER))
            self.scheduler.load_state_dict(load_checkpoint(checkpoint_dir / SCHEDULER)["state"])
        except (RuntimeError, KeyError) as e:  # torch's mismatch messages run over many lines
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise checkpoints.CheckpointError(f"{checkpoint_dir} does not fit this run: {reason}") from None
        state = load_checkpoint(checkpoint_dir / TRAINER_STATE)["state"]
        self.example_counter, self.batch_counter = state["example_counter"], state["batch_counter"]
        self.update_counter, self.last_save_at = state["update_counter"], state["example_counter"]
        self.last_eval_at, self.last_eval_metrics = state["last_eval_at"], state["last_eval_metrics"]
        checkpoints.restore_rng_states(state["rng"])
        if self.loss_state is not None:
            self.loss_state.load_state_dict(state["loss_state"])
        distributed.rank0_print(f"resumed from {checkpoint_dir} after {self.example_counter} examples "
                                f"({self.batch_counter} batches, {self.update_counter} optimizer steps)")


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
                                           batch[TARGET_KEYS.combined_attention_mask], batch[TARGET_KEYS.labels]).logps
        per_example = losses.sft_loss(policy_logps)
        return per_example.mean(), {f"logps_{mode}/chosen": policy_logps.detach(), f"loss/{mode}": per_example.detach()}


class PreferenceTrainer(BasicTrainer):
    """What paired and unpaired losses share: one forward per model, the loss, its persistent state, the metrics.

    A loss is given either as `loss_function` (a function of losses.py, called with the chosen and rejected
    sequence log-probs of the policy, then of the reference if the trainer requires one, then with
    `length_normalised` the response token counts, then the loss's statistics and its declared `hyperparameters`
    read from config.loss), or by overriding `loss_from(policy, reference)` (typed containers: loss_inputs.py) or the
    original's `loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)`.
    """

    loss_function: Optional[Callable[..., Tuple]] = None
    length_normalised = False
    reference_logps_cacheable = True

    def forward(self, model: torch.nn.Module, batch: Dict):
        """The model's PairedLogps or UnpairedLogps of the batch."""
        raise NotImplementedError

    def loss(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: Optional[torch.Tensor], reference_rejected_logps: Optional[torch.Tensor],
             **statistics) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The original's contract: (losses, chosen_rewards, rejected_rewards) from summed sequence log-probs
        (reference ones None without a reference model); `statistics` are the loss_statistics, e.g. kl_estimate."""
        raise NotImplementedError(f"{type(self).__name__} defines neither loss_function, loss_from nor loss")

    def loss_from(self, policy, reference, **statistics) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen_rewards, rejected_rewards) from each model's log-probs (PairedLogps/UnpairedLogps;
        reference None without a reference model) and the loss_statistics."""
        # An overridden `loss` (the original's contract) wins over an inherited loss_function.
        if self.loss_function is None or type(self).loss is not PreferenceTrainer.loss:
            return self.loss(policy.chosen.logps, policy.rejected.logps,
                             None if reference is None else reference.chosen.logps,
                             None if reference is None else reference.rejected.logps, **statistics)
        inputs = [policy.chosen.logps, policy.rejected.logps]
        if self.requires_reference_model:
            inputs += [reference.chosen.logps, reference.rejected.logps]
        if self.length_normalised:
            inputs += [policy.chosen.lengths, policy.rejected.lengths]
        hyperparameters = {key: self.config.loss[key] for key in self.declared_hyperparameters()}
        # Read from the class: a function stored on a class would be bound as a method through the instance.
        return type(self).loss_function(*inputs, **statistics, **hyperparameters)

    def loss_statistics(self, batch: Dict, mode: str) -> Dict[str, torch.Tensor]:
        """Scalars the loss reads beside the log-probs: its persistent state's (e.g. BCO's delta)."""
        return self.loss_state.loss_inputs() if self.loss_state is not None else {}

    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Metrics]:
        policy = self.forward(self.policy, batch)
        reference = self.reference_forward(batch) if self.reference_model is not None else None
        statistics = self.loss_statistics(batch, mode)
        output = self.loss_from(policy, reference, **statistics)
        n_chosen, n_rejected = policy.chosen.logps.size(0), policy.rejected.logps.size(0)
        check_loss_output(self, output, n_chosen, n_rejected, self.n_losses(n_chosen, n_rejected))
        if mode == "train" and self.loss_state is not None:
            self.loss_state.observe(output)
        per_example, chosen_rewards, rejected_rewards = output[:3]
        return per_example.mean(), {
            **self.reward_metrics(chosen_rewards.detach(), rejected_rewards.detach(), mode),
            **{f"rewards_{mode}/{name}": value for name, value in self.logged_statistics(statistics).items()},
            f"logps_{mode}/chosen": policy.chosen.logps.detach(),
            f"logps_{mode}/rejected": policy.rejected.logps.detach(),
            f"loss/{mode}": per_example.detach(),
        }

    def logged_statistics(self, statistics: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The statistics logged as rewards_{mode}/<name> (KTO's reference point as KL_estimate)."""
        return {}

    @staticmethod
    def n_losses(n_chosen: int, n_rejected: int) -> int:
        raise NotImplementedError

    def reward_metrics(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, mode: str) -> Metrics:
        raise NotImplementedError


class PairedPreferenceTrainer(PreferenceTrainer):
    """Losses over (chosen, rejected) pairs of responses to one prompt: B pairs, losses (B,)."""

    compatible_dataloaders = (dataloader.PairedPreferenceDataLoader,)

    def forward(self, model: torch.nn.Module, batch: Dict) -> PairedLogps:
        """Chosen and rejected log-probs (B rows each) from one concatenated forward pass."""
        input_ids, attention_mask, labels = concatenate_rows(batch, (CHOSEN_KEYS, REJECTED_KEYS),
                                                             self.tokenizer.pad_token_id)
        logps = self.sequence_logps(model, input_ids, attention_mask, labels)
        n_pairs = batch[CHOSEN_KEYS.labels].size(0)
        return PairedLogps(logps.rows(slice(None, n_pairs)), logps.rows(slice(n_pairs, None)))

    @staticmethod
    def n_losses(n_chosen: int, n_rejected: int) -> int:
        return n_chosen

    def reward_metrics(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, mode: str) -> Metrics:
        return {f"rewards_{mode}/chosen": chosen_rewards, f"rewards_{mode}/rejected": rejected_rewards,
                f"rewards_{mode}/accuracies": losses.paired_reward_accuracies(chosen_rewards, rejected_rewards),
                f"rewards_{mode}/margins": chosen_rewards - rejected_rewards}


class UnpairedPreferenceTrainer(PreferenceTrainer):
    """Losses over single responses labelled desirable ('chosen') or undesirable ('rejected'): losses
    (n_chosen + n_rejected,), chosen rows first.

    With `uses_kl_rows`, each batch's mismatched (prompt, other response) rows also run through both models
    (without gradients) and their mean log-ratio over the whole optimizer step, every micro-batch and process,
    reaches the loss as `kl_estimate` (KTO's reference point z).
    """

    compatible_dataloaders = (dataloader.UnpairedPreferenceDataLoader, dataloader.SimpleKTODataLoader)
    uses_kl_rows = False
    step_kl_estimate: Optional[torch.Tensor] = None  # z of the optimizer step in progress (prepare_step)

    def forward(self, model: torch.nn.Module, batch: Dict) -> UnpairedLogps:
        """Desirable (n_chosen) and undesirable (n_rejected) rows' log-probs from one forward pass."""
        logps = self.sequence_logps(model, *concatenate_rows(batch, (TARGET_KEYS,), self.tokenizer.pad_token_id))
        chosen = torch.tensor([status == "chosen" for status in batch[STATUS_KEY]], device=logps.logps.device)
        return UnpairedLogps(logps.rows(chosen), logps.rows(~chosen))

    def kl_logps(self, model: torch.nn.Module, batch: Dict) -> torch.Tensor:
        """(B,) summed log-probs of the batch's KL rows, without gradients.

        They get a forward pass of their own: the KL estimate is detached (losses.kto_kl_estimate), so
        backpropagating through them, as one concatenated pass would, spends a third of KTO's policy compute on zeros.
        """
        with torch.no_grad():
            return self.sequence_logps(model, *concatenate_rows(batch, (KL_KEYS,), self.tokenizer.pad_token_id)).logps

    def kl_estimate(self, batches: List[Dict]) -> torch.Tensor:
        """z_local over the KL rows of these batches of every process (the mean policy/reference log-ratio), ()."""
        self.fill_reference_cache()
        policy_logps, reference_logps = (
            distributed.all_gather_if_needed(torch.cat([self.kl_logps(model, batch) for batch in batches]))
            for model in (self.policy, self.reference_model))
        return losses.kto_kl_estimate(policy_logps, reference_logps)

    def prepare_step(self, batches: List[Dict]) -> None:
        # KTO's reference point is one statistic of the whole optimizer step, so splitting the step into
        # accumulation micro-batches or processes does not change it.
        if self.uses_kl_rows:
            self.step_kl_estimate = self.kl_estimate(batches)

    def loss_statistics(self, batch: Dict, mode: str) -> Dict[str, torch.Tensor]:
        statistics = super().loss_statistics(batch, mode)
        if self.uses_kl_rows:
            prepared = mode == "train" and self.step_kl_estimate is not None
            statistics["kl_estimate"] = self.step_kl_estimate if prepared else self.kl_estimate([batch])
        return statistics

    def logged_statistics(self, statistics: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"KL_estimate": statistics["kl_estimate"]} if "kl_estimate" in statistics else {}

    def all_reference_logps(self, batch: Dict) -> None:
        super().all_reference_logps(batch)
        if self.uses_kl_rows:
            self.kl_logps(self.reference_model, batch)

    @staticmethod
    def n_losses(n_chosen: int, n_rejected: int) -> int:
        return n_chosen + n_rejected

    def reward_metrics(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, mode: str) -> Metrics:
        return {f"rewards_{mode}/chosen": chosen_rewards, f"rewards_{mode}/rejected": rejected_rewards,
                f"rewards_{mode}/margins": self.global_margin(chosen_rewards, rejected_rewards)}

    @staticmethod
    def global_margin(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
        """Mean chosen minus mean rejected reward over all processes' rows (a class with no rows counts as 0)."""
        def mean_or_zero(values: torch.Tensor) -> torch.Tensor:
            values = distributed.all_gather_if_needed(values.detach())
            return values.mean() if values.numel() else values.new_zeros(())
        return mean_or_zero(chosen_rewards) - mean_or_zero(rejected_rewards)


# --- paired losses -------------------------------------------------------------------------------------------
# Each names its function in losses.py; the hyperparameters it declares are checked before anything loads and
# passed to the function from config.loss (PreferenceTrainer.loss_from).


class DPOTrainer(PairedPreferenceTrainer):
    """Direct Preference Optimization (Rafailov et al., 2023)."""
    requires_reference_model = True
    loss_function = losses.dpo_loss
    hyperparameters = {"beta": losses.POSITIVE}


class CDPOTrainer(DPOTrainer):
    """Conservative DPO: DPO with an assumed rate epsilon of flipped preference labels."""
    loss_function = losses.cdpo_loss
    hyperparameters = {"epsilon": losses.CLOSED_HALF}


class RobustDPOTrainer(DPOTrainer):
    """Robust DPO (Chowdhury et al., 2024): unbiased under an assumed label-noise rate epsilon."""
    loss_function = losses.rdpo_loss
    hyperparameters = {"epsilon": losses.HALF_OPEN_HALF}


class HingeTrainer(DPOTrainer):
    """A hinge on the DPO margin: max(0, 1 - beta * margin), no gradient past a margin of 1/beta nats."""
    loss_function = losses.hinge_loss


class NCATrainer(DPOTrainer):
    """Noise Contrastive Alignment, pairwise (Chen et al., 2024): the chosen likelihood rises itself, not only the
    margin over the rejected one."""
    loss_function = losses.nca_loss


class APOZeroTrainer(DPOTrainer):
    """Anchored Preference Optimization, zero (D'Oosterlinck et al., 2024): chosen up, rejected down, each anchored
    at the reference; for chosen responses better than the model's own."""
    loss_function = losses.apo_zero_loss


class APODownTrainer(DPOTrainer):
    """Anchored Preference Optimization, down (D'Oosterlinck et al., 2024): the rejected likelihood down, the chosen
    one held back by the margin term; for chosen responses worse than the model's own."""
    loss_function = losses.apo_down_loss


class SPPOHardTrainer(DPOTrainer):
    """Self-Play Preference Optimization with hard labels (Wu et al., 2024): log-ratios regressed to +-1/(2 beta)."""
    loss_function = losses.sppo_hard_loss


class BCOPairTrainer(DPOTrainer):
    """Binary Classifier Optimization on both responses of each pair, with a running-mean reward shift delta."""
    loss_function = losses.bco_pair_loss
    loss_state_class = RunningRewardMean


class DPONormTrainer(DPOTrainer):
    """Length-normalised DPO: DPO on per-token log-ratios."""
    loss_function = losses.dpo_norm_loss
    length_normalised = True


class IPOTrainer(PairedPreferenceTrainer):
    """Identity Preference Optimization (Azar et al., 2024) on per-token log-ratios."""
    requires_reference_model = True
    loss_function = losses.ipo_loss
    length_normalised = True
    hyperparameters = {"tau": losses.POSITIVE}


class SimPOTrainer(PairedPreferenceTrainer):
    """SimPO (Meng et al., 2024): per-token log-probs with a target margin gamma; no reference model."""
    loss_function = losses.simpo_loss
    length_normalised = True
    hyperparameters = {"beta": losses.POSITIVE, "gamma": losses.NONNEGATIVE}


class ORPOTrainer(PairedPreferenceTrainer):
    """Odds-Ratio Preference Optimization (Hong et al., 2024): NLL plus an odds-ratio term; no reference model."""
    loss_function = losses.orpo_loss
    length_normalised = True
    hyperparameters = {"lambda_coef": losses.NONNEGATIVE}


class SLiCTrainer(PairedPreferenceTrainer):
    """SLiC-HF: a hinge on the chosen/rejected log-prob margin plus an NLL regulariser; no reference model."""
    loss_function = losses.slic_loss
    hyperparameters = {"beta": losses.NONNEGATIVE, "lambda_coef": losses.NONNEGATIVE}


# --- unpaired losses -----------------------------------------------------------------------------------------


class KTOTrainer(UnpairedPreferenceTrainer):
    """Kahneman-Tversky Optimization with the mismatched-pair KL estimate as reference point."""
    requires_reference_model = True
    compatible_dataloaders = (dataloader.UnpairedPreferenceDataLoader,)  # it builds the KL rows
    uses_kl_rows = True
    loss_function = losses.kto_loss
    hyperparameters = {"beta": losses.POSITIVE, "desirable_weight": losses.NONNEGATIVE,
                       "undesirable_weight": losses.NONNEGATIVE}

    @classmethod
    def config_problems(cls, config: DictConfig) -> List[str]:
        problems = super().config_problems(config)
        for key in ("batch_size", "eval_batch_size"):
            if isinstance(config.model[key], int) and config.model[key] < 2:
                problems.append(f"model.{key}: KTO pairs each prompt with another example's response to estimate "
                                f"its reference point, so batches need at least 2 examples, got {config.model[key]}")
        return problems


class SimpleKTOTrainer(UnpairedPreferenceTrainer):
    """KTO whose reference points are the opposite class's mean reward in the microbatch."""
    requires_reference_model = True
    loss_function = losses.simple_kto_loss
    hyperparameters = {"beta": losses.POSITIVE}


class KTOZeroTrainer(SimpleKTOTrainer):
    """KTO with a reference point of zero: 1 - sigmoid(beta r) for desirable, 1 - sigmoid(-beta r) for undesirable
    responses. It is also APO-zero for unpaired data (config/loss/apo-zero-unpaired.yaml): one loss, two names."""
    loss_function = losses.kto_zero_loss


class BCOTrainer(SimpleKTOTrainer):
    """Binary Classifier Optimization (Jung et al., 2024) with a running-mean reward shift delta."""
    loss_function = losses.bco_loss
    loss_state_class = RunningRewardMean


class Rollout(NamedTuple):
    """What offline PPO fixes for a batch before its optimisation passes; every field is (B, T-1)."""

    mask: torch.Tensor  # True at response tokens
    reference_logps: torch.Tensor  # the frozen reference model's token log-probs (PPO's "old" policy here)
    values: torch.Tensor  # the value head's estimates before the update
    advantages: torch.Tensor  # GAE advantages, whitened over the batch's response tokens
    returns: torch.Tensor  # critic targets: GAE returns (advantages + values)


class PPOTrainer(BasicTrainer):
    """Offline PPO: each response earns +1 (desirable) or -1 (undesirable) at its last token; the policy is updated
    with PPO's clipped objective against the frozen reference model, a value head learns the returns, and a KL
    penalty keeps the policy near the reference. Saves `policy.pt` (the causal LM) and `v_head.pt`."""

    requires_reference_model = True
    compatible_dataloaders = (dataloader.UnpairedPreferenceDataLoader,)
    hyperparameters = {"ppo_epochs": losses.POSITIVE_INT, "cliprange": losses.OPEN_UNIT, "lam": losses.UNIT_INTERVAL,
                       "gamma": losses.UNIT_INTERVAL, "critic_coef": losses.NONNEGATIVE, "KL_coef": losses.NONNEGATIVE}

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
