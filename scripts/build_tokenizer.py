"""Build the embedded debug tokenizer (byte-level BPE, 2048 tokens) from the embedded corpus.

    python scripts/build_tokenizer.py   # writes titan_dsv4/assets/tokenizer.json

BOS/EOS take ids 0 and 1, as in DeepSeek-V4's own tokenizer.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from titan_dsv4.components.dataloader import pydocs_corpus
from titan_dsv4.components.tokenizer import BOS, EMBEDDED_TOKENIZER, EOS

VOCAB_SIZE = 2048


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(pydocs_corpus(), trainer=trainer)
    Path(EMBEDDED_TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(EMBEDDED_TOKENIZER))
    print(f"wrote {EMBEDDED_TOKENIZER} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
