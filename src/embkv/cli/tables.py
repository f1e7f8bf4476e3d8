"""`embkv` commands on tables: create, load, info, get, export, copy, check, repair, drop."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, cast

import click
import numpy as np

import embkv
from embkv.file.format import DTYPES, DTypeName, KeyType

__all__ = ["COMMANDS"]


@click.command()
@click.argument("store")
@click.argument("table")
@click.option("--dim", type=click.IntRange(1), required=True, help="Vector width.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
              help="How vectors are stored; int8 (a scale per row) and bfloat16 are read back as float32.")
@click.option("--key-type", type=click.Choice(["int64", "str"]), default="int64", show_default=True)
@click.option("--capacity", type=click.IntRange(16), default=1024, show_default=True,
              help="Starting size in rows; tables grow on their own.")
@click.option("--tags", is_flag=True, help="Rows keep a u64 tag (8 bytes a row); compute on miss needs it.")
def create(store: str, table: str, dim: int, dtype: DTypeName, key_type: KeyType, capacity: int, tags: bool) -> None:
    """Create an empty TABLE in STORE."""
    t = embkv.open(store).create_table(table, dim=dim, dtype=dtype, key_type=key_type, capacity=capacity, tags=tags)
    click.echo(f"created {t!r}")


@click.command()
@click.argument("store")
@click.argument("table")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("vectors", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--key-column", default="key", show_default=True, help="Parquet: column holding keys.")
@click.option("--vector-column", default="vector", show_default=True, help="Parquet: list column of vectors.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Stored dtype of a new table (default: the data's float type, else float32); int8 and "
              "bfloat16 quantize the data.")
@click.option("--tags/--no-tags", default=None,
              help="Whether a new table's rows keep a tag word (default: if the source has tags).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def load(store: str, table: str, source: str, vectors: str | None, key_column: str, vector_column: str,
         dtype: DTypeName | None, tags: bool | None, quiet: bool) -> None:
    """Build a new version of TABLE from files and publish it atomically.

    \b
    SOURCE VECTORS   two .npy files: keys [N] (integers or strings) and vectors [N, dim]
    SOURCE.npz       arrays named 'keys' and 'vectors' (what `embkv export` writes, with the
                     stored dtype and any row tags, which a new table then takes by default)
    SOURCE.parquet   a keys column and a list column of vectors (needs pyarrow)

    Open readers switch to the new version on their next lookup.
    """
    from tqdm import tqdm

    keys: Any = source
    vecs: Any = vectors
    row_tags: Any = None  # what `embkv export` wrote of a tagged table
    exported_dtype: str | None = None
    if source.endswith(".npz"):
        with np.load(source, allow_pickle=False) as npz:
            keys, vecs = npz["keys"], npz["vectors"]
            exported_dtype = str(npz["stored_dtype"]) if "stored_dtype" in npz.files else None
            row_tags = npz["tags"] if "tags" in npz.files else None
    elif source.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        if "tag" in pq.read_schema(source).names:
            row_tags = pq.read_table(source, columns=["tag"]).column("tag").to_numpy()
    elif vectors is None:
        raise click.UsageError("give a VECTORS .npy file, or a .npz / .parquet SOURCE")
    target = embkv.open(store)
    if table in target:  # an existing table keeps its own form; untagged, it has nowhere to keep tags
        tagged = target[table].tagged
    else:  # a new one takes the exported form unless told otherwise
        dtype = dtype or cast(DTypeName | None, exported_dtype)
        tagged = row_tags is not None if tags is None else tags
    if not tagged:
        row_tags = None
    total = None
    if vecs is not None:
        total = len(np.load(vecs, mmap_mode="r")) if isinstance(vecs, str) else len(vecs)
    with tqdm(total=total, unit="rows", unit_scale=True, disable=quiet, desc=f"loading {table}") as bar:
        t = target.load_table(table, keys, vecs, key_column=key_column, vector_column=vector_column,
                              tags=tags if table in target else tagged, row_tags=row_tags, dtype=dtype,
                              progress=bar.update)
    click.echo(f"published {t!r}")


@click.command()
@click.argument("store")
@click.argument("table", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(store: str, table: str | None, as_json: bool) -> None:
    """Describe STORE's tables, or one TABLE in detail."""
    s = embkv.open(store, readonly=True)
    names = [table] if table else s.list_tables()
    infos = [s[name].info() for name in names]
    if as_json:
        click.echo(json.dumps(infos if table is None else infos[0], indent=2))
        return
    if not infos:
        click.echo(f"{store}: no tables")
    for i in infos:
        per_row = i["bytes_per_row"]
        # a few rows share the fixed pages of the file: bytes per row say something from about 1,000 on
        size = (f"{per_row['total']:g} bytes/row ({per_row['vector']:g} vector + {per_row['overhead']:g})"
                if i["rows"] >= 1000 else f"{i['file_bytes']:,} bytes")
        click.echo(f"{i['name']}: {i['rows']:,} rows x {i['dim']} {i['dtype']}, {i['key_type']} keys"
                   f"{', tagged' if i['tagged'] else ''}, {size}")
        if table:
            for k, v in i.items():
                if k == "bytes_per_row":
                    v = ", ".join(f"{part} {n:g}" for part, n in v.items())
                click.echo(f"  {k:<16}{v}")


@click.command(context_settings={"ignore_unknown_options": True})  # negative int keys are not options
@click.argument("store")
@click.argument("table")
@click.argument("keys", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print {key: vector or null} as JSON.")
def get(store: str, table: str, keys: tuple[str, ...], as_json: bool) -> None:
    """Print the vectors of KEYS in TABLE (integers for int64 tables)."""
    t = embkv.open(store, readonly=True)[table]
    lookup: Any = list(keys)
    if t.key_type == "int64":
        try:
            lookup = np.array([int(k) for k in keys], dtype=np.int64)
        except ValueError:
            raise click.BadParameter("this table has int64 keys", param_hint="KEYS") from None
    vectors, found = t.get(lookup)
    if as_json:
        click.echo(json.dumps({k: (v.tolist() if f else None) for k, v, f in zip(keys, vectors, found, strict=True)}))
        return
    with np.printoptions(precision=4, suppress=True, linewidth=120, threshold=20):
        for k, v, f in zip(keys, vectors, found, strict=True):
            click.echo(f"{k}: {v}" if f else f"{k}: (missing)")
    if not found.all():
        sys.exit(2)


@click.command()
@click.argument("store")
@click.argument("table")
@click.argument("out", type=click.Path(dir_okay=False))
def export(store: str, table: str, out: str) -> None:
    """Write TABLE's keys and vectors to OUT (.npz, or .parquet with pyarrow).

    A tagged table's row tags go along (an .npz array `tags`, a Parquet column `tag`), and an
    .npz also records the stored dtype: `embkv load` gives a new table the same form.
    """
    t = embkv.open(store, readonly=True)[table]
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise click.BadParameter(f"folder {folder} does not exist", param_hint="OUT")
    keys, vectors, tags = t.export_tagged()
    tmp = out + ".partial"
    if out.endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = pa.array(vectors.reshape(-1))
        col = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        columns = {"key": pa.array(keys), "vector": col}
        if t.tagged:
            columns["tag"] = pa.array(tags)
        pq.write_table(pa.table(columns), tmp)
    else:
        if not out.endswith(".npz"):
            raise click.BadParameter("OUT must end in .npz or .parquet", param_hint="OUT")
        with open(tmp, "wb") as f:  # with how the table stored them, so `embkv load` makes it alike
            stored = np.array(t.stored_dtype)
            if t.tagged:  # compute on miss keeps each vector's model version and fill time there
                np.savez(f, keys=np.asarray(keys), vectors=vectors, tags=tags, stored_dtype=stored)
            else:
                np.savez(f, keys=np.asarray(keys), vectors=vectors, stored_dtype=stored)
    os.replace(tmp, out)
    click.echo(f"wrote {len(vectors):,} rows to {out}")


@click.command()
@click.argument("store")
@click.argument("table")
@click.argument("dest")
@click.option("--as", "dest_name", default=None, help="Name in DEST (default: TABLE).")
def copy(store: str, table: str, dest: str, dest_name: str | None) -> None:
    """Copy TABLE into the store DEST: snapshot /dev/shm to disk, or restore disk to /dev/shm.

    Readers on both sides keep reading; readers of DEST switch to the copy on their next call.
    """
    t = embkv.open(store).copy_table(table, dest, dest_name)
    click.echo(f"copied to {t.path}: {t!r}")


@click.command()
@click.argument("store", type=click.Path(exists=True))
@click.argument("table", required=False)
def check(store: str, table: str | None) -> None:
    """Verify tables: header, index, row checksums, free rows, counters.

    STORE may be a store folder (all tables, or TABLE) or one .ekv file. Exits 1 if any
    problem is found, and names it.
    """
    from embkv.file.check import check_table, table_paths

    failed = False
    paths = table_paths(store, table)
    if not paths:
        click.echo(f"{store}: no tables")
    for path in paths:
        report = check_table(path)
        click.echo(str(report))
        failed |= not report.ok
    if failed:
        sys.exit(1)


@click.command()
@click.argument("store")
@click.argument("table")
@click.option("--yes", is_flag=True, help="Do not ask before dropping damaged rows.")
def repair(store: str, table: str, yes: bool) -> None:
    """Rebuild TABLE from its intact rows, dropping damaged ones, and publish it.

    A table whose header is damaged cannot be repaired: restore it from a snapshot.
    """
    from embkv.file.check import check_table, repair_table

    s = embkv.open(store)
    before = check_table(s[table].path)
    click.echo(str(before))
    if before.ok:
        return
    if not yes:
        click.confirm(f"drop {len(before.damaged_rows)} damaged row(s) and rebuild?", abort=True)
    result = repair_table(s[table])
    click.echo(f"rebuilt: kept {result['kept']:,} rows, dropped {result['dropped']:,}")
    click.echo(str(check_table(s[table].path)))


@click.command()
@click.argument("store")
@click.argument("table")
@click.confirmation_option(prompt="Delete the table and its data?")
def drop(store: str, table: str) -> None:
    """Delete TABLE from STORE."""
    embkv.open(store).drop_table(table)
    click.echo(f"dropped {table}")


@click.command()
@click.argument("store")
@click.argument("table", required=False)
def upgrade(store: str, table: str | None) -> None:
    """Rewrite STORE's tables (or TABLE) written by embkv 0.2 in the current file format.

    This embkv reads only the current format; a table in an older one says to run this.
    Each table is copied into a new version and published atomically: every key keeps its
    vector and tag, and embkv 0.2 readers still mapping the old file let it go. Tables
    already current are left as they are.
    """
    s = embkv.open(store)
    names = [table] if table else s.list_tables()
    failed = 0
    for name in names:
        try:
            upgraded = s.upgrade_table(name)
        except (embkv.FormatVersionError, embkv.StorageError) as exc:  # embkv 0.1's files; a dead 0.2 writer
            click.echo(f"{name}: not upgraded: {exc}", err=True)
            failed += 1
            continue
        version = s[name].info()["format_version"]
        click.echo(f"{name}: upgraded to format version {version}" if upgraded
                   else f"{name}: already format version {version}")
    if failed:
        raise click.ClickException(f"{failed} table(s) could not be upgraded")


COMMANDS = [create, load, info, get, export, copy, check, repair, drop, upgrade]
