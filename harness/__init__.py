"""Everything around the method that hscr.py, train.py, eval.py and the demo share, written once
(README.md lists the modules); `provenance.start` is the one decision to start, continue, refuse
or reuse an output. Nothing here is part of HSCR; the scripts import it, it never imports them.
"""
