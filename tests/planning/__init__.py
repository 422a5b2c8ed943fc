"""Tests of fitmap.planning."""
