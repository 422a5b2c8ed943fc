"""Tests of fitmap.cli (the commands as a user types them)."""
