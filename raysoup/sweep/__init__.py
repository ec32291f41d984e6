"""Sweeps on Ray Tune: config, stage planning."""
