"""Generating responses from a policy, kept apart from the trainer.

`generate_batch` samples responses (one or several per prompt) to left-padded prompts with Hugging Face `generate`;
`HFGenerator` runs it for a model, and vllm_sampling.VLLMGenerator does the same with vLLM (eval.py's `sampler`).
`sample_resumably` runs a generator over a sequence of tokenised prompts, batch by batch, and records every
finished sample in a partial JSONL file, so that an interrupted run continues where it stopped (see
docs/evaluation.md).

Differences from the original's `get_batch_samples`/`sample` (spec F-18):
- Only nucleus sampling applies: `top_k=0` and `temperature=1.0` are passed explicitly. The original left the
  Hugging Face default `top_k=50` active beside `top_p` (and so does transformers today for `top_k=None`).
- The response is decoded from the new token ids only, cut at the first EOS (the tokenizer's, or one of the
  model generation config's). The original decoded prompt and
  response together and cut `len(prompt_text)` characters, which breaks when decoding changes the prompt text.
- Each batch's sampling RNG is seeded from (seed, batch index), so a resumed run samples what an uninterrupted
  run would have (the original seeded once per process).
"""
import itertools
import json
import os
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping

import torch
from tqdm import tqdm

from dataloader import ORIGINAL_PROMPT_KEY, PROMPT_KEYS, PROMPT_MESSAGES_KEY, TARGET_KEYS, collate
from errors import HalosError
from utils import chunked

SAMPLE_FIELDS = ("prompt", "original_prompt", "chosen", "policy")  # the texts a partial file records per sample
SAMPLE_IDS = ("prompt_id", "sample_index")  # which prompt (its position in sampling order) and which of its samples


class SamplingError(HalosError):
    """A partial sample file that cannot be resumed, or a prompt that leaves no room to generate."""


def stop_token_ids(generation_config, tokenizer) -> List[int]:
    """Ids that end a response: the tokenizer's EOS, which training appends to every response, and the EOS ids of
    the model's generation config (e.g. Llama 3's end-of-turn token)."""
    configured = generation_config.eos_token_id if generation_config is not None else None
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))


def decode_until_stop(token_ids: torch.Tensor, stop_ids: List[int], tokenizer) -> str:
    """Text of `token_ids` (T,) up to, not including, the first stop id; special tokens are skipped."""
    ids = token_ids.tolist()
    end = next((position for position, token in enumerate(ids) if token in stop_ids), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


def new_token_budget(prompt_length: int, max_length: int) -> int:
    """Tokens a response may have after prompts padded to `prompt_length`, within max_length (as the original)."""
    if max_length - prompt_length < 1:
        raise SamplingError(f"prompts padded to {prompt_length} tokens leave no room to generate within "
                            f"max_length={max_length}")
    return max_length - prompt_length


def generate_batch(policy: torch.nn.Module, tokenizer, prompt_input_ids: torch.Tensor,
                   prompt_attention_mask: torch.Tensor, *, max_length: int, top_p: float,
                   num_samples: int = 1) -> List[str]:
    """Samples `num_samples` responses per prompt, in one batched call, with nucleus sampling; uses the global torch
    RNG.

    Args:
        policy: a Hugging Face causal LM.
        prompt_input_ids: (B, Lp) LEFT-padded prompt ids.
        prompt_attention_mask: (B, Lp), 0 on padding.
        max_length: tokens of padded prompt + response, as in the original, so each response gets at most
            `max_length - Lp` new tokens.
        top_p: nucleus threshold.
        num_samples: responses per prompt.

    Returns:
        B x num_samples strings, prompt by prompt: the newly generated text of each row, without the prompt, up to
        its first EOS.
    """
    prompt_length = prompt_input_ids.size(1)
    max_new_tokens = new_token_budget(prompt_length, max_length)
    device = next(policy.parameters()).device
    stop_ids = stop_token_ids(policy.generation_config, tokenizer)
    with torch.no_grad():
        output_ids = policy.generate(
            input_ids=prompt_input_ids.to(device), attention_mask=prompt_attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=True, top_p=top_p, num_return_sequences=num_samples,
            # top_k=None would fall back to Hugging Face's default of 50; 0 disables it.
            top_k=0, temperature=1.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
    return [decode_until_stop(row, stop_ids, tokenizer) for row in output_ids[:, prompt_length:].cpu()]


def batch_seed(seed: int, batch_index: int) -> int:
    """Sampling seed of one batch: a fixed function of the run's seed and the batch's position."""
    return zlib.crc32(f"{seed}/{batch_index}".encode())


class HFGenerator:
    """Samples with Hugging Face `generate` (generate_batch), seeding the torch RNG with each batch's seed."""

    name = "hf"

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy.eval()

    def generate(self, tokenizer, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor, *,
                 max_length: int, top_p: float, num_samples: int, seed: int) -> List[str]:
        """B x num_samples response texts, prompt by prompt (generate_batch's)."""
        torch.manual_seed(seed)
        return generate_batch(self.policy, tokenizer, prompt_input_ids, prompt_attention_mask, max_length=max_length,
                              top_p=top_p, num_samples=num_samples)


class PartialSamples:
    """The finished samples of a sampling run, appended to a JSONL file as they are generated.

    Line 1 records the run's settings; every further line is one sample `{"index", "prompt_id", "sample_index",
    "prompt", "prompt_messages", "original_prompt", "chosen", "policy"}`. A run with different settings refuses to
    continue the file, so samples of two policies never mix. A last line cut short by a crash is dropped.
    """

    def __init__(self, path: Path, settings: Mapping[str, Any]):
        self.path = path
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.rows: Dict[int, dict] = {}
        if path.exists():
            self.read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.write_lines([{"settings": self.settings}])

    def read(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")[:-1]  # a last line without its newline was cut short by a crash
        records = [self.parse(line, number) for number, line in enumerate(lines, 1)]
        if records and records[0]["settings"] != self.settings:
            raise SamplingError(f"{self.path} holds samples made with other settings (policy, data, seed, batch "
                                f"size or generation settings); delete it to start over, or rerun with the "
                                f"settings it was started with")
        self.rows = {record["index"]: record for record in records[1:]}
        if not text.endswith("\n") or not records:
            # Rewritten (atomically) without the cut line, so that the next batch starts on a line of its own.
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(record) + "\n" for record in [{"settings": self.settings}, *records[1:]]))
            os.replace(tmp, self.path)

    def parse(self, line: str, number: int) -> dict:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if number == 1:
            valid = isinstance(record, dict) and "settings" in record
        else:
            valid = isinstance(record, dict) and all(isinstance(record.get(key), int) for key in ("index", *SAMPLE_IDS)) \
                and all(isinstance(record.get(field), str) for field in SAMPLE_FIELDS) \
                and isinstance(record.get(PROMPT_MESSAGES_KEY), list)
        if not valid:
            raise SamplingError(f"{self.path}:{number} is not a line of a partial sample file; delete the file to "
                                f"start over")
        return record

    def write_lines(self, records: Iterable[dict]) -> None:
        # One write per batch, flushed to disk: a crash loses at most the batch being written.
        with open(self.path, "a") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, rows: List[dict]) -> None:
        self.write_lines(rows)
        self.rows.update((row["index"], row) for row in rows)


def sample_row(prompt_id: int, sample_index: int, num_samples: int, element: dict, policy_text: str) -> dict:
    return {"index": prompt_id * num_samples + sample_index, "prompt_id": prompt_id, "sample_index": sample_index,
            "prompt": element[PROMPT_KEYS.text], PROMPT_MESSAGES_KEY: element[PROMPT_MESSAGES_KEY],
            "original_prompt": element[ORIGINAL_PROMPT_KEY], "chosen": element[TARGET_KEYS.text],
            "policy": policy_text}


def sample_resumably(generator, tokenizer, elements: Iterable[dict], partial: PartialSamples, *, total: int,
                     batch_size: int, max_length: int, top_p: float, seed: int, num_samples: int = 1) -> List[dict]:
    """Samples `num_samples` responses to each of `total` prompts, skipping prompts already in `partial`.

    Batch k holds prompts [k * batch_size, (k + 1) * batch_size); the last batch may be smaller. Only the missing
    prompts of a batch are generated, with the batch's own seed, so a run resumed at a batch boundary gives exactly
    the samples of an uninterrupted run.

    Args:
        generator: an HFGenerator or a vllm_sampling.VLLMGenerator.
        elements: tokenised SFT elements (un-collated dicts with PROMPT_KEYS, TARGET_KEYS, original_prompt and
            prompt_messages), in sampling order; at least `total` of them.
        partial: where finished samples are recorded and read back from.

    Returns:
        `total` x `num_samples` sample dicts, prompt by prompt, with the keys `index`, SAMPLE_IDS, SAMPLE_FIELDS and
        prompt_messages.
    """
    done = sum(prompt * num_samples in partial.rows for prompt in range(total))
    progress = tqdm(total=total, initial=done, unit="prompt", desc=f"sample ({generator.name})")
    for batch_index, chunk in enumerate(chunked(itertools.islice(elements, total), batch_size)):
        first = batch_index * batch_size
        todo = [(first + k, element) for k, element in enumerate(chunk)
                if (first + k) * num_samples not in partial.rows]
        if not todo:
            continue
        batch = collate([element for _, element in todo], tokenizer.pad_token_id)
        texts = generator.generate(tokenizer, batch[PROMPT_KEYS.input_ids], batch[PROMPT_KEYS.attention_mask],
                                   max_length=max_length, top_p=top_p, num_samples=num_samples,
                                   seed=batch_seed(seed, batch_index))
        partial.add([sample_row(prompt_id, k, num_samples, element, texts[position * num_samples + k])
                     for position, (prompt_id, element) in enumerate(todo) for k in range(num_samples)])
        progress.update(len(todo))
    progress.close()
    return [partial.rows[index] for index in range(total * num_samples)]
