"""Tests of fitmap.runtime."""
