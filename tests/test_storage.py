"""Object storage against a real S3 API on 127.0.0.1 (moto's ThreadedMotoServer): sources,
outputs, the lease, kills mid-upload, errors, staging for training, a cluster whose workers
see only the store."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from tests.helpers import digest, download, environment, preprocess
from tests.reliability.helpers import kill_when, start
from tests.test_cli import DRPIPE
from tfrecord_writer.info import load_info

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

SECRET = "drpipe-test-secret-6b1f0c"  # must never appear in an output, a log or a message
SETTINGS = ("--workers", 2, "--size", 128, "--shard-size", 0.2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 API server; the environment points every process at it (subprocesses and
    Dask workers inherit it)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "DRPIPE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    try:
        with environment(env):
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bkt")
            yield fs
    finally:
        server.stop()


def objects(fs, url: str) -> dict[str, int]:
    fs.invalidate_cache()
    try:
        return {e["name"].rsplit("/", 1)[-1]: e["size"]
                for e in fs.ls(url.removeprefix("s3://"), detail=True)}
    except FileNotFoundError:
        return {}


@pytest.fixture(scope="module")
def local_run(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local-run")
    preprocess("--src", synth_dir, "--out", out, *SETTINGS)
    return out


@pytest.fixture(scope="module")
def raw_url(s3, synth_dir) -> str:
    s3.put(str(synth_dir) + "/", "bkt/raw/", recursive=True)
    return "s3://bkt/raw"


def test_store_to_store_equals_the_local_run(s3, raw_url, local_run, tmp_path):
    r = preprocess("--src", raw_url, "--out", "s3://bkt/out1", *SETTINGS)
    got = download(s3, "s3://bkt/out1", tmp_path / "got")
    assert digest(got) == digest(local_run) and len(digest(got)) >= 5
    names = objects(s3, "s3://bkt/out1")
    assert "dataset_info.json" in names and "SHA256SUMS" in names and ".drpipe.lease" not in names
    info = load_info(got)
    assert info["config"]["src"] == raw_url
    everything = r.stdout + r.stderr + "".join(
        p.read_bytes().decode("latin-1") for p in got.iterdir())
    assert SECRET not in everything and "testing" not in json.dumps(info["config"])
    # a re-run: nothing to do, nothing rewritten
    r = subprocess.run([DRPIPE, "preprocess", "--src", raw_url, "--out", "s3://bkt/out1",
                        *map(str, SETTINGS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr


def test_storage_options_stay_out_of_outputs(s3, raw_url, local_run, tmp_path):
    """Credentials given as options work and are written nowhere."""
    r = preprocess("--src", raw_url, "--out", "s3://bkt/out-opt", *SETTINGS,
                   "--storage-option", "key=testing", "--storage-option", f"secret={SECRET}")
    got = download(s3, "s3://bkt/out-opt", tmp_path / "got")
    assert digest(got) == digest(local_run)
    blob = b"".join(p.read_bytes() for p in got.iterdir())  # the state file too
    assert SECRET.encode() not in blob and SECRET not in r.stdout + r.stderr
    # the options are not configuration: the same hash as a run without them
    if "dataset_info.json" not in objects(s3, "s3://bkt/out1"):
        preprocess("--src", raw_url, "--out", "s3://bkt/out1", *SETTINGS)
    plain = download(s3, "s3://bkt/out1", tmp_path / "plain")
    state = [json.loads((d / ".drpipe-state.json").read_text()) for d in (got, plain)]
    info = [load_info(d) for d in (got, plain)]
    assert state[0]["config_hash"] == state[1]["config_hash"] == info[0]["config_hash"]
    assert info[0]["config_hash"] == info[1]["config_hash"]
    assert info[0]["config"] == info[1]["config"]


def test_one_zip_in_the_store(s3, synth_dir, local_run, tmp_path):
    """``--src s3://bucket/one.zip``: an object, not a folder; the same bytes as the folder."""
    with zipfile.ZipFile(tmp_path / "one.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted((synth_dir / "train").iterdir()):
            z.write(p, "train/" + p.name)
        z.write(synth_dir / "trainLabels.csv", "trainLabels.csv")
    s3.put_file(str(tmp_path / "one.zip"), "bkt/zips/one.zip")
    preprocess("--src", "s3://bkt/zips/one.zip", "--out", tmp_path / "out", *SETTINGS)
    assert digest(tmp_path / "out") == digest(local_run)


@pytest.mark.slow  # over 30 s on two shared cores
def test_archive_parts_in_the_store(s3, sample_dir, tmp_path):
    """Kaggle's volumes in a bucket: the same bytes as the local extracted folder."""
    from tests.test_archive import make_zip, split_parts

    parts = split_parts(make_zip(sample_dir, tmp_path / "t.zip"), tmp_path / "parts")
    for p in parts:
        s3.put_file(str(p), f"bkt/parts/{p.name}")
    with zipfile.ZipFile(tmp_path / "trainLabels.csv.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(sample_dir / "trainLabels.csv", "trainLabels.csv")
    s3.put_file(str(tmp_path / "trainLabels.csv.zip"), "bkt/parts/trainLabels.csv.zip")
    args = ("--workers", 2, "--size", 128, "--shard-size", 2)
    preprocess("--src", sample_dir, "--out", tmp_path / "local", *args)
    preprocess("--src", "s3://bkt/parts", "--out", tmp_path / "fromstore", *args)
    assert digest(tmp_path / "fromstore") == digest(tmp_path / "local")
    assert len(digest(tmp_path / "local")) >= 4


@pytest.mark.slow  # over 30 s on two shared cores
def test_sigkill_mid_upload_then_rerun(s3, raw_url, local_run, tmp_path):
    url = "s3://bkt/out-kill"
    args = ["preprocess", "--quiet", "--src", raw_url, "--out", url, *SETTINGS[:4],
            "--shard-size", 0.01]  # about one shard per record: a long upload

    def uploading():
        names = objects(s3, url)
        return any(n.endswith(".tfrecord") for n in names) and "dataset_info.json" not in names

    assert kill_when(start(*args), uploading, 240), "never caught it uploading"
    seen = objects(s3, url)
    assert "dataset_info.json" not in seen and ".drpipe.lease" in seen
    n_shards = sum(n.endswith(".tfrecord") for n in seen)
    r = subprocess.run([DRPIPE, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # the dead run's lease is taken over
    final = download(s3, url, tmp_path / "final")
    total = sum(p.name.endswith(".tfrecord") for p in final.iterdir())
    assert 0 < n_shards < total
    # every shard the killed run left was whole: the same size as the finished one's
    assert all(final.joinpath(n).stat().st_size == size for n, size in seen.items()
               if n.endswith(".tfrecord"))
    ref = tmp_path / "ref"
    preprocess("--src", raw_url, "--out", ref, *args[6:])
    assert digest(final) == digest(ref)


@pytest.mark.slow  # over 30 s on two shared cores
def test_second_concurrent_run_refused_by_the_lease(s3, raw_url, tmp_path):
    url = "s3://bkt/out-lease"
    first = start("preprocess", "--quiet", "--src", raw_url, "--out", url, *SETTINGS)
    try:
        deadline = time.time() + 60
        while ".drpipe.lease" not in objects(s3, url) and time.time() < deadline:
            time.sleep(0.05)
        r = subprocess.run([DRPIPE, "preprocess", "--quiet", "--src", raw_url, "--out", url,
                            *map(str, SETTINGS)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 75, r.stderr  # skipped, EX_TEMPFAIL
        assert "another drpipe run is writing to s3://bkt/out-lease" in r.stderr
        assert f"host {socket.gethostname()}, pid {first.pid}" in r.stderr
        assert r.stderr.count("\n") == 1
    finally:
        assert first.wait(timeout=300) == 0
    # an expired lease of another host is taken over
    s3.pipe_file("bkt/out-lease/.drpipe.lease", json.dumps(
        {"host": "elsewhere", "pid": 1, "expires": time.time() - 5, "token": "x"}).encode())
    r = subprocess.run([DRPIPE, "preprocess", "--src", raw_url, "--out", url,
                        *map(str, SETTINGS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
    # a live one of another host is not
    s3.pipe_file("bkt/out-lease/.drpipe.lease", json.dumps(
        {"host": "elsewhere", "pid": 1, "expires": time.time() + 600, "token": "x"}).encode())
    r = subprocess.run([DRPIPE, "preprocess", "--src", raw_url, "--out", url,
                        *map(str, SETTINGS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 75 and "host elsewhere, pid 1" in r.stderr


def test_missing_buckets_are_one_line(s3, raw_url, tmp_path):
    r = preprocess("--src", raw_url, "--out", "s3://no-such-bucket/out", check=False)
    assert r.returncode == 1 and "no such bucket 'no-such-bucket'" in r.stderr
    assert r.stderr.count("\n") == 1
    r = preprocess("--src", "s3://no-such-bucket/raw", "--out", tmp_path / "o", check=False)
    assert r.returncode == 3 and "no such bucket or folder" in r.stderr
    assert r.stderr.count("\n") == 1


def test_refused_credentials_are_one_line(s3, raw_url, tmp_path):
    from moto import settings

    old = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on the server checks credentials
    try:
        r = preprocess("--src", raw_url, "--out", tmp_path / "o", check=False)
        r2 = preprocess("--src", tmp_path, "--out", "s3://bkt/denied", check=False)
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = old
    for res in (r, r2):
        assert res.returncode == 1, res.stderr
        assert "access denied" in res.stderr and "credentials" in res.stderr
        assert res.stderr.count("\n") == 1 and SECRET not in res.stderr


def test_shards_staged_for_training_verified(s3, raw_url, local_run, tmp_path):
    from pipeline.job import JobError
    from pipeline.remote_out import stage_shards

    url = "s3://bkt/out1"
    if "dataset_info.json" not in objects(s3, url):
        preprocess("--src", raw_url, "--out", url, *SETTINGS)
    local = stage_shards(url)
    assert digest(local) == digest(local_run)
    victim = sorted(local.glob("*.tfrecord"))[0]
    victim.write_bytes(b"x" * victim.stat().st_size)  # same size, other bytes: re-fetched
    assert digest(stage_shards(url)) == digest(local_run)
    # a shard altered in the store is refused
    key = f"bkt/out1/{victim.name}"
    good = s3.cat_file(key)
    s3.pipe_file(key, good[:-1] + bytes([good[-1] ^ 1]))
    victim.unlink()
    try:
        with pytest.raises(JobError, match="does not match its size and SHA256SUMS"):
            stage_shards(url)
    finally:
        s3.pipe_file(key, good)


def test_cluster_workers_see_only_the_store(s3, raw_url, local_run, tmp_path, dask_cluster):
    """Workers started elsewhere (their own cwd) read the photos from the store; the source
    exists on no local disk."""
    from distributed import Client

    with Client(dask_cluster.address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
        cwds = set(client.run(os.getcwd).values())
    assert len(cwds) == 2 and os.getcwd() not in cwds  # no client-relative path resolves
    out = tmp_path / "out"
    preprocess("--src", raw_url, "--out", out, *SETTINGS[2:], "--scheduler",
               dask_cluster.address)
    assert digest(out) == digest(local_run)


@pytest.mark.slow  # over 30 s on two shared cores
def test_archive_source_on_a_cluster_from_the_store(s3, sample_dir, tmp_path, dask_cluster):
    from tests.test_archive import make_zip, split_parts

    parts = split_parts(make_zip(sample_dir, tmp_path / "t.zip"), tmp_path / "parts")
    for p in parts:
        s3.put_file(str(p), f"bkt/cparts/{p.name}")
    s3.put_file(str(sample_dir / "trainLabels.csv"), "bkt/cparts/trainLabels.csv")
    shutil.rmtree(tmp_path / "parts")
    args = ("--size", 128, "--shard-size", 2)
    preprocess("--src", sample_dir, "--out", tmp_path / "local", "--workers", 2, *args)
    preprocess("--src", "s3://bkt/cparts", "--out", "s3://bkt/cout", *args, "--scheduler",
               dask_cluster.address)
    got = download(s3, "s3://bkt/cout", tmp_path / "got")
    assert digest(got) == digest(tmp_path / "local")


def test_foreign_objects_in_store_out_refused_and_kept(s3, raw_url):
    s3.pipe_file("bkt/foreign/notes.txt", b"mine")
    s3.pipe_file("bkt/foreign/train-00000-of-00001.tfrecord", b"not drpipe's")
    r = preprocess("--src", raw_url, "--out", "s3://bkt/foreign", *SETTINGS, check=False)
    assert r.returncode == 1 and "not empty and not a drpipe output" in r.stderr
    assert objects(s3, "s3://bkt/foreign") == {"notes.txt": 4,
                                                "train-00000-of-00001.tfrecord": 12}


def test_a_users_shard_in_a_store_output_is_refused_never_removed(s3, raw_url):
    """A *.tfrecord the user put into a drpipe output in a store: refused (even with
    --overwrite), kept; drpipe's own shards are those it recorded."""
    url = "s3://bkt/theirs"
    preprocess("--src", raw_url, "--out", url, *SETTINGS)
    ours = {n for n in objects(s3, url) if n.endswith(".tfrecord")}
    state = json.loads(s3.cat_file("bkt/theirs/.drpipe-state.json"))
    assert set(state["shards"]) == ours and ours
    s3.pipe_file("bkt/theirs/mine.tfrecord", b"my own records")
    r = preprocess("--src", raw_url, "--out", url, *SETTINGS, "--overwrite", check=False)
    assert r.returncode == 1 and "mine.tfrecord that no drpipe run recorded" in r.stderr, r.stderr
    assert objects(s3, url)["mine.tfrecord"] == 14
    s3.rm("bkt/theirs/mine.tfrecord")
    preprocess("--src", raw_url, "--out", url, *SETTINGS, "--overwrite")  # ours: replaced
    assert {n for n in objects(s3, url) if n.endswith(".tfrecord")} == ours


def test_a_users_lease_object_and_a_stray_shard_beside_a_finished_output(s3, raw_url):
    s3.pipe_file("bkt/lease/.drpipe.lease", b"my own lease notes")
    r = preprocess("--src", raw_url, "--out", "s3://bkt/lease", *SETTINGS, check=False)
    assert r.returncode == 1 and "is not a drpipe lease" in r.stderr, r.stderr
    assert objects(s3, "s3://bkt/lease") == {".drpipe.lease": 18}
    url = "s3://bkt/done"
    preprocess("--src", raw_url, "--out", url, *SETTINGS)
    s3.pipe_file("bkt/done/mine.tfrecord", b"mine")
    r = preprocess("--src", raw_url, "--out", url, *SETTINGS, check=False)  # as a local --out
    assert r.returncode == 1 and "mine.tfrecord that no drpipe run recorded" in r.stderr
    assert objects(s3, url)["mine.tfrecord"] == 4


def test_train_data_url_is_staged_or_refused_in_one_line(s3):
    r = subprocess.run([DRPIPE, "train", "--data", "s3://bkt/nothing-here"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1  # as a local --data without shards
    assert "s3://bkt/nothing-here: no finished drpipe output here" in r.stderr


def test_report_on_a_store_output(s3, raw_url, tmp_path):
    url = "s3://bkt/out1"
    if "dataset_info.json" not in objects(s3, url):
        preprocess("--src", raw_url, "--out", url, *SETTINGS)
    r = subprocess.run([DRPIPE, "report", "--data", url, "--out", str(tmp_path / "r.html")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000


def test_storage_options_reach_data_urls(s3, raw_url, tmp_path):
    """--storage-option on the commands that read --data URLs (report here; train, evaluate,
    ensemble and tune take the same option): applied before the shards are staged — an
    endpoint that answers nothing is a one-line failure, not the default endpoint."""
    url = "s3://bkt/out1"
    if "dataset_info.json" not in objects(s3, url):
        preprocess("--src", raw_url, "--out", url, *SETTINGS)
    r = subprocess.run([DRPIPE, "report", "--data", url, "--out", str(tmp_path / "r.html"),
                        "--storage-option", "endpoint_url=http://127.0.0.1:9",
                        "--storage-option",
                        'config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2}'],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, DRPIPE_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("drpipe: error: the object store cannot be used"), r.stderr
    assert not (tmp_path / "r.html").exists()
    r = subprocess.run([DRPIPE, "report", "--data", url, "--out", str(tmp_path / "r.html"),
                        "--storage-option", "client_kwargs={bad json"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, DRPIPE_CACHE=str(tmp_path / "cache2")))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "does not accept these --storage-option values" in r.stderr
    for command in ("train", "evaluate", "ensemble", "tune"):
        help_text = subprocess.run([DRPIPE, command, "--help"], capture_output=True, text=True,
                                   timeout=120).stdout
        assert "--storage-option" in help_text, command


def test_a_previous_format_output_in_a_store(s3, raw_url):
    """drpipe's info in dataset_info.json (drpipe 0.1.0): a re-run finds it complete, and
    its shards, recorded there alone, are drpipe's to replace with --overwrite (the same
    format decision as a local output: tfrecord_writer.info.info_from)."""
    url, key = "s3://bkt/old-format", "bkt/old-format"
    preprocess("--src", raw_url, "--out", url, *SETTINGS)
    ours = {n for n in objects(s3, url) if n.endswith(".tfrecord")}
    info = json.loads(s3.cat_file(f"{key}/drpipe_info.json"))
    for name in ("drpipe_info.json", "features.json", "image.class.label.labels.txt",
                 "metadata.json", "SHA256SUMS"):
        s3.rm(f"{key}/{name}")
    s3.pipe_file(f"{key}/dataset_info.json", json.dumps(info).encode())
    r = subprocess.run([DRPIPE, "preprocess", "--src", raw_url, "--out", url,
                        *map(str, SETTINGS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
    assert f"{info['summary']['ok']} of {info['summary']['photos']} photos" in r.stdout
    state = json.loads(s3.cat_file(f"{key}/.drpipe-state.json"))
    s3.pipe_file(f"{key}/.drpipe-state.json", json.dumps(dict(state, shards=[])).encode())
    preprocess("--src", raw_url, "--out", url, *SETTINGS, "--overwrite")
    assert {n for n in objects(s3, url) if n.endswith(".tfrecord")} == ours
    assert "drpipe_version" not in json.loads(s3.cat_file(f"{key}/dataset_info.json"))


def test_an_unreachable_split_quota_changes_nothing_in_the_store(s3, raw_url, synth_dir,
                                                                  tmp_path):
    """--split-quota floor that these labels cannot meet (three patients, both eyes grade 0,
    half of six photos in val), asked with --overwrite over a finished store output: exit 3
    in one line, and the store's objects are as they were (the old output was cleared and a
    state object written before the split was planned)."""
    url, key = "s3://bkt/quota", "bkt/quota"
    preprocess("--src", raw_url, "--out", url, *SETTINGS)
    before = {n: s3.cat_file(f"{key}/{n}") for n in objects(s3, url)}
    ids = [line.split(",")[0]
           for line in (synth_dir / "trainLabels.csv").read_text().splitlines()[1:7]]
    labels = tmp_path / "three.csv"
    labels.write_text("image,level\n" + "".join(f"{i},0\n" for i in ids))
    r = subprocess.run([DRPIPE, "preprocess", "--src", raw_url, "--out", url,
                        *map(str, SETTINGS), "--labels", str(labels), "--split",
                        "train=0.5,val=0.5", "--split-quota", "floor", "--overwrite"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "--split-quota floor: no patient-safe split gives val exactly 3 photos" in r.stderr
    s3.invalidate_cache()
    assert {n: s3.cat_file(f"{key}/{n}") for n in objects(s3, url)} == before


def test_labels_from_the_store(s3, raw_url, synth_dir, tmp_path):
    """``--labels s3://…`` with a local or a store ``--src``: the same shards and manifests
    as with the labels file on the local disk."""
    labels = "s3://bkt/labels/own.csv"
    s3.put_file(str(synth_dir / "trainLabels.csv"), labels)
    args = ("--size", 128, "--shard-size", 0.2, "--workers", 2)
    preprocess("--src", synth_dir / "train", "--labels", synth_dir / "trainLabels.csv",
               "--out", tmp_path / "local", *args)
    preprocess("--src", synth_dir / "train", "--labels", labels, "--out", tmp_path / "a", *args)
    preprocess("--src", f"{raw_url}/train", "--labels", labels, "--out", tmp_path / "b", *args)
    ref = digest(tmp_path / "local")
    assert len(ref) >= 3 and digest(tmp_path / "a") == ref and digest(tmp_path / "b") == ref
    assert load_info(tmp_path / "b")["config"]["labels"] == labels


STALE = {"host": "elsewhere", "pid": 1, "token": "x"}


def test_two_takeovers_of_one_stale_lease_one_wins(s3, monkeypatch):
    """Two runs judge the same expired lease stale before either writes: exactly one takes
    it over, the other is refused as by a live lease (LockHeld: exit 75)."""
    import threading

    from pipeline import remote_out

    path = "s3://bkt/race/.drpipe.lease"
    s3.pipe_file(path, json.dumps(dict(STALE, expires=time.time() - 5)).encode())
    both_read = threading.Barrier(2, timeout=30)
    turn = {"a": threading.Event(), "b": threading.Event()}
    turn["a"].set()
    judge = remote_out._stale

    def judged(holder):  # both have read it; then a writes, then b
        verdict = judge(holder)
        both_read.wait()
        assert turn[threading.current_thread().name].wait(30)
        return verdict

    monkeypatch.setattr(remote_out, "_stale", judged)
    got = {}

    def take(name):
        try:
            got[name] = remote_out.Lease(s3, path, ttl=60).__enter__()
        except remote_out.LockHeld as e:
            got[name] = e
        finally:
            turn["b"].set()

    threads = [threading.Thread(target=take, args=(n,), name=n) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert isinstance(got["a"], remote_out.Lease) and not got["a"].lost
        assert isinstance(got["b"], remote_out.LockHeld), got["b"]
        assert str(got["b"]).startswith("another drpipe run is writing to s3://bkt/race (host "
                                        f"{socket.gethostname()}, pid {os.getpid()},")
        assert json.loads(s3.cat_file(path))["token"] == got["a"].token
    finally:
        for lease in got.values():
            if isinstance(lease, remote_out.Lease):
                lease.__exit__(None, None, None)
    assert not s3.exists(path)  # the holder removed its own lease


def test_a_held_lease_is_renewed_and_a_replaced_one_lost(s3, monkeypatch):
    """Renewed every third of DRPIPE_LEASE_TTL while held; once another writer replaces the
    object the holder's conditional renewal fails: lost, check() says so in one line, and
    the other writer's lease is left as it is."""
    from pipeline.job import JobError
    from pipeline.remote_out import Lease

    monkeypatch.setenv("DRPIPE_LEASE_TTL", "0.6")
    path = "s3://bkt/renew/.drpipe.lease"
    lease = Lease(s3, path).__enter__()
    try:
        first = json.loads(s3.cat_file(path))
        deadline = time.time() + 10
        while json.loads(s3.cat_file(path))["expires"] <= first["expires"]:
            assert time.time() < deadline, "never renewed"
            time.sleep(0.05)
        assert not lease.lost and json.loads(s3.cat_file(path))["token"] == lease.token
        lease.check()
        other = json.dumps(dict(STALE, expires=time.time() + 600, token="another-run"))
        s3.pipe_file(path, other.encode())  # another run's takeover
        deadline = time.time() + 10
        while not lease.lost:
            assert time.time() < deadline, "never noticed"
            time.sleep(0.05)
        with pytest.raises(JobError) as e:
            lease.check()
        assert str(e.value) == (f"lost the lease {path} to another run; nothing more is "
                                "written, re-run to resume")
    finally:
        lease.__exit__(None, None, None)
    assert s3.cat_file(path) == other.encode()  # not renewed over, not deleted


def test_a_lease_the_store_stops_renewing_is_given_up_before_it_expires(s3, monkeypatch):
    """Renewals that fail (the store does not answer) are retried; a tenth of the time to
    live before the expiry last written, the holder counts the lease lost. One that hangs
    does not delay it: check() refuses by the clock."""
    from pipeline.job import JobError
    from pipeline.remote_out import Lease

    monkeypatch.setenv("DRPIPE_LEASE_TTL", "1.5")
    for how in ("fails", "hangs"):
        path = f"s3://bkt/unanswered-{how}/.drpipe.lease"
        lease = Lease(s3, path).__enter__()
        try:
            expires = json.loads(s3.cat_file(path))["expires"]

            def no_answer(how=how, **condition):
                if how == "hangs":
                    time.sleep(30)
                raise OSError("the store did not answer")

            lease._write = no_answer
            while True:
                try:
                    lease.check()
                except JobError:
                    break
                assert time.time() < expires + 5, "never given up"
                time.sleep(0.01)
            assert time.time() < expires  # before the store's copy expires
            assert lease.lost
        finally:
            del lease._write
            lease._stop.set()
            lease._thread = None  # a hung renewal is not waited for
            lease.__exit__(None, None, None)


def test_a_run_that_loses_its_lease_writes_nothing_more(s3, raw_url):
    """Another writer replaces a running preprocess's lease while it processes: at its next
    renewal the run knows, uploads no shard and no marker, exits 1 in one line and leaves
    the other lease as it is."""
    url = "s3://bkt/out-lost"
    run = subprocess.Popen([DRPIPE, "preprocess", "--quiet", "--src", raw_url, "--out", url,
                            *map(str, SETTINGS)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, DRPIPE_LEASE_TTL="0.6"))
    try:
        deadline = time.time() + 60
        while not {".drpipe.lease", ".drpipe-state.json"} <= set(objects(s3, url)):
            assert time.time() < deadline and run.poll() is None, "no lease seen"
            time.sleep(0.02)
        other = json.dumps(dict(STALE, expires=time.time() + 600)).encode()
        s3.pipe_file(f"{url}/.drpipe.lease", other)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1 and err.count("\n") == 1, err
    assert f"lost the lease {url}/.drpipe.lease to another run" in err
    left = objects(s3, url)
    assert not any(n.endswith(".tfrecord") for n in left) and "dataset_info.json" not in left
    assert s3.cat_file(f"{url}/.drpipe.lease") == other


@pytest.mark.slow
def test_train_evaluate_predict_with_a_store(s3, raw_url, local_run, sample_dir, tmp_path):
    """drpipe train --data s3://…: the shards staged to the local cache (verified), then a
    real training run on them; evaluate reads the same staged copy; predict --src s3://…
    grades photos in the store as the same photos on disk."""
    url = "s3://bkt/out1"
    if "dataset_info.json" not in objects(s3, url):
        preprocess("--src", raw_url, "--out", url, *SETTINGS)
    run = tmp_path / "run"
    r = subprocess.run([DRPIPE, "train", "--data", url, "--model", "resnetv2-small",
                        "--image-size", "128", "--epochs", "1", "--batch-size", "8",
                        "--out", str(run)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    data = Path(json.loads((run / "config.json").read_text())["data"])
    assert data.is_relative_to(os.environ["DRPIPE_CACHE"])  # the staged copy
    assert digest(data) == digest(local_run)  # shards and manifests as the local run's
    assert (run / "model.keras").exists() and len(
        list(open(run / "history.csv"))) == 2  # header + 1 epoch
    r = subprocess.run([DRPIPE, "evaluate", str(run), "--split", "val"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "quadratic kappa" in r.stdout, r.stderr[-2000:]
    assert SECRET not in (run / "config.json").read_text()

    local = tmp_path / "photos"
    (local / "more").mkdir(parents=True)
    for p in sorted((sample_dir / "train").glob("*.jpeg"))[:3]:
        shutil.copy(p, local / "more" / p.name)
    (local / "broken.jpeg").write_bytes(b"<html>502</html>")
    (local / ".hidden.jpeg").write_bytes(b"")
    s3.put(str(local) + "/", "bkt/photos/", recursive=True)
    rows = {}
    for src in (str(local), "s3://bkt/photos/"):
        csv_path = tmp_path / f"preds-{len(rows)}.csv"
        r = subprocess.run([DRPIPE, "predict", str(run), "--src", src, "--out", str(csv_path)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        got = list(csv.DictReader(open(csv_path)))
        rows[src] = got
    local_rows, store_rows = rows.values()
    assert sorted(r["path"] for r in store_rows) == ["s3://bkt/photos/broken.jpeg"] + [
        f"s3://bkt/photos/more/{p.name}" for p in sorted((local / "more").glob("*.jpeg"))]
    strip = [{k: v for k, v in r.items() if k != "path"} for r in local_rows]
    assert strip == [{k: v for k, v in r.items() if k != "path"} for r in store_rows]
    assert [r["status"] for r in store_rows].count("ok") == 3
    r = subprocess.run([DRPIPE, "predict", str(run), "--src", "s3://bkt/no-such-prefix",
                        "--out", str(tmp_path / "none.csv")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "no photos found in s3://bkt/no-such-prefix" in r.stderr
    r = subprocess.run([DRPIPE, "predict", str(run), "--src", "s3://bkt/photos/",
                        "--out", "s3://bkt/preds.csv"], capture_output=True, text=True,
                       timeout=300)  # refused before any photo is graded, nothing written
    assert r.returncode == 2 and "a local file" in r.stderr and not Path("s3:").exists()


def test_the_lease_on_a_store_without_conditional_writes():
    """fsspec's memory:// store (no ETags): the exclusive create refuses a second run, a
    stale lease is taken over (also when another run removed it first), renewal reads the
    token back and a replaced lease is lost."""
    import fsspec

    from pipeline.remote_out import Lease, LockHeld

    fs = fsspec.filesystem("memory")
    path = "memory://lease-test/.drpipe.lease"
    first = Lease(fs, path, ttl=0.6).__enter__()
    assert not first._conditional
    with pytest.raises(LockHeld):
        Lease(fs, path, ttl=0.6).__enter__()
    deadline = time.time() + 10
    while json.loads(fs.cat_file(path))["expires"] < first.valid_until - 0.6 + 0.1:
        assert time.time() < deadline, "never renewed"
        time.sleep(0.02)
    other = dict(STALE, expires=time.time() - 1, token="another-run")  # replaced, expired
    fs.pipe_file(path, json.dumps(other).encode())
    while not first.lost:
        assert time.time() < deadline, "never noticed"
        time.sleep(0.02)
    first.__exit__(None, None, None)
    assert json.loads(fs.cat_file(path))["token"] == "another-run"  # left as it is
    stale = Lease(fs, path, ttl=0.6)
    real_rm = fs.rm

    def removed_first(p, *a, **kw):  # another run removes the stale lease just before
        real_rm(p, *a, **kw)
        raise FileNotFoundError(p)

    fs.rm = removed_first
    try:
        stale.__enter__()
    finally:
        fs.rm = real_rm
    assert json.loads(fs.cat_file(path))["token"] == stale.token
    stale.__exit__(None, None, None)
    assert not fs.exists(path)


def test_a_live_run_of_this_machine_keeps_its_staging(s3, raw_url, tmp_path):
    """The store's lease may have expired under a run that is alive but stopped (Ctrl-Z,
    a suspended VM): another run on the machine must not clear or fill the staging folder
    that run writes to. It is refused (exit 75) before touching the store or the staging;
    once the folder is free the same command runs."""
    import fcntl

    from pipeline.remote_out import _url_key, cache_dir

    url = "s3://bkt/out-staging"
    staging = cache_dir() / "out" / _url_key(url)
    (staging / ".staging").mkdir(parents=True)
    (staging / ".staging" / "batch-of-the-live-run").write_bytes(b"x")
    with open(cache_dir() / "out" / f"{_url_key(url)}.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the live run's lock
        r = subprocess.run([DRPIPE, "preprocess", "--src", raw_url, "--out", url, "--overwrite",
                            *map(str, SETTINGS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 75 and r.stderr.count("\n") == 1, r.stderr
    assert f"another drpipe run is writing to {url} (host {socket.gethostname()}, pid " in (
        r.stderr) and "on this machine is in use" in r.stderr
    assert (staging / ".staging" / "batch-of-the-live-run").exists()  # not cleared
    assert objects(s3, url) == {}  # nothing written to the store, no lease taken
    r = subprocess.run([DRPIPE, "preprocess", "--src", raw_url, "--out", url, "--overwrite",
                        *map(str, SETTINGS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("body", [b'{"host": "vm", "pid": 1, "expires": "soon", "token": "x"}',
                                  b"not json", b"[1, 2]"])
def test_a_lease_object_drpipe_did_not_write_is_refused_and_kept(s3, raw_url, body):
    url = "s3://bkt/out-foreign-lease"
    s3.pipe_file(f"{url.removeprefix('s3://')}/.drpipe.lease", body)
    r = subprocess.run([DRPIPE, "preprocess", "--src", raw_url, "--out", url,
                        *map(str, SETTINGS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "is not a drpipe lease" in r.stderr
    assert s3.cat_file(f"{url.removeprefix('s3://')}/.drpipe.lease") == body
