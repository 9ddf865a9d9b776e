#!/usr/bin/env python3
"""Build pmserve/data/clinc150.json.gz from CLINC150 (clinc/oos-eval: data/data_full.json, data/domains.json).

One gzip'd JSON object, the requests grouped by split and intent instead of repeated (text, intent) pairs:

    {"format": "pmserve-clinc150/1",
     "source": "<repository, files and commit>",
     "domains": {"banking": ["<intent>", ...], ...},      # 10 domains of 15 intents, domains.json's order
     "train": {"<intent>": ["<request>", ...], ...},      # 100 per intent, data_full.json's order
     "val":   {...},                                      # 20 per intent
     "test":  {...},                                      # 30 per intent
     "oos":   {"train": [...], "val": [...], "test": [...]}}  # out-of-scope: 100 / 100 / 1000

Intents are sorted within each split; requests are kept byte for byte and in source order (the source repeats 5
requests under two intents or splits; they are kept). Every count above is checked, so a different source file
fails loudly. Output is deterministic (gzip mtime=0, fixed key order), so re-running gives byte-identical output.

Requires a checkout of https://github.com/clinc/oos-eval (``--source DIR``). Stdlib only.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys

SPLITS = {"train": 100, "val": 20, "test": 30}  # in-scope requests per intent
OOS = {"train": 100, "val": 100, "test": 1000}
N_DOMAINS, PER_DOMAIN = 10, 15


def build(full: dict, domains: dict[str, list[str]], source: str) -> dict:
    """The compact object above, from data_full.json and domains.json as loaded; ValueError on any count."""
    intents = [i for names in domains.values() for i in names]
    if len(domains) != N_DOMAINS or any(len(v) != PER_DOMAIN for v in domains.values()):
        raise ValueError(f"domains.json: expected {N_DOMAINS} domains of {PER_DOMAIN} intents")
    if len(set(intents)) != len(intents):
        raise ValueError("domains.json: an intent is listed in two domains")
    out: dict = {"format": "pmserve-clinc150/1", "source": source, "domains": domains}
    for split, per_intent in SPLITS.items():
        by_intent: dict[str, list[str]] = collections.defaultdict(list)
        for text, intent in full[split]:
            by_intent[intent].append(text)
        if set(by_intent) != set(intents):
            raise ValueError(f"data_full.json: {split}'s intents differ from domains.json's")
        short = {i: len(v) for i, v in by_intent.items() if len(v) != per_intent}
        if short:
            raise ValueError(f"data_full.json: {split}: expected {per_intent} per intent, got {short}")
        out[split] = {i: by_intent[i] for i in sorted(by_intent)}
    out["oos"] = {}
    for split, n in OOS.items():
        rows = full[f"oos_{split}"]
        if len(rows) != n or {intent for _, intent in rows} != {"oos"}:
            raise ValueError(f"data_full.json: oos_{split}: expected {n} requests labelled oos")
        out["oos"][split] = [text for text, _ in rows]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="a checkout of clinc/oos-eval")
    ap.add_argument("--commit", default="", help="the checkout's commit, recorded in the output")
    ap.add_argument("--out", default="pmserve/data/clinc150.json.gz")
    args = ap.parse_args(argv)

    with open(os.path.join(args.source, "data", "data_full.json"), encoding="utf-8") as f:
        full = json.load(f)
    with open(os.path.join(args.source, "data", "domains.json"), encoding="utf-8") as f:
        domains = json.load(f)
    source = "https://github.com/clinc/oos-eval data/data_full.json, data/domains.json"
    if args.commit:
        source += f" at commit {args.commit}"
    data = build(full, domains, source)

    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as raw:
        # filename="" and mtime=0 keep the gzip header deterministic.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(payload)
    n = {s: sum(map(len, data[s].values())) for s in SPLITS}
    print(
        f"wrote {len(data['train'])} intents in {len(domains)} domains ({n['train']} train, {n['val']} val, "
        f"{n['test']} test; oos {', '.join(str(len(v)) for v in data['oos'].values())}) to {args.out} "
        f"({os.path.getsize(args.out)} bytes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
