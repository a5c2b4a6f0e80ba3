"""What rounds.py reports per round: the mean reward of a policy's samples, its win rate against the dataset's
responses (with a judge), and its KL divergence to the initial model, estimated on its own samples as
mean over samples of log π(y|x) − log π_0(y|x) (y ~ π, response tokens only, the prompt/response tokenisation of
reward_scoring.encode_text)."""
import math
import statistics
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig

import weights
from reward_scoring import encode_text


def sequence_logps(model: torch.nn.Module, tokenizer, texts: Sequence[tuple]) -> List[float]:
    """log π(response | prompt) of each (prompt, response), summed over the response tokens and its EOS."""
    totals = []
    with torch.no_grad():
        for prompt, response in texts:
            ids, n_prompt = encode_text(tokenizer, prompt, response)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            token_logps = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
            totals.append(math.fsum(token_logps[n_prompt - 1:].tolist()))
    return totals


def kl_to_initial(config: DictConfig, tokenizer, policy_path: Optional[str], texts: Sequence[tuple]) -> float:
    """KL(π || π_0) on samples of π: 0 for the initial model itself (policy_path None)."""
    if policy_path is None:
        return 0.0
    vocab = len(tokenizer)
    initial_weights = weights.locate_in_config(config, "model.load_from")
    models = [weights.load_model(located, config.model, "float32", config.seed, vocab).eval()
              for located in (weights.locate(policy_path, config.cache_dir, "policy"), initial_weights)]
    policy, initial = (sequence_logps(model, tokenizer, texts) for model in models)
    return statistics.fmean(p - q for p, q in zip(policy, initial))


def win_rate(judge_scores: Sequence[float]) -> float:
    """Wins plus half the ties, over the samples (judge score +1 win, 0 tie, -1 loss)."""
    return statistics.fmean((score + 1) / 2 for score in judge_scores)


def table(rows: Sequence[Dict[str, object]]) -> str:
    """A Markdown table of the per-round rows (keys as columns, floats with 4 decimals)."""
    columns = list(rows[0])
    cell = lambda value: f"{value:.4f}" if isinstance(value, float) else str(value)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
