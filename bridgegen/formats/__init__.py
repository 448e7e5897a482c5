"""What each tool writes and reads, one module each: safetensors folders, megatron-core
distributed checkpoints, Megatron-LM's and Megatron-Bridge's layouts and configs, FP8 / MXFP4
tensors, checkpoint key names, output folders.

May import: ``bridgegen.bridge``, ``bridgegen.plan``, torch and megatron-core's checkpoint
library; never megatron, engines or cli.
"""
