"""How eval.py cuts a split into the windows it scores: every token once, back to back or with a stride
(eval_windows, as the Hugging Face perplexity guide does), each document apart as lm-evaluation-harness does
(harness_windows), stacked into batches (batched); the context sweep's windows, cut back from documents' ends
(document_windows), and the forwards that score them at one context (context_windows).
"""
import numpy as np
import torch


def eval_windows(tokens, block_size, stride=None, max_tokens=None):
    """Windows (x (1, L), y (1, L)), L <= block_size, that together score every token but the first exactly once
    (y = -1 where a position is context only). stride=None: back-to-back windows, each scoring all its tokens.
    stride < block_size: each window moves on by stride and scores only its last stride tokens (the first window
    scores all), so every scored token but the first block_size has block_size - stride tokens of context or more:
    the convention of the Hugging Face perplexity guide. max_tokens: use only the first max_tokens tokens."""
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride {stride} must be between 1 and block_size {block_size}")
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise ValueError(f"{n} tokens: need at least 2 to score one")
    scored = 0  # tokens[1:scored + 1] are scored already
    for begin in range(0, n - 1, stride):
        end = min(begin + block_size, n - 1)  # x = tokens[begin:end] predicts tokens[begin + 1:end + 1]
        x = torch.from_numpy(tokens[begin:end].astype(np.int64))[None]  # (1, L)
        y = torch.from_numpy(tokens[begin + 1:end + 1].astype(np.int64))[None]  # (1, L)
        y[:, :scored - begin] = -1  # predicted by an earlier window already: context only here
        yield x, y
        scored = end
        if end == n - 1:
            break


def document_windows(tokens, eot, length, max_windows):
    """Spans for a context sweep: windows of `length` target tokens cut from the documents (the text between
    <|endoftext|>s) that are at least `length` tokens long, the first ending at its document's end, the next
    `length` tokens before it, and so on (non-overlapping), taken round robin (every document's last window,
    then every second-last, ...) up to max_windows, so they spread over as many documents as there are.
    Returns (spans (N, length + 1) uint16: the token before the window then its `length` tokens, the one before a
    document's first token being <|endoftext|>; documents used; the longest document's length)."""
    ends = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(tokens)]])
    lengths = ends - starts  # (documents + 1,): a file that ends in <|endoftext|> has an empty last piece
    longest = int(lengths.max()) if len(lengths) else 0
    cuts = []  # (document start, window end within it)
    for k in range(longest // length if length else 0):
        cuts += [(s, n - k * length) for s, n in zip(starts.tolist(), lengths.tolist()) if n // length > k]
    cuts = cuts[:max_windows]
    spans = np.empty((len(cuts), length + 1), dtype=np.uint16)
    for row, (s, b) in zip(spans, cuts):
        row[1:] = tokens[s + b - length:s + b]
        row[0] = tokens[s + b - length - 1] if b > length else eot
    return spans, len({s for s, _ in cuts}), longest


def context_windows(context, score, window=None, stride=None):
    """The forwards that score the last `score` of `context` positions: [(start, end, scored)], each forward
    reading positions start..end-1 and scoring its last `scored` (together exactly context-score..context-1, once).
    window None or >= context: one forward over everything. Else sliding windows of at most `window` positions,
    the last ending at `context`, each one `stride` before the next and scoring its last stride positions (the
    first scores all of the scored positions it holds): every scored position is predicted from at most `window`
    positions and at least window - stride (or all before it), as eval_windows does."""
    if window is None or window >= context:
        return [(0, context, score)]
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride} must be between 1 and the window {window}")
    first = context - score + (score - 1) % stride + 1  # the first forward's end: then `stride` apart up to context
    out = [(max(0, first - window), first, first - (context - score))]
    for end in range(first + stride, context + 1, stride):
        out.append((max(0, end - window), end, stride))
    return out


def batched(windows, batch_size):
    """Stack consecutive windows of equal length, batch_size at a time (eval_windows' last one may be shorter)."""
    batch = []
    for x, y in windows:
        if batch and (len(batch) == batch_size or batch[0][0].shape != x.shape):
            yield torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])  # (B, L) each
            batch = []
        batch.append((x, y))
    if batch:
        yield torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])


def harness_windows(tokens, eot, context):
    """lm-eval's rolling windows (its get_rolling_token_windows with context_len=1, made disjoint) for every
    document of tokens: (x (1, L), y (1, L)), y = -1 where a position is context only."""
    ends = np.flatnonzero(tokens == eot).tolist() + [len(tokens)]
    for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends):
        seq = np.concatenate([[eot], tokens[start:end]]).astype(np.int64)  # seq[i + 1] is the document's token i
        for first in range(0, end - start, context):  # this window scores document tokens first..last-1
            last = min(first + context, end - start)
            begin = max(0, last - context)  # a short last window reaches back for a full context
            x, y = torch.from_numpy(seq[begin:last])[None], torch.from_numpy(seq[begin + 1:last + 1].copy())[None]
            y[:, :first - begin] = -1
            yield x, y
