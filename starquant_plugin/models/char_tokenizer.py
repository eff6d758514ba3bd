"""Character-level tokenizers in the hub format (`tokenizer.json`), for small shipped and test models."""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["build_char_tokenizer"]


def build_char_tokenizer(
    characters: str, vocab_size: int, bos: tuple[str, int] | None, eos: tuple[str, int], mask: tuple[str, int]
) -> PreTrainedTokenizerFast:
    """One token per character (ids in order), special tokens at the given ids, unused ids reserved.

    Encoding prepends BOS, as LLaDA's tokenizer does; `bos=None`: nothing is prepended and the
    EOS token is also the BOS (Qwen2's, so Dream's, convention). EOS doubles as padding; padding
    is left.
    """
    vocab = {c: i for i, c in enumerate(characters)}
    specials = dict([eos, mask] if bos is None else [bos, eos, mask])
    taken = set(vocab.values()) | set(specials.values())
    if len(taken) != len(vocab) + len(specials) or max(taken) >= vocab_size:
        raise ValueError(f"characters and special ids must be distinct ids below vocab_size={vocab_size}")
    vocab.update(specials)
    reserved = {f"<|reserved_{i}|>": i for i in range(vocab_size) if i not in taken}
    vocab.update(reserved)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos]
        )
    # Reserved ids are special too, so decoding with skip_special_tokens drops them.
    tokenizer.add_special_tokens(list(specials) + list(reserved))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=(eos if bos is None else bos)[0],
        eos_token=eos[0],
        pad_token=eos[0],
        mask_token=mask[0],
        padding_side="left",
        model_max_length=4096,
    )
