"""What other tools write and read, one module each: Megatron-LM's checkpoint layout and
arguments, Megatron-Bridge's run config, and the checkpoint key names of megatron-core's layer
specs. Nothing here builds a model."""
