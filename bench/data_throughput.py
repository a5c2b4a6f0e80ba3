"""How fast the dataloaders read, format and tokenise: rows per second on the bundled HH train split (2,000 rows).

    .venv/bin/python bench/data_throughput.py                 # about a minute on 2 cores
    .venv/bin/python bench/data_throughput.py --repeats 5

For each format (the prefix strings with the tiny tokenizer; the chat template of assets/tiny-chat) and loader
(SFTDataLoader: one target per prompt; PairedPreferenceDataLoader: both responses of every pair), it times:

* build: the whole loader construction: reading the rows (the `datasets` arrow cache is warm after the first
  repeat, as on any run after the first), building Examples, rendering, tokenising every prompt and response in
  batches, checking the chat-template prefix property, and the data report;
* tokenise: `Encoder.encode` alone on the loaded Examples (rendering + tokenisation + checks);
* batches: one epoch of collated batches (truncation, decoding of the display texts, padding), in examples/s.

The median over `--repeats` runs is reported, with the row count of the split.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  TQDM_DISABLE="1")  # progress bars would be timed too

import datasets  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import dataloader  # noqa: E402
from dataloader import DataSpec, LoaderOptions, PairedPreferenceDataLoader, SFTDataLoader  # noqa: E402
from feedback.prompt_format import ChatTemplateFormat, PrefixFormat  # noqa: E402
from feedback.tokenization import Encoder  # noqa: E402

BUNDLED_HH = str(REPO_ROOT / "data" / "hh-rlhf")
OPTIONS = LoaderOptions(batch_size=8, n_epochs=1, max_length=256, max_prompt_length=128, seed=1)


def tokenizer_of(name: str):
    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "assets" / name)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def formats():
    plain, chat = tokenizer_of("tiny-llama"), tokenizer_of("tiny-chat")
    return {"prefix strings": (plain, PrefixFormat()),
            "chat template": (chat, ChatTemplateFormat(chat, chat.chat_template, "tiny-chat's template"))}


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    print("| format | loader | rows | build rows/s | tokenise rows/s | batches examples/s |")
    print("|---|---|---:|---:|---:|---:|")
    for format_name, (tokenizer, prompt_format) in formats().items():
        spec = DataSpec(["hh"], prompt_format, local_paths={"hh": BUNDLED_HH})
        examples = dataloader.load_examples(spec, "train")
        for cls in (SFTDataLoader, PairedPreferenceDataLoader):
            loader = cls(spec, tokenizer, "train", OPTIONS)  # also warms the arrow cache
            rows = loader.report.table.splitlines()[1].split()[1]
            build = median_seconds(lambda: cls(spec, tokenizer, "train", OPTIONS), args.repeats)
            encoder = Encoder(tokenizer, prompt_format, OPTIONS.max_length, OPTIONS.max_prompt_length)
            encode = median_seconds(lambda: encoder.encode(examples, loader.generation_indices), args.repeats)
            batches = median_seconds(lambda: list(loader), args.repeats)
            print(f"| {format_name} | {cls.__name__} | {rows} | {int(rows) / build:,.0f} | {int(rows) / encode:,.0f} "
                  f"| {loader.examples_per_epoch / batches:,.0f} |")


if __name__ == "__main__":
    main()
