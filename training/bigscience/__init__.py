"""BigScience's checkpoints: Megatron-DeepSpeed global_stepN folders and DeepSpeed universal
checkpoints, read into our format (bloom-import --from) and written from it (bloom-export --to)."""
