"""The ftfy fast path must equal plain ftfy.fix_text on every input, including adversarial ones."""
import random

import ftfy
import pytest
from ftfy import TextFixerConfig

from megagpt.data.cleaning import clean_text

PIECES = [
    "plain ascii words ", "line\n", "\n", "\t", "Ã©tÃ© ", "â€œmojibakeâ€\x9d ", "Ã¢â‚¬â„¢", "&amp; ", "&lt;b&gt;",
    "&eacute;", "&#x41;", "&#233;", "AT&T ", "this&not that ", "P&EACUTE;REZ", "<p>", "</p>", "\r\n", "\r",
    "\x00", "\x1b[31m", "\x07", "\x0b", "\x0c", "\x7f", "\x85", "\u2028", "\u2029", "“curly” ‘quotes’ ",
    "ＦＵＬＬ－ＷＩＤＴＨ ", "ﬁne ﬂow ", "naïve café ", "e\u0301", "\ud83d", "😀 ", "Â\xa0", "–—…", "日本語",
    "It's ", "&", "&#", ";",
]


def _random_texts(seed, n):
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))


@pytest.mark.parametrize("max_decode_length", [1_000_000, 5, 23])
def test_fast_path_equals_fix_text(max_decode_length):
    # small max_decode_length values exercise ftfy's chopping of long lines into segments
    cfg = TextFixerConfig(explain=False, max_decode_length=max_decode_length)
    for text in _random_texts(max_decode_length, 1500):
        assert clean_text(text, cfg) == ftfy.fix_text(text, cfg), repr(text)


def test_every_ascii_character_in_context():
    for c in map(chr, range(128)):
        for text in (c, f"a{c}b", f"x\n{c}\n&amp;{c}", f"<{c}>&lt;", f"{c}&#33;"):
            assert clean_text(text) == ftfy.fix_text(text), repr(text)


def test_html_switch_carries_across_lines():
    # fix_text stops unescaping for the rest of the document after the first segment holding "<"
    text = "&amp; first\n<b>tag</b>\n&amp; after\n"
    assert clean_text(text) == ftfy.fix_text(text) == "& first\n<b>tag</b>\n&amp; after\n"


def test_the_fixes_actually_happen():
    assert clean_text("cafÃ©") == "café"
    assert clean_text("ﬁne") == "fine"
    assert clean_text("a\r\nb") == "a\nb"
    assert clean_text("\x1b[31mred") == "red"
    assert clean_text("ＡＢＣ") == "ABC"
    assert clean_text("“q”") == '"q"'


def test_clean_text_returns_same_object_when_clean():
    text = "nothing to fix here\n" * 10
    assert clean_text(text) is text
