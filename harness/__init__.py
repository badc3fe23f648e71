"""Everything around the method that hscr.py, train.py, eval.py and the demo share, written once:

    cli          options declared as dataclass fields; an error the user can fix ends with one line
    files        UTF-8 text, JSON / JSON-lines readers, atomic writes; the append-only JSON-lines
                 output (torn-line repair, ids, a batch per flush) and its rank files' merge
    dist         torchrun's environment, the process group, a training process's Context
    provenance   content fingerprints of what made an output, and what changed since
    outputs      a resumable JSON-lines output with a fingerprint header, rejects, summary, rank files
    rundir       start or resume a run directory (train.py's and eval.py's); train.py's fingerprint,
                 checkpoints, exact resume, the reference log-prob cache
    trainset     train.py's inputs before the model load: tokenizer, model config, examples (and
                 demo/base.py's), images checked once, the held-out split
    questions    eval.py's inputs: NAME=PATH options, question files, missing or unreadable images
    answers      eval.py's answer files: per-rank JSONL shards, resumable, merged in question order
    reports      eval.py's tables: report.md, summary.json, compare / score / baselines
    prefs        hscr.py's records in and out, its run's inputs and fingerprint
    stats        `python hscr.py stats`: a preference file's figures, the sampling-probability claim

Nothing here is part of HSCR; the scripts import it, it never imports them.
"""
