"""File-based multimodal benchmarks (registered in ``DATASETS`` on import).

One module per family: ``audiovisual`` (cremad, ave, kinetics_sounds),
``sentiment`` (mosi, mosei), ``imagetext`` (food101, mvsa), ``mmimdb``
(multi-label), ``rgbd`` (nyud2), ``video`` (ucf101); ``common``, ``media`` and ``tokenizer`` are
shared.
"""

from . import audiovisual, imagetext, mmimdb, rgbd, sentiment, video  # noqa: F401
