"""Everything around the method that hscr.py, train.py, eval.py and the demo share, written once:

    cli          options declared as dataclass fields; an error the user can fix ends with one line
    files        JSON / JSON-lines readers, atomic writes, deletion, the append-only JSON-lines output
    dist         torchrun's environment, the process group, a training process's Context
    provenance   fingerprints of what made an output, what changed, and `start`: the one decision
                 to start, continue, refuse or reuse an output
    outputs      hscr.py's output: fingerprint in its header line, rejects, summary, rank files
    rundir       a run directory (train.py's, eval.py's): fingerprint in provenance.json;
                 train.py's fingerprint, checkpoints, exact resume, the reference log-prob cache
    trainset     train.py's inputs before the model load: tokenizer, config, examples, images
    questions    eval.py's inputs: NAME=PATH options, question files, missing or unreadable images
    answers      eval.py's answer files: per-rank JSONL shards, resumable, merged in question order
    reports      eval.py's tables: report.md, summary.json, compare / score / baselines
    prefs        hscr.py's inputs, its run's fingerprint, an entry prepared, a record assembled
    stats        `python hscr.py stats`: a preference file's figures, the sampling-probability claim

Nothing here is part of HSCR; the scripts import it, it never imports them.
"""
