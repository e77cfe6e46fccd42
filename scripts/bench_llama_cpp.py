"""llama.cpp's side of scripts/bench-engine.sh (through llama-cpp-python): the same
measurements as crates/engine/examples/bench_engine.rs, on the same GGUF and thread count, as
one JSON object. llama-cpp-python serves one sequence at a time, so it has no 16-stream figure.

  python bench_llama_cpp.py MODEL THREADS
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama

BASE = "Run {salt}. The history of the city is long and full of surprising turns, markets, rivers and bridges. "


def tokens_of(llm: Llama, n: int, salt: int) -> list[int]:
    text = ""
    while len(llm.tokenize(text.encode(), add_bos=False)) < n:
        text += BASE.format(salt=salt)
    return llm.tokenize(text.encode(), add_bos=False)[:n]


def last_logits(llm: Llama) -> np.ndarray:
    ptr = llm._ctx.get_logits()
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    m = logits.max()
    return float(logits[token] - m - math.log(np.exp(logits - m).sum()))


def main() -> None:
    model, threads = sys.argv[1], int(sys.argv[2])
    t = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t
    llm.eval(llm.tokenize(b"Hello", add_bos=False))

    prompt_tps = []
    for run in range(3):
        toks = tokens_of(llm, 300, run)
        llm.reset()
        t = time.perf_counter()
        llm.eval(toks)
        prompt_tps.append(len(toks) / (time.perf_counter() - t))

    decode_tps = []
    for run in range(3):
        llm.reset()
        llm.eval(tokens_of(llm, 20, 2000 + run))
        t = time.perf_counter()
        for _ in range(64):
            nxt = int(np.argmax(last_logits(llm)))
            llm.eval([nxt])
        decode_tps.append(64 / (time.perf_counter() - t))

    # Choice scoring: the chat prompt once, then each candidate (with the end-of-turn token)
    # from a saved state, as batchlab does with its shared prefix.
    scoring_s = []
    eot = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    for run in range(3):
        text = llm.detokenize(tokens_of(llm, 60, 100 + run)).decode()
        chat = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{text}\n"
                "How is the tone of this text? positive, negative, neutral, mixed or unclear?<|im_end|>\n"
                "<|im_start|>assistant\n")  # fmt: skip
        prompt = llm.tokenize(chat.encode(), add_bos=False, special=True)
        candidates = [llm.tokenize(c.encode(), add_bos=False) + eot for c in ["positive", "negative", "neutral", "mixed", "unclear"]]
        t = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        first = last_logits(llm)
        state = llm.save_state()
        logprobs = []
        for cand in candidates:
            llm.load_state(state)
            lp = log_softmax_at(first, cand[0])
            for k in range(1, len(cand)):
                llm.eval([cand[k - 1]])
                lp += log_softmax_at(last_logits(llm), cand[k])
            logprobs.append(lp)
        scoring_s.append(time.perf_counter() - t)

    print(json.dumps({
        "engine": "llama.cpp",
        "threads": threads,
        "load_s": load_s,
        "prompt_tps": statistics.median(prompt_tps),
        "decode_tps": statistics.median(decode_tps),
        "aggregate16_tps": None,
        "scoring_s": statistics.median(scoring_s),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
