"""tokenizer.load_tokenizer gives exactly the ids of HF `tokenizers` on the GPT-NeoX-20B (Pythia) tokenizer.

Run with `-s` to see how many tokens each parity test compared.
"""
import json
import pickle
import random
import sys
import types
import unicodedata
from pathlib import Path

import pytest

from tokenizer import HFEncoding, load_tokenizer, tokenizer_file_sha256

tokenizers = pytest.importorskip("tokenizers")

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # beside the repository
TOKENIZER_JSON = DATA / "tokenizer" / "20B_tokenizer.json"
SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"  # shared/data/tokenizer/SOURCE.md
WIKI_VALID = DATA / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
OWT = DATA / "openwebtext" / "owt10k_val500.jsonl"

needs_data = pytest.mark.skipif(not TOKENIZER_JSON.is_file(), reason=f"shared offline data absent: {TOKENIZER_JSON}")

SEPARATORS = [" ", "\t", "\n", "\r\n", " \t \n  ", "\n  \n", "  \n", " \n ", "\t \t", " \u00a0 ", "\u3000\u3000",
              "\x0b\x0c\x85\u2028\u2029", "\u200b", "\n\n\n"]
TRICKY = [
    "", " ", "  ", "hello", " hello", "  hello", "hello ", "hello  ", "\thello\t", "\nhello\n\n",
    *(" " * n for n in range(1, 80)), *("a" + " " * n + "b" for n in range(1, 80)),
    *("\t" * n for n in range(1, 12)), *("\n" * n for n in range(1, 12)), *(" \t" * n + " " for n in range(1, 6)),
    *("x" + sep + "y" for sep in SEPARATORS), *(sep + "x" + sep for sep in SEPARATORS),
    "    def f(x):\n        return x  # indented code\n\treturn\n",
    "I'm, you're, he'll, she'd, it's, we've, can't; I'M YOU'RE 'S'S ''s",
    "1234567890 3.14159 1,000,000 -42 1e-9 ٣٤٥ ⅷ ½",
    "naïve café résumé Ünïcödé ﬁne ß Å Ω",
    "e\u0301 cafe\u0301 \u212b \u1100\u1161\u11a8 a\u0308\u0304 \u0338",  # decomposed: NFC changes these
    "日本語のテキスト、中文文本。한국어 텍스트 العربية हिन्दी ไทย",
    "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇫🇷 ❤️ *️⃣ 🧑🏿‍🚀",
    "\x00\x01\x1b[0m\x7f\x1c\x1d\x1e\x1f",
    "<|endoftext|>", "a<|endoftext|>b", "end.<|endoftext|>\n\nStart", "<|endoftext|><|endoftext|>",
    "<|padding|> <|padding|>", "<|endoftext", "endoftext|>", "<|endoftext|>\u0338 <|padding|>\u0338",
    "x" * 3000, "é" * 500 + "  " + "🙂" * 200,
]


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def hf():
    return tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))


def assert_same_ids(texts, ours, hf) -> int:
    """ours[i] == HF's ids for texts[i]; returns how many tokens were compared."""
    theirs = [e.ids for e in hf.encode_batch(texts)]
    for text, a, b in zip(texts, ours, theirs):
        if a != b:
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            pytest.fail(f"ids differ at token {i} of {text[:60]!r}...: ours {a[max(0, i - 3):i + 3]} "
                        f"HF {b[max(0, i - 3):i + 3]}")
    return sum(map(len, theirs))


@needs_data
def test_wikitext_parity_and_round_trip(enc, hf):
    text = WIKI_VALID.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    whole = enc.encode_ordinary(text)
    n = assert_same_ids([text], [whole], hf) + assert_same_ids(lines, enc.encode_ordinary_batch(lines), hf)
    assert n > 500_000
    assert enc.decode(whole) == unicodedata.normalize("NFC", text)
    print(f"wikitext parity: {n} tokens")


@needs_data
def test_openwebtext_parity_and_round_trip(enc, hf):
    docs = [json.loads(line)["text"] for line in OWT.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 500
    ours = enc.encode_ordinary_batch(docs)
    n = assert_same_ids(docs, ours, hf)
    assert [enc.decode(ids) for ids in ours] == [unicodedata.normalize("NFC", d) for d in docs]
    print(f"openwebtext parity: {n} tokens")


@needs_data
def test_tricky_strings_parity_and_round_trip(enc, hf):
    with_specials = [enc.encode(s, allowed_special="all") for s in TRICKY]
    n = assert_same_ids(TRICKY, with_specials, hf)
    plain = [s for s in TRICKY if "<|" not in s]  # no special tokens: encode_ordinary must agree as well
    n += assert_same_ids(plain, enc.encode_ordinary_batch(plain), hf)
    for s, ids in zip(TRICKY, with_specials):
        assert enc.decode(ids) == enc.normalize(s)
        assert enc.encode_to_numpy(s, allowed_special="all").tolist() == ids
    print(f"tricky-string parity: {n} tokens")


@needs_data
def test_random_strings_parity(enc, hf):
    """Fuzz: short strings over an alphabet of the characters where pre-tokenization has edge cases."""
    rng = random.Random(0)
    alphabet = [*" \t\n\r\x0b\u00a0\u3000\u2028", *"aZé'sdtmlrv0.,!?<|>_-", "e\u0301", "\u0338", "中", "🙂",
                "\u200d", "<|endoftext|>", "<|padding|>", "'ll", "  ", "   "]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(3000)]
    n = assert_same_ids(texts, enc.encode_batch(texts, allowed_special="all"), hf)
    print(f"random-string parity: {n} tokens")


@needs_data
def test_every_id_decodes_like_hf(enc, hf):
    """Includes the vocab's own space-run tokens (e.g. 245), which share bytes with added tokens."""
    assert enc.n_vocab == hf.get_vocab_size(with_added_tokens=True) == 50277
    ids = list(range(enc.n_vocab))
    assert [enc.decode([i]) for i in ids] == hf.decode_batch([[i] for i in ids], skip_special_tokens=False)
    assert enc.decode([245, 50276, 12092]) == hf.decode([245, 50276, 12092]) == "    Hello"


@needs_data
def test_special_tokens(enc):
    assert enc.eot_token == 0 and enc.encode("<|padding|>", allowed_special="all") == [1]
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode("a<|endoftext|>")  # tiktoken convention
    # the data pipeline's call: a literal "<|endoftext|>" in a document is text, never the separator
    ids = enc.encode_ordinary("a<|endoftext|>b")
    assert enc.eot_token not in ids and enc.decode(ids) == "a<|endoftext|>b"


@needs_data
def test_normalizes_to_nfc(enc):
    assert enc.encode_ordinary("cafe\u0301") == enc.encode_ordinary("caf\u00e9")
    assert enc.decode(enc.encode_ordinary("cafe\u0301")) == "caf\u00e9"


@needs_data
def test_load_forms_and_sha256(enc, tmp_path, monkeypatch):
    assert isinstance(enc, HFEncoding)  # a tiktoken.Encoding subclass
    assert enc.source_sha256 == tokenizer_file_sha256(TOKENIZER_JSON) == SHA256
    assert enc.name == "hf-" + SHA256[:12]
    (tmp_path / "tokenizer.json").write_bytes(TOKENIZER_JSON.read_bytes())
    from_dir = load_tokenizer(tmp_path)
    assert from_dir.encode_ordinary("Hello  world") == enc.encode_ordinary("Hello  world") == [12092, 50276, 10186]

    calls = []  # a hub repo id goes through hub.resolve_file(repo, "tokenizer.json", revision)
    fake_hub = types.SimpleNamespace(resolve_file=lambda *args: calls.append(args) or TOKENIZER_JSON)
    monkeypatch.setitem(sys.modules, "hub", fake_hub)
    assert load_tokenizer("EleutherAI/pythia-70m", revision="step1000").source_sha256 == SHA256
    assert calls == [("EleutherAI/pythia-70m", "tokenizer.json", "step1000")]


@needs_data
def test_pickles_with_its_extras(enc):
    clone = pickle.loads(pickle.dumps(enc))
    assert isinstance(clone, HFEncoding) and clone.source_sha256 == SHA256
    assert clone.encode_ordinary("e\u0301  x") == enc.encode_ordinary("e\u0301  x") and clone.decode([245]) == "  "


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    with pytest.raises(FileNotFoundError, match="hub repo id"):
        load_tokenizer(str(tmp_path / "missing"))


def tiny_tokenizer_json(**changes) -> dict:
    """A minimal valid byte-level BPE file (printable ASCII + space, one merge, <|endoftext|>), then `changes`."""
    byte_chars = [chr(b) for b in range(ord("!"), ord("~") + 1)] + ["Ġ"]
    spec = {"normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            "added_tokens": [{"id": 96, "content": "<|endoftext|>", "special": True, "normalized": False,
                              "lstrip": False, "rstrip": False, "single_word": False}],
            "model": {"type": "BPE", "vocab": {**{c: i for i, c in enumerate(byte_chars)}, "Ġa": 97},
                      "merges": ["Ġ a"]}}
    return {**spec, **changes}


@pytest.mark.parametrize("changes, fault", [
    ({"normalizer": {"type": "Lowercase"}}, "normalizer"),
    ({"pre_tokenizer": {"type": "Metaspace"}}, "pre_tokenizer"),
    ({"model": {"type": "WordPiece", "vocab": {}}}, "model"),
    ({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 3, "ba": 2}, "merges": ["a b", "b a"]}}, "merge order"),
    ({"added_tokens": [{"id": 97, "content": "RWKV", "special": False, "normalized": True, "lstrip": False,
                        "rstrip": False, "single_word": False}]}, "RWKV"),
])
def test_unsupported_tokenizer_json_is_a_clear_error(tmp_path, changes, fault):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tiny_tokenizer_json()))
    assert load_tokenizer(path).encode_ordinary("! a") == [0, 97]  # the unmodified file loads
    path.write_text(json.dumps(tiny_tokenizer_json(**changes)))
    with pytest.raises(ValueError, match=fault) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value)
