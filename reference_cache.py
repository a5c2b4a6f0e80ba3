"""Reference-model log-probs computed once per sequence and reused across epochs, runs and restarts.

With `cache_reference_logprobs=true`, `builders.build_models` wraps the reference model in a `CachedReference`.
The first time a trainer asks for reference log-probs (`BasicTrainer.reference_forward`), the wrapper replays every
train and eval batch of the run through the reference model (`fill`), keeps one summed log-prob per sequence, saves
them to <cache_dir>/reference_logps/<fingerprint>.pt and drops the reference model. From then on the trainer's
`sequence_logps` reads the cache, so losses cannot tell the difference.

Sequences are keyed by content (their unpadded token ids and which of them are labelled), never by position: KTO's
KL rows pair each prompt with whichever response follows it in the batch, so the same row can come back in another
batch, epoch or run. The replay runs the very batches training will run, so each cached value is bit for bit what
the live reference forward computes for that batch. A sequence that appears in several batches keeps the value of
its first batch; the live path would recompute it with another batch's padding, which changes its float32 rounding
only (about 1e-7 relative).

The file is named by a fingerprint of everything else that determines the values: a hash of the reference weights
(after `load_from` and any embedding growth), the attention implementation, packing, prompt sharing, FSDP mixed
precision, and, to
keep one file per dataset setup, the datasets, tokenizer, prompt format (prefix strings or chat template), length
limits and dataloader.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig

import distributed
from errors import HalosError
from feedback.prompt_format import config_fingerprint
from utils import IGNORE_INDEX

CACHE_FORMAT_VERSION = 1
KEY_BYTES = 16  # blake2b digest size of one sequence key


class ReferenceCacheError(HalosError):
    """The reference model was freed but a sequence is missing from the cache."""


def weights_hash(model: torch.nn.Module) -> str:
    """sha1 of every parameter and buffer (names, dtypes, shapes, bytes), about 1 s per GB on one CPU core.

    Call it before FSDP sharding, while each process holds the whole model.
    """
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_fingerprint(config: DictConfig, reference_model: torch.nn.Module) -> Dict[str, object]:
    """Everything that determines the cached values, as a JSON-able dict."""
    model = config.model
    return {
        "version": CACHE_FORMAT_VERSION,
        "weights": weights_hash(reference_model),
        "attention": reference_model.config._attn_implementation,
        "pack_sequences": config.pack_sequences,
        "share_prompts": config.get("share_prompts", False),
        "fsdp_mixed_precision": model.fsdp_policy_mp if distributed.world_size() > 1 else None,
        "datasets": list(config.datasets),
        "tokenizer": model.tokenizer_name_or_path or model.name_or_path,
        "max_length": model.max_length,
        "max_prompt_length": model.max_prompt_length,
        "dataloader": config.loss.dataloader,
        "prompt_format": config_fingerprint(config),
    }


def cache_path(cache_dir: str, fingerprint: Dict[str, object]) -> Path:
    name = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "reference_logps" / f"{name}.pt"


def sequence_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> List[bytes]:
    """One key per row of right-padded (N, T) tensors: a hash of its unpadded ids and its labelled positions."""
    input_ids, attention_mask, labels = input_ids.cpu(), attention_mask.cpu().bool(), labels.cpu()
    keys = []
    for ids, mask, row_labels in zip(input_ids, attention_mask, labels):
        digest = hashlib.blake2b(ids[mask].numpy().tobytes(), digest_size=KEY_BYTES)
        digest.update((row_labels[mask] != IGNORE_INDEX).numpy().tobytes())
        keys.append(digest.digest())
    return keys


class LogpStore:
    """Sequence key -> float32 reference log-prob, loaded from and saved to one file."""

    def __init__(self, path: Path, fingerprint: Dict[str, object]):
        self.path, self.fingerprint = path, json.dumps(fingerprint, sort_keys=True)
        self.logps: Dict[bytes, float] = {}
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved["fingerprint"] == self.fingerprint:
                self.add(saved["keys"], saved["logps"])
        self.saved_size = len(self.logps)

    def get(self, keys: List[bytes]) -> Optional[torch.Tensor]:
        """(N,) float32 log-probs of the keys, or None if any is missing."""
        if not all(key in self.logps for key in keys):
            return None
        return torch.tensor([self.logps[key] for key in keys], dtype=torch.float32)

    def put(self, keys: List[bytes], logps: torch.Tensor) -> None:
        """Adds the (N,) values of keys not stored yet (the first value of a sequence wins)."""
        for key, value in zip(keys, logps.detach().float().cpu().tolist()):
            self.logps.setdefault(key, value)

    def tensors(self):
        """All entries as keys (N, KEY_BYTES) uint8 and log-probs (N,) float32."""
        keys = np.frombuffer(b"".join(self.logps), dtype=np.uint8).reshape(len(self.logps), KEY_BYTES)
        return torch.from_numpy(keys.copy()), torch.tensor(list(self.logps.values()), dtype=torch.float32)

    def add(self, keys: torch.Tensor, logps: torch.Tensor) -> None:
        """Adds entries given as `tensors()` returns them."""
        self.put([bytes(key) for key in keys.numpy()], logps)

    def save(self) -> None:
        """Writes the file atomically, so a crash or a concurrent run never leaves a torn file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys, logps = self.tensors()
        partial = self.path.with_suffix(f".{os.getpid()}.partial")  # concurrent writers never share a partial file
        torch.save({"fingerprint": self.fingerprint, "keys": keys, "logps": logps}, partial)
        partial.replace(self.path)
        self.saved_size = len(self.logps)


SequenceLogps = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CachedReference(torch.nn.Module):
    """Stands in for the reference model: serves sequence log-probs from a `LogpStore`.

    Until `fill` has run, misses are computed with the wrapped model and stored; after it, the model is gone and a
    miss raises ReferenceCacheError.
    """

    def __init__(self, model: torch.nn.Module, store: LogpStore):
        super().__init__()
        self.model: Optional[torch.nn.Module] = model
        self.store = store
        self.filled = False
        self.computed_rows = self.cached_rows = 0  # rows computed by the model / read from the cache

    def sequence_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       live: SequenceLogps) -> torch.Tensor:
        """(N,) float32 summed log-probs of (N, T) right-padded rows; `live(model, ...)` computes misses."""
        keys = sequence_keys(input_ids, attention_mask, labels)
        cached = self.store.get(keys)
        # Under FSDP every process must run the same forwards, so one process's miss makes all of them compute.
        missing = distributed.all_reduce_mean(torch.tensor(float(cached is None), device=input_ids.device)) > 0
        if not missing:
            self.cached_rows += len(keys)
            return cached.to(input_ids.device)
        if self.model is None:
            raise ReferenceCacheError(
                f"{len(keys)} sequences are not in the reference log-prob cache {self.store.path} and the reference "
                "model was freed after filling it; was the batch built outside the train/eval dataloaders?")
        logps = live(self.model, input_ids, attention_mask, labels)
        self.store.put(keys, logps)
        self.computed_rows += len(keys)
        return logps

    def fill(self, batches: Iterable[Dict], forward: Callable[[Dict], object]) -> None:
        """Runs `forward(batch)` (the trainer's forward through this wrapper) on every batch without gradients,
        merges what every process computed, saves it (main process) and frees the reference model."""
        with torch.no_grad():
            for batch in batches:
                forward(batch)
        # Each process computed its own slices of the batches; all of them get every entry.
        keys, logps = self.store.tensors()
        self.store.add(distributed.all_gather_if_needed(keys), distributed.all_gather_if_needed(logps))
        if distributed.is_main_process() and len(self.store.logps) > self.store.saved_size:
            self.store.save()
        distributed.barrier()
        distributed.rank0_print(f"reference log-prob cache {self.store.path}: {self.computed_rows} sequences computed, "
                                f"{self.cached_rows} read; the reference model is freed")
        self.model = None
        self.filled = True
