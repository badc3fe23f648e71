"""Everything around the method that hscr.py, train.py, eval.py and the demo share, written once:

    cli          options declared as dataclass fields; an error the user can fix ends with one line
    files        UTF-8 text, JSON / JSON-lines readers, atomic writes, torn-line repair
    dist         torchrun's environment and the process group
    provenance   content fingerprints of what made an output, and what changed since
    outputs      a resumable JSON-lines output with a fingerprint header, rejects, summary, rank files
    rundir       train.py's output directory: checkpoints and exact resume
    prefs        hscr.py's records in and out, its run's inputs and fingerprint
    stats        `python hscr.py stats`: a preference file's figures, the sampling-probability claim

Nothing here is part of HSCR; the scripts import it, it never imports them.
"""
