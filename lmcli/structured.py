"""Structured output: a JSON schema compiled by llguidance into a mask over the vocabulary before each sample.

llguidance (Rust, no dependencies) computes the set of tokens that keep the output a prefix of some document the
schema accepts; masking the rest makes every finished output valid. It is the grammar engine llama.cpp and vLLM
use too; xgrammar would pull triton, outlines-core an older token-index design.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import UsageError

JSON_OBJECT = {"type": "object"}  # OpenAI's json_object and Ollama's format "json": any JSON object
# One layout, no free whitespace: a model cannot pad a document forever (llama.cpp bounds its whitespace too),
# and the separators are Python's json.dumps ones.
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_grammar(schema: Any) -> str:
    """llguidance's grammar for a JSON schema (a dict, or its JSON text); UsageError if it is not one."""
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise UsageError("the JSON schema is not valid JSON") from None
    if not isinstance(schema, (dict, bool)):
        raise UsageError("a JSON schema must be an object")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=LAYOUT)
    except (ValueError, TypeError) as e:
        raise UsageError(f"the JSON schema is not usable: {e}") from None
    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err:
        raise UsageError(f"the JSON schema is not usable: {err.splitlines()[0][:300]}")
    return grammar


class GrammarVocab:
    """The tokenizer as llguidance sees it (each id's bytes); built once per model (about 0.5 s for 49k ids)."""

    def __init__(self, tokenizer, n_vocab: int):
        import llguidance

        self.n_vocab = n_vocab  # the logits' length, which may exceed the tokenizer's (padded embeddings)
        try:
            self.ll = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=n_vocab,
                                             eos_token=sorted(tokenizer.eos_ids))
        except (ValueError, RuntimeError) as e:  # llguidance's word for a tokenizer it cannot read
            raise UsageError(f"structured output cannot use this model's tokenizer: {str(e)[:300]}") from None


class Constraint:
    """One generation's grammar state: mask() before sampling, accept() each sampled token; stopped once the
    document is complete (only end-of-text may follow)."""

    def __init__(self, vocab: GrammarVocab, grammar: str):
        import llguidance
        import llguidance.numpy as lln

        self._lln = lln
        self.n_vocab = vocab.n_vocab
        self.matcher = llguidance.LLMatcher(vocab.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise UsageError(f"the JSON schema is not usable: {self.matcher.get_error()[:300]}")
        self._bits = lln.allocate_token_bitmask(1, vocab.ll.vocab_size)  # (1, ceil(n_vocab / 32)) int32

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits with every token the grammar forbids at -inf."""
        self._lln.fill_next_token_bitmask(self.matcher, self._bits)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar: {self.matcher.get_error()}")
        # bit i of word j allows token 32 j + i: little-endian bytes, little-endian bits
        allowed = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[: len(logits)].view(bool)
        return np.where(allowed, logits, -np.inf)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def stopped(self) -> bool:
        return self.matcher.is_stopped()
