"""Small evaluation data shipped with the package (written for this project).

`sample_mc.jsonl`: 40 zero-shot multiple-choice sentence completions (KJV-flavoured and
general knowledge), one `{"context": str, "choices": [str, ...], "label": int}` per line, for
tests and the README example (`eval.py --mc_file=...`). Far too small to rank models: its
standard error is ~0.08.
"""

import os

SAMPLE_MC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_mc.jsonl")
