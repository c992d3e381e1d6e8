"""``hgkd-extract``: stage one of H-GKD (teacher tokens -> Zarr cache), plus verify/info/repair."""
from __future__ import annotations

import json
import logging
import sys
from functools import partial

import click

from ..config import default_of
from ..data.view_config import DECODERS, GRANULARITIES, TEACHER_VIEWS, ViewConfig
from ..errors import user_errors
from ..registry import TEACHER_NAMES
from ..storage.codecs import COMPRESSORS, TOKEN_CODECS, CodecSpec
from .config import PRECISIONS, ExtractConfig

# torch, timm and zarr are imported inside the commands, so that --help answers at once. Option
# defaults are read from the (torch-free) config dataclasses: one home per default (issue 14).
RUN, VIEW, CODEC = partial(default_of, ExtractConfig), partial(default_of, ViewConfig), partial(default_of, CodecSpec)


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
@click.option("--views-per-image", default=VIEW("views_per_image"), show_default=True)
@click.option("--mask-ratio", default=VIEW("mask_ratio"), show_default=True)
@click.option("--mask-granularity", type=click.Choice([str(g) for g in GRANULARITIES]),
              default=str(VIEW("mask_granularity")), show_default=True)
@click.option("--teacher-view", type=click.Choice(TEACHER_VIEWS), default=VIEW("teacher_view"), show_default=True)
@click.option("--img-size", default=VIEW("img_size"), show_default=True)
@click.option("--seed", default=VIEW("seed"), show_default=True, help="Seed of views and masks.")
@click.option("--decoder", type=click.Choice(DECODERS), default=VIEW("decoder"), show_default=True,
              help="What makes the teacher's pixels: pil (libjpeg-turbo on the CPU, any machine reproduces them) or "
                   "nvjpeg (batched on the GPU; stage two then needs a GPU too). Recorded in the cache.")
@click.option("--batch-size", default=RUN("batch_size"), show_default=True)
@click.option("--device", default=RUN("device"), show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=RUN("precision"), show_default=True)
@click.option("--codec", type=click.Choice(TOKEN_CODECS), default=CODEC("codec"), show_default=True)
@click.option("--compressor", type=click.Choice(COMPRESSORS), default=CODEC("compressor"), show_default=True)
@click.option("--clevel", default=CODEC("clevel"), show_default=True)
@click.option("--shard-views", default=RUN("shard_views"), show_default=True,
              help="Views per cache shard (one file per array).")
@click.option("--workers", default=RUN("workers"), show_default=True,
              help="Processes reading images (and, with --decoder pil, decoding them and rendering views); 0: "
                   "in the extraction process.")
@click.option("--rank", type=int, envvar="RANK", default=RUN("rank"), show_default=True,
              help="This process's shard set (shard % world-size); torchrun's RANK is used when set.")
@click.option("--world-size", type=int, envvar="WORLD_SIZE", default=RUN("world_size"), show_default=True,
              help="Number of shard sets; torchrun's WORLD_SIZE is used when set.")
@click.option("--init-seed", default=RUN("init_seed"), show_default=True, help="Weights seed when no --checkpoint is given.")
@click.option("--no-progress", is_flag=True)
@user_errors
def run(**opts) -> None:
    """Extract teacher tokens into a cache; re-run the same command to resume."""
    from .run import run_extract

    view = ViewConfig(
        img_size=opts["img_size"], mask_ratio=opts["mask_ratio"], mask_granularity=int(opts["mask_granularity"]),
        teacher_view=opts["teacher_view"], seed=opts["seed"], views_per_image=opts["views_per_image"],
        decoder=opts["decoder"],
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
    from ..storage.fingerprint import read_fingerprint

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
    fingerprint = read_fingerprint(fc)
    click.echo(f"pixels     decoder={v.get('decoder', 'pil')}; "
               + (f"fingerprint of rows {', '.join(map(str, fingerprint[0]))} (stage two checks them)" if fingerprint
                  else "no fingerprint (made before issue 20): stage two cannot check its pixels"))
    steps = [f"views {b.view_start}-{b.view_stop - 1} in rows {b.rows.start}-{b.rows.stop - 1}"
             + (f" (grown {b.added})" if b.added else "") for b in fc.blocks]
    click.echo(f"K history  {'; '.join(steps)}")
    click.echo(f"data       {fc.meta.dataset['kind']} {' '.join(fc.meta.dataset['spec'])} fingerprint={fc.meta.dataset['fingerprint'][:16]}")
    click.echo(f"storage    codec={st['codec']} compressor={st['compressor']}({st['clevel']}) shard_views={st['shard_views']}")
    unchecked = fc.unchecked_arrays()
    click.echo("checksums  crc32c on every array" if not unchecked else
               f"checksums  none on {', '.join(unchecked)} (made before checksums on every array): verify cannot "
               "detect damage there")
    seconds = cost["extraction_seconds"]
    click.echo(f"cost       {cost['teacher_forwards']} teacher forwards spent (views extracted), "
               f"{cost['bytes_stored'] / 2**20:.1f} MiB stored, "
               + (f"{seconds:.1f} s of extraction" if seconds is not None else "extraction time not recorded"))
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
    # every option not given here takes its default (click's invoke fills them in)
    ctx.invoke(run, data=(pattern,), teacher=teacher, out=cache, views_per_image=4, mask_granularity="32",
               batch_size=16, shard_views=32)
    report = verify_cache(cache)
    click.echo(f"verify: {report.shards_checked} shards, {report.views_ok} views ok, {len(report.problems)} problems")
    ctx.invoke(info, cache=cache, as_json=False)
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
