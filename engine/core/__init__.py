"""The torch-free engine core: sequences, the scheduler and the block manager (plain Python)."""
