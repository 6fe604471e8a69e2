"""Near-duplicate search in linear memory: MinHash signatures over word-bigram shingles, LSH banding, and an
exact Jaccard check of every candidate pair.

Why bigrams: rows in fine-tuning sets are short (tens of words). With word 3-grams, one changed word in a
20-word row already drops Jaccard to 15/21 = 0.71; with bigrams it is 17/21 = 0.81, so a 0.8 threshold
still means "the same row with a word or two changed". A row of one word is one shingle.
Why banding with a recall floor: b bands of r rows find a pair of Jaccard s with probability
1 - (1 - s^r)^b. We pick, among b*r <= 128, the (b, r) that finds pairs at the threshold with
probability >= 0.995 and lets through the fewest dissimilar pairs; those are removed by the exact check.
Memory: signatures are N x 128 uint32, and each band's bucket keeps at most BUCKET_CAP rows, so neither
memory nor comparisons grow with N^2 (a bucket of 10,000 identical-looking rows costs 10,000 x BUCKET_CAP
checks, not 10,000^2 / 2).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

NUM_PERM = 128
RECALL_AT_THRESHOLD = 0.995
BUCKET_CAP = 8  # rows kept per LSH bucket as comparison partners
BLOCK = 1 << 16  # shingles hashed at once (x NUM_PERM x 8 bytes = 64 MiB peak)


def near_duplicate_pairs(texts: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """(duplicate, kept, jaccard) for rows that are near-duplicates of an earlier kept row, in order.

    Greedy in row order: a row is kept unless its Jaccard with an earlier kept row reaches the
    threshold, so every dropped row is within the threshold of a row that stays (no chaining)."""
    index = _Index(texts, threshold)
    found = []
    buckets = [dict() for _ in range(index.bands)]
    for i in range(len(texts)):
        if not index.has_shingles(i):
            continue
        keys = index.keys[i]
        best = index.best_match(i, {j for band, key in enumerate(keys) for j in buckets[band].get(key, ())})
        if best is not None:
            found.append((i, *best))
            continue
        for band, key in enumerate(keys):
            members = buckets[band].setdefault(key, [])
            if len(members) < BUCKET_CAP:
                members.append(i)
    return found


def near_matches(queries: list[str], corpus: list[str], threshold: float) -> dict[int, tuple[int, float]]:
    """For each query row with a corpus row at Jaccard >= threshold: query index -> (corpus index, jaccard)."""
    if not queries or not corpus:
        return {}
    index = _Index(list(corpus) + list(queries), threshold)
    offset = len(corpus)
    buckets = [dict() for _ in range(index.bands)]
    for j in range(len(corpus)):
        if index.has_shingles(j):
            for band, key in enumerate(index.keys[j]):
                members = buckets[band].setdefault(key, [])
                if len(members) < BUCKET_CAP:
                    members.append(j)
    found = {}
    for q in range(len(queries)):
        i = offset + q
        if not index.has_shingles(i):
            continue
        best = index.best_match(i, {j for band, key in enumerate(index.keys[i]) for j in buckets[band].get(key, ())})
        if best is not None:
            found[q] = best
    return found


def exact_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class _Index:
    """Shingles, MinHash signatures and band keys of a list of normalised texts."""

    def __init__(self, texts: list[str], threshold: float):
        self.threshold = threshold
        self.bands, rows = bands_for(threshold)
        self.shingles, self.starts = _shingles(texts)
        counts = np.diff(self.starts)
        signatures = _minhash(self.shingles, counts)
        self.keys = _band_keys(signatures, self.bands, rows).tolist()
        self._counts = counts
        self._sets: dict[int, frozenset] = {}

    def has_shingles(self, i: int) -> bool:
        return self._counts[i] > 0

    def shingle_set(self, i: int) -> frozenset:
        found = self._sets.get(i)
        if found is None:
            found = self._sets[i] = frozenset(self.shingles[self.starts[i] : self.starts[i + 1]].tolist())
        return found

    def best_match(self, i: int, candidates: set[int]) -> tuple[int, float] | None:
        best = None
        mine = self.shingle_set(i)
        for j in sorted(candidates):
            similarity = exact_jaccard(mine, self.shingle_set(j))
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (j, similarity)
        return best


@lru_cache(maxsize=16)
def bands_for(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band): recall >= RECALL_AT_THRESHOLD at the threshold, fewest false candidates below it."""
    xs = np.linspace(0.0, threshold, 200)
    best = None
    for r in range(1, num_perm + 1):
        for b in range(1, num_perm // r + 1):
            if 1 - (1 - threshold**r) ** b < RECALL_AT_THRESHOLD:
                continue
            false_area = float(np.mean(1 - (1 - xs**r) ** b))
            if best is None or false_area < best[0]:
                best = (false_area, b, r)
            break  # more bands only add false candidates
    if best is None:  # a threshold so low that even one row per band misses: use every permutation
        return num_perm, 1
    return best[1], best[2]


def _shingles(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashed word bigrams of every text, flat, with row boundaries `starts` (len(texts) + 1)."""
    vocab: dict[str, int] = {}
    ids, lengths = [], []
    for text in texts:
        words = text.split()
        lengths.append(len(words))
        ids.extend(vocab.setdefault(w, len(vocab) + 1) for w in words)
    ids = np.asarray(ids, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.int64)
    word_starts = np.concatenate([[0], np.cumsum(lengths)])
    row_end = np.repeat(word_starts[1:], lengths)
    position = np.arange(len(ids))
    following = np.append(ids[1:], np.uint64(0)) if len(ids) else ids
    following = np.where(position + 1 < row_end, following, np.uint64(0))
    # A bigram starts at every word but the last; a one-word row is its single word.
    keep = (position + 1 < row_end) | (lengths.repeat(lengths) == 1)
    hashed = _mix(ids[keep] * np.uint64(0x9E3779B97F4A7C15) + following[keep])
    per_row = np.where(lengths >= 2, lengths - 1, lengths)
    return hashed, np.concatenate([[0], np.cumsum(per_row)])


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads ids into well-mixed 64-bit hashes (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _minhash(shingles: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """N x NUM_PERM minimum of (a_k * h + b_k) >> 32 over each row's shingles (rows without shingles: max)."""
    rng = np.random.default_rng(0x10AF7)
    a = rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
    out = np.full((len(counts), NUM_PERM), np.iinfo(np.uint32).max, dtype=np.uint32)
    rows = np.flatnonzero(counts)
    ends = np.cumsum(counts[rows])
    row_start = 0
    while row_start < len(rows):
        # Blocks end on row boundaries so each row's minimum is one reduceat over its own shingles.
        first = ends[row_start - 1] if row_start else 0
        row_stop = max(int(np.searchsorted(ends, first + BLOCK, side="right")), row_start + 1)
        block = shingles[first : ends[row_stop - 1]]
        with np.errstate(over="ignore"):
            values = ((block[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
        offsets = np.concatenate([[0], np.cumsum(counts[rows[row_start:row_stop]])[:-1]])
        out[rows[row_start:row_stop]] = np.minimum.reduceat(values, offsets, axis=0)
        row_start = row_stop
    return out


def _band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """N x bands uint64 keys: rows whose r signature values agree in a band share that band's key."""
    rng = np.random.default_rng(0xBA4D)
    weights = rng.integers(1, 2**63, rows, dtype=np.uint64) | np.uint64(1)
    used = signatures[:, : bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    with np.errstate(over="ignore"):
        return _mix((used * weights).sum(axis=2, dtype=np.uint64))
