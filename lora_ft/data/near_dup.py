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

import hashlib
from functools import lru_cache

import numpy as np

NUM_PERM = 128
RECALL_AT_THRESHOLD = 0.995
BUCKET_CAP = 5  # earliest rows of an LSH bucket that a row is compared with
# Candidates whose signature agreement (an unbiased Jaccard estimate with standard error
# sqrt(J(1-J)/128), 0.035 at 0.8) is more than 3 standard errors below the threshold skip the exact
# check: 100k templated rows (the quickstart generator) put 2.6M pairs into shared buckets, mostly at
# Jaccard 0.4-0.7, and the vectorised estimate is far cheaper than a set intersection per pair.
ESTIMATE_SIGMAS = 3.0
BLOCK = 1 << 14  # shingles hashed at once (x NUM_PERM x 8 bytes = 16 MiB per temporary)
WORD_CHUNK = 8192  # texts split into words at once
PAIR_BLOCK = 1 << 16  # candidate pairs whose signatures are compared at once


class ShingleIndex:
    """Shingles, MinHash signatures and LSH band keys of normalised (single-spaced) texts."""

    def __init__(self, texts: list[str], threshold: float):
        self.threshold = threshold
        self._estimate_floor = threshold - ESTIMATE_SIGMAS * (threshold * (1 - threshold) / NUM_PERM) ** 0.5
        bands, rows = bands_for(threshold)
        self.shingles, self.starts = _shingles(texts)
        counts = np.diff(self.starts)
        self.signatures = _minhash(self.shingles, counts)
        self.keys = _band_keys(self.signatures, bands, rows)
        # A row without words has no signature; give it keys no other row can share.
        empty = np.flatnonzero(counts == 0).astype(np.uint64)
        self.keys[empty.astype(np.int64)] = np.uint64(2**63) + empty[:, None] * np.uint64(bands) + np.arange(bands, dtype=np.uint64)
        self._sets: dict[int, frozenset] = {}

    def __len__(self) -> int:
        return len(self.starts) - 1

    def duplicates(self, rows: np.ndarray | None = None) -> list[tuple[int, int, float]]:
        """(duplicate, kept, jaccard) among `rows` (default all), greedy in row order: a row is dropped when
        its Jaccard with an earlier row that stays reaches the threshold, so there is no chaining."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        verified: dict[int, list[tuple[int, float]]] = {}
        for later, earlier in self._verify(self, _candidates(self.keys[rows], self.keys[rows], same=True), rows, rows):
            verified.setdefault(later, []).append((earlier, self._last))
        found, dropped = [], set()
        for i in sorted(verified):
            partners = [(j, sim) for j, sim in verified[i] if j not in dropped]
            if partners:
                j, similarity = max(partners, key=lambda item: (item[1], -item[0]))
                found.append((i, j, similarity))
                dropped.add(i)
        return found

    def matches(self, rows: np.ndarray, corpus: "ShingleIndex", corpus_rows: np.ndarray) -> dict[int, tuple[int, float]]:
        """For each of `rows` with a `corpus_rows` row at Jaccard >= threshold: row -> (corpus row, jaccard)."""
        rows, corpus_rows = np.asarray(rows, dtype=np.int64), np.asarray(corpus_rows, dtype=np.int64)
        found: dict[int, tuple[int, float]] = {}
        if len(rows) and len(corpus_rows):
            pairs = _candidates(self.keys[rows], corpus.keys[corpus_rows], same=False)
            for q, c in self._verify(corpus, pairs, rows, corpus_rows):
                if q not in found or self._last > found[q][1]:
                    found[q] = (c, self._last)
        return found

    def _verify(self, other: "ShingleIndex", pairs: np.ndarray, rows: np.ndarray, other_rows: np.ndarray):
        """Yield (row, other row) pairs at Jaccard >= threshold (the value is left in self._last)."""
        pairs = np.stack([rows[pairs[:, 0]], other_rows[pairs[:, 1]]], axis=1) if len(pairs) else pairs
        for block in range(0, len(pairs), PAIR_BLOCK):
            chunk = pairs[block : block + PAIR_BLOCK]
            estimate = (self.signatures[chunk[:, 0]] == other.signatures[chunk[:, 1]]).mean(axis=1)
            for i, j in chunk[estimate >= self._estimate_floor].tolist():
                self._last = exact_jaccard(self.shingle_set(i), other.shingle_set(j))
                if self._last >= self.threshold:
                    yield i, j

    def shingle_set(self, i: int) -> frozenset:
        found = self._sets.get(i)
        if found is None:
            found = self._sets[i] = frozenset(self.shingles[self.starts[i] : self.starts[i + 1]].tolist())
        return found


def near_duplicate_pairs(texts: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """(duplicate, kept, jaccard) for texts that are near-duplicates of an earlier kept text."""
    return ShingleIndex(texts, threshold).duplicates()


def near_matches(queries: list[str], corpus: list[str], threshold: float) -> dict[int, tuple[int, float]]:
    """query index -> (corpus index, jaccard) for queries with a corpus text at Jaccard >= threshold."""
    queries_index, corpus_index = ShingleIndex(queries, threshold), ShingleIndex(corpus, threshold)
    return queries_index.matches(np.arange(len(queries)), corpus_index, np.arange(len(corpus)))


def _candidates(query_keys: np.ndarray, corpus_keys: np.ndarray, *, same: bool) -> np.ndarray:
    """Unique (query, corpus) position pairs that share a band key, each query paired with at most
    BUCKET_CAP corpus rows per bucket (the earliest). With same=True both sides are one list and only
    pairs (later, earlier) are made. Vectorised per band; at most N * bands * BUCKET_CAP pairs."""
    n_query, n_corpus = len(query_keys), len(corpus_keys)
    n_corpus_or_query = max(n_query if same else n_corpus, 1)
    pairs: list[np.ndarray] = []
    for band in range(query_keys.shape[1]):
        if same:
            keys, is_query, ids = query_keys[:, band], np.ones(n_query, bool), np.arange(n_query)
        else:
            keys = np.concatenate([corpus_keys[:, band], query_keys[:, band]])
            is_query = np.arange(n_corpus + n_query) >= n_corpus
            ids = np.concatenate([np.arange(n_corpus), np.arange(n_query)])
        # Sort by key, then corpus rows before queries, then row order: each bucket is one run.
        order = np.lexsort((ids, is_query, keys))
        keys, is_query, ids = keys[order], is_query[order], ids[order]
        position = np.arange(len(keys))
        new_bucket = np.ones(len(keys), bool)
        new_bucket[1:] = keys[1:] != keys[:-1]
        start = np.maximum.accumulate(np.where(new_bucket, position, 0))
        if same:
            earlier_in_bucket = position - start
        else:
            corpus_before = np.cumsum(~is_query) - (~is_query)  # corpus rows before each position
            earlier_in_bucket = corpus_before - corpus_before[start]
        for rank in range(BUCKET_CAP):
            ok = is_query & (earlier_in_bucket > rank)
            if not ok.any():
                break
            pairs.append(ids[ok].astype(np.int64) * n_corpus_or_query + ids[(start + rank)[ok]])
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    flat = np.sort(np.concatenate(pairs))  # sort + neighbour compare: faster than np.unique's hashing here
    flat = flat[np.concatenate([[True], flat[1:] != flat[:-1]])]
    return np.stack([flat // n_corpus_or_query, flat % n_corpus_or_query], axis=1)


def exact_jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


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
    # Texts are normalised (single spaces), so one split of the joined text gives every word, and
    # dict/map do the word -> id lookups in C: the slow part would be a Python loop over words.
    # Each distinct word is hashed by content (blake2b, not Python's per-process salted hash), so two
    # indexes (train and eval) give the same word the same id and results repeat from run to run.
    # Chunks of rows keep the list of word strings small (100k rows are ~3.5M words, ~200 MB as str).
    vocab: dict[str, int] = {}
    parts = []
    for first in range(0, len(texts), WORD_CHUNK):
        joined = " ".join(t for t in texts[first : first + WORD_CHUNK] if t)
        if not joined:
            continue
        words = joined.split(" ")
        for word in dict.fromkeys(words).keys() - vocab.keys():
            vocab[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        parts.append(np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words)))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    lengths = np.fromiter((t.count(" ") + 1 if t else 0 for t in texts), dtype=np.int64, count=len(texts))
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
