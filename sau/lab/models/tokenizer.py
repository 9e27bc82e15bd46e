"""A small byte-level BPE tokenizer trained locally on the corpus (no hub downloads).

Byte-level pre-tokenization splits text before BPE at the same places whether a prompt
and its answer are tokenized together or apart (the answer starts with a space), so
`ids(prompt) + ids(answer)` equals `ids(prompt + answer)`: training and evaluation see
the same tokens. Every encoding starts with BOS (added by the post-processor).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sau.prompt import format_answer, format_prompt

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3 in this order


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024):
    """Train a byte-level BPE on `texts` and wrap it for transformers.

    Args:
        texts: iterable of str; the corpus (prompts and answers).
        vocab_size: int; target vocabulary size including the 256 byte symbols and
            the 4 special tokens (fewer if the corpus has fewer merges to make).

    Returns:
        transformers.PreTrainedTokenizerFast with bos/eos/pad/unk set; encoding adds BOS
        at the start; `save_pretrained(dir)` writes it beside a model.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted, de-duplicated input: BPE merge ties are then broken the same way every run.
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
    )


def corpus_texts(rows: Iterable[dict]) -> list[str]:
    """The texts a tokenizer is trained on: every prompt, answer and alternative answer."""
    out = []
    for row in rows:
        out.append(format_prompt(row["question"]))
        out.append(format_answer(row["answer"]))
        if row.get("paraphrased_answer"):
            out.append(format_answer(row["paraphrased_answer"]))
        out.extend(format_answer(a) for a in row.get("perturbed_answer", ()))
    return out
