"""The request stage's character check against its definition: Unicode category Cc, tab and newlines allowed."""

import sys
import unicodedata

from rag_service.api.request import _has_control_chars


def test_the_control_character_check_is_unicode_category_cc_over_every_code_point():
    for code in range(sys.maxunicode + 1):
        c = chr(code)
        expected = unicodedata.category(c) == "Cc" and c not in "\t\n\r"
        assert _has_control_chars(f"what is {c} here") == expected, hex(code)
    assert not _has_control_chars("tabs\tand\nnewlines\r\nare text")
