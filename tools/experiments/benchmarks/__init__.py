"""The pieces of tools/experiments/benchmark_iounet.py: timing, workload (models, inputs, realistic random weights),
one module per section (faster_rcnn: train and infer; stages; pool; cascade) and the printed report."""
