"""Everything that talks to nnU-Net: model folders, checkpoints, plans, the sliding window, geometry."""
