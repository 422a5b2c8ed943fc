"""The real model code run on fake devices (FakeTensorMode, GPU i = ``meta:i``): model inputs with
images as each family's processor makes them (``vision_inputs``), small integer tensors carried
with real values (``hybrid``), the replay of a plan with per-device memory and device mismatches
and the per-unit costs the planner reads (``simulate``), and the check that repairs a plan until
it replays clean (``check``).

May import: ``fitmap.dispatch``, ``fitmap.planning``, ``fitmap.model`` and the base modules.
"""
