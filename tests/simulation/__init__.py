"""Tests of fitmap.simulation."""
