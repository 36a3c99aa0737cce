"""lmms-eval tasks on this project's data: `python -m eval.lmms_tasks.export` turns shards into a task folder.

The folder it writes (parquet files and one task YAML each) is what `python -m lmms_eval --include_path` reads; the
task YAMLs include the templates here, whose hooks (`shapes.py`) prompt and score as `python -m eval` does.
"""
