#!/usr/bin/env python3
"""Build pmserve/data/wordnet_{nouns,verbs}.jsonl.gz from the WordNet 3.0 noun or verb database.

One JSON object per synset, sorted by synset offset:

    {"text": "<first lemma, underscores -> spaces>: <gloss>", "label": "<lexname, e.g. noun.animal>"}

Synsets in noun.Tops are dropped. `--pos verb` reads data.verb instead (supersenses verb.*). Output is deterministic (gzip mtime=0, fixed
key order, sorted records), so re-running gives byte-identical output.

Requires the WordNet 3.0 database files, e.g. ``apt-get install wordnet-base``
(installs them in /usr/share/wordnet). Stdlib only.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import os
import sys

# Standard WordNet 3.0 lexicographer file names (lexnames(5WN)). Used when the
# database directory has no ``lexnames`` file (Debian's wordnet-base omits it).
DEFAULT_LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]


def load_lexnames(wordnet_dir: str) -> dict[int, str]:
    path = os.path.join(wordnet_dir, "lexnames")
    if not os.path.exists(path):
        print(f"note: {path} not found; using the standard WordNet 3.0 lexnames table", file=sys.stderr)
        return dict(enumerate(DEFAULT_LEXNAMES))
    names: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                names[int(parts[0])] = parts[1]
    return names


def parse_data(path: str, lexnames: dict[int, str], pos: str = "n") -> list[tuple[int, str, str, str]]:
    """Return (offset, lemma, gloss, label) tuples for every synset in data.noun or data.verb."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  "):  # license header
                continue
            line = line.rstrip("\n")
            if not line.strip():
                continue
            data, sep, gloss = line.partition("|")
            if not sep:
                raise ValueError(f"{path}:{lineno}: no gloss separator")
            fields = data.split()
            offset = int(fields[0])
            lex_filenum = int(fields[1])
            ss_type = fields[2]
            w_cnt = int(fields[3], 16)
            if ss_type != pos or w_cnt < 1:
                raise ValueError(f"{path}:{lineno}: unexpected synset header {fields[:4]}")
            words = fields[4 : 4 + 2 * w_cnt : 2]
            p_cnt = int(fields[4 + 2 * w_cnt])
            if len(fields) < 5 + 2 * w_cnt + 4 * p_cnt:
                raise ValueError(f"{path}:{lineno}: truncated pointer list")
            if lex_filenum not in lexnames:
                raise ValueError(f"{path}:{lineno}: unknown lex_filenum {lex_filenum}")
            lemma = words[0].replace("_", " ")
            out.append((offset, lemma, gloss.strip(), lexnames[lex_filenum]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    ap.add_argument("--pos", choices=["noun", "verb"], default="noun")
    ap.add_argument("--out", default=None, help="default: pmserve/data/wordnet_<pos>s.jsonl.gz")
    args = ap.parse_args(argv)
    args.out = args.out or f"pmserve/data/wordnet_{args.pos}s.jsonl.gz"

    lexnames = load_lexnames(args.wordnet_dir)
    synsets = parse_data(os.path.join(args.wordnet_dir, f"data.{args.pos}"), lexnames, args.pos[0])
    synsets.sort(key=lambda s: s[0])

    buf = io.StringIO()
    counts: collections.Counter[str] = collections.Counter()
    for _offset, lemma, gloss, label in synsets:
        if label == "noun.Tops":
            continue
        counts[label] += 1
        buf.write(json.dumps({"text": f"{lemma}: {gloss}", "label": label}, ensure_ascii=False))
        buf.write("\n")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    payload = buf.getvalue().encode("utf-8")
    with open(args.out, "wb") as raw:
        # filename="" and mtime=0 keep the gzip header deterministic.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(payload)

    total = sum(counts.values())
    print(f"wrote {total} records ({len(counts)} labels) to {args.out} ({os.path.getsize(args.out)} bytes)")
    for label in sorted(counts):
        print(f"  {label:22s} {counts[label]:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
