"""`dali-fl prep` and `dali-fl verify`: build the resized store once, then prove it right."""
from __future__ import annotations

import time
from pathlib import Path

import click

from dali_fl.cli import NamedPath, explicit_options
from dali_fl.data.resize import METHODS
from dali_fl.data.sources import SOURCE_PARAMS, SOURCES, check_synthetic_args, load_source
from dali_fl.data.store import (
    DTYPES,
    LEGACY_SAMPLES,
    MANIFEST,
    check_outside_stores,
    check_prep_args,
    check_sample_count,
    check_store_fits,
    open_store,
    verify_store,
    write_store,
)
from dali_fl.errors import DaliFlError


def _source_options(hidden: bool = False):
    """The synthetic source's options, shared by prep and verify. verify reads them only for a synthetic store
    that predates recorded settings and refuses them anywhere else, so its help leaves them out."""
    def add(f):
        for name, default, help_ in (("--seed", 0, "Seed of the synthetic source."),
                                     ("--num-test", 1000, "Synthetic source: test images."),
                                     ("--num-train", 5000, "Synthetic source: train images.")):
            f = click.option(name, default=default, show_default=True, hidden=hidden, help=help_)(f)
        return f
    return add


@click.command()
@click.option("--source", "source_name", type=click.Choice(SOURCES), default="synthetic", show_default=True,
              help="Raw dataset: cifar10/cifar100 (python-version layout), imagefolder, npz, or synthetic.")
@click.option("--source-path", type=click.Path(path_type=Path),
              help="cifar-10-batches-py/ directory or .tar.gz; ROOT of train/CLASS/*.png; or the .npz file.")
@click.option("--download", is_flag=True, help="Fetch CIFAR through torchvision (needs internet).")
@click.option("--image-size", default=224, show_default=True, type=int, help="Side of the stored square images.")
@click.option("--dtype", type=click.Choice(DTYPES), default="uint8", show_default=True,
              help="uint8 (4x smaller); float32 in [0, 1] only reproduces the old pipeline for benchmarks.")
@click.option("--interpolation", type=click.Choice(METHODS), default="bilinear", show_default=True,
              help="Resize method (torch, antialiased, like torchvision's Resize).")
@click.option("--out", "out_dir", type=NamedPath(path_type=Path), default=Path("data"), show_default=True,
              help="Directory that holds stores; the store goes to OUT/<source>-<size>[-f32].")
@click.option("--force", is_flag=True, help="Rebuild even if a valid store exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_source_options()
def prep(source_name, source_path, download, image_size, dtype, interpolation, out_dir, force, quiet,
         num_train, num_test, seed):
    """Resize a dataset once and store it as uint8 arrays for training.

    \b
    Example:
      dali-fl prep --source cifar10 --source-path cifar-10-python.tar.gz --image-size 224
    The last line printed is the store's path.
    """
    check_prep_args(image_size, dtype, interpolation)  # before a source that may take minutes to read
    check_synthetic_args(num_train, num_test, seed)
    check_outside_stores(out_dir, "--out")  # `prep --force` of that store would delete the one made inside it
    _check_source_args(source_name, source_path, download)
    if source_name == "synthetic":  # its size is known before it is generated: check the disk first
        check_store_fits(out_dir, num_train + num_test, image_size, dtype)
    source = load_source(source_name, source_path, download=download, download_root=out_dir / "downloads",
                         num_train=num_train, num_test=num_test, seed=seed)
    start = time.perf_counter()
    path, written = write_store(source, out_dir, image_size, dtype=dtype, interpolation=interpolation,
                                force=force, progress=not quiet)
    if written:
        n = sum(s.count for s in source.splits.values())
        secs = time.perf_counter() - start
        click.echo(f"wrote {n} images in {secs:.1f} s ({n / max(secs, 1e-9):.0f} img/s)", err=True)
    else:
        click.echo(_same_store_note(path), err=True)
    click.echo(str(path))


def _same_store_note(path: Path) -> str:
    """What prep compared before it found the store at `path` already made from this source."""
    if all("source_sha256" in e for e in open_store(path).manifest["splits"].values()):
        return (f"a store of the same source images (sha256 before resize), classes and labels already exists at "
                f"{path}; nothing to do (--force rebuilds)")
    return (f"a store of the same classes, counts and labels already exists at {path}, and {LEGACY_SAMPLES} "
            "re-resized samples per split equal it; it predates recorded source hashes, so the other images were not "
            "compared; nothing to do (--force rebuilds it and records the hash)")


def _check_source_args(source_name: str, source_path, download: bool) -> None:
    """Refuse what the source would not read: config-free sources store every image they hold."""
    if source_name == "synthetic" and (source_path is not None or download):
        given = "--source-path" if source_path is not None else "--download"
        raise DaliFlError(f"{given} does nothing for --source synthetic, which is generated from --seed, "
                          "--num-train and --num-test; drop it")
    if download and not source_name.startswith("cifar"):
        raise DaliFlError(f"--download fetches CIFAR only; --source {source_name} reads --source-path, so drop it")
    given = [n for n in SOURCE_PARAMS if n in explicit_options(click.get_current_context())]
    if source_name != "synthetic" and given:
        raise DaliFlError(f"--{given[0].replace('_', '-')} sets the synthetic source only; --source {source_name} "
                          "stores every image it holds, so drop it")


@click.command()
@click.argument("store", type=NamedPath(path_type=Path))
@click.option("--source-path", type=click.Path(path_type=Path),
              help="The raw source, to compare re-resized samples with the stored ones.")
@click.option("--check-samples", default=16, show_default=True, help="Samples to re-resize and compare.")
@_source_options(hidden=True)
@click.pass_context
def verify(ctx, store, source_path, check_samples, num_train, num_test, seed):
    """Check a store: manifest, shapes, sha256, labels, class counts, values, samples.

    \b
    Example:
      dali-fl verify data/cifar10-224 --source-path cifar-10-batches-py
    Exits 0 only when every check passes. The synthetic source is regenerated
    from the manifest's settings, so it needs no --source-path.
    """
    check_sample_count(check_samples)
    check_synthetic_args(num_train, num_test, seed)
    if not store.is_dir():
        open_store(store)  # raises the one-line "does not exist; create it with prep" error
    if not (store / MANIFEST).exists() and not any(store.parent.glob(f".{store.name}.old-*")):
        # nothing prep made (nor a store a killed `prep --force` set aside): rebuilding is not the way on
        raise DaliFlError(f"{store} is not a store (no manifest.json); give a directory `dali-fl prep` wrote")
    given = [n for n in SOURCE_PARAMS if n in explicit_options(ctx)]
    # A given --source-path is compared (classes, raw-image sha256) even with no sample re-resized.
    wanted = check_samples or source_path is not None
    source = _source_for(store, source_path, num_train, num_test, seed, given) if wanted else None
    checks, counts, classes = verify_store(store, source, check_samples)
    for c in checks:
        click.echo(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    if (source is None or check_samples == 0) and counts:  # said, so that "all passed" is not read as more
        why = "--check-samples 0" if check_samples == 0 else "no --source-path"
        click.echo(f"skip  samples: {why}, so no sample was re-resized and compared")
    if counts:
        click.echo(_class_table(counts, classes))
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise DaliFlError(f"{len(failed)} check(s) failed ({', '.join(failed)}); rebuild with `dali-fl prep --force`")
    click.echo(f"all {len(checks)} checks passed: {store}")


def _source_for(store: Path, source_path, num_train, num_test, seed, given: list[str]):
    """The raw source matching a store, when it can be had; None skips the sample check.

    --num-train/--num-test/--seed (`given`) regenerate only a synthetic store that does not record them;
    anywhere else they would do nothing, so they are refused.
    """
    try:
        manifest = open_store(store).manifest
    except DaliFlError:
        return None  # verify_store reports the damage itself
    name = manifest["source"]
    if given and (name != "synthetic" or manifest.get("source_params")):
        raise DaliFlError(f"--{given[0].replace('_', '-')} does nothing here: verify regenerates a synthetic store "
                          f"from the settings in {store}/manifest.json and reads any other from --source-path; "
                          "drop it")
    if name == "synthetic" and source_path is not None:
        raise DaliFlError(f"--source-path does nothing here: verify regenerates the synthetic store {store} from "
                          "its manifest.json; drop it")
    if name == "synthetic":
        params = {"num_train": num_train, "num_test": num_test, "seed": seed, **manifest.get("source_params", {})}
        try:
            return load_source(name, **params)
        except DaliFlError as err:  # the values came from the manifest, not from the options the message names
            raise DaliFlError(f"cannot regenerate the synthetic source from {store}/manifest.json "
                              f"(source_params {params}): {err}") from None
    return load_source(name, source_path) if source_path is not None else None


def _class_table(counts: dict, classes: list[str]) -> str:
    """Class counts per split as a fixed-width table."""
    splits = list(counts)
    width = max([len(c) for c in classes] + [5])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>8}" for s in splits)]
    for i, name in enumerate(classes):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{int(counts[s][i]):>8}" for s in splits))
    return "\n".join(lines)


COMMANDS = [prep, verify]
