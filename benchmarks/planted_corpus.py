"""Run raw_corpus + cleaned_shards on a generated corpus with planted duplicates and broken files,
and score the outcome against its ground truth.

    python benchmarks/planted_corpus.py [--work-dir /tmp/scratchllm-planted] [--files 300] [--seed 0]

Prints: planted exact duplicates removed, planted near duplicates removed (with the Jaccard of any
missed pair), clean originals kept, low-quality files filtered, broken files/records quarantined
(with the reasons given), duplicate removals outside the planted pairs, and whether the
invariant (in = kept + filtered + duplicates + quarantined) holds. Exit status 1 if anything planted
was missed or the invariant fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import benchmarks.* from the root

from benchmarks.make_corpus import make_planted_corpus
from benchmarks.outcomes import Outcomes, score_pairs
from llm_core.config import load_config  # noqa: E402
from llm_core.data.checks import verify_cleaned_shards  # noqa: E402
from llm_core.data.cleaned_shards import build_cleaned_shards  # noqa: E402
from llm_core.data.raw_corpus import build_raw_corpus  # noqa: E402


def run(work_dir: Path, n_files: int, seed: int, overrides: dict | None = None, verbose: bool = False,
        pool: list | None = None) -> dict:
    """pool: the prose the files are made of (default: make_corpus.text_pool(), every package)."""
    truth = make_planted_corpus(work_dir / "planted", n_files, seed, pool=pool)
    corpus = Path(truth["corpus_dir"])
    data_dir = work_dir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    cfg = load_config(overrides={"data_dir": str(data_dir), "corpus": {"sources": [str(corpus)]}, **(overrides or {})})
    log = print if verbose else (lambda message: None)
    start = time.monotonic()
    raw = build_raw_corpus(cfg, log)
    cleaned = build_cleaned_shards(cfg, log)
    seconds = time.monotonic() - start
    out = Outcomes(data_dir, corpus)

    pairs = [{"kind": "exact", **p} for p in truth["exact_duplicates"]] + \
            [{"kind": "near", **p} for p in truth["near_duplicates"]]
    scores = score_pairs(out, pairs)

    # Originals: kept, or removed as a duplicate of their own planted copy (which was read first).
    copy_of = {p["of"]: p["file"] for p in pairs}
    originals_ok, originals_total, original_problems, short_tails = 0, 0, [], []
    for rel in truth["originals"]:
        for k, (doc_id, status) in enumerate(zip(out.ids[rel], out.status(rel))):
            originals_total += 1
            removed_for_copy = status in ("exact_duplicate", "near_duplicate") and \
                out.removed[doc_id][1] in out.ids.get(copy_of.get(rel, ""), [])
            if status == "kept" or removed_for_copy:
                originals_ok += 1
            elif k > 0 and "#" not in rel and status in ("min_chars", "min_words"):
                short_tails.append((rel, status))  # the last piece of a file cut at max_document_bytes
            else:
                original_problems.append((rel, status))
        if not out.ids[rel]:
            originals_total += 1
            original_problems.append((rel, "not read"))

    low_quality = {rel: out.status(rel) for rel in truth["low_quality"]}
    not_a_rule = ("kept", "missing", "exact_duplicate", "near_duplicate", "quarantined")
    low_filtered = sum(1 for s in low_quality.values() if s and all(x not in not_a_rule for x in s))
    broken = []
    for item in truth["broken"]:
        rel, _, line = item["file"].partition("#")
        entries = [e for e in out.quarantine if e["rel"] == rel and
                   (not line or e.get("location") == f"line {int(line) + 1}")]
        kinds = {e["kind"] for e in entries}
        ok = bool(entries) and (item["expect"] == "file or record" or item["expect"] in kinds)
        broken.append((item, ok, [e["reason"] for e in entries]))
    valid, detail = verify_cleaned_shards(cfg)
    return {"truth": truth, "raw": raw, "cleaned": cleaned, "seconds": seconds, "scores": scores,
            "originals": (originals_ok, originals_total, original_problems, short_tails),
            "low_quality": (low_filtered, low_quality),
            "broken": broken, "invariant": cleaned.invariant_holds() and valid, "verify": detail}


def report(r: dict) -> bool:
    truth, s, cleaned, raw = r["truth"], r["scores"], r["cleaned"], r["raw"]
    print(f"planted corpus: {truth['num_files']} files -> {raw.num_documents} documents "
          f"({raw.num_bytes / 1e6:.2f} MB), stages took {r['seconds']:.1f} s")
    print(f"  planted exact duplicates removed: {s['found']['exact']}/{s['total']['exact']}")
    print(f"  planted near duplicates removed:  {s['found']['near']}/{s['total']['near']}  "
          f"(Jaccard {min(p['jaccard'] for p in truth['near_duplicates']):.3f}-"
          f"{max(p['jaccard'] for p in truth['near_duplicates']):.3f})")
    for pair in s["missed"]:
        print(f"    missed {pair['kind']}: {pair['file']} ~ {pair['of']} {pair.get('jaccard', pair.get('variant'))}")
    ok_n, total_n, problems, short_tails = r["originals"]
    print(f"  clean originals kept: {ok_n}/{total_n} documents ({100 * ok_n / max(total_n, 1):.1f}%)")
    for rel, status in problems[:10]:
        print(f"    not kept: {rel}: {status}")
    if short_tails:
        print(f"    + {len(short_tails)} short last piece(s) of files cut at max_document_bytes filtered by "
              f"{sorted({s for _, s in short_tails})} (text lost at the cut, not a cleaning error)")
    low_n, low = r["low_quality"]
    print(f"  low-quality files filtered: {low_n}/{len(low)}  {dict((k, v) for k, v in low.items())}")
    n_ok = sum(ok for _, ok, _ in r["broken"])
    print(f"  broken files/records quarantined: {n_ok}/{len(r['broken'])}")
    for item, ok, reasons in r["broken"]:
        print(f"    {'ok  ' if ok else 'MISS'} {item['file']} ({item['problem']}): {'; '.join(reasons) or '-'}")
    print(f"  duplicate removals outside planted pairs: {s['unplanted_removals'] or 'none'}")
    print(f"  filtered by rule: {cleaned.filtered_by_rule}; quarantine reasons: {raw.quarantine_reasons}")
    print(f"  invariant holds: {r['invariant']} ({cleaned.num_documents_in} in = {cleaned.num_kept} kept + "
          f"{cleaned.num_filtered} filtered + {cleaned.num_exact_duplicates} exact + "
          f"{cleaned.num_near_duplicates} near + {cleaned.num_quarantined} quarantined; {r['verify']})")
    return (not s["missed"] and ok_n + len(short_tails) == total_n and n_ok == len(r["broken"]) and low_n == len(low)
            and r["invariant"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a new directory under /tmp")
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show the stages' log")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="scratchllm-planted-"))
    print(f"work dir: {work_dir}")
    all_ok = report(run(work_dir, args.files, args.seed, verbose=args.verbose))
    print("ALL PLANTED CASES HANDLED" if all_ok else "SOME PLANTED CASES WERE MISSED")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
