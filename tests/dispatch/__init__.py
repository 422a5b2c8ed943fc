"""Tests of fitmap.dispatch."""
