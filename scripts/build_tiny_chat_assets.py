"""Rebuild assets/tiny-chat: the tiny model's tokenizer with role tokens and a chat template, for chat-template
runs and tests on CPU (model=tiny_chat). Deterministic: it derives everything from assets/tiny-llama.

    python scripts/build_tiny_chat_assets.py

It writes
  assets/tiny-chat/tokenizer.json (+ config files)   the tiny BPE plus <|system|>, <|user|>, <|assistant|>, <|end|>
                                                     as special tokens; <|end|> closes every turn and is the EOS
  assets/tiny-chat/chat_template.jinja               BOS, then '<|role|>\\n' + text + '<|end|>\\n' per turn
  assets/tiny-chat/config.json                       the tiny Llama with the grown vocabulary and <|end|> as EOS
"""
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
SOURCE, TARGET = REPO / "assets" / "tiny-llama", REPO / "assets" / "tiny-chat"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
END_OF_TURN = "<|end|>"
# Like the templates of Llama/Mistral-style instruct tokenizers: the template writes BOS itself, and the
# end-of-turn token is the tokenizer's EOS, so a sampled response stops where a trained one ends.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(SOURCE)
    tokenizer.add_special_tokens({"additional_special_tokens": ROLE_TOKENS + [END_OF_TURN]})
    tokenizer.eos_token = END_OF_TURN
    tokenizer.chat_template = CHAT_TEMPLATE
    config = AutoConfig.from_pretrained(SOURCE)
    config.vocab_size = len(tokenizer)
    config.eos_token_id = tokenizer.eos_token_id
    TARGET.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(TARGET)
    config.save_pretrained(TARGET)
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
