"""The embedded demo: HSCR end to end on a CPU, with nothing to download.

- demo/world.py  the synthetic Med-VQA world (scenes drawn from a seed, rendered to scans, written
                 as LLaVA-Med instruction and VQA files with a built-in language prior);
- demo/base.py   what only the shipped from-scratch base model (assets/base) needs: building the
                 world, pretraining its vision tower on the world's scene labels, and instruction
                 tuning (SFT) of the whole model (`python -m demo.base world|vision|sft`);
- demo/tokenizer.py  the base's tokenizer, a small Llama-style BPE trained on the world's texts;
- demo/run.py    the demo itself (`python train.py`, `python train.py demo|ablation`): world →
                 hscr.py → train.py → eval.py → a before/after table, and its ablation over seeds;
- demo/negatives.py  the quality of hscr.py's negatives against the world's ground truth (same-slot
                 hallucination or junk), and the comparison of candidate rules;
- demo/report.py the run's report.html: coupling scores, negatives, training curves, answers.

The method's scripts (hscr.py, train.py, eval.py) and data.py never import this package at module
level; train.py imports demo.run only to run it.
"""
