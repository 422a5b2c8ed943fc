"""Tests of fitmap.model."""
