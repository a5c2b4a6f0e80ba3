"""Sampling with vLLM, for eval.py's `sampler: vllm` (or `auto` on a machine with a GPU and the vllm package): the
prompts, token budget, nucleus settings, stop ids and output schema of sampling.HFGenerator, with vLLM's RNG seeded
per batch instead of torch's. vLLM is an optional extra (pip install vllm, GPU machines only); nothing imports it
unless it is asked for.
"""
import importlib.util
from pathlib import Path
from typing import List, Sequence

import torch

from errors import HalosError
from sampling import decode_until_stop, new_token_budget

SAMPLERS = ("auto", "hf", "vllm")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_unavailable() -> str:
    """Why vLLM cannot sample here ('' when it can)."""
    if not vllm_installed():
        return "the vllm package is not installed (pip install vllm, on a machine with a GPU)"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and this machine has none"
    return ""


def resolve_sampler(choice: str) -> str:
    """The sampler eval.py uses: `auto` is vllm where it can run, else hf; an explicit vllm that cannot is an error."""
    if choice == "auto":
        return "hf" if vllm_unavailable() else "vllm"
    if choice == "vllm" and vllm_unavailable():
        raise HalosError(f"sampler=vllm: {vllm_unavailable()}; use sampler=hf (Hugging Face generate)")
    return choice


class VLLMGenerator:
    """Samples a Hugging Face model directory with vLLM."""

    name = "vllm"

    def __init__(self, model_dir: Path, tokenizer_dir: str, dtype: str, seed: int, stop_ids: Sequence[int]):
        from vllm import LLM  # imported here: the package is optional

        self.llm = LLM(model=str(model_dir), tokenizer=tokenizer_dir, dtype=dtype, seed=seed)
        self.stop_ids = list(stop_ids)

    def generate(self, tokenizer, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor, *,
                 max_length: int, top_p: float, num_samples: int, seed: int) -> List[str]:
        """B x num_samples response texts, prompt by prompt, as sampling.generate_batch returns them."""
        from vllm import SamplingParams

        max_tokens = new_token_budget(prompt_input_ids.size(1), max_length)
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()}
                   for ids, mask in zip(prompt_input_ids, prompt_attention_mask)]
        # top_k=-1 disables top-k: nucleus sampling only, at temperature 1, as HFGenerator samples.
        params = SamplingParams(n=num_samples, top_p=top_p, top_k=-1, temperature=1.0, max_tokens=max_tokens,
                                seed=seed, stop_token_ids=self.stop_ids)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [decode_until_stop(torch.tensor(list(completion.token_ids), dtype=torch.long), self.stop_ids,
                                  tokenizer) for output in outputs for completion in output.outputs]
