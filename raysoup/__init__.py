"""raysoup."""
