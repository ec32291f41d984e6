"""Sweeps on Ray Tune: config, stage planning."""

QUICKSTART_NAME = "quickstart"  # the sweep name when none is given
