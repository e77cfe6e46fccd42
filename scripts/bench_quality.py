"""The table of scripts/bench-quality.sh: batchlab's measured quality (from bench_quality's JSON,
means over its splits) beside two baselines trained on exactly the same rows: the majority class of the annotations
given, and TF-IDF + logistic regression (scikit-learn). Then each target of issue 18, met or not.

Usage: python bench_quality.py REPORT_JSON DATASETS_DIR COMMIT
"""

import json
import sys
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score


def macro_f1(gold, predicted):
    return f1_score(gold, predicted, average="macro", labels=sorted(set(gold) | set(predicted)), zero_division=0)


def baselines(texts, labels, pool, evaluated, n):
    """Majority class and TF-IDF + LR trained on the first n rows of the pool."""
    gold = [labels[i] for i in evaluated]
    given = pool[:n]
    given_labels = [labels[i] for i in given]
    # With nothing given, the majority baseline is the commonest class of the whole subset.
    source = given_labels or [labels[i] for i in pool + evaluated]
    majority = max(sorted(set(source)), key=source.count)
    out = {"majority_accuracy": accuracy_score(gold, [majority] * len(gold))}
    if len(set(given_labels)) >= 2:
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        x = vectorizer.fit_transform([texts[i] for i in given])
        model = LogisticRegression(max_iter=2000, C=10.0).fit(x, given_labels)
        predicted = list(model.predict(vectorizer.transform([texts[i] for i in evaluated])))
        out["tfidf_accuracy"] = accuracy_score(gold, predicted)
        out["tfidf_macro_f1"] = macro_f1(gold, predicted)
    return out


def mean(values):
    return sum(values) / len(values)


def main():
    report = json.loads(Path(sys.argv[1]).read_text())
    datasets = Path(sys.argv[2])
    commit = sys.argv[3]
    print("Each figure is the mean over the splits (the range of batchlab's accuracy in brackets).")
    print()
    print("| dataset (rows: pool / evaluated, splits) | annotations | batchlab accuracy | macro-F1 | ECE | answered by "
          "| majority class | TF-IDF + LR accuracy | TF-IDF + LR macro-F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    checks = []
    by_name = {}
    for d in report:
        rows = [json.loads(line) for line in (datasets / d["file"]).read_text().splitlines()]
        texts = [r["text"] for r in rows]
        labels = [r["label"] for r in rows]
        by_name[d["name"]] = {}
        splits = d["splits"]
        for k, first in enumerate(splits[0]["results"]):
            n = first["annotations"]
            ours = [s["results"][k] for s in splits]
            theirs = [baselines(texts, labels, s["pool"], s["eval"], n) for s in splits]
            r = {key: mean([o[key] for o in ours]) for key in ("accuracy", "macro_f1", "ece")}
            r["min_accuracy"] = min(o["accuracy"] for o in ours)
            r["max_accuracy"] = max(o["accuracy"] for o in ours)
            r["smallest_class_share"] = min(min(o["predicted_per_class"]) / sum(o["predicted_per_class"]) for o in ours)
            r["used"] = ", ".join(sorted({o["used"] for o in ours}))
            b = {"majority_accuracy": mean([t["majority_accuracy"] for t in theirs])}
            if all("tfidf_accuracy" in t for t in theirs):
                b["tfidf_accuracy"] = mean([t["tfidf_accuracy"] for t in theirs])
                b["tfidf_macro_f1"] = mean([t["tfidf_macro_f1"] for t in theirs])
            by_name[d["name"]][n] = (r, b)
            tfidf = (f"{b['tfidf_accuracy']:.3f}", f"{b['tfidf_macro_f1']:.3f}") if "tfidf_accuracy" in b else ("—", "—")
            print(f"| {d['name']} ({len(splits[0]['pool'])} / {len(splits[0]['eval'])}, {len(splits)}) | {n} "
                  f"| {r['accuracy']:.3f} ({r['min_accuracy']:.3f}–{r['max_accuracy']:.3f}) | {r['macro_f1']:.3f} "
                  f"| {r['ece']:.3f} | {r['used']} | {b['majority_accuracy']:.3f} | {tfidf[0]} | {tfidf[1]} |")
        print(f"| {d['name']}: features of {len(splits[0]['pool']) + len(splits[0]['eval'])} rows | | "
              f"{d['rows_per_second']:.1f} rows/s | | | | | | |")
    sms, trec = by_name.get("sms_spam (balanced)", {}), by_name.get("trec", {})

    def check(name, ok, measured):
        checks.append((name, measured, "met" if ok else "**missed**"))

    if 0 in sms:
        r, _ = sms[0]
        check("zero-shot SMS Spam (balanced): no single-class collapse, accuracy ≥ 0.65",
              r["accuracy"] >= 0.65 and r["smallest_class_share"] >= 0.1,
              f"accuracy {r['accuracy']:.3f}, smallest share of answers for one class {r['smallest_class_share']:.2f}")
    if 0 in trec:
        r, b = trec[0]
        check("zero-shot TREC ≥ 1.5× the majority-class accuracy", r["accuracy"] >= 1.5 * b["majority_accuracy"],
              f"{r['accuracy']:.3f} = {r['accuracy'] / b['majority_accuracy']:.2f}× {b['majority_accuracy']:.3f}")
    for name, data in (("SMS Spam", sms), ("TREC", trec)):
        if 50 in data:
            r, b = data[50]
            tfidf = b.get("tfidf_accuracy", 0.0)
            check(f"50 annotations, {name}: ahead of TF-IDF + LR", r["accuracy"] > tfidf,
                  f"{r['accuracy']:.3f} vs {tfidf:.3f}")
    if 200 in trec:
        r, _ = trec[200]
        check("200 annotations, TREC accuracy ≥ 0.80", r["accuracy"] >= 0.80, f"{r['accuracy']:.3f}")
    if 200 in sms:
        r, _ = sms[200]
        check("200 annotations, SMS Spam macro-F1 ≥ 0.92", r["macro_f1"] >= 0.92, f"{r['macro_f1']:.3f}")
    worst = max((r["ece"], f"{name} {n}") for name, data in (("SMS Spam", sms), ("TREC", trec))
                for n, (r, _) in data.items() if n >= 50)
    check("ECE ≤ 0.10 wherever 50+ annotations exist", worst[0] <= 0.10, f"worst {worst[0]:.3f} ({worst[1]})")
    print()
    print(f"| target (commit {commit}) | measured | |")
    print("| --- | --- | --- |")
    for name, measured, verdict in checks:
        print(f"| {name} | {measured} | {verdict} |")


if __name__ == "__main__":
    main()
