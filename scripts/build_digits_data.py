#!/usr/bin/env python3
"""Build pmserve/data/digits.npz from scikit-learn's bundled 8x8 digits.

Arrays:
    images  uint8 (N, 8, 8), original 0..16 intensities scaled to 0..255 (x16, clipped)
    labels  int64 (N,)

The data ships with scikit-learn (no download). See pmserve/data/LICENSE-DIGITS.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from sklearn.datasets import load_digits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="pmserve/data/digits.npz")
    args = ap.parse_args(argv)

    digits = load_digits()
    images = np.clip(np.rint(digits.images * 16), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    assert images.shape == (labels.shape[0], 8, 8)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels)
    counts = np.bincount(labels, minlength=10)
    print(f"wrote {len(labels)} images to {args.out} ({os.path.getsize(args.out)} bytes)")
    print("per-class counts:", dict(enumerate(counts.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
