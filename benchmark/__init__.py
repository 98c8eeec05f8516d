"""Every experiment of the paper as one command: plan (registry), launch (local or Slurm), collect, report.

See `python benchmark/run.py --help` and `python benchmark/report.py --help`.
"""
