"""A plan made real: weights streamed from the checkpoint to their devices (``loader``), cpu and
disk units brought in ahead of use (``offload``, ``diskread``), prompts and images as the model's
own processor or ``chat()`` makes them (``prompting``), and generation with memory measured beside
the plan (``run``).

May import: ``fitmap.pipeline`` and everything below it.
"""
