"""The seed papers' headline comparisons, run on simulated workers and timed under each paper's
stated system model (examples/adaptive_reproductions.py is the command line; docs/reproductions.md
and docs/scaling.md hold the tables it writes)."""
