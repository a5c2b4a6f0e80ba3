"""The trainers a loss config names (`trainer:` in config/loss/NAME.yaml): the bases of each data shape and one thin
subclass per loss. `BasicTrainer` (basic_trainer.py) owns the loop; `PPOTrainer` lives in ppo_trainer.py; both are
importable from here, like every trainer.

Add a loss by subclassing `PairedPreferenceTrainer` or `UnpairedPreferenceTrainer` (name a function of `losses` in
`loss_function`, or override `loss_from` or the original's `loss`) and naming the class in a `config/loss/NAME.yaml`
(README: "Adding a loss").
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

import dataloader
import distributed
import humanline
import lora
import losses
from basic_trainer import BasicTrainer, Metrics, TrainingError, TrainingInterrupted  # noqa: F401 (trainer names)
from checkpoints import POLICY, REFERENCE
from dataloader import CHOSEN_KEYS, GROUP_KEYS, KL_KEYS, REJECTED_KEYS, STATUS_KEY, TARGET_KEYS
from loss_inputs import PairedLogps, SequenceLogps, UnpairedLogps, response_lengths
from loss_state import RunningRewardMean
from models import RewardModel, copy_weights
from ppo_trainer import PPOTrainer  # noqa: F401 (named by config/loss/ppo.yaml)
from utils import IGNORE_INDEX, pad_to_length


def concatenate_rows(batch: Dict, key_groups: Tuple,
                     pad_token_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    humanline_capable = False  # loss.humanline may turn on humanline (humanline.py): losses of the log-ratios alone

    @classmethod
    def config_problems(cls, config: DictConfig) -> List[str]:
        return super().config_problems(config) + humanline.config_problems(cls.__name__, cls.humanline_capable, config)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.humanline = humanline.Humanline.from_loss_config(self.config.loss) if self.humanline_capable else None
        if self.humanline is not None:
            self.token_level_logps = True  # the clamp acts on each token's log-ratio

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
        # The statistics first: KTO's reference point runs the reference model over the batch's rows in one pass.
        statistics = self.loss_statistics(batch, mode)
        reference = self.reference_forward(batch) if self.reference_model is not None else None
        output = self.loss_from(*self.loss_inputs(policy, reference), **statistics)
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

    def loss_inputs(self, policy, reference) -> Tuple:
        """What the loss is given of each model's log-probs: as computed, or with humanline the clamped log-ratios
        (policy side) against zeros (reference side)."""
        return (policy, reference) if self.humanline is None else self.humanline.log_ratio_sides(policy, reference)

    def after_optimizer_step(self) -> None:
        if self.humanline is not None and self.humanline.sync_due(self.update_counter):
            copy_weights(self.policy, self.reference_model)

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        # A synced reference is no longer the starting model: resuming needs it as it is.
        synced = {REFERENCE: self.reference_model} if self.humanline is not None else {}
        return {**super().checkpoint_modules(), **synced}

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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The reference log-probs of target rows that kl_estimate computed together with their KL rows, until the
        # batch's loss reads them: (batch, UnpairedLogps) pairs, the batch itself held so that identity finds it.
        self.early_reference_logps: List[Tuple[Dict, UnpairedLogps]] = []

    def forward(self, model: torch.nn.Module, batch: Dict) -> UnpairedLogps:
        """Desirable (n_chosen) and undesirable (n_rejected) rows' log-probs from one forward pass."""
        logps = self.sequence_logps(model, *concatenate_rows(batch, (TARGET_KEYS,), self.tokenizer.pad_token_id))
        return self.split_by_status(logps, batch)

    @staticmethod
    def split_by_status(logps: SequenceLogps, batch: Dict) -> UnpairedLogps:
        chosen = torch.tensor([status == "chosen" for status in batch[STATUS_KEY]], device=logps.logps.device)
        return UnpairedLogps(logps.rows(chosen), logps.rows(~chosen))

    def kl_logps(self, model: torch.nn.Module, batch: Dict) -> torch.Tensor:
        """(B,) summed log-probs of the batch's KL rows, without gradients.

        The policy's get a forward pass of their own: the KL estimate is detached (losses.kto_kl_estimate), so
        backpropagating through them, as one concatenated pass would, spends a third of KTO's policy compute on zeros.
        """
        with torch.no_grad():
            return self.sequence_logps(model, *concatenate_rows(batch, (KL_KEYS,), self.tokenizer.pad_token_id)).logps

    def reference_target_and_kl_logps(self, batch: Dict) -> Tuple[UnpairedLogps, torch.Tensor]:
        """The reference model's target-row log-probs and (B,) KL-row log-probs from one pass without gradients.

        KL row k pairs target row k's prompt with another response, so with share_prompts the pass runs each prompt
        once for both rows; the reference needs no gradient, so nothing is spent on the KL rows' backward.
        """
        with torch.no_grad():
            logps = self.sequence_logps(self.reference_model, *concatenate_rows(batch, (TARGET_KEYS, KL_KEYS),
                                                                                self.tokenizer.pad_token_id))
        n_rows = len(batch[STATUS_KEY])
        return self.split_by_status(logps.rows(slice(None, n_rows)), batch), logps.logps[n_rows:]

    def kl_estimate(self, batches: List[Dict]) -> torch.Tensor:
        """z_local over the KL rows of these batches of every process (the mean policy/reference log-ratio), ().

        The reference's target-row log-probs come out of the same passes and are kept for the batches' losses
        (reference_forward)."""
        self.fill_reference_cache()
        policy_logps = torch.cat([self.kl_logps(self.policy, batch) for batch in batches])
        reference_logps = []
        for batch in batches:
            target_logps, kl_logps = self.reference_target_and_kl_logps(batch)
            self.early_reference_logps.append((batch, target_logps))
            reference_logps.append(kl_logps)
        return losses.kto_kl_estimate(distributed.all_gather_if_needed(policy_logps),
                                      distributed.all_gather_if_needed(torch.cat(reference_logps)))

    def reference_forward(self, batch: Dict) -> UnpairedLogps:
        """The reference's target-row log-probs: those kl_estimate computed for this batch, else a pass of their
        own."""
        for index, (early_batch, logps) in enumerate(self.early_reference_logps):
            if early_batch is batch:
                del self.early_reference_logps[index]
                return logps
        return super().reference_forward(batch)

    def prepare_step(self, batches: List[Dict]) -> None:
        # KTO's reference point is one statistic of the whole optimizer step, so splitting the step into
        # accumulation micro-batches or processes does not change it.
        if self.uses_kl_rows:
            self.early_reference_logps.clear()  # any left by a step the data ended in the middle of
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
        if self.uses_kl_rows:
            self.reference_target_and_kl_logps(batch)
        else:
            super().all_reference_logps(batch)

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
    """Direct Preference Optimization (Rafailov et al., 2023); humanline with loss.humanline (config/loss/dpo.yaml)."""
    requires_reference_model = True
    humanline_capable = True
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
    """Kahneman-Tversky Optimization with the mismatched-pair KL estimate as reference point; humanline with
    loss.humanline (config/loss/kto.yaml)."""
    requires_reference_model = True
    humanline_capable = True
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


# --- reward models -------------------------------------------------------------------------------------------


class BradleyTerryTrainer(PairedPreferenceTrainer):
    """A Bradley-Terry reward model (loss=bradley-terry): a scalar head on the model, trained so that
    σ(r(x, y_w) − r(x, y_l)) is the probability that y_w is preferred; rewards_{mode}/accuracies is its pairwise
    accuracy. The finished checkpoint is a Hugging Face AutoModelForSequenceClassification directory."""

    trains_reward_model = True

    @classmethod
    def wrap_policy(cls, policy: torch.nn.Module, adapt: lora.Adapt) -> torch.nn.Module:
        # With LoRA the classifier carries the adapters, and its score head trains whole beside them.
        reward_model = RewardModel(policy)
        reward_model.classifier = adapt(reward_model.classifier, task_type=lora.SEQ_CLS)
        return reward_model

    def __init__(self, tokenizer, config: DictConfig, *args, **kwargs):
        super().__init__(tokenizer, config, *args, **kwargs)
        # The exported classifier pools at the last token that is not the pad token, as scores are read here.
        self.policy.classifier.config.pad_token_id = tokenizer.pad_token_id

    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Metrics]:
        input_ids, attention_mask, _ = concatenate_rows(batch, (CHOSEN_KEYS, REJECTED_KEYS),
                                                        self.tokenizer.pad_token_id)
        scores = self.policy(input_ids, attention_mask, pack=self.config.pack_sequences)
        n_pairs = batch[CHOSEN_KEYS.labels].size(0)
        output = losses.bradley_terry_loss(scores[:n_pairs], scores[n_pairs:])
        return output.losses.mean(), {**self.reward_metrics(output.chosen_rewards, output.rejected_rewards, mode),
                                      f"loss/{mode}": output.losses.detach()}

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        return {POLICY: self.policy.classifier}


# --- scored groups -------------------------------------------------------------------------------------------


class GRPOTrainer(BasicTrainer):
    """Offline GRPO on scored responses (loss=grpo): group-normalised advantages, per-token ratios to the reference
    model clipped to [1 − ε, 1 + ε], a k3 KL penalty, and the token mean over the whole optimizer step.

    The step's response-token count is all-reduced in prepare_step, and each micro-batch's summed token losses are
    divided by count / (accumulation steps × processes): after the loop's division by the accumulation steps and
    the gradient average over processes, the gradient is that of the step's token mean, however the step is split.
    """

    requires_reference_model = True
    token_level_logps = True
    compatible_dataloaders = (dataloader.ScoredGroupDataLoader,)
    hyperparameters = {"beta": losses.NONNEGATIVE, "epsilon": losses.OPEN_UNIT, "advantage_epsilon": losses.POSITIVE}
    step_token_count: Optional[torch.Tensor] = None  # response tokens of the optimizer step in progress

    def forward(self, model: torch.nn.Module, batch: Dict) -> SequenceLogps:
        return self.sequence_logps(model, *concatenate_rows(batch, (TARGET_KEYS,), self.tokenizer.pad_token_id))

    def prepare_step(self, batches: List[Dict]) -> None:
        local = sum(response_lengths(batch[TARGET_KEYS.labels], torch.float64).sum() for batch in batches)
        self.step_token_count = distributed.all_reduce_sum(local.to(self.device))

    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Metrics]:
        policy = self.forward(self.policy, batch)
        reference = self.reference_forward(batch)
        score, mean, std = (torch.tensor(batch[key], dtype=policy.logps.dtype, device=policy.logps.device)
                            for key in GROUP_KEYS)
        config = self.config.loss
        advantages = losses.grpo_advantages(score, mean, std, epsilon=config.advantage_epsilon)
        if mode == "train":
            token_count = self.step_token_count / (self.config.model.gradient_accumulation_steps * self.world_size)
        else:
            token_count = policy.lengths.sum()
        output = losses.grpo_loss(policy.token_logps, reference.token_logps, policy.token_mask, advantages,
                                  token_count.to(policy.logps.dtype), beta=config.beta, epsilon=config.epsilon)
        return output.loss, {f"rewards_{mode}/rewards": score, f"rewards_{mode}/advantages": advantages,
                             f"rewards_{mode}/KL": output.kl, f"rewards_{mode}/clipped": output.clipped,
                             f"logps_{mode}/responses": policy.logps.detach(), f"loss/{mode}": output.losses}
