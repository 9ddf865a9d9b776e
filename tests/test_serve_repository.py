"""Serving a model that changes: `pmserve export --new-version` into a model repository, `pmserve serve
--repository` with polling and the KServe/Triton repository extension (index, load, unload), swaps and rollbacks
under concurrent load with nothing dropped, refused versions, and bad input.

Waits are on conditions (an index entry, a response's model_version, a queued-inputs gauge), never on sleeps that
a slow machine could outrun."""

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import typer
from typer.testing import CliRunner

from pmserve.formats import sha256_file
from pmserve.formats.bundle import MANIFEST, PROBE, read_manifest, verify_bundle, write_manifest
from pmserve.formats.repository import versions
from tests.test_export import assert_one_line_error, bundle, run  # noqa: F401 -- the tiny run and its bundle
from tests.test_serve import infer_body, queued, start, stderr

NAME = "tiny"
TEXTS = ["dog and cat", "a hammer", "the old city by the river", "joy", "bread with cheese and a pear"]


@pytest.fixture()
def cli():
    """`pmserve export` and `pmserve serve` in process (their errors come before anything is loaded)."""
    from pmserve.cli.deploy import register as deploy
    from pmserve.cli.serve import register as serve

    app = typer.Typer(pretty_exceptions_enable=False)
    deploy(app)
    serve(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):  # noqa: F811
    """REPO/tiny/1 and /2: `pmserve export --new-version` twice, and the first version's files after each."""
    from pmserve.cli.deploy import register

    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    repo = tmp_path_factory.mktemp("repository")
    results, files = [], []
    for _ in range(2):
        results.append(
            CliRunner().invoke(app, ["export", str(run), "--out", str(repo / NAME), "--new-version", "-q"])
        )
        files.append({p.name: sha256_file(p) for p in (repo / NAME / "1").iterdir()})
    return repo, results, files


def new_repo(tmp_path, version_folder, *numbers):
    """A repository holding copies of one exported version under the given numbers."""
    repo = tmp_path / "repo"
    for n in numbers:
        shutil.copytree(version_folder, repo / NAME / str(n))
    return repo


def add_version(repo, source, number, alter=None):
    """Copy `source` to REPO/tiny/NUMBER the way an export writes it: under a hidden name, renamed when complete
    (`alter` changes the copy first), so a poll never sees half a copy."""
    tmp = repo / NAME / f".{number}.tmp-test"
    shutil.copytree(source, tmp)
    if alter:
        alter(tmp)
    os.rename(tmp, repo / NAME / str(number))


def wait_for(what, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def index(url, **body):
    r = httpx.post(f"{url}/v2/repository/index", json=body or None)
    assert r.status_code == 200, r.text
    return r.json()


def entry(url, version):
    return next((e for e in index(url) if e["name"] == NAME and e.get("version") == str(version)), None)


def infer(url, text="dog and cat", **kw):
    return httpx.post(f"{url}/v2/models/{NAME}/infer", json=infer_body([text]), timeout=60, **kw)


def load(url, version=None):
    body = {"parameters": {"version": str(version)}} if version is not None else None
    return httpx.post(f"{url}/v2/repository/models/{NAME}/load", json=body, timeout=120)


@pytest.fixture()
def servers():
    """`pmserve serve --repository REPO OPTS...` processes, killed at the end of the test."""
    procs = []

    def launch(repo, *opts):
        proc, url = start(None, "--repository", repo, *opts)
        procs.append(proc)
        return proc, url

    yield launch
    for p in procs:
        p.kill()
        p.wait()


def metric(url, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# ---------------------------------------------------------------- export --new-version


def test_export_new_version_numbers_versions_and_never_overwrites(exported):
    repo, results, files = exported
    for k, res in enumerate(results, 1):
        assert res.exit_code == 0, (res.stdout, res.stderr)
        assert f"wrote {repo / NAME / str(k)}:" in res.stdout
    assert versions(repo / NAME) == [1, 2]
    assert sorted(p.name for p in (repo / NAME).iterdir()) == ["1", "2"]  # no temporary folder left
    assert files[0] == files[1], "the second export changed version 1"
    for v in (1, 2):
        m = verify_bundle(repo / NAME / str(v))
        assert m["probe"]["file"] == PROBE and PROBE in m["files"] and m["probe"]["inputs"] >= 5
        assert m["probe"]["tolerance"] == 1e-4  # fp32's parity tolerance


def test_export_new_version_skips_gaps_and_temporary_folders(exported, run, cli, tmp_path):  # noqa: F811
    repo, _, _ = exported
    model = tmp_path / NAME
    shutil.copytree(repo / NAME / "1", model / "4")
    (model / ".5.tmp-1").mkdir()  # a half-written version of a killed export: not a version
    (model / "config.pbtxt").write_text("")  # other files beside the versions are left alone
    res = cli("export", run, "--out", model, "--new-version", "-q")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert versions(model) == [4, 5]
    verify_bundle(model / "5")


@pytest.mark.parametrize("case", ["bundle", "junk", "file"])
def test_export_new_version_refuses_a_bad_model_folder(exported, run, cli, tmp_path, case):  # noqa: F811
    repo, _, _ = exported
    model = tmp_path / NAME
    if case == "bundle":
        shutil.copytree(repo / NAME / "1", model)
        needle = "is a bundle itself"
    elif case == "junk":
        shutil.copytree(repo / NAME / "1", model / "1")
        (model / "2.partial").mkdir()
        needle = "2.partial: looks like a version folder"
    else:
        model.write_text("")
        needle = "not a folder"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = cli("export", run, "--out", model, "--new-version")
    assert_one_line_error(res, needle)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "something was written"


# ---------------------------------------------------------------- serve --repository


def test_serves_the_newest_version_and_answers_the_repository_extension(exported, servers):
    import tritonclient.http as tc

    repo, _, _ = exported
    proc, url = servers(repo, "--poll-s", 0)
    c = tc.InferenceServerClient(url.removeprefix("http://"))
    assert "model_repository" in c.get_server_metadata()["extensions"]
    assert c.get_model_metadata(NAME)["versions"] == ["2"]
    assert c.is_model_ready(NAME, "2") and not c.is_model_ready(NAME, "1")
    assert infer(url).json()["model_version"] == "2"
    assert httpx.get(f"{url}/v2/models/{NAME}/versions/2").json()["versions"] == ["2"]
    assert httpx.get(f"{url}/v2/models/{NAME}/versions/2/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/{NAME}/versions/1").status_code == 404
    r = httpx.post(f"{url}/v2/models/{NAME}/versions/1/infer", json=infer_body(["dog"]))
    assert r.status_code == 404 and "serves version 2" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/{NAME}/versions/2/infer", json=infer_body(["dog"]))
    assert r.status_code == 200 and r.json()["model_version"] == "2"

    assert index(url) == [
        {"name": NAME, "version": "1", "state": "UNAVAILABLE", "reason": "not loaded"},
        {"name": NAME, "version": "2", "state": "READY"},
    ]
    assert index(url, ready=True) == [{"name": NAME, "version": "2", "state": "READY"}]
    assert c.get_model_repository_index() == index(url)  # tritonclient reads it as Triton's
    assert metric(url, "pmserve_model_version", model=NAME) == 2

    # rollback: load version 1; tritonclient's load_model (no version) loads the newest again
    r = load(url, 1)
    assert r.status_code == 200 and r.json() == {"name": NAME, "version": "1", "state": "READY"}
    assert infer(url).json()["model_version"] == "1"
    assert entry(url, 2) == {"name": NAME, "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"}
    c.load_model(NAME)
    assert infer(url).json()["model_version"] == "2"

    for body, status, needle in [
        ({"parameters": {"version": "7"}}, 404, "no version 7"),
        ({"parameters": {"version": "x"}}, 400, "parameters.version"),
        ({"parameters": {"config": "{}"}}, 400, "not supported"),
    ]:
        r = httpx.post(f"{url}/v2/repository/models/{NAME}/load", json=body)
        assert r.status_code == status and needle in r.json()["error"], r.text
    r = httpx.post(f"{url}/v2/repository/models/nope/load")
    assert r.status_code == 404 and "no model folder 'nope'" in r.json()["error"]

    c.unload_model(NAME)
    r = infer(url)
    assert r.status_code == 404 and "not loaded (unloaded)" in r.json()["error"]
    assert httpx.get(f"{url}/v2/models/{NAME}/ready").status_code == 404
    assert [e["state"] for e in index(url)] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert metric(url, "pmserve_model_version", model=NAME) == 0
    assert load(url).json()["version"] == "2"
    assert infer(url).status_code == 200
    assert metric(url, "pmserve_model_loads_total", model=NAME, result="swapped") == 3


def test_swaps_and_rollback_under_concurrent_load_drop_nothing(exported, servers, tmp_path):
    """32 client threads send requests while a new version appears (the poller swaps to it) and version 1 is
    loaded back; every request is answered 200, and every request sent after the rollback returned is answered
    by version 1."""
    exported_repo, _, _ = exported
    repo = new_repo(tmp_path, exported_repo / NAME / "1", 1)
    proc, url = servers(repo, "--poll-s", 0.2, "--max-wait-ms", 2)
    stop = threading.Event()
    lock = threading.Lock()
    answers = []  # (sent at, status, model_version)

    def client(k):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                sent = time.monotonic()
                r = c.post(f"{url}/v2/models/{NAME}/infer", json=infer_body([TEXTS[k % len(TEXTS)]]))
                with lock:
                    answers.append((sent, r.status_code, r.json().get("model_version")))
                time.sleep(0.05)  # about 20 requests a second per client: a few hundred in all

    def seen(version, after=0.0):
        with lock:
            return sum(1 for t, _, v in answers if v == version and t >= after)

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(client, k) for k in range(32)]
        try:
            wait_for("answers from version 1", lambda: seen("1") >= 32)
            add_version(repo, exported_repo / NAME / "1", 2)
            wait_for("answers from version 2", lambda: seen("2") >= 32)
            r = load(url, 1)
            rolled_back = time.monotonic()
            assert r.status_code == 200, r.text
            wait_for("answers from version 1 again", lambda: seen("1", after=rolled_back) >= 64)
            time.sleep(0.5)  # a few polls: the poller must not undo the rollback
        finally:
            stop.set()
        for f in futures:
            f.result()
    assert len(answers) < 3000
    assert [s for _, s, _ in answers if s != 200] == [], "requests failed across a swap"
    assert {v for t, _, v in answers if t >= rolled_back} == {"1"}
    assert entry(url, 1)["state"] == "READY" and entry(url, 2)["reason"] == "unloaded"
    assert metric(url, "pmserve_model_loads_total", model=NAME, result="swapped") == 2
    assert metric(url, "pmserve_model_load_seconds_count", model=NAME) == 2
    log = stderr(proc)
    assert "version 2 serves (was version 1)" in log and "version 1 serves (was version 2)" in log


def test_queued_requests_finish_on_their_version_across_a_swap_and_an_unload(exported, servers, tmp_path):
    """Deterministic: requests held in version 1's batcher (a long batching wait) when version 2 is swapped in
    are answered by version 1 and later ones by version 2; requests queued when the model is unloaded are
    answered, later ones get 404. (A fresh batcher waits for company, so its first requests queue.)"""
    exported_repo, _, _ = exported
    repo = new_repo(tmp_path, exported_repo / NAME / "1", 1)
    proc, url = servers(repo, "--poll-s", 0, "--max-batch", 64, "--max-wait-ms", 3000)
    with ThreadPoolExecutor(8) as pool:
        held = [pool.submit(infer, url, t) for t in TEXTS]
        wait_for("requests queued on version 1", lambda: queued(url) == len(TEXTS))
        add_version(repo, exported_repo / NAME / "1", 2)
        assert load(url).json()["version"] == "2"
        after = pool.submit(infer, url)
        assert [(r.result().status_code, r.result().json()["model_version"]) for r in held] == [
            (200, "1")
        ] * 5
        assert after.result().json()["model_version"] == "2"

        # the version served is not loaded again (a no-op since issue 37): unload it first for a fresh batcher
        assert httpx.post(f"{url}/v2/repository/models/{NAME}/unload").status_code == 200
        assert load(url, 2).json()["version"] == "2"  # loaded again: a fresh batcher, whose requests queue
        held = [pool.submit(infer, url, t) for t in TEXTS]
        wait_for("requests queued on version 2", lambda: queued(url) == len(TEXTS))
        assert httpx.post(f"{url}/v2/repository/models/{NAME}/unload").status_code == 200
        assert infer(url).status_code == 404
        assert [(r.result().status_code, r.result().json()["model_version"]) for r in held] == [
            (200, "2")
        ] * 5
    assert queued(url) == 0


def alter_byte(name):
    def alter(folder):
        raw = bytearray((folder / name).read_bytes())
        raw[len(raw) // 2] ^= 1
        (folder / name).write_bytes(bytes(raw))

    return alter


def alter_probe(folder):
    """A bundle whose files all match a rewritten manifest, but whose model does not score as recorded: what only
    the parity probe catches."""
    probe = json.loads((folder / PROBE).read_text())
    probe["scores"][0][0] += 0.5
    (folder / PROBE).write_text(json.dumps(probe))
    m = read_manifest(folder)
    write_manifest(folder, {k: v for k, v in m.items() if k not in ("format", "version", "files")})


REFUSED = {
    2: (alter_byte("model.onnx"), ["model.onnx", "sha256"]),
    3: (lambda f: (f / "labels.json").write_text('["a", "b"]'), ["labels.json", "altered"]),
    4: (lambda f: (f / "model.onnx").unlink(), ["model.onnx", "missing"]),
    5: (alter_probe, ["parity probe failed"]),
    6: (lambda f: (f / MANIFEST).unlink(), ["not a bundle"]),
}


def test_altered_and_incomplete_versions_are_refused_while_the_old_one_serves(exported, servers, tmp_path):
    exported_repo, _, _ = exported
    repo = new_repo(tmp_path, exported_repo / NAME / "1", 1)
    proc, url = servers(repo, "--poll-s", 0.1)
    for v, (alter, _) in REFUSED.items():
        add_version(repo, exported_repo / NAME / "1", v, alter)

    def all_refused():
        return all((e := entry(url, v)) and e.get("reason", "not loaded") != "not loaded" for v in REFUSED)

    wait_for("every altered version refused", all_refused)
    for v, (_, needles) in REFUSED.items():
        e = entry(url, v)
        assert e["state"] == "UNAVAILABLE" and all(n in e["reason"] for n in needles), e
        assert f"version {v} not served" in stderr(proc)
    assert entry(url, 1) == {"name": NAME, "version": "1", "state": "READY"}
    assert infer(url).json()["model_version"] == "1"
    r = load(url, 2)
    assert r.status_code == 400 and "sha256" in r.json()["error"]
    assert infer(url).json()["model_version"] == "1"
    assert metric(url, "pmserve_model_loads_total", model=NAME, result="refused") >= len(REFUSED) + 1


def test_half_written_version_is_ignored_until_renamed(exported, servers, tmp_path):
    exported_repo, _, _ = exported
    repo = new_repo(tmp_path, exported_repo / NAME / "1", 1)
    half = repo / NAME / ".2.tmp-4242"  # what an export still writing (or killed) leaves
    shutil.copytree(exported_repo / NAME / "2", half)
    (half / "model.onnx").unlink()
    proc, url = servers(repo, "--poll-s", 0.1)
    assert load(url).json()["version"] == "1"  # the newest version is 1: the poller looks the same way
    assert index(url) == [{"name": NAME, "version": "1", "state": "READY"}]
    shutil.copy(exported_repo / NAME / "2" / "model.onnx", half / "model.onnx")
    os.rename(half, repo / NAME / "2")
    wait_for("version 2 served", lambda: infer(url).json()["model_version"] == "2")
    assert "not served" not in stderr(proc)


def test_a_version_refused_half_copied_is_tried_again_once_complete(exported, servers, tmp_path):
    """`cp -r 1 2` is not atomic: a poll can see version 2 before its files are complete. It is refused, and
    tried again when its files change."""
    exported_repo, _, _ = exported
    repo = new_repo(tmp_path, exported_repo / NAME / "1", 1)
    proc, url = servers(repo, "--poll-s", 0.1)
    shutil.copytree(
        exported_repo / NAME / "2", repo / NAME / "2", ignore=shutil.ignore_patterns("model.onnx")
    )
    wait_for("version 2 refused", lambda: "missing" in (entry(url, 2) or {}).get("reason", ""))
    shutil.copy(exported_repo / NAME / "2" / "model.onnx", repo / NAME / "2" / "model.onnx")
    wait_for("version 2 served", lambda: infer(url).json()["model_version"] == "2")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["missing", "empty", "bundle", "no_versions", "all_bad", "with_bundle"])
def test_bad_repository_is_one_line_and_exit_2(exported, bundle, cli, tmp_path, case):  # noqa: F811
    exported_repo, _, _ = exported
    repo = tmp_path / "repo"
    extra = []
    if case == "empty":
        repo.mkdir()
        needle = "holds no model with a version"
    elif case == "bundle":
        shutil.copytree(bundle, repo)
        needle = "is a bundle, not a repository"
    elif case == "no_versions":
        (repo / NAME).mkdir(parents=True)
        needle = "holds no model with a version"
    elif case == "all_bad":
        new_repo(tmp_path, exported_repo / NAME / "1", 1)
        alter_byte("model.onnx")(repo / NAME / "1")
        needle = "no version of any model passes its checks"
    elif case == "with_bundle":
        repo = exported_repo
        extra = [bundle]
        needle = "without BUNDLE arguments"
    else:
        needle = "does not exist"
    res = cli("serve", *extra, "--repository", repo, "--port", 0)
    assert_one_line_error(res, "--repository", needle)


def test_serve_needs_a_bundle_or_a_repository(cli):
    assert_one_line_error(cli("serve", "--port", 0), "BUNDLE", "--repository")
    assert_one_line_error(cli("serve", "--repository", ".", "--poll-s", -1), "--poll-s")


# ---------------------------------------------------------------- the parity probe


def test_every_dtype_passes_its_own_probe_and_old_bundles_still_load(run, bundle, tmp_path):  # noqa: F811
    """In process: the probe export writes for fp16 and int8 (whose tolerance is measured) passes at load; a
    bundle exported before probes (no "probe" in its manifest) loads as before, run once."""
    from pmserve.export import ExportOptions, export_bundle
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_bundle

    cfg = ServeConfig(provider="cpu", threads=1)
    for name, opts in (("fp16", ExportOptions(dtype="fp16")), ("int8", ExportOptions(quantize="int8"))):
        m = export_bundle(run, tmp_path / name, opts)
        tol = m["probe"]["tolerance"]
        assert tol == 1e-2 if name == "fp16" else 1e-4 <= tol < 1, tol  # int8: twice what export measured
        load_bundle(tmp_path / name, name, cfg)
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    (old / PROBE).unlink()
    m = read_manifest(old)
    write_manifest(old, {k: v for k, v in m.items() if k not in ("format", "version", "files", "probe")})
    assert load_bundle(old, "old", cfg).version == "1"
