"""What a model is, before any device is chosen: its checkpoint's tensors (``inventory``), its
config under any name the model code uses (``configs``, ``catalog_models`` for full-size public
configs with no download), the model built with no storage and cut into placement units
(``skeleton``), checkpoint names mapped to modules (``keys``), quantized layouts (``quant``),
and what differs between transformers versions (``compat``).

May import: ``fitmap.errors``, ``fitmap.sizes``, ``fitmap.cache``; nothing else of fitmap.
"""
