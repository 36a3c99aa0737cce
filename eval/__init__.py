"""Evaluation: retrieval (retrieval.py), captioning (captioning.py, metrics/coco_caption), VQA (vqa.py),
caption-vs-scene checks for synthetic data (scene.py), and the report (report.py).

`python -m eval --model <folder or Hub id> --data <shards or dataset> --out <dir>` runs what fits the model
(run.py); see `python -m eval --help`.
"""
