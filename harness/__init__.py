"""Everything around the method that hscr.py, train.py, eval.py and the demo share, written once:

    cli          options declared as dataclass fields; an error the user can fix ends with one line
    files        UTF-8 text, JSON / JSON-lines readers, atomic writes, torn-line repair
    dist         torchrun's environment, the process group, a training process's Context
    provenance   content fingerprints of what made an output, and what changed since
    rundir       train.py's output directory: fingerprint, checkpoints, exact resume; the
                 reference log-prob cache

Nothing here is part of HSCR; the scripts import it, it never imports them.
"""
