"""Test-wide settings: one torch thread per test process (the suite runs with pytest-xdist on 2 cores)."""

import os

import torch as th

os.environ.setdefault("MPLBACKEND", "Agg")
th.set_num_threads(1)
