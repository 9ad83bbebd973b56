"""The training loop shared by both stages and both model families: run folder, optimiser step, tasks."""
