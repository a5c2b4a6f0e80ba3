"""Offline PPO (the original's one-step variant): a value head on the policy, +1/-1 rewards at the last response
token, GAE advantages, the clipped objective against the frozen reference model."""
from typing import Dict, Iterator, NamedTuple, Tuple

import torch

import dataloader
import distributed
import lora
import losses
from basic_trainer import BasicTrainer, Metrics
from checkpoints import POLICY, V_HEAD
from dataloader import STATUS_KEY, TARGET_KEYS
from models import CausalLMWithValueHead
from utils import get_token_logps


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
    hyperparameters = {"ppo_epochs": losses.POSITIVE_INT, "cliprange": losses.OPEN_UNIT, "lam": losses.UNIT_INTERVAL,
                       "gamma": losses.UNIT_INTERVAL, "critic_coef": losses.NONNEGATIVE, "KL_coef": losses.NONNEGATIVE}

    @classmethod
    def wrap_policy(cls, policy: torch.nn.Module, adapt: lora.Adapt) -> torch.nn.Module:
        return CausalLMWithValueHead(adapt(policy))

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
