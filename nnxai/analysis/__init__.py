"""Findings from explained runs: rings, features, statistics, figures, FP filter, report, viewer."""
