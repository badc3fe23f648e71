"""harness/prefs.py: hscr.py's run plumbing (here the seeded sample of entries that --limit takes)."""
from __future__ import annotations

from harness import prefs


def test_select_entries_seeded_sample():
    assert prefs.select_entries(5, None, 0) == [0, 1, 2, 3, 4] and prefs.select_entries(5, 9, 0) == [0, 1, 2, 3, 4]
    s = prefs.select_entries(100, 10, 0)
    assert s == sorted(s) and len(set(s)) == 10 and s == prefs.select_entries(100, 10, 0)
    assert s != prefs.select_entries(100, 10, 1)
