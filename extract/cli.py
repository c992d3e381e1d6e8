"""``hgkd-extract``: stage one of H-GKD (teacher tokens -> Zarr cache), plus verify/info/repair."""
from __future__ import annotations

import json
import logging
import sys

import click

from ..errors import user_errors
from ..registry import COMPRESSOR_NAMES, TEACHER_NAMES, TOKEN_CODEC_NAMES

# torch, timm and zarr are imported inside the commands, so that --help answers at once.


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """Run a frozen MIM teacher once over masked views and cache its tokens (H-GKD stage one)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--data", multiple=True, required=True, help="Tar shards (brace patterns, URLs) or an image folder.")
@click.option("--teacher", required=True, metavar="NAME", help=f"Registered teacher: {', '.join(TEACHER_NAMES)}.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Official release checkpoint (local file).")
@click.option("--out", required=True, help="Cache path or fsspec URL (Zarr v3 group).")
@click.option("--views-per-image", default=1, show_default=True)
@click.option("--mask-ratio", default=0.6, show_default=True)
@click.option("--mask-granularity", type=click.Choice(["16", "32"]), default="16", show_default=True)
@click.option("--teacher-view", type=click.Choice(["masked", "full"]), default="masked", show_default=True)
@click.option("--img-size", default=224, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of views and masks.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--codec", type=click.Choice(TOKEN_CODEC_NAMES), default="int8ct", show_default=True)
@click.option("--compressor", type=click.Choice(COMPRESSOR_NAMES), default="lz4", show_default=True)
@click.option("--clevel", default=5, show_default=True)
@click.option("--shard-views", default=256, show_default=True, help="Views per cache shard (one file per array).")
@click.option("--workers", default=2, show_default=True, help="Image decoding threads.")
@click.option("--rank", type=int, envvar="RANK", default=0, show_default=True,
              help="This process's shard set (shard % world-size); torchrun's RANK is used when set.")
@click.option("--world-size", type=int, envvar="WORLD_SIZE", default=1, show_default=True,
              help="Number of shard sets; torchrun's WORLD_SIZE is used when set.")
@click.option("--init-seed", default=0, show_default=True, help="Weights seed when no --checkpoint is given.")
@click.option("--no-progress", is_flag=True)
@user_errors
def run(**opts) -> None:
    """Extract teacher tokens into a cache; re-run the same command to resume."""
    from ..storage.codecs import CodecSpec
    from .run import ExtractConfig, run_extract
    from ..data.views import ViewConfig

    view = ViewConfig(
        img_size=opts["img_size"], mask_ratio=opts["mask_ratio"], mask_granularity=int(opts["mask_granularity"]),
        teacher_view=opts["teacher_view"], seed=opts["seed"], views_per_image=opts["views_per_image"],
    )
    cfg = ExtractConfig(
        data=list(opts["data"]), out=opts["out"], teacher=opts["teacher"], checkpoint=opts["checkpoint"], view=view,
        codec=CodecSpec(opts["codec"], opts["compressor"], opts["clevel"]), shard_views=opts["shard_views"],
        batch_size=opts["batch_size"], device=opts["device"], precision=opts["precision"], workers=opts["workers"],
        rank=opts["rank"], world_size=opts["world_size"], init_seed=opts["init_seed"], progress=not opts["no_progress"],
    )
    report = run_extract(cfg)
    if report.grown_from is not None:
        click.echo(f"{cfg.out}: grew from {report.grown_from} to {cfg.view.views_per_image} views per image "
                   f"(views {report.grown_from}-{cfg.view.views_per_image - 1} appended; earlier views kept)")
    state = "complete" if report.complete else "incomplete (other shards pending)"
    click.echo(f"{cfg.out}: wrote {report.views_written} views in {len(report.shards_written)} shards "
               f"({report.views_written / max(report.seconds, 1e-9):.1f} views/s); cache {state}")


@main.command()
@click.argument("cache")
@user_errors
def verify(cache: str) -> None:
    """Read every chunk; exit 1 on any hole, duplicate, corrupt or missing shard."""
    from ..storage.verify import verify_cache

    report = verify_cache(cache)
    for line in report.problems:
        click.echo(f"problem: {line}", err=True)
    if report.damaged:
        click.echo(f"fix: run 'hgkd-extract repair {cache}', then re-run the 'hgkd-extract run' command that made it "
                   f"(shards {', '.join(map(str, sorted(report.damaged)))} are extracted again)", err=True)
    if report.unchecked:
        click.echo(f"note: {', '.join(report.unchecked)} stored without crc32c (cache made before checksums on "
                   "every array): damage there cannot be detected", err=True)
    click.echo(f"{cache}: {report.shards_checked} shards checked, {report.views_ok} views ok, "
               f"{report.views_skipped} skipped, {len(report.problems)} problems")
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("cache")
@user_errors
def repair(cache: str) -> None:
    """Clear damaged shards (and lost array metadata) so the next 'run' re-extracts exactly them."""
    from .repair import repair_cache

    report = repair_cache(cache)
    if report.restored_arrays:
        click.echo(f"{cache}: re-created the metadata of {', '.join(report.restored_arrays)}")
    if report.busy:
        click.echo(f"{cache}: shards {', '.join(map(str, report.busy))} are being written by another process; "
                   "left alone", err=True)
    if report.cleared:
        click.echo(f"{cache}: cleared shards {', '.join(map(str, report.cleared))}; re-run the 'hgkd-extract run' "
                   "command that made the cache to extract them again")
    elif not report.changed:
        click.echo(f"{cache}: nothing to repair")


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the full metadata, plus the cost summary under 'cost', as JSON.")
@user_errors
def info(cache: str, as_json: bool) -> None:
    """Print the cache's metadata, growth history, teacher forwards spent and bytes per view."""
    from ..storage.cache import FeatureCache

    fc = FeatureCache.open(cache)
    cost = fc.cost_summary()
    if as_json:
        click.echo(json.dumps({**fc.meta.to_json(), "cost": cost}, indent=2))
        return
    st, t, v = fc.meta.storage, fc.meta.teacher, fc.meta.view
    click.echo(f"cache      {cache} ({fc.meta.status}; {cost['shards_done']}/{fc.num_shards} shards)")
    click.echo(f"teacher    {t['name']} sha256={t['checkpoint_sha256'] or 'random-init'} dim={t['embed_dim']} grid={t['grid']}")
    click.echo(f"views      {fc.view_rows()} ({fc.meta.dataset['num_samples']} samples x {v['views_per_image']}), "
               f"mask {v['mask_ratio']} @ {v['mask_granularity']}px, teacher_view={v['teacher_view']}, seed={v['seed']}")
    steps = [f"views {b.view_start}-{b.view_stop - 1} in rows {b.rows.start}-{b.rows.stop - 1}"
             + (f" (grown {b.added})" if b.added else "") for b in fc.blocks]
    click.echo(f"K history  {'; '.join(steps)}")
    click.echo(f"data       {fc.meta.dataset['kind']} {' '.join(fc.meta.dataset['spec'])} fingerprint={fc.meta.dataset['fingerprint'][:16]}")
    click.echo(f"storage    codec={st['codec']} compressor={st['compressor']}({st['clevel']}) shard_views={st['shard_views']}")
    unchecked = fc.unchecked_arrays()
    click.echo("checksums  crc32c on every array" if not unchecked else
               f"checksums  none on {', '.join(unchecked)} (made before checksums on every array): verify cannot "
               "detect damage there")
    click.echo(f"cost       {cost['teacher_forwards']} teacher forwards spent (views extracted), "
               f"{cost['bytes_stored'] / 2**20:.1f} MiB stored")
    if cost["bytes_per_view"]:
        click.echo(f"size       {cost['bytes_per_view'] / 1024:.1f} KiB per view stored")
    reasons = cost["skipped_samples"]
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    click.echo(f"skipped    {sum(reasons.values())} samples{': ' + detail if detail else ''}")


@main.command()
@click.option("--out", default="demo-out", show_default=True, help="Folder for the demo data and cache.")
@click.option("--teacher", default="cae_tiny_patch16", show_default=True, metavar="NAME",
              help=f"Registered teacher: {', '.join(TEACHER_NAMES)}.")
@user_errors
def demo(out: str, teacher: str) -> None:
    """Main job on the embedded default: pack scikit-image's photos, extract, verify, info.

    No weights can be downloaded here, so the teacher is a randomly initialised tiny
    model of the registered family (pass real checkpoints to `run` for real work).
    """
    from pathlib import Path

    from ..storage.verify import verify_cache
    from ..data.demo_data import write_demo_shards

    pattern = write_demo_shards(Path(out) / "data")
    cache = str(Path(out) / "cache.zarr")
    click.echo(f"demo data: {pattern}")
    ctx = click.get_current_context()
    ctx.invoke(run, data=(pattern,), teacher=teacher, checkpoint=None, out=cache, views_per_image=4, mask_ratio=0.6,
               mask_granularity="32", teacher_view="masked", img_size=224, seed=0, batch_size=16, device="auto",
               precision="auto", codec="int8ct", compressor="lz4", clevel=5, shard_views=32, workers=2, rank=0,
               world_size=1, init_seed=0, no_progress=False)
    report = verify_cache(cache)
    click.echo(f"verify: {report.shards_checked} shards, {report.views_ok} views ok, {len(report.problems)} problems")
    ctx.invoke(info, cache=cache, as_json=False)
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
