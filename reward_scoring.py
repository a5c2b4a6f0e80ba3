"""Scoring (prompt, response) texts with a reward model: a Hugging Face sequence classifier with one label, such
as a loss=bradley-terry export (label.py's --reward_model).

A text is tokenised as training tokenises a prompt-format (non-templated) example: the prompt with the tokenizer's
special tokens (a trailing EOS dropped), the response without them, then EOS; rows are right-padded and the
classifier pools at each row's last non-pad token, as models.RewardModel does in training. Chat-templated prompts
are tokenised the same way, which may split the prompt/response boundary differently from training's templated
encoding (docs/online.md).
"""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from transformers import AutoTokenizer

from checkpoints import is_hf_model_dir
from errors import HalosError
from models import from_pretrained
from weights import SequenceClassifierDirectory


def encode_text(tokenizer, prompt: str, response: str) -> Tuple[List[int], int]:
    """The ids of prompt + response + EOS, tokenised as training tokenises a prompt-format example, and the number
    of prompt ids."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id:
        prompt_ids = prompt_ids[:-1]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


class RewardScorer:
    """A loaded reward model and its tokenizer, scoring batches of texts in float32 on the CPU or GPU."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = self.tokenizer.eos_token_id
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    @classmethod
    def load(cls, model_dir: str, tokenizer_dir: Optional[str] = None) -> "RewardScorer":
        """The sequence classifier of `model_dir` and the tokenizer of `tokenizer_dir` (default: `model_dir`, else
        its parent, the run directory of a finished loss=bradley-terry run)."""
        path = Path(model_dir)
        if not is_hf_model_dir(path):
            raise HalosError(f"--reward_model: {model_dir} is not a Hugging Face model directory (config.json and "
                             f"weights); give a finished loss=bradley-terry run's LATEST or a sequence classifier")
        model = SequenceClassifierDirectory.load(path, None, "float32", "--reward_model")
        if model.config.num_labels != 1:
            raise HalosError(f"--reward_model: {model_dir} has {model.config.num_labels} labels; a reward model "
                             f"has one (a scalar score)")
        candidates = [Path(tokenizer_dir)] if tokenizer_dir else [path, path.parent]
        found = next((c for c in candidates if (c / "tokenizer_config.json").exists()), None)
        if found is None:
            raise HalosError(f"--tokenizer: no tokenizer in {' or '.join(map(str, candidates))}; pass --tokenizer")
        return cls(model, from_pretrained(AutoTokenizer.from_pretrained, str(found), "--tokenizer"))

    def score(self, texts: Sequence[Tuple[str, str]]) -> List[float]:
        """The scalar score of each (prompt, response)."""
        rows = [encode_text(self.tokenizer, prompt, response)[0] for prompt, response in texts]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            input_ids[k, :len(row)] = torch.tensor(row)
            attention_mask[k, :len(row)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device)).logits
        return logits[:, 0].float().cpu().tolist()
