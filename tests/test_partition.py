"""Client partitions: coverage, skew, determinism, argument checks, JSON files and the CLI."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from dali_fl.cli import cli
from dali_fl.config import option_defaults
from dali_fl.data.partition import (
    Partition,
    load_partition,
    make_partition,
    partition_to_json,
    plot_partition,
    save_partition,
    summarize,
)
from dali_fl.errors import DaliFlError

METHODS = ("iid", "dirichlet", "shards")


def random_labels(n: int, num_classes: int = 10, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n)


def balanced_labels(per_class: int, num_classes: int = 10) -> np.ndarray:
    # Interleaved rather than grouped, so that a partition cannot be right by luck of order.
    return np.tile(np.arange(num_classes), per_class)


def assert_partition_of(p: Partition, n: int, num_users: int) -> None:
    assert len(p.clients) == num_users
    every = np.concatenate(p.clients)
    assert len(every) == n, "some sample is missing or given twice"
    assert np.array_equal(np.sort(every), np.arange(n))
    for c in p.clients:
        assert c.dtype == np.int64 and np.all(np.diff(c) > 0)


def mean_tv_from_global(p: Partition, labels: np.ndarray) -> float:
    """Mean over clients of the total-variation distance to the global label distribution."""
    counts = p.class_counts(labels)
    local = counts / counts.sum(axis=1, keepdims=True)
    glob = np.bincount(labels, minlength=p.num_classes) / len(labels)
    return float(0.5 * np.abs(local - glob).sum(axis=1).mean())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,users", [(1000, 10), (997, 7), (101, 3), (50, 1), (64, 32)])
def test_disjoint_and_covering(method, n, users):
    labels = random_labels(n)
    kwargs = {"min_size": 1} if method == "dirichlet" else {}
    p = make_partition(labels, users, method, seed=3, **kwargs)
    assert_partition_of(p, n, users)
    assert p.sizes().sum() == n
    assert p.class_counts(labels).shape == (users, 10)
    assert np.array_equal(p.class_counts(labels).sum(axis=0), np.bincount(labels, minlength=10))


def test_iid_sizes_differ_by_at_most_one():
    p = make_partition(random_labels(1003), 10, "iid")
    assert p.sizes().max() - p.sizes().min() <= 1


def test_num_classes_counts_classes_absent_from_labels():
    labels = random_labels(200, num_classes=5)
    p = make_partition(labels, 4, "iid", num_classes=8)
    assert p.num_classes == 8 and p.class_counts(labels).shape == (4, 8)
    assert p.class_counts(labels)[:, 5:].sum() == 0


@pytest.mark.parametrize("min_size", [0, 10, 40])
def test_dirichlet_honours_min_size(min_size):
    labels = random_labels(2000)
    for seed in range(3):
        p = make_partition(labels, 20, "dirichlet", alpha=0.3, min_size=min_size, seed=seed)
        assert p.sizes().min() >= min_size
        assert_partition_of(p, 2000, 20)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_partition_other_seed_differs(method):
    labels = random_labels(1000)
    a = make_partition(labels, 10, method, seed=7)
    b = make_partition(labels, 10, method, seed=7)
    c = make_partition(labels, 10, method, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients))
    assert a == b
    assert any(not np.array_equal(x, y) for x, y in zip(a.clients, c.clients))
    assert a != c


def test_dirichlet_large_alpha_is_near_iid_small_alpha_is_skewed():
    labels = random_labels(5000)
    near_iid = make_partition(labels, 10, "dirichlet", alpha=1000, seed=0)
    skewed = make_partition(labels, 10, "dirichlet", alpha=0.05, seed=0)
    assert mean_tv_from_global(near_iid, labels) < 0.1
    assert mean_tv_from_global(skewed, labels) > 0.5
    # Skewed clients are dominated by one or two classes.
    top2 = np.sort(skewed.class_counts(labels), axis=1)[:, -2:].sum(axis=1) / skewed.sizes()
    assert np.median(top2) > 0.8


def test_iid_is_near_global_distribution():
    labels = random_labels(5000)
    assert mean_tv_from_global(make_partition(labels, 10, "iid"), labels) < 0.1


def test_shards_aligned_with_classes_give_at_most_shards_per_client_classes():
    # 10 classes x 100 samples, 25 users x 2 shards = 50 shards of 20: no shard crosses a class.
    labels = balanced_labels(100)
    p = make_partition(labels, 25, "shards", shards_per_client=2, seed=1)
    classes = (p.class_counts(labels) > 0).sum(axis=1)
    assert classes.max() <= 2
    assert np.all(p.sizes() == 40)


@pytest.mark.parametrize("spc", [1, 2, 3])
def test_shards_straddling_give_at_most_twice_shards_per_client_classes(spc):
    # Shards are contiguous in label order; as no class is smaller than a shard, a shard
    # touches at most two classes.
    labels = balanced_labels(97)
    users = 13
    p = make_partition(labels, users, "shards", shards_per_client=spc, seed=2)
    assert_partition_of(p, len(labels), users)
    assert (p.class_counts(labels) > 0).sum(axis=1).max() <= 2 * spc
    shard = len(labels) // (users * spc)
    assert p.sizes().min() >= spc * shard and p.sizes().max() <= spc * (shard + 1)
    assert mean_tv_from_global(p, labels) > 0.5  # far from IID


def test_json_round_trip(tmp_path):
    labels = random_labels(800)
    p = make_partition(labels, 6, "dirichlet", alpha=0.5, seed=4)
    path = tmp_path / "p.json"
    save_partition(p, labels, path)
    doc = json.loads(path.read_text())
    assert set(doc) == {"method", "seed", "num_classes", "params", "clients"}
    assert doc["method"] == "dirichlet" and doc["seed"] == 4 and doc["num_classes"] == 10
    assert doc["params"] == {"alpha": 0.5, "min_size": 10}
    assert doc == partition_to_json(p, labels)
    for entry, idx, counts in zip(doc["clients"], p.clients, p.class_counts(labels)):
        assert set(entry) == {"indices", "class_counts"}
        assert entry["indices"] == idx.tolist() and entry["class_counts"] == counts.tolist()
    q = load_partition(path, num_samples=800)
    assert q == p
    assert np.array_equal(q.class_counts(labels), p.class_counts(labels))
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"], "temp file left behind"


def _write_doc(tmp_path, mutate):
    labels = random_labels(100)
    doc = partition_to_json(make_partition(labels, 3, "iid"), labels)
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("mutate", [
    lambda d: d["clients"][1]["indices"].__setitem__(0, d["clients"][0]["indices"][0]),  # overlap
    lambda d: d["clients"][0]["indices"].append(d["clients"][0]["indices"][0]),  # duplicate
    lambda d: d["clients"][0]["indices"].__setitem__(0, 1.5),  # not an integer
    lambda d: d["clients"][0]["indices"].__setitem__(0, -1),  # negative
    lambda d: d["clients"][0].__setitem__("class_counts", [1, 2]),  # wrong length
    lambda d: d.pop("clients"),
    lambda d: d.__setitem__("clients", []),
    lambda d: d.__setitem__("num_classes", "ten"),
], ids=["overlap", "duplicate", "float", "negative", "counts", "no-clients", "empty", "classes"])
def test_load_rejects_bad_partitions(tmp_path, mutate):
    path = _write_doc(tmp_path, mutate)
    with pytest.raises(DaliFlError, match="bad.json"):
        load_partition(path)


def test_load_rejects_garbage_missing_and_out_of_range(tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xffnot json{")
    with pytest.raises(DaliFlError, match="garbage.json"):
        load_partition(garbage)
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    with pytest.raises(DaliFlError, match="list.json"):
        load_partition(tmp_path / "list.json")
    with pytest.raises(DaliFlError, match="missing.json"):
        load_partition(tmp_path / "missing.json")
    good = _write_doc(tmp_path, lambda d: None)
    load_partition(good, num_samples=100)
    with pytest.raises(DaliFlError, match="out of range"):
        load_partition(good, num_samples=50)


@pytest.mark.parametrize("labels,users,method,kwargs,match", [
    (random_labels(100), 5, "dirichlet", {"alpha": 0}, "alpha"),
    (random_labels(100), 5, "dirichlet", {"alpha": -1}, "alpha"),
    (random_labels(100), 5, "dirichlet", {"alpha": float("nan")}, "alpha"),
    (random_labels(100), 5, "dirichlet", {"alpha": float("inf")}, "alpha"),
    (random_labels(100), 101, "iid", {}, "num-users"),
    (random_labels(100), 0, "iid", {}, "num-users"),
    (random_labels(100), 5, "bogus", {}, "unknown partition method"),
    (random_labels(100), 5, "dirichlet", {"min_size": -1}, "min-size"),
    (random_labels(100), 5, "dirichlet", {"min_size": 21}, "min-size"),
    (random_labels(100), 5, "shards", {"shards_per_client": 0}, "shards"),
    (random_labels(100), 5, "shards", {"shards_per_client": 21}, "shards"),
    (random_labels(100).astype(float), 5, "iid", {}, "labels"),
    (random_labels(100).reshape(10, 10), 5, "iid", {}, "labels"),
    (random_labels(100) - 1, 5, "iid", {}, "non-negative"),
    (random_labels(100), 5, "iid", {"num_classes": 3}, "out of range"),
])
def test_bad_arguments_raise(labels, users, method, kwargs, match):
    with pytest.raises(DaliFlError, match=match):
        make_partition(labels, users, method, **kwargs)


def _count_draws(monkeypatch) -> list:
    import dali_fl.data.partition as partition

    calls, real = [], partition._dirichlet_draw
    monkeypatch.setattr(partition, "_dirichlet_draw", lambda *a: calls.append(1) or real(*a))
    return calls


def test_impossible_min_size_fails_fast(monkeypatch):
    # min_size 100 x 10 users > 500 samples: refused before drawing anything.
    draws = _count_draws(monkeypatch)
    with pytest.raises(DaliFlError, match="min-size"):
        make_partition(random_labels(500), 10, "dirichlet", alpha=0.5, min_size=100)
    assert draws == []


@pytest.mark.timeout(60)
def test_unreachable_min_size_gives_up_with_advice(monkeypatch):
    # Allowed (10 x 10 = 100 samples), but every client would need exactly 10: the bounded
    # redraws give up instead of looping.
    from dali_fl.data.partition import MAX_ATTEMPTS

    draws = _count_draws(monkeypatch)
    with pytest.raises(DaliFlError, match="--min-size.*--alpha.*--num-users"):
        make_partition(random_labels(100, 3), 10, "dirichlet", alpha=1.0, min_size=10)
    assert len(draws) == MAX_ATTEMPTS


def test_summarize_and_plot(tmp_path):
    labels = random_labels(3000)
    p = make_partition(labels, 150, "dirichlet", alpha=0.1, min_size=1)
    text = summarize(p, labels)
    assert "150" in text and "dirichlet" in text and "alpha=0.1" in text
    sizes = p.sizes()
    assert f"min {sizes.min()} / median {np.median(sizes):g} / max {sizes.max()}" in text
    assert "classes per client" in text
    out = tmp_path / "sub" / "p.png"
    plot_partition(p, labels, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from dali_fl.data.sources import load_synthetic
    from dali_fl.data.store import write_store

    path, _ = write_store(load_synthetic(600, 100, seed=0), tmp_path_factory.mktemp("store"),
                          image_size=8, progress=False)
    return path


def test_cli_partition_writes_json_and_plot(store, tmp_path):
    out, png = tmp_path / "f.json", tmp_path / "p.png"
    result = CliRunner().invoke(cli, ["partition", str(store), "--num-users", "5", "--partition",
                                      "dirichlet", "--alpha", "0.5", "--out", str(out),
                                      "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "min" in result.output and "median" in result.output and "max" in result.output
    assert f"wrote {out}" in result.output
    p = load_partition(out, num_samples=600)
    assert p.method == "dirichlet" and len(p.clients) == 5 and p.params["alpha"] == 0.5
    assert_partition_of(p, 600, 5)
    assert png.stat().st_size > 0


def test_cli_without_out_prints_only_the_summary(store):
    result = CliRunner().invoke(cli, ["partition", str(store), "--num-users", "4"])
    assert result.exit_code == 0, result.output
    # The default method is the one `dali-fl train` partitions with.
    assert "wrote" not in result.output and option_defaults()["partition"] in result.output


@pytest.mark.parametrize("args", [
    ["--num-users", "5", "--partition", "dirichlet", "--alpha", "0"],
    ["--num-users", "601"],
    ["--num-users", "100", "--partition", "dirichlet"],  # default --min-size 10 x 100 > 600
])
def test_cli_bad_input_is_one_line_error(store, args):
    result = CliRunner().invoke(cli, ["partition", str(store), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output


def test_cli_missing_store_is_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["partition", str(tmp_path / "nope"), "--num-users", "5"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output


def test_cli_help_documents_every_option():
    result = CliRunner().invoke(cli, ["partition", "--help"])
    assert result.exit_code == 0
    for option in ("--num-users", "--partition", "--alpha", "--shards", "--min-size", "--seed",
                   "--out", "--plot", "Example"):
        assert option in result.output


# --- where `partition --out/--plot` may write ---------------------------------------------

def _run(store, *args):
    return CliRunner().invoke(cli, ["partition", str(store), "--num-users", "3", *map(str, args)])


def assert_refused(result, *words):
    """Exit 2, one `error:` line on stderr naming `words`, and no summary: refused before any work."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert result.stdout == "", "the partition was made before the refusal"
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("flag,name", [("--out", "p.json"), ("--plot", "p.png")])
def test_cli_keeps_an_existing_file_unless_force(store, tmp_path, flag, name):
    path = tmp_path / name
    path.write_bytes(b"the user's own file\n")
    assert_refused(_run(store, flag, path), str(path), "--force", "choose another")
    assert path.read_bytes() == b"the user's own file\n"
    result = _run(store, flag, path, "--force")
    assert result.exit_code == 0, result.output
    assert path.read_bytes() != b"the user's own file\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == [name], "temp file left behind"


@pytest.mark.parametrize("flag,name", [("--out", "p.json"), ("--plot", "p.png")])
def test_cli_never_follows_or_replaces_a_symlink(store, tmp_path, flag, name):
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    link = tmp_path / name
    link.symlink_to(target)
    for extra in ([], ["--force"]):
        assert_refused(_run(store, flag, link, *extra), str(link), "symlink")
        assert link.is_symlink() and target.read_bytes() == b"keep me"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_cli_refuses_a_fifo_or_directory_without_blocking(store, tmp_path, flag):
    fifo, folder = tmp_path / "fifo.png", tmp_path / "dir.png"
    os.mkfifo(fifo)
    folder.mkdir()
    assert_refused(_run(store, flag, fifo, "--force"), str(fifo), "a FIFO")
    assert_refused(_run(store, flag, folder, "--force"), str(folder), "a directory")
    assert_refused(_run(store, flag, f"{tmp_path}/new/"), "names a directory")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir() and not (tmp_path / "new").exists()


def test_cli_refuses_a_device(store):
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null here")
    assert_refused(_run(store, "--out", "/dev/null", "--force"), "/dev/null", "a device")


@pytest.mark.parametrize("flag,name", [("--out", "p.json"), ("--plot", "p.png")])
def test_cli_refuses_a_missing_directory_and_does_not_create_it(store, tmp_path, flag, name):
    path = tmp_path / "missing" / "deeper" / name
    assert_refused(_run(store, flag, path), str(tmp_path / "missing" / "deeper"), "does not exist")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    assert_refused(_run(store, flag, tmp_path / "file" / name), "not a directory")


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_cli_refuses_an_empty_path(store, flag):
    assert_refused(_run(store, flag, ""), flag, "empty")


def test_cli_refuses_the_same_path_for_out_and_plot(store, tmp_path):
    path = tmp_path / "p.png"
    assert_refused(_run(store, "--out", path, "--plot", tmp_path / "." / "p.png"), "same file")
    assert not path.exists()


@pytest.mark.parametrize("name", ["manifest.json", "train_labels.npy"])
def test_cli_refuses_the_stores_own_files_even_with_force(store, name):
    before = (store / name).read_bytes()
    assert_refused(_run(store, "--out", store / name, "--force"), "inside the store")
    assert (store / name).read_bytes() == before


def test_cli_bad_plot_is_refused_before_out_is_written(store, tmp_path):
    out = tmp_path / "p.json"
    assert_refused(_run(store, "--out", out, "--plot", tmp_path / "p.xyz"), ".xyz", ".png", ".svg")
    assert_refused(_run(store, "--out", out, "--plot", tmp_path / "plot"), "no suffix")
    assert_refused(_run(store, "--out", out, "--plot", tmp_path / "p.pgf"), ".pgf")  # matplotlib's, but needs LaTeX
    assert not out.exists()


@pytest.mark.parametrize("name,check", [
    ("p.svg", lambda b: b.startswith(b"<?xml") and b"<svg" in b),
    ("p.pdf", lambda b: b.startswith(b"%PDF")),
    ("p.PNG", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")),
    ("p.jpg", lambda b: b.startswith(b"\xff\xd8")),
])
def test_cli_plot_writes_the_format_its_suffix_names(store, tmp_path, name, check):
    if name.endswith(".jpg"):
        pytest.importorskip("PIL")  # matplotlib writes JPEG through pillow
    path = tmp_path / name
    result = _run(store, "--plot", path)
    assert result.exit_code == 0, result.output
    assert check(path.read_bytes()), path.read_bytes()[:16]
