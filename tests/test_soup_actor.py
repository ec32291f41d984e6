"""The soup actor on a real local Ray instance: killed mid-stream, it restarts and ends
with the same soups as an undisturbed actor, without duplicate rows."""

from __future__ import annotations

import pandas as pd
import pytest
import ray

from raysoup.results import load_results
from raysoup.soup.group import GroupKey, Offer
from raysoup.sweep.soup_actor import NAMESPACE, actor_name, start_soup_actor

pytestmark = pytest.mark.slow

KEY = GroupKey("MiniRotatedMNIST", 5, 0, "pretrained")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


def _start(root, sweep, trials):
    expected = {KEY: [o.trial_id for o in trials]}
    return start_soup_actor(root, sweep, expected, device="cpu", max_models=1)


def test_killed_actor_restarts_and_ends_with_identical_soups(
    local_ray, soup_trials, tmp_path
) -> None:
    calm = _start(tmp_path / "calm", "calm", soup_trials)
    for offer in soup_trials:
        calm.offer.remote([offer])
    assert ray.get(calm.finalize.remote()) == []  # the last offer already finalized it
    assert ray.get_actor(actor_name("calm", tmp_path / "calm"), namespace=NAMESPACE)

    actor = _start(tmp_path / "killed", "killed", soup_trials)
    ray.get(actor.offer.remote(soup_trials[:2]))
    pid = ray.get(actor.pid.remote())
    actor.offer.remote([soup_trials[2]])  # maybe in flight when killed: retried
    ray.kill(actor, no_restart=False)
    for offer in soup_trials[2:]:
        actor.offer.remote([offer])  # queued while it restarts
    ray.get(actor.finalize.remote())
    new_pid = ray.get(actor.pid.remote())
    assert new_pid != pid, "the actor was not restarted"
    summary = ray.get(actor.summary.remote())
    assert summary[0]["trials"] == len(soup_trials)
    assert summary[0]["final"] == ["ensemble", "erm", "greedy", "uniform"]

    a, b = load_results(tmp_path / "calm"), load_results(tmp_path / "killed")
    columns = ["method", "init", "n_ingredients", "id_val_acc", "test_acc"]
    soups_a = a["soups"].sort_values("method").reset_index(drop=True)
    soups_b = b["soups"].sort_values("method").reset_index(drop=True)
    pd.testing.assert_frame_equal(soups_a[columns], soups_b[columns])
    assert [list(x) for x in soups_a.ingredients] == [list(x) for x in soups_b.ingredients]
    assert not b["soup_steps"].duplicated(subset=["method", "trial_id"]).any()
    assert not b["soups"].duplicated(subset=["method", "init"]).any()
    assert set(b["soups"].method) == {"erm", "uniform", "greedy", "uniform_all", "ensemble"}
    assert len(b["soup_steps"]) == len(soup_trials)
    steps = ["trial_id", "rank", "accepted", "soup_size", "soup_id_val_acc"]
    pd.testing.assert_frame_equal(
        a["soup_steps"].sort_values("rank")[steps].reset_index(drop=True),
        b["soup_steps"].sort_values("rank")[steps].reset_index(drop=True),
    )
    peak = ray.get(actor.peak_rss_mb.remote())
    assert 0 < peak < 4096


def test_feeder_batches_trials_and_sends_the_rest_at_the_end(
    local_ray, soup_trials, tmp_path
) -> None:
    """With ``every_s`` not yet elapsed, finished trials wait in the driver and go to the
    actor together; whatever waits when the experiment ends is sent then."""
    from types import SimpleNamespace

    from raysoup.sweep.soup_actor import SoupFeeder, offer_from_result

    actor = _start(tmp_path, "fed", soup_trials)
    feeder = SoupFeeder(actor_name("fed", tmp_path), every_s=3600.0)
    for offer in soup_trials:
        result = {"final": True, "stage": "target", "key": offer.trial_id}
        result[Offer.RESULT_KEY] = offer.to_dict()
        assert offer_from_result(result) == offer  # the one encoding, both ways
        feeder.on_trial_complete(0, [], SimpleNamespace(last_result=result))
    assert feeder.waiting == [o.trial_id for o in soup_trials[1:]]  # the first went at once
    feeder.on_step_begin(0, [])
    assert len(feeder.waiting) == len(soup_trials) - 1  # every_s not elapsed: still waiting
    feeder.on_experiment_end([])
    assert feeder.waiting == []
    ray.get(feeder._in_flight)
    summary = ray.get(actor.summary.remote())
    assert summary[0]["trials"] == len(soup_trials)
    assert "greedy" in summary[0]["final"]  # the group completed and was finalized
    ray.kill(actor, no_restart=True)


def test_feeder_never_fails_tune_when_the_actor_is_missing(local_ray, capfd) -> None:
    """A callback that raises breaks Tune's bookkeeping of the trial (and its worker is not
    reused): an unreachable actor is a warning, the runner hands the trial over later."""
    from types import SimpleNamespace

    from raysoup.sweep.soup_actor import SoupFeeder

    feeder = SoupFeeder("soup:no-such-sweep:0000000000")
    offer = Offer(
        trial_id="target-x",
        checkpoint="/nowhere",
        id_val_acc=0.5,
        content_hash="h",
        group=GroupKey("MiniRotatedMNIST", 5, 0, "pretrained"),
        test_acc=0.4,
    )
    result = {"final": True, "stage": "target", "key": "target-x"}
    result[Offer.RESULT_KEY] = offer.to_dict()
    feeder.on_trial_complete(0, [], SimpleNamespace(last_result=result))
    err = capfd.readouterr().err
    assert "soup actor 'soup:no-such-sweep:0000000000' not reached for trial(s) target-x" in err
    assert feeder.waiting == []  # dropped with the warning: the runner hands it over
