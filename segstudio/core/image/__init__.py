"""Images in and out: axes and metadata (``io``), lazy readers by format (``sources``), label writers (``sinks``).

``open_source(path)`` opens any supported file for region-by-region reads;
``read_image(path)`` is ``open_source(path).to_image()``.
"""
