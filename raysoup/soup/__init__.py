"""Soups without Ray: greedy selection (Recipe 1, batch and streaming) and weight averaging.

The Ray actor that feeds trials in as they finish is ``raysoup.sweep.soup_actor``;
everything here is pure and testable on its own.
"""

from raysoup.soup.average import RunningSoup, uniform_average
from raysoup.soup.greedy import (
    ACCEPT,
    Candidate,
    Decision,
    StreamingGreedy,
    batch_greedy,
    better,
    rank_key,
)

__all__ = [
    "ACCEPT",
    "Candidate",
    "Decision",
    "RunningSoup",
    "StreamingGreedy",
    "batch_greedy",
    "better",
    "rank_key",
    "uniform_average",
]
