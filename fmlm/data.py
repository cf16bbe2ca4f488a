"""`fmlm.data`: the data helpers of fmlm.engine.data under a short name (`fmlm.data.bundled_corpus()`)."""
from fmlm.engine.data import (Corpus, PackedBlocks, ShardedSampler, bundled_corpus, bundled_corpus_path,  # noqa: F401
                              iter_texts, load_corpus, pack, train_tokenizer, word_pairs, words)

__all__ = ["Corpus", "PackedBlocks", "ShardedSampler", "bundled_corpus", "bundled_corpus_path", "iter_texts",
           "load_corpus", "pack", "train_tokenizer", "word_pairs", "words"]
