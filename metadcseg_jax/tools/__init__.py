"""Measurement tools: the step's speed, where its time goes, reference implementations, device
checks and the GPU report."""
