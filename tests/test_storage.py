"""Storage on a local directory and on a real S3 protocol endpoint (moto's server on
127.0.0.1): small files, checkpoint publish / fetch, atomicity, corruption. A whole sweep
on S3 is in ``test_sweep_run.py``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from raysoup.data.nuisance import NUISANCE_AUXILIARY
from raysoup.io import storage
from raysoup.io.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
)
from raysoup.io.layout import SweepLayout
from raysoup.options import OptionsError, from_mapping
from raysoup.results import ResultsStore, load_results
from raysoup.sweep.config import SweepConfig, load_config
from raysoup.sweep.plan import aux_key, check_aux_pool, plan_sweep
from raysoup.sweep.record import record_config
from raysoup.training import inits
from raysoup.training.trainer import RunSpec, train_run

SOUP_STEP = {
    "sweep": "q",
    "method": "greedy",
    "trial_id": "t00",
    "rank": 0,
    "candidate_id_val_acc": 0.8,
    "accepted": True,
    "soup_size": 1,
    "soup_id_val_acc": 0.8,
    "decided_at": dt.datetime(2025, 1, 1, 12, tzinfo=dt.timezone.utc),
}


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> storage.Location:
    """A storage root on each backend."""
    if request.param == "local":
        return tmp_path / "store"
    return f"{request.getfixturevalue('s3_bucket')}/store"


def _checkpoint(path: Path, value: float = 1.0, dataset: str = "OtherSet") -> CheckpointMeta:
    state = {
        "featurizer.conv.weight": torch.full((3, 2), value),
        "featurizer.bn.num_batches_tracked": torch.tensor(7),
        "classifier.weight": torch.zeros(4, 2),
    }
    meta = CheckpointMeta(dataset=dataset, envs=["a"], arch="x", num_classes=4, stage="aux")
    return save_checkpoint(path, state, meta)


def _files(location: storage.Location) -> list[str]:
    """Every file under ``location``, relative to it."""
    fs, path = storage.filesystem(location)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(
        info.path[len(path) + 1 :]
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    )


def _stamps(location: storage.Location) -> dict[str, object]:
    """Modification time of every file under ``location``."""
    fs, path = storage.filesystem(location)
    selector = pafs.FileSelector(path, recursive=True)
    return {i.path: i.mtime for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}


def _hidden(names: list[str]) -> list[str]:
    return [n for n in names if any(part.startswith(".") for part in n.split("/"))]


# ---------------------------------------------------------------- naming (no I/O)


def test_uris_are_never_mangled_into_paths(tmp_path: Path) -> None:
    query = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.is_uri("s3://bucket/runs") and storage.is_uri("gs://b/x")
    assert not storage.is_uri("runs") and not storage.is_uri(Path("s3:/x"))
    assert not storage.is_uri(f"file://{tmp_path}")  # file:// is a local path
    assert storage.join(f"s3://b/runs/{query}", "n", "checkpoints") == (
        f"s3://b/runs/n/checkpoints{query}"
    )
    assert storage.join("hdfs:///runs/", "n") == "hdfs:///runs/n"  # empty authority kept
    with pytest.raises(ValueError, match=r"bogus://x/runs.*not a usable URI"):
        storage.exists("bogus://x/runs")
    assert storage.join(tmp_path, "a", "b") == tmp_path / "a" / "b"
    assert storage.resolve(f"file://{tmp_path}") == tmp_path.resolve()
    assert SweepLayout.of("s3://b/runs/", "n").root == "s3://b/runs/n"
    assert SweepLayout.of(tmp_path / "x" / "..", "n").root == tmp_path.resolve() / "n"
    spec = from_mapping(
        RunSpec,
        {"dataset": "D", "out": "s3://b/o", "aux_dir": ["s3://b/aux", "rel"], "lp_head": "lp"},
    )
    assert spec.out == "s3://b/o" and spec.lp_head == Path("lp")
    assert spec.aux_dir == ["s3://b/aux", Path("rel")]
    config = load_config(None)
    local = plan_sweep(config, tmp_path / "q")
    remote = plan_sweep(config, "s3://b/runs/q")
    assert [r.key for rs in local.values() for r in rs] == [
        r.key for rs in remote.values() for r in rs
    ]
    for runs_l, runs_r in zip(local.values(), remote.values(), strict=True):
        for run_l, run_r in zip(runs_l, runs_r, strict=True):
            assert isinstance(run_r.spec["out"], str)
            assert run_r.spec["out"] == str(run_l.spec["out"]).replace(
                str(tmp_path / "q"), "s3://b/runs/q"
            )
            aux_l = [
                str(p).replace(str(tmp_path / "q"), "s3://b/runs/q")
                for p in run_l.spec.get("aux_dir", [])
            ]
            assert run_r.spec.get("aux_dir", []) == aux_l


# ---------------------------------------------------------------- both backends


def test_small_files_are_replaced_atomically(where: storage.Location) -> None:
    path = storage.join(where, "sweep.json")
    assert not storage.exists(path)
    with pytest.raises(FileNotFoundError, match=r"sweep\.json"):
        storage.read_bytes(path)
    storage.write_bytes_atomic(path, b"one")
    storage.write_bytes_atomic(path, b"two")
    assert storage.read_bytes(path) == b"two" and storage.exists(path)
    assert storage.is_dir(where) and not storage.is_dir(storage.join(where, "missing"))
    assert _files(where) == ["sweep.json"]  # no temporary file left behind


def test_publish_then_fetch_verified_and_cached(where, tmp_path: Path) -> None:
    meta = _checkpoint(tmp_path / "src" / "ck", 2.0)
    location = storage.join(where, "checkpoints", "aux", "a")
    assert not storage.is_checkpoint(location)
    storage.publish_checkpoint(tmp_path / "src" / "ck", location)
    assert storage.is_checkpoint(location)
    assert storage.read_meta(location).content_hash == meta.content_hash
    assert storage.find_checkpoints(storage.join(where, "checkpoints")) == [location]
    cache = tmp_path / "cache"
    local = storage.local_checkpoint(location, cache_dir=cache)
    state, loaded = load_checkpoint(local)  # verifies the hash again
    assert loaded.content_hash == meta.content_hash
    torch.testing.assert_close(state["featurizer.conv.weight"], torch.full((3, 2), 2.0))
    if isinstance(where, Path):
        assert local == location and not cache.exists()  # local: the path itself, no copy
    else:
        assert local.parent == cache / storage.STORAGE_CACHE
        stamp = (local / WEIGHTS_FILE).stat().st_mtime_ns
        assert storage.local_checkpoint(location, cache_dir=cache) == local  # reused
        assert (local / WEIGHTS_FILE).stat().st_mtime_ns == stamp
    assert _hidden(_files(where)) == []
    # republishing other weights: the new version is what is fetched
    _checkpoint(tmp_path / "src" / "ck2", 5.0)
    storage.publish_checkpoint(tmp_path / "src" / "ck2", location)
    state, _ = load_checkpoint(storage.local_checkpoint(location, cache_dir=cache))
    torch.testing.assert_close(state["featurizer.conv.weight"], torch.full((3, 2), 5.0))


def test_half_uploaded_checkpoint_is_not_a_checkpoint(where, tmp_path: Path) -> None:
    _checkpoint(tmp_path / "ck")
    location = storage.join(where, "checkpoints", "half")
    storage.write_bytes_atomic(
        storage.join(location, WEIGHTS_FILE), (tmp_path / "ck" / WEIGHTS_FILE).read_bytes()
    )
    assert not storage.is_checkpoint(location)
    assert storage.find_checkpoints(where) == []
    with pytest.raises(CheckpointError, match="not a raysoup checkpoint"):
        storage.local_checkpoint(location, cache_dir=tmp_path / "cache")
    with pytest.raises(CheckpointError, match=f"{META_FILE} is missing"):
        storage.read_meta(location)


def test_checkpoint_output_publishes_only_on_success(where, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAYSOUP_CACHE", str(tmp_path / "cache"))
    location = storage.join(where, "run")
    with storage.checkpoint_output(location) as out:
        assert (out == location) == isinstance(where, Path)  # local: written in place
        meta = _checkpoint(out, 3.0)
    assert storage.read_meta(location).content_hash == meta.content_hash
    if not isinstance(where, Path):
        cached = list((tmp_path / "cache" / storage.STORAGE_CACHE).iterdir())
        assert len(cached) == 1  # the staging copy became the cached copy, nothing left over
        assert storage.local_checkpoint(location) == cached[0]
    failed = storage.join(where, "failed")
    with pytest.raises(RuntimeError, match="boom"), storage.checkpoint_output(failed) as out:
        _checkpoint(out)
        raise RuntimeError("boom")
    if not isinstance(where, Path):  # a local run that fails after saving keeps its files
        assert not storage.exists(failed)
        assert len(list((tmp_path / "cache" / storage.STORAGE_CACHE).iterdir())) == 1


# ---------------------------------------------------------------- S3 only


def test_interrupted_republish_leaves_no_checkpoint(s3_bucket, tmp_path, monkeypatch) -> None:
    _checkpoint(tmp_path / "a", 1.0)
    _checkpoint(tmp_path / "b", 2.0)
    location = f"{s3_bucket}/ck"
    storage.publish_checkpoint(tmp_path / "a", location)

    def crash(*args: object) -> None:
        raise OSError("connection lost before the marker was uploaded")

    monkeypatch.setattr(storage, "_put_atomic", crash)
    with pytest.raises(OSError, match="connection lost"):
        storage.publish_checkpoint(tmp_path / "b", location)
    # b's weights are up, a's marker is gone: not a checkpoint, never a mix of the two
    assert not storage.is_checkpoint(location)
    assert storage.find_checkpoints(s3_bucket) == []


def test_corrupt_remote_weights_are_rejected(s3_bucket, tmp_path: Path) -> None:
    _checkpoint(tmp_path / "ck")
    location = f"{s3_bucket}/ck"
    storage.publish_checkpoint(tmp_path / "ck", location)
    data = (tmp_path / "ck" / WEIGHTS_FILE).read_bytes()
    storage.write_bytes_atomic(f"{location}/{WEIGHTS_FILE}", data[:-8] + b"\0" * 8)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=r"content hash .* corrupt, truncated"):
        storage.local_checkpoint(location, cache_dir=cache)
    assert storage.find_checkpoints(cache) == []  # nothing unverified is kept
    (tmp_path / "ck" / WEIGHTS_FILE).write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="does not match"):
        storage.publish_checkpoint(tmp_path / "ck", f"{s3_bucket}/other")  # never uploaded
    assert not storage.exists(f"{s3_bucket}/other")


def test_aux_pool_is_listed_on_s3_and_leaks_are_never_fetched(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSOUP_CACHE", str(tmp_path / "cache"))
    for name, dataset, value in [("x", "OtherSet", 1.0), ("y", "Third", 2.0), ("z", "Target", 3.0)]:
        _checkpoint(tmp_path / name, value, dataset)
        storage.publish_checkpoint(tmp_path / name, f"{s3_bucket}/aux/{name}")
    with pytest.warns(UserWarning, match="leakage guard"):
        pool = inits.discover_aux_pool([f"{s3_bucket}/aux"], "Target")
    assert pool.as_lists() == [[f"{s3_bucket}/aux/x"], [f"{s3_bucket}/aux/y"]]
    assert pool.excluded == [f"{s3_bucket}/aux/z"]
    reference = {"conv.weight": torch.zeros(3, 2), "bn.num_batches_tracked": torch.tensor(0)}
    with pytest.raises(inits.LeakageError):
        inits.load_aux_featurizer(f"{s3_bucket}/aux/z", "Target", reference)
    assert not (tmp_path / "cache").exists()  # the leak was refused before any download
    state = inits.load_aux_featurizer(f"{s3_bucket}/aux/y", "Target", reference)
    torch.testing.assert_close(state["conv.weight"], torch.full((3, 2), 2.0))


def _tiny_run(spec: dict, key: str) -> dict:
    """A planned run, trained for two steps on the CPU."""
    return train_run(from_mapping(RunSpec, {**spec, "steps": 2, "device": "cpu"}, key))


def test_a_pool_under_a_uri_is_borrowed_and_trains_a_target_run(s3_bucket, tmp_path, monkeypatch):
    """``aux_pool`` is a location as ``--storage`` is: a pool on S3 is checked where it is
    at planning (record, runs, metadata and headers; no download), and a target run with an
    auxiliary init fetches the runs it mixes and trains."""
    monkeypatch.setenv("RAYSOUP_CACHE", str(tmp_path / "cache"))
    pool = SweepLayout.of(f"{s3_bucket}/runs", "pool")
    pool_config = SweepConfig(
        name="pool", dataset=None, aux_datasets=list(NUISANCE_AUXILIARY), aux_n_hparams=1
    ).validate()
    record_config(pool.root, pool_config)
    lent = [pool.checkpoint("aux", aux_key(aux, 0)) for aux in NUISANCE_AUXILIARY]
    for aux, out in zip(NUISANCE_AUXILIARY, lent, strict=True):  # trained here, uploaded
        _tiny_run({"dataset": aux, "stage": "aux", "test_env": -1, "out": tmp_path / aux}, aux)
        storage.publish_checkpoint(tmp_path / aux, out)
    config = load_config(None, aux_pool=pool.root, inits=["pretrained", "fusing"], n_hparams=1)
    assert config.aux_pool == pool.root  # a URI stays a string (a Path would collapse //)
    assert check_aux_pool(config) == lent
    assert not (tmp_path / "cache").exists()  # planning checks the pool, fetches nothing
    plan = plan_sweep(config, tmp_path / "target")
    assert list(plan) == ["lp", "target"]  # the pool's aux runs are reused
    fusing = next(run for run in plan["target"] if run.spec["init"] == "fusing")
    assert fusing.spec["aux_dir"] == lent
    _tiny_run(plan["lp"][0].spec, plan["lp"][0].key)
    result = _tiny_run(fusing.spec, fusing.key)
    assert result["init_sources"][0] == "pretrained"
    assert sorted(result["init_sources"][1:]) == sorted(lent)
    assert storage.is_checkpoint(fusing.spec["out"])
    fetched = storage.find_checkpoints(tmp_path / "cache" / storage.STORAGE_CACHE)
    assert len(fetched) == len(lent)  # the mixed runs, fetched when the trial needed them


def test_a_bad_uri_pool_is_refused_naming_it(s3_bucket, tmp_path) -> None:
    expected = r"\(expected the folder <storage>/<name> of a sweep or auxiliary pool: a local"
    for pool, problem in [
        (f"{s3_bucket}/runs/nowhere", "no such directory"),
        ("nosuch://bucket/pool", r"not a usable URI \(.*\)"),
    ]:
        with pytest.raises(OptionsError, match=f"aux_pool='{pool}': {problem} {expected}"):
            load_config(None, aux_pool=pool)
    root = f"{s3_bucket}/runs/pool"
    storage.write_bytes_atomic(storage.join(root, "notes.txt"), b"not a sweep")
    with pytest.raises(OptionsError, match=f"aux_pool='{root}': no sweep.json; not a sweep"):
        plan_sweep(load_config(None, aux_pool=root), tmp_path)
    record_config(root, SweepConfig(name="pool", dataset=None).validate())
    with pytest.raises(OptionsError, match=f"aux_pool='{root}' lacks auxiliary run"):
        plan_sweep(load_config(None, aux_pool=root), tmp_path)


def test_endpoint_given_in_the_uri_query(s3_endpoint, s3_bucket, tmp_path, monkeypatch) -> None:
    """Without AWS_ENDPOINT_URL, the endpoint travels in the URI and survives every join."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("RAYSOUP_CACHE", str(tmp_path / "cache"))
    host = s3_endpoint.removeprefix("http://")
    root = f"{s3_bucket}/runs/q?endpoint_override={host}&scheme=http"
    storage.write_bytes_atomic(storage.join(root, "sweep.json"), b"{}")
    meta = _checkpoint(tmp_path / "ck")
    location = storage.join(root, "checkpoints", "lp", "k")
    assert location.endswith(f"/runs/q/checkpoints/lp/k?endpoint_override={host}&scheme=http")
    storage.publish_checkpoint(tmp_path / "ck", location)
    assert storage.find_checkpoints(storage.join(root, "checkpoints")) == [location]
    _, loaded = load_checkpoint(storage.local_checkpoint(location))
    assert loaded.content_hash == meta.content_hash
    written = ResultsStore(storage.join(root, "results")).append(
        "soup_steps", [SOUP_STEP], part_key="k"
    )
    assert written == storage.join(root, "results", "soup_steps", "part-k.parquet")
    assert len(load_results(root)["soup_steps"]) == 1
