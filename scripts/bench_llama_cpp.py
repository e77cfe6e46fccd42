"""llama.cpp's side of scripts/bench-engine.sh (through llama-cpp-python): the same
measurements as crates/engine/examples/bench_engine.rs, on the same GGUF and thread count, as
one JSON object.

Where llama.cpp can batch, it batches as its own server does, through the low-level API on a
second context with 16 sequences: 16 streams decode in one `llama_decode` per step, and choice
scoring evaluates the prompt once, copies its cache to one sequence per candidate
(`llama_memory_seq_cp`, no state copy) and evaluates every candidate's tokens in one batch.
Peak RSS leaves out what the Python interpreter, numpy and the library held before the model
was loaded.

  python bench_llama_cpp.py MODEL THREADS
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

STREAMS = 16
# Runs of the paired one-stream / 16-stream decode measurement (the ratio's median over them).
RATIO_RUNS = 5

BASE = "Run {salt}. The history of the city is long and full of surprising turns, markets, rivers and bridges. "


def tokens_of(llm: Llama, n: int, salt: int) -> list[int]:
    text = ""
    while len(llm.tokenize(text.encode(), add_bos=False)) < n:
        text += BASE.format(salt=salt)
    return llm.tokenize(text.encode(), add_bos=False)[:n]


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    m = logits.max()
    return float(logits[token] - m - math.log(np.exp(logits - m).sum()))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def render_chat(llm: Llama, template: str, messages: list[dict]) -> str:
    """`messages` through a Jinja chat template as llama-cpp-python renders it, with the model's
    BOS and EOS texts and the generation prompt (also golden_llama_cpp.py's)."""
    text = llm._model.token_get_text
    formatter = Jinja2ChatFormatter(template, eos_token=text(llm.token_eos()),
                                    bos_token=text(llm.token_bos()), add_generation_prompt=True)
    return formatter(messages=messages).prompt


def chat_prompt(llm: Llama, system: str | None, user: str) -> list[int]:
    """The model's own chat template (ChatML where the GGUF has none), as token ids."""
    template = llm.metadata.get("tokenizer.chat_template") or (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    prompt = render_chat(llm, template, messages)
    text = llm._model.token_get_text
    return llm.tokenize(prompt.encode(), add_bos=not prompt.startswith(text(llm.token_bos())),
                        special=True)


class Parallel:
    """A second context over the loaded model with STREAMS sequences in one KV cache."""

    def __init__(self, llm: Llama, threads: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = 2048
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = STREAMS
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self.n_vocab = llm.n_vocab()

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Evaluates (token, position, sequence, wants logits) entries, 512 at a time; returns
        the logits asked for, in order."""
        out = []
        for start in range(0, len(entries), 512):
            chunk = entries[start:start + 512]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = seq
            if llama_cpp.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            for i, (_, _, _, want) in enumerate(chunk):
                if want:
                    ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
                    out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return out

    def generate(self, prompts: list[list[int]], n: int) -> int:
        """Greedy continuations of every prompt together, up to n tokens each (end of
        generation stops one); returns the tokens generated."""
        self.clear()
        entries = [(t, p, s, p == len(toks) - 1) for s, toks in enumerate(prompts)
                   for p, t in enumerate(toks)]
        nxt = [int(l.argmax()) for l in self.decode(entries)]
        pos = [len(toks) for toks in prompts]
        generated = len(prompts)
        live = list(range(len(prompts)))
        for _ in range(n - 1):
            live = [s for s in live if not llama_cpp.llama_vocab_is_eog(self.vocab, nxt[s])]
            if not live:
                break
            logits = self.decode([(nxt[s], pos[s], s, True) for s in live])
            for s, l in zip(live, logits):
                nxt[s], pos[s] = int(l.argmax()), pos[s] + 1
            generated += len(live)
        return generated

    def score(self, prompt: list[int], candidates: list[list[int]]) -> list[float]:
        """Summed log-probabilities of each candidate after the prompt: the prompt once in
        sequence 0, its cache shared with one sequence per candidate, the candidates together."""
        self.clear()
        (first,) = self.decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        for s in range(1, len(candidates)):
            llama_cpp.llama_memory_seq_cp(self.mem, 0, s, -1, -1)
        entries = [(c[k], len(prompt) + k, s, True) for s, c in enumerate(candidates)
                   for k in range(len(c) - 1)]
        logits = iter(self.decode(entries))
        out = []
        for c in candidates:
            lp = log_softmax_at(first, c[0])
            for k in range(1, len(c)):
                lp += log_softmax_at(next(logits).astype(np.float64), c[k])
            out.append(lp)
        return out


def main() -> None:
    model, threads = sys.argv[1], int(sys.argv[2])
    # What the interpreter, numpy and the library hold before the model: not llama.cpp's.
    baseline_mb = rss_mb()
    t = time.perf_counter()
    # The high-level object only tokenizes (a 64-position context); every measurement runs on
    # one context of 2048 positions that up to 16 sequences share, as llama.cpp's server runs.
    llm = Llama(model_path=model, n_ctx=64, n_batch=64, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    par = Parallel(llm, threads)
    load_s = time.perf_counter() - t
    par.generate([llm.tokenize(b"Hello", add_bos=False)], 2)

    prompt_tps = []
    for run in range(3):
        toks = tokens_of(llm, 300, run)
        par.clear()
        t = time.perf_counter()
        par.decode([(tok, p, 0, p == len(toks) - 1) for p, tok in enumerate(toks)])
        prompt_tps.append(len(toks) / (time.perf_counter() - t))

    # Decode, one stream: 65 tokens minus 1 token after prompts of the same length, as
    # batchlab's side. Aggregate decode, measured like one stream: 16 prompts for 1 token, then
    # 16 others for 65; the tokens beyond the first over the extra time (and all of them over
    # the whole). Each run measures both, one right after the other, and gives their ratio: the
    # machine's speed drifts (a shared host), and a ratio of neighbours in time is not moved by
    # a drift between the two phases.
    def prompts(salt: int) -> list[list[int]]:
        return [chat_prompt(llm, None, f"Tell story number {i} (run {salt}) about a lighthouse.")
                for i in range(STREAMS)]
    decode_tps, aggregate_tps, aggregate_e2e_tps, over_one = [], [], [], []
    for run in range(RATIO_RUNS):
        t = time.perf_counter()
        par.generate([tokens_of(llm, 20, 1000 + run)], 1)
        one = time.perf_counter() - t
        t = time.perf_counter()
        n = par.generate([tokens_of(llm, 20, 2000 + run)], 65)
        decode_tps.append((n - 1) / max(time.perf_counter() - t - one, 1e-9))
        t = time.perf_counter()
        first = par.generate(prompts(1000 + run), 1)
        one = time.perf_counter() - t
        t = time.perf_counter()
        tokens = par.generate(prompts(2000 + run), 65)
        many = time.perf_counter() - t
        aggregate_tps.append((tokens - first) / max(many - one, 1e-9))
        aggregate_e2e_tps.append(tokens / many)
        over_one.append(aggregate_tps[-1] / decode_tps[-1])

    # Choice scoring: a 5-way field after the chat prompt, candidates with the end of turn.
    scoring_s = []
    # The model's end-of-turn token: the first of the common markers that this vocabulary has
    # as an end-of-generation token.
    eot = [t for t in llm.tokenize(b"<|im_end|><end_of_turn><|eot_id|><|end|>", add_bos=False,
                                   special=True) if llama_cpp.llama_vocab_is_eog(par.vocab, t)][:1]
    for run in range(3):
        text = llm.detokenize(tokens_of(llm, 60, 100 + run)).decode(errors="replace")
        prompt = chat_prompt(llm, "You are a helpful assistant.",
                             f"{text}\nHow is the tone of this text? positive, negative, neutral, "
                             "mixed or unclear?")
        candidates = [llm.tokenize(c.encode(), add_bos=False) + eot
                      for c in ["positive", "negative", "neutral", "mixed", "unclear"]]
        t = time.perf_counter()
        par.score(prompt, candidates)
        scoring_s.append(time.perf_counter() - t)

    print(json.dumps({
        "engine": "llama.cpp",
        "threads": threads,
        "load_s": load_s,
        "prompt_tps": statistics.median(prompt_tps),
        "decode_tps": statistics.median(decode_tps),
        "aggregate16_tps": statistics.median(aggregate_tps),
        "aggregate16_e2e_tps": statistics.median(aggregate_e2e_tps),
        "aggregate16_over_one": statistics.median(over_one),
        "scoring_s": statistics.median(scoring_s),
        "peak_rss_mb": rss_mb() - baseline_mb,
        "interpreter_rss_mb": baseline_mb,
        "llama_cpp_python": llama_cpp.__version__,
    }))


if __name__ == "__main__":
    main()
