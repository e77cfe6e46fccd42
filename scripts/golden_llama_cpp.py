"""Golden fixtures for the engine's correctness tests, computed by llama.cpp (llama-cpp-python)
on the same GGUF: the top-k logits at every position of a few prompts (one past 512 tokens, so
Gemma 3's sliding window is exercised), the greedy continuation of the first prompt, and the
token ids of a corpus of tokenizer edge cases.

  python golden_llama_cpp.py MODEL OUT.json

scripts/golden-fixtures.sh runs it for every model; crates/engine/src/golden.rs reads the files.
"""

from __future__ import annotations

import hashlib
import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

from bench_llama_cpp import render_chat

TOP_K = 8
GREEDY_TOKENS = 24

# Natural text past 512 tokens for every tokenizer (Gemma 3's local layers then see only their
# window), written for these fixtures, with no paragraph repeated: a model's logits on repeated
# text are unusually confident and hide errors that ordinary prose shows.
LONG = """The harbour office opened at seven, although the first ferry did not leave until nine. \
Margit liked the quiet hour before the passengers came: the kettle ticking as it cooled, gulls \
arguing on the roof, the ledger open at a clean page. She had kept the office for eleven years \
and had never once been late, a fact her brother found either admirable or slightly alarming, \
depending on his mood.

That morning a parcel was waiting on the step, wrapped in brown paper and tied with green \
string. There was no stamp and no return address, only her name written in a careful, \
old-fashioned hand. She carried it inside, set it beside the scales, and decided it could wait \
until she had finished the tide tables. Curiosity, her mother used to say, is a fine servant and \
a poor master.

By half past eight the queue had reached the bakery. A schoolteacher wanted two return tickets \
to the island and a receipt for the council; a fisherman asked whether the weather would hold \
through Thursday; a tourist from Lyon, holding a map upside down, wanted to know where the \
lighthouse museum was and whether it sold postcards. Margit answered each in turn, stamping \
tickets, pointing at the window, promising nothing about Thursday.

When the ferry finally pulled away, the office fell silent again. She untied the green string. \
Inside the paper was a wooden box, and inside the box lay a brass compass, its glass scratched, \
its needle trembling toward the north wall. Beneath it was a folded note: "It belonged to your \
grandfather. He said you would know what to do with it." She did not know, not at first.

Her grandfather had been a pilot in the days before radar, guiding cargo ships through the \
narrow channel between the sandbanks. People still told stories about him: how he had brought \
a grain freighter home through fog so thick the crew could not see the bow from the bridge, how \
he refused payment from anyone who had lost a boat that year, how he whistled hymns badly and \
loudly. Margit had been six when he died, and she remembered mostly his hands and the smell of \
tar.

In the afternoon she walked out along the breakwater with the compass in her coat pocket. The \
wind had turned, bringing rain from the west, and the water in the channel was the colour of \
slate. At the end of the wall stood the old pilot station, boarded up for a decade, its door \
padlocked and its paint flaking. She had passed it a thousand times without a second look.

The padlock, it turned out, was not locked. Inside, under dust and a collapsed shelf, she found \
a chart table with a shallow drawer. The drawer held logbooks, dozens of them, each filled with \
the same careful handwriting as the note. The last entry was dated the week before he died. It \
read, simply, that the lower channel was silting faster than the harbour board believed, and \
that someone ought to measure it properly before the spring tides.

"""

PROMPTS = [
    "The capital of France is",
    "Question: Is the following review positive or negative?\nReview: The food was cold and the "
    "waiter ignored us for an hour.\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    LONG + "Margit closed the logbook and",
]

# A conversation rendered with the GGUF's chat template (where it has one) and tokenized as
# llama.cpp tokenizes a chat prompt: control tokens parsed, no BOS added beyond the template's.
CHAT = [
    {"role": "system", "content": "You label reviews."},
    {"role": "user", "content": "Is this review positive?\n  The food was cold."},
    {"role": "assistant", "content": " Negative."},
    {"role": "user", "content": "Why?  "},
]

# Tokenizer edge cases: scripts, emoji, whitespace runs, control-token look-alikes, code, markup.
CORPUS = [
    "",
    " ",
    "  ",
    "   leading and trailing   ",
    "\t\ttabs\tand\nnewlines\n\n\nthree",
    "\r\nwindows line\r\n",
    "Hello, world!",
    "hello world",
    "HELLO WORLD",
    "don't won't it's we're they'll I'd",
    "1234567890 3.14159 1,000,000 -42 +7 1e-9 0x1F",
    "2026-11-28T17:31:36Z",
    "naïve café résumé façade coöperate Ångström",
    "Straße ß ẞ İstanbul ǅ",
    "日本語のテキストと漢字。",
    "中文文本，包括标点符号！",
    "한국어 텍스트입니다.",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "ภาษาไทย",
    "🎉🚀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "math: ∑ᵢ xᵢ² ≤ ∞, ∀ε>0 ∃δ",
    "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>",
    "<bos><eos><pad><unk><mask>",
    "<s></s><unk>[INST][/INST]",
    "<|endoftext|><|eot_id|>",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "    indented with four spaces\n        and eight",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.org",
    '<div class="x"><p>Hello &amp; welcome</p></div>',
    '{"label": "positive", "score": 0.97, "tags": ["a", "b"]}',
    "a\u00a0b\u2009c\u200bd",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ",
    "zero\u0000byte",
    "combining: e\u0301 a\u0308 n\u0303",
    "!!!???...,,,;;;:::",
    "________----------==========",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "The quick brown fox jumps over the lazy dog.",
    "▁already▁has▁metaspace",
    "\u2581",
    "Ünïcödé 日本語 🎉🚀 ok",
]


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    with open(model, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    # An f32 KV cache (llama.cpp's default is f16), as the engine keeps: one source of
    # difference less.
    llm = Llama(model_path=model, n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True,
                n_threads=2, type_k=0, type_v=0, verbose=False)
    # Whether llama.cpp itself adds BOS (the GGUF's flag, else its default for the tokenizer).
    add_bos = bool(llm._model.add_bos_token())
    prompts = []
    for text in PROMPTS:
        ids = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        top = []
        for row in scores:
            idx = np.argsort(-row, kind="stable")[:TOP_K]
            top.append([[int(i), round(float(row[i]), 4)] for i in idx])
        prompts.append({"text": text, "tokens": ids, "top": top})
        print(f"{model}: {len(ids)} tokens", file=sys.stderr)
    # Greedy continuation of the first prompt, token by token.
    ids = llm.tokenize(PROMPTS[0].encode(), add_bos=add_bos, special=False)
    llm.reset()
    llm.eval(ids)
    greedy = []
    for _ in range(GREEDY_TOKENS):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        llm.eval([nxt])
    chat = None
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        prompt = render_chat(llm, template, CHAT)
        chat = {"messages": CHAT, "prompt": prompt,
                "ids": llm.tokenize(prompt.encode(), add_bos=False, special=True)}
    corpus = [
        {"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=False)} for t in CORPUS
    ]
    json.dump({"model": model.split("/")[-1], "sha256": sha, "llama_cpp_python": llama_cpp.__version__,
               "top_k": TOP_K,
               "add_bos": add_bos, "prompts": prompts, "greedy": greedy, "tokenizer": corpus, "chat": chat},
              open(out, "w"), ensure_ascii=False, separators=(",", ":"))


if __name__ == "__main__":
    main()
