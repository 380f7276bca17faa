"""Command-line entry points: bin/run.py (main), its flag parsing, and bin/sweep.py."""
