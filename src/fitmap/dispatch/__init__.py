"""How a planned model moves tensors between devices: standard torch hooks at unit boundaries
(``hooks``) and the check's repairs applied as hooks (``repairs``). The simulator and the runtime
install the same ones, so what the check replays is what runs.

May import: ``fitmap.planning``, ``fitmap.model`` and the base modules.
"""
