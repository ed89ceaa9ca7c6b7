"""Research and documentation-table scripts (not needed to train or evaluate): seed tables (``seed_table``,
``trees_seeds``), the IoU head's learning check (``check_iou_learning``) and the GPU benchmarks (``benchmark_op``,
``benchmark_iounet`` with its sections in ``benchmarks/``). They share one seed runner (:mod:`.runner`) and one
mean +- std table (:mod:`.tables`). Run them as ``python tools/experiments/<name>.py`` from the repository root."""
