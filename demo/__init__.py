"""`make demo` (`python -m demo`): train a VLM from nothing on the offline shapes set, on a laptop CPU, and show that
it learned to see. The steps are in `demo.pipeline`; what it reports, in `demo.report`.

    python -m demo [--out outputs/demo] [--train 20000] [--validation 1000] [--seed 0] [--stage1-steps N] ...
"""
