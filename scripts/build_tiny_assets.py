"""Rebuild the offline assets shipped with the repo: the bundled HH sample and the tiny model.

Run once by maintainers (the outputs are committed); users never need it::

    python scripts/build_tiny_assets.py --hh-source PATH/TO/harmless-base/test.jsonl.gz

It writes
  data/hh-rlhf/harmless-base/{train,test}.jsonl.gz   real Anthropic HH pairs (MIT), split 2000/rest in file order
  assets/tiny-llama/config.json                        a 2-layer Llama architecture (weights are random, built at run time)
  assets/tiny-llama/tokenizer.json (+ config files)    byte-level BPE trained on the bundled train split
"""
import argparse
import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
HH_DIR = REPO / "data" / "hh-rlhf" / "harmless-base"
MODEL_DIR = REPO / "assets" / "tiny-llama"
N_TRAIN = 2000
VOCAB_SIZE = 4096
BOS, EOS = "<s>", "</s>"


def split_hh(source: Path) -> list:
    """Copies the HH rows into a train/test split and returns the train rows."""
    with gzip.open(source, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    HH_DIR.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:N_TRAIN]), ("test", rows[N_TRAIN:])):
        # mtime=0 keeps the gzip bytes identical across rebuilds.
        with open(HH_DIR / f"{split}.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode("utf-8"))
    return rows[:N_TRAIN]


def train_tokenizer(rows: list) -> PreTrainedTokenizerFast:
    """Byte-level BPE that, like Llama's, prepends BOS to every encoded text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False, initializer_range=0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hh-source", type=Path, required=True, help="harmless-base/test.jsonl.gz of Anthropic/hh-rlhf")
    args = parser.parse_args()
    train_rows = split_hh(args.hh_source)
    tokenizer = train_tokenizer(train_rows)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(MODEL_DIR)
    tiny_llama_config(tokenizer).save_pretrained(MODEL_DIR)
    print(f"wrote {HH_DIR} and {MODEL_DIR}")


if __name__ == "__main__":
    main()
