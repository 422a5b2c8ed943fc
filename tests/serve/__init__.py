"""Tests of fitmap.serve."""
