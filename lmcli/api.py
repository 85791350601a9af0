"""The Python API: `lmcli.load(name_or_path) -> Model` with tokenize, logits and generate."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from quant.container import Container
from quant.schema import ModelConfig

from .engine.model import Transformer
from .engine.options import EngineOptions
from .errors import LmcliWarning, UsageError, model_file_errors
from .generate import Generation
from .sampling import Sampler, SamplerParams
from .threads import ThreadPolicy, configure_pool

from .memory import kv_cache_type
from .memory import DEFAULT_CTX, context_size, env_int  # noqa: F401 (DEFAULT_CTX: the API's documented default)


def set_threads(threads: int | None) -> int:
    """Set the kernels' thread count (default: LMCLI_THREADS, else every core Numba sees)."""
    configure_pool()  # before Numba starts its pool
    import numba

    n = threads if threads is not None else env_int("LMCLI_THREADS")
    if n is None:
        n = numba.config.NUMBA_NUM_THREADS
    if not isinstance(n, int) or not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise UsageError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)
    return n


def _tokenizer(container: Container):
    """The container's tokenizer: read from the store's cache when it was built from these very bytes (the header's
    digest) by this very code (tokenizer.build_key), else built from the metadata and cached for the next run.
    Building SmolLM2's from its 49k-token vocabulary took 0.3 s of a 1.5 s start; reading it back, a third of that."""
    from .store import StoreError, tokenizer_cache_path, write_text_atomic
    from .tokenizer import Tokenizer, TokenizerError, build_key

    path = tokenizer_cache_path(container.path)
    key = f"{container.header_digest} {build_key()}"
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
            first, _, rest = text.partition("\n")
            if first == key:
                return Tokenizer.from_cache(rest)
        except (OSError, UnicodeDecodeError, TokenizerError):
            pass  # none yet, or unreadable: build it
    tok = Tokenizer.from_metadata(container.metadata.get("tokenizer") or {})
    if path is not None:
        try:
            write_text_atomic(path, f"{key}\n{tok.to_cache()}")
        except StoreError:
            pass  # a read-only store: build it every run, as before
    return tok


class Model:
    """A loaded model: config, tokenizer, chat template and the engine over the container.

    options: how to run it (EngineOptions); keywords set single fields over it (n_ctx=..., threads=...).
    self.options holds what was chosen, the context, thread count and KV cache type resolved.
    """

    def __init__(self, path: str | os.PathLike, options: EngineOptions | None = None, **engine):
        opts = EngineOptions.of(options, **engine)
        t0 = time.perf_counter()
        self.path = Path(path)
        with model_file_errors():
            self.container = Container(self.path)
            self.config = ModelConfig.from_dict(self.container.metadata.get("config"))
        md = self.container.metadata
        self.metadata = md
        self.n_ctx = n_ctx = context_size(opts.n_ctx, self.config.n_ctx_train)
        if n_ctx > self.config.n_ctx_train:
            warnings.warn(f"a context of {n_ctx} tokens is beyond the {self.config.n_ctx_train} this model was trained "
                          "for: what it writes past that point may degrade", LmcliWarning, stacklevel=2)
        self.threads = set_threads(opts.threads)
        # an explicit count is kept; else decode moves between counts by what the machine gives (lmcli.threads)
        fixed = opts.threads is not None or env_int("LMCLI_THREADS") is not None
        self.thread_policy = ThreadPolicy.default(self.threads, fixed=fixed)
        self.options = replace(opts, n_ctx=n_ctx, threads=self.threads, kv_type=kv_cache_type(opts.kv_type))
        self.tokenizer = _tokenizer(self.container)
        self.chat_template: str | None = md.get("chat_template")
        self.transformer = Transformer(self.container, self.config, self.options)
        self._grammar_vocab = None  # built on the first structured request
        self.load_s = time.perf_counter() - t0

    # --- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text of a conversation; with OpenAI-style `tools`, as the model's template presents them (or
        described in a system message when the template takes none; lmcli.tools)."""
        from .template import render_chat
        from .tools import prepare

        messages, tools = prepare(self.chat_template, messages, tools)
        tk = self.tokenizer
        bos = tk.token_text(tk.bos_id) if tk.bos_id is not None else ""
        eos_id = self.metadata.get("tokenizer", {}).get("eos_token_id")
        eos = tk.token_text(eos_id) if isinstance(eos_id, int) else ""
        return render_chat(self.chat_template, messages, bos_token=bos, eos_token=eos,
                           add_generation_prompt=add_generation_prompt, tools=tools)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for a conversation: the template renders BOS itself when the model wants it."""
        text = self.apply_chat_template(messages, tools=tools)
        tk = self.tokenizer
        bos = tk.token_text(tk.bos_id) if tk.bos_id is not None else None
        add_bos = None if not (bos and text.startswith(bos)) else False
        return tk.encode(text, add_bos=add_bos)

    # --- compute ---------------------------------------------------------------------------

    def logits(self, token_ids) -> np.ndarray:
        """Logits (len(token_ids), vocab) float32 for every position, from a fresh cache."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise UsageError("logits() needs at least one token")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise UsageError(f"token ids must be in [0, {self.config.vocab_size})")
        cache = self.transformer.new_cache(max(len(ids), 1))
        return self.transformer.forward(ids, cache, all_logits=True)

    def embed(self, text_or_ids: str | list[int], *, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        """One embedding (n_embd,) float32: the final-normed hidden states of the text (tokenized raw, with the
        model's BOS) or of the ids, pooled ("mean" over tokens, as llama.cpp's default for a decoder; or "last"),
        L2-normalized unless normalize=False (OpenAI's embeddings are unit vectors)."""
        ids = self.tokenize(text_or_ids) if isinstance(text_or_ids, str) else [int(t) for t in text_or_ids]
        if not ids:
            raise UsageError("nothing to embed: the input is empty")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise UsageError(f"token ids must be in [0, {self.config.vocab_size})")
        if len(ids) > self.n_ctx:
            raise UsageError(f"the input has {len(ids)} tokens; this model's context holds {self.n_ctx}")
        if pooling not in ("mean", "last"):
            raise UsageError(f"pooling must be mean or last, not {pooling!r}")
        h = self.transformer.hidden_states(ids, self.transformer.new_cache(len(ids)))
        v = h.mean(axis=0, dtype=np.float64) if pooling == "mean" else h[-1].astype(np.float64)
        if normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        return v.astype(np.float32)

    def new_cache(self):
        return self.transformer.new_cache(self.n_ctx)

    def generate(self, prompt: str | list[int], *, max_tokens: int = 256, stop: list[str] | None = None,
                 sampler: SamplerParams | None = None, cache=None, ignore_eos: bool = False,
                 json_schema: dict | str | None = None, top_logprobs: int | None = None, **sampling) -> Generation:
        """Events for a completion of prompt (text is tokenized raw; pass chat_ids() for chat); the last carries
        the run's statistics (Generation.stats() gives them also for a run stopped early).

        json_schema: the output is a JSON document this schema accepts (constrained decoding; lmcli.structured.
        JSON_OBJECT for any object); a run that ends with "stop" has produced a whole one.
        top_logprobs: each token event carries its log-probability and this many alternatives (0: none).
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise UsageError("the prompt is empty")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise UsageError(f"--max-tokens must be a non-negative integer, got {max_tokens!r}")
        cache = cache if cache is not None else self.new_cache()
        if cache.n_past + len(ids) > cache.n_ctx:
            from .errors import ContextOverflow

            raise ContextOverflow(f"the prompt has {len(ids)} tokens; the context holds {cache.n_ctx - cache.n_past}",
                                  hint="raise --ctx-size or shorten the prompt")
        if top_logprobs is not None and (not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20):
            raise UsageError(f"top_logprobs must be an integer in [0, 20], got {top_logprobs!r}")
        params = sampler if sampler is not None else SamplerParams(**sampling)
        constraint = self.constraint(json_schema) if json_schema is not None else None
        return Generation(self.transformer, self.tokenizer, Sampler(params), cache, ids, max_tokens=max_tokens,
                          stop=stop, ignore_eos=ignore_eos, constraint=constraint, top_logprobs=top_logprobs,
                          threads=self.thread_policy)

    def constraint(self, json_schema: dict | str):
        """A fresh grammar state for one generation under json_schema (UsageError if it is not a usable one)."""
        from .structured import Constraint, GrammarVocab, schema_grammar

        grammar = schema_grammar(json_schema)
        if self._grammar_vocab is None:
            self._grammar_vocab = GrammarVocab(self.tokenizer, self.config.vocab_size)
        return Constraint(self._grammar_vocab, grammar)


def load(name_or_path: str, options: EngineOptions | None = None, **engine) -> Model:
    """Resolve a name (store, registry, packaged) or a path (.gguf imports on first use) and load it.

    options: an EngineOptions; engine: any of its fields as keywords over it: n_ctx, threads, moe_topk,
    expert_cache_mib (None: automatic, 0: off), cache_policy ("cyclic", the default, "lru" or "lfu":
    lmcli.engine.expert_cache.Policy), prefetch (default False; True reads the next layer's predicted experts
    ahead, which lost to demand reads in every capped run of bench/larger_than_ram.py), use_mmap (None: read
    the weights into RAM when the file fits in memory, else map it; True: always map; False: always read),
    routing_trace (record every routing decision; each generation's final event carries its own).
    """
    from .store import resolve

    opts = EngineOptions.of(options, **engine)  # an unknown keyword fails before the model is located
    return Model(resolve(str(name_or_path)), opts)
