#!/usr/bin/env python
"""A deterministic unicode-heavy jsonl corpus: the case where ftfy, not tokenization, is the bottleneck.

Almost every line holds something ftfy changes: curly quotes, en/em dashes, ellipses, Latin ligatures, full-width
letters, decomposed accents (NFC), HTML entities, CRLF line ends, and mojibake (UTF-8 text decoded as cp1252 or
latin-1). Accented words, other scripts and emoji make the tokenizer see multi-byte text too. Example:
    python benchmarks/unicode_corpus.py --output /tmp/unicode.jsonl.zst --mb 16 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

WORDS = ("the of and to in is was that for on with as by at from this which be are or an it not but have had "
         "one all were when there can more their some time into only other new about after first people also "
         "market report season city water music history between during against house small country").split()
ACCENTED = ("café naïve résumé façade jalapeño Zürich São Paulo Dvořák Łódź Ångström crème brûlée smörgåsbord "
            "Kraków señor über piñata déjà Müller Björk Ærø Curaçao Reykjavík Orléans Škoda fiancée Gödel").split()
SCRIPTS = "Ελληνικά русский українська 日本語 中文 한국어 العربية עברית हिन्दी ไทย".split()
EMOJI = ["🙂", "🚀", "🎉", "👍🏽", "☕", "✨", "🇫🇷"]
LIGATURES = ["ﬁnance", "ﬂower", "eﬀort", "oﬃce", "waﬄe"]  # ftfy splits Latin ligatures
FULL_WIDTH = ["ＡＢＣ", "ｔｅｓｔ", "１２３"]  # ftfy narrows full-width letters and digits
DECOMPOSED = ["cafe\u0301", "nai\u0308ve", "A\u030angstro\u0308m"]  # ftfy NFC-normalizes these
ENTITIES = ["&amp;", "&eacute;", "&mdash;", "&#8217;", "&quot;", "&hellip;", "&nbsp;"]


def _mojibake(text: str, rng: random.Random) -> str:
    """UTF-8 bytes read back as Windows-1252 (or latin-1 where cp1252 has no character), e.g. café -> cafÃ©."""
    raw = text.encode("utf-8")
    if rng.random() < 0.7:
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:  # cp1252 leaves 5 bytes undefined; latin-1 decodes everything
            pass
    return raw.decode("latin-1")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
    for _ in range(rng.randint(1, 3)):  # accented words in most sentences
        words[rng.randrange(len(words))] = rng.choice(ACCENTED)
    extra = rng.random()
    if extra < 0.15:
        words.insert(rng.randrange(len(words)), rng.choice(SCRIPTS))
    elif extra < 0.25:
        words.insert(rng.randrange(len(words)), rng.choice(EMOJI))
    elif extra < 0.35:
        words.insert(rng.randrange(len(words)), rng.choice(LIGATURES + FULL_WIDTH + DECOMPOSED))
    elif extra < 0.45:
        words.insert(rng.randrange(len(words)), rng.choice(ENTITIES))
    i = rng.randrange(len(words) - 1)
    style = rng.random()
    if style < 0.35:
        words[i:i + 2] = [f"“{words[i]} {words[i + 1]}”"]
    elif style < 0.55:
        words[i] = f"‘{words[i]}’"
    elif style < 0.75:
        words.insert(i + 1, "—")
    elif style < 0.9:
        a = rng.randint(1900, 2020)
        words.insert(i, f"{a}–{a + rng.randint(1, 9)}")
    text = " ".join(words)
    text = text[0].upper() + text[1:] + rng.choice([".", ".", ".", "…", "?", "!"])
    if rng.random() < 0.2:
        text = _mojibake(text, rng)
    return text


def unicode_document(rng: random.Random) -> str:
    """One document of a few paragraphs, mostly with CRLF line ends (ftfy turns them into LF)."""
    newline = "\r\n" if rng.random() < 0.7 else "\n"
    paragraphs = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 10))]
    if rng.random() < 0.05:  # a "<" turns ftfy's HTML unescaping off for the rest of the document
        paragraphs.insert(rng.randrange(len(paragraphs)), "<p>markup &amp; entities</p>")
    return newline.join(paragraphs)


def write_unicode_corpus(path: str, target_bytes: int = 16_000_000, seed: int = 0) -> dict:
    """Write whole jsonl documents (``{"text", "id"}``, UTF-8, zstd-compressed if ``path`` ends in .zst) until at
    least ``target_bytes`` of uncompressed jsonl; atomically. Returns path, documents and uncompressed bytes."""
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    if not path.endswith((".jsonl", ".jsonl.zst")):
        raise ValueError(f"{path}: the corpus path must end in .jsonl or .jsonl.zst")
    rng = random.Random(seed)
    tmp = f"{path}.partial"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written = docs = 0
    with open(tmp, "wb") as raw:
        if path.endswith(".zst"):
            import zstandard
            out = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        else:
            out = raw
        while written < target_bytes:
            line = json.dumps({"text": unicode_document(rng), "id": docs}, ensure_ascii=False).encode() + b"\n"
            out.write(line)
            written += len(line)
            docs += 1
        if out is not raw:
            out.close()
    os.replace(tmp, path)
    return {"path": path, "documents": docs, "input_bytes": written, "seed": seed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="a .jsonl or .jsonl.zst path")
    p.add_argument("--mb", type=float, default=16.0, help="uncompressed size in MB (10^6 bytes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        info = write_unicode_corpus(args.output, int(args.mb * 1e6), args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {info['path']}: {info['documents']:,} documents, {info['input_bytes'] / 1e6:.1f} MB uncompressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
