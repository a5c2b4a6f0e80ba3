"""Small tensor and formatting helpers shared by trainers, models and scripts."""
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent
IGNORE_INDEX = -100  # label value of positions that carry no loss (prompt and padding)


class HalosError(ValueError):
    """A user-facing error: bad config, data, checkpoint or environment. Entry points print it without a traceback."""


def register_resolvers() -> None:
    """`${repo_path:assets/tiny-llama}` resolves to that path inside this repository, wherever it is run from."""
    if not OmegaConf.has_resolver("repo_path"):
        OmegaConf.register_new_resolver("repo_path", lambda rel: str(REPO_ROOT / rel))


def pad_to_length(tensor: torch.Tensor, length: int, pad_value: float, dim: int = -1) -> torch.Tensor:
    """Right-pads `tensor` along `dim` with `pad_value` up to `length`; never truncates."""
    missing = length - tensor.size(dim)
    if missing <= 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(pad_shape, pad_value)], dim=dim)


def get_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels, in float32 whatever the model dtype.

    Token t is predicted by the logits at position t-1, so the outputs cover positions 1..T-1.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, IGNORE_INDEX where no loss is taken.

    Returns:
        token_logps (B, T-1), zero where masked; mask (B, T-1) bool, True at labelled positions.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree on (batch, length)")
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    log_probs = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    token_logps = torch.gather(log_probs, 2, labels.masked_fill(~mask, 0).unsqueeze(2)).squeeze(2)
    return token_logps * mask, mask


def get_batch_logps(logits: torch.Tensor, labels: torch.Tensor, average_log_prob: bool = False) -> torch.Tensor:
    """Sequence log-probabilities: (B,) sum (or mean) over labelled tokens of log p(label_t | tokens < t).

    Computed in float32 (the original computed log_softmax in the policy dtype, bf16 by default).

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) target ids, IGNORE_INDEX where no loss is taken.
        average_log_prob: return the mean over labelled tokens instead of the sum.
    """
    token_logps, mask = get_token_logps(logits, labels)
    summed = token_logps.sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average_log_prob else summed


def disable_dropout(model: torch.nn.Module) -> None:
    """Sets p=0 on every dropout module: training and log-prob evaluation must be deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0


def formatted_dict(d: Mapping[str, float]) -> Dict[str, str]:
    """Floats rendered with 5 significant digits, for printing metrics."""
    return {k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in d.items()}
