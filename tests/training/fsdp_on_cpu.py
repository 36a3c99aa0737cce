"""Runs a training module under accelerate's FSDP on CPU processes (gloo), for the tests.

accelerate 1.15 turns FSDP on only for accelerator devices: on CPU processes (`use_cpu: true`, distributed type
MULTI_CPU) it drops the FSDP plugin that `accelerate launch` built from the config, without a word, and the run is
plain DDP. torch's FSDP2 itself shards over gloo on CPU, so this launcher sets the one thing accelerate withholds
(the FSDP distributed type, with the plugin accelerate built) and then runs the module as `python -m` would; the
Trainer's FSDP path, the sharding and the state dicts saved and loaded are the real ones.

    accelerate launch --config_file fsdp_cpu.yaml tests/training/fsdp_on_cpu.py training.train_qformer ARGS...
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # PartialState's copy too: every later AcceleratorState() copies its fields over its own.
        PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    sys.argv = sys.argv[1:]  # [module, its arguments...]; run_module puts the module's path first
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
