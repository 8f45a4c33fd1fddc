"""Load a Hugging Face byte-level BPE `tokenizer.json` (GPT-NeoX-20B / Pythia) as a tiktoken.Encoding.

tiktoken's Rust core does the work (prepare.py tokenizes ~160 MB); HF `tokenizers` is only the test oracle,
and test_tokenizer.py checks the ids are identical. HF's pipeline, and where each step lands here:

1. Added tokens are split off first, leftmost-longest. The special ones (`<|endoftext|>` = 0, `<|padding|>` = 1)
   become tiktoken special tokens, matched on the raw text like HF does. tiktoken convention: `encode(s)`
   raises if `s` contains one, `encode(s, allowed_special="all")` gives HF's ids, and `encode_ordinary(s)`
   (the data pipeline's call) encodes a literal "<|endoftext|>" as ordinary text -- so a document can never
   forge the document separator `enc.eot_token` -- where HF would emit id 0.
   GPT-NeoX's other added tokens (ids 50254..50276) are runs of 2..24 spaces: HF turns every run of 2+
   spaces into them before pre-tokenizing. We fold that into the split regex: ` {2,24}` is a piece of its
   own (greedy = leftmost-longest, since all lengths 2..24 exist) that tiktoken looks up whole, and the
   whitespace alternatives may not swallow two spaces in a row, so pieces end where HF's segments end.
2. The normalizer (NFC): tiktoken cannot normalize, so HFEncoding.normalize runs before encoding, on the
   text between special tokens (HF matches those before normalizing). decode(encode(s)) == NFC(s).
3. ByteLevel pre-tokenizer: GPT-2's regex over UTF-8 bytes -- tiktoken's r50k_base pattern.
4. BPE: HF applies merges by merge index, tiktoken by rank = token id. Same result because the ids grow with
   merge order (checked at load) and every token's own BPE is itself (checked by the tests).

The vocab's own multi-space tokens (e.g. 245 = two spaces) are unreachable through HF's encoder (the added
tokens win) but have the same bytes as an added token, and tiktoken needs bytes -> id to be one-to-one, so
they are kept as decode-only aliases.
"""
import hashlib
import json
import re
import unicodedata
from pathlib import Path

import tiktoken

# GPT-2's pre-tokenizer regex: tiktoken's r50k_base pat_str, equivalent to the one in HF's ByteLevel.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class HFEncoding(tiktoken.Encoding):
    """A tiktoken.Encoding plus what HF does outside tiktoken's model: Unicode normalization before
    encoding, and decoding of vocab ids that alias an added token. Picklable (for worker processes)."""

    def __init__(self, name, *, pat_str, mergeable_ranks, special_tokens, normalizer=None, aliases=None,
                 source_sha256=""):
        super().__init__(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        self.normalizer = normalizer  # a unicodedata form ("NFC") or None
        self.aliases = aliases or {}  # vocab id -> added-token id with the same bytes
        self.source_sha256 = source_sha256  # of the tokenizer.json this was built from
        specials = "|".join(map(re.escape, special_tokens))
        self._special_split = re.compile(f"({specials})") if specials else None

    def normalize(self, text: str) -> str:
        """HF's normalizer, applied between special tokens, which HF matches on the raw text."""
        if self.normalizer is None:
            return text
        parts = self._special_split.split(text) if self._special_split else [text]
        # odd indices are the captured special tokens: kept verbatim
        return "".join(p if i % 2 else unicodedata.normalize(self.normalizer, p) for i, p in enumerate(parts))

    # encode_batch / encode_ordinary_batch call these two, so they normalize too
    def encode_ordinary(self, text: str) -> list[int]:
        return super().encode_ordinary(self.normalize(text))

    def encode(self, text: str, **kwargs) -> list[int]:
        return super().encode(self.normalize(text), **kwargs)

    def encode_to_numpy(self, text: str, **kwargs):
        return super().encode_to_numpy(self.normalize(text), **kwargs)

    def _dealias(self, tokens):
        if self.aliases.keys().isdisjoint(tokens):
            return tokens
        return [self.aliases.get(t, t) for t in tokens]

    # decode_batch / decode_tokens_bytes / decode_with_offsets go through these three
    def decode_bytes(self, tokens) -> bytes:
        return super().decode_bytes(self._dealias(tokens))

    def decode(self, tokens, errors: str = "replace") -> str:
        return super().decode(self._dealias(tokens), errors=errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        return super().decode_single_token_bytes(self.aliases.get(token, token))

    def __getstate__(self):
        # tiktoken's __setstate__ calls __init__(**state): carry our fields along
        return {**super().__getstate__(), "normalizer": self.normalizer, "aliases": self.aliases,
                "source_sha256": self.source_sha256}


DEFAULT_TOKENIZER = "EleutherAI/pythia-70m"  # GPT-NeoX-20B's BPE, as every Pythia has it

def tokenizer_file_sha256(path) -> str:
    """sha256 hex digest of a tokenizer file; equals `load_tokenizer(path).source_sha256`."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _byte_of_char() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: the char a byte-level vocab uses -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def tokenizer_path(name_or_path, revision="main") -> Path:
    """The tokenizer.json that load_tokenizer reads: a file named directly (any name, e.g. 20B_tokenizer.json), else
    hub.resolve_file's: a directory holding tokenizer.json, or a hub repo id (downloaded at revision)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".json":
        raise FileNotFoundError(f"{name_or_path}: no such tokenizer file; pass a tokenizer.json file, a directory "
                                "holding one, or a hub repo id such as EleutherAI/pythia-70m")
    from hub import resolve_file  # lazy: local files need no hub client

    return Path(resolve_file(name_or_path, "tokenizer.json", revision))


def load_tokenizer(name_or_path=DEFAULT_TOKENIZER, revision="main") -> HFEncoding:
    """tiktoken.Encoding with HF-identical ids, from a tokenizer.json path, a directory holding one, or a
    hub repo id (downloaded at `revision` via hub.resolve_file). Named "hf-<sha256[:12]>" of the file."""
    path = tokenizer_path(name_or_path, revision)
    sha = tokenizer_file_sha256(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON tokenizer file ({e})") from None

    def need(ok, what):
        if not ok:
            raise ValueError(f"{path}: unsupported tokenizer.json: {what}. load_tokenizer reads GPT-2/GPT-NeoX-style "
                             "byte-level BPE files only (e.g. EleutherAI/pythia-70m's)")

    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    options = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
    need(model.get("type") == "BPE" and not any(options.get(k) for k in ("dropout", "continuing_subword_prefix",
         "end_of_word_suffix", "byte_fallback")), f"model {options}")
    need(pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True),
         f"pre_tokenizer {pre}")
    need(norm is None or norm == {"type": "NFC"}, f"normalizer {norm} (only NFC or none)")

    vocab = model["vocab"]
    merged = [vocab.get("".join(m.split(" ") if isinstance(m, str) else m)) for m in model["merges"]]
    need(None not in merged and merged == sorted(set(merged)),
         "merge results missing from the vocab, or vocab ids not increasing with merge order (tiktoken ranks by id)")
    byte_of = _byte_of_char()
    need(all(c in byte_of for tok in vocab for c in tok), "vocab tokens outside the byte-level alphabet")
    token_bytes = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items()}

    special, runs = {}, {}  # special content -> id; space-run length -> id
    for t in spec.get("added_tokens", []):
        content, plain = t["content"], not (t["lstrip"] or t["rstrip"] or t["single_word"])
        if t["special"]:
            need(plain and not t["normalized"], f"special added token {t}")
            special[content] = t["id"]
        else:
            need(plain and set(content) == {" "}, f"added token {t} (only specials and runs of spaces are supported)")
            runs[len(content)] = t["id"]
    longest_run = max(runs, default=0)
    need(sorted(runs) == list(range(2, longest_run + 1)), f"space-run added tokens of lengths {sorted(runs)}")

    added = {**{c.encode(): i for c, i in special.items()}, **{b" " * k: i for k, i in runs.items()}}
    ranks = {b: i for b, i in token_bytes.items() if b not in added}
    ranks.update({b" " * k: i for k, i in runs.items()})
    aliases = {i: added[b] for b, i in token_bytes.items() if b in added and added[b] != i}
    pat = GPT2_PAT
    if runs:  # see step 1 of the module docstring
        pat = f" {{2,{longest_run}}}|" + GPT2_PAT.replace(r"\s+", r"(?:(?!  )\s)+")
    return HFEncoding(f"hf-{sha[:12]}", pat_str=pat, mergeable_ranks=ranks, special_tokens=special,
                      normalizer="NFC" if norm else None, aliases=aliases, source_sha256=sha)
