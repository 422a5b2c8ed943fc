"""Sizes and capacities in, a device map out; no model code runs here.

The workload (``workload``), the machine (``devices``, measured by ``calibrate``), images in
tokens (``images``), each unit's analytic costs (``profile``), the pure solver (``solver``), the
plan and its ledger (``plan``), and a user's own device map read as a plan (``usermap``).

May import: ``fitmap.model`` and the base modules (``errors``, ``sizes``, ``cache``).
"""
