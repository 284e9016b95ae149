"""The command line and what it runs: explain, show, bench."""
