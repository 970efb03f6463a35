"""The `synfer` command: demo data, the demo run of the whole graph, lineage.

    synfer demo-data            write the built-in toy-face datasets where the profile expects them
    synfer demo                 demo data + materialize every asset of the graph into the local instance
    synfer export OUT           the voted synthetic set of a round (default: the newest) as an ImageFolder tree and
                                WebDataset shards with provenance; --with-real adds the real labelled faces
    synfer lineage ASSET        which exact upstream materializations fed the latest (or --run-id) materialization
    synfer retention --keep N   delete all but the N newest published versions of every asset partition (and what
                                they were built from stays), plus old work-in-progress leftovers
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_dagster_home() -> Path:
    """`DAGSTER_HOME` (default `.synfer/dagster_home`) with the repository's dagster.yaml in it."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(os.environ.get("SYNFER_HOME", ".synfer")).resolve() / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def cmd_demo_data(args: argparse.Namespace) -> int:
    from synfer_pipeline.config import load_profile
    from synfer_pipeline.demo.data import ensure_demo_data

    profile = load_profile(args.profile)
    if profile.demo_data is None:
        raise SystemExit(f"profile {profile.path} has no demo_data section: it uses no built-in data")
    for name, path in ensure_demo_data(profile.demo_data, force=args.force, log=print,
                                       progress=_bar("base model autoencoder")).items():
        print(f"demo data {name}: {path}")
    return 0


def _bar(desc: str):
    """A tqdm bar for `progress(step, total, loss)` callbacks (off when SYNFER_PROGRESS=0)."""
    from tqdm.auto import tqdm

    state = {}

    def progress(step: int, total: int, loss: float) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="step", leave=False,
                                disable=os.environ.get("SYNFER_PROGRESS", "1") == "0")
        state["bar"].update(step - state["bar"].n)
        state["bar"].set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step >= total:
            state.pop("bar").close()
    return progress


def ablation_rows(instance) -> list[tuple[str, dict]]:
    """The generation-quality rows (base, stage 1, stage 2, adapter) of the latest generator materializations."""
    from dagster import AssetKey

    rows = []
    for asset in ("diffusion_stage1", "diffusion_stage2", "au_adapter"):
        event = instance.get_latest_materialization_event(AssetKey(asset))
        if event is not None and "quality_rows" in event.asset_materialization.metadata:
            rows += list(event.asset_materialization.metadata["quality_rows"].value.items())
    return rows


def guidance_line(instance) -> str | None:
    """The newest round's ablation line: the judge's FER acc without and with guidance on the same seeds."""
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey("synthetic_quality"))
    if event is None:
        return None
    meta = event.asset_materialization.metadata
    off, on = meta["fer_acc_unguided"].value, meta["fer_acc_guided"].value
    verb = "raises" if on > off else "lowers" if on < off else "leaves"
    return (f"round {event.asset_materialization.partition}: FER acc {off:.1%} without guidance, {on:.1%} with: guidance {verb} the "
            f"judge's FER acc by {abs(on - off) * 100:.1f} points (AU acc {meta['au_acc_unguided'].value:.1%} -> "
            f"{meta['au_acc_guided'].value:.1%})")


def evaluation_table(instance) -> str | None:
    """The newest round's downstream evaluation as terminal text (see `fer_evaluation`)."""
    from dagster import AssetKey

    from synfer_pipeline.evaluation.downstream import format_table

    event = instance.get_latest_materialization_event(AssetKey("fer_evaluation"))
    if event is None:
        return None
    meta = event.asset_materialization.metadata
    return (f"downstream evaluation of round {event.asset_materialization.partition} (one recipe per training set, "
            f"tested on the real test split):\n" + format_table(meta["training_rows"].value, meta["n_test"].value))


def latest_ref(instance, asset: str, partition: str | None = None):
    """The ArtifactRef of an asset partition's latest materialization."""
    from dagster import AssetKey, AssetRecordsFilter

    from resources.io_manager import REF_KEY
    from synfer_pipeline.io.storage import ArtifactRef

    records = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1).records
    if not records:
        raise LookupError(f"{asset}{f'[{partition}]' if partition else ''} has not been materialized in this instance")
    return ArtifactRef(**records[0].asset_materialization.metadata[REF_KEY].value)


def format_ablation(rows: list[tuple[str, dict]]) -> str:
    def pct(v):
        return "   -" if v is None else f"{v:6.1%}"
    lines = [f"{'model':<10} {'FER acc':>8} {'AU acc':>8}"]
    lines += [f"{name:<10} {pct(row.get('fer_acc')):>8} {pct(row.get('au_acc')):>8}" for name, row in rows]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    ensure_dagster_home()
    if args.profile:
        os.environ["SYNFER_PROFILE"] = args.profile
    cmd_demo_data(argparse.Namespace(profile=args.profile, force=False))

    from dagster import DagsterInstance
    from diffusers.utils import logging as diffusers_logging

    from assets.definitions import defs
    from assets.orchestration import materialize_all

    diffusers_logging.disable_progress_bar()  # the terminal gets one line per run; the UI has the details

    started = time.time()
    with DagsterInstance.get() as instance:
        results = materialize_all(defs, instance, log=print)
        rows, guided, evaluation = ablation_rows(instance), guidance_line(instance), evaluation_table(instance)
    failed = [name for name, ok in results if not ok]
    if rows:
        print("\ngeneration quality on the fixed evaluation batch (FER acc: the judge; AU acc: the AU detector):")
        print(format_ablation(rows))
    if guided:
        print(guided)
    if evaluation:
        print("\n" + evaluation)
    print(f"\nmaterialized {len(results)} run(s) in {time.time() - started:.0f} s; instance: {os.environ['DAGSTER_HOME']}")
    from synfer_pipeline.config import load_profile

    print(f"artifacts under: {load_profile().storage_root}")
    print("open the UI with `make ui` (http://127.0.0.1:3000) to inspect metadata, checks and lineage;")
    print("`synfer lineage au_adapter` prints which FEText, captions and runs fed the checkpoints")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The voted synthetic set of one round, read from the latest materializations in the instance."""
    ensure_dagster_home()
    import pandas as pd
    from dagster import AssetKey, DagsterInstance

    from assets.fer import labelled_faces
    from assets.labels import LABELS, read_synthetic
    from assets.synthesis import round_shard_partitions
    from synfer_pipeline.config import load_profile
    from synfer_pipeline.evaluation.export import export_voted
    from synfer_pipeline.io.datasets import read_table
    from synfer_pipeline.io.storage import Storage

    profile = load_profile(args.profile)
    store = Storage(profile.storage_root)
    with DagsterInstance.get() as instance:
        voted_keys = instance.get_materialized_partitions(AssetKey("voted_labels"))
        rounds = sorted({k.split("|")[0] for k in voted_keys})
        if not rounds and not args.round:
            print("synfer export: no round has voted labels yet; run the graph through voted_labels first",
                  file=sys.stderr)
            return 1
        round_key = args.round or rounds[-1]
        shard_keys = [str(k) for k in round_shard_partitions.get_partition_keys()
                      if k.keys_by_dimension["round"] == round_key]
        try:
            voted = pd.concat([read_table(store, latest_ref(instance, "voted_labels", k), LABELS) for k in shard_keys],
                              ignore_index=True)
            shard_refs = [latest_ref(instance, "synthetic_shards", k) for k in shard_keys]
            real = None
            if args.with_real:
                refs = {d: latest_ref(instance, "superres_faces", d) for d in profile.fer_classifiers.train_on}
                real = {split: (f.images, f.labels, f.keys)
                        for split, f in labelled_faces(store, refs, profile.fer_classifiers.train_on).items()}
        except LookupError as e:
            print(f"synfer export: {e}; run the graph through voted_labels for round {round_key} first", file=sys.stderr)
            return 1

    def samples():
        for ref in shard_refs:
            for key, members, _ in read_synthetic(store, ref):
                yield key, members, {"artifact": ref.uri, "data_version": ref.data_version, "partition": ref.partition}

    manifest = export_voted(samples(), voted, args.out, formats=args.format, real=real)
    print(f"exported round {round_key}: {manifest['synthetic']} synthetic images"
          + (f" and {sum(manifest['real'].values())} real faces" if real else "") + f" to {args.out}")
    for fmt, splits in manifest["counts"].items():
        for split, counts in splits.items():
            print(f"  {fmt}/{split}: " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    ensure_dagster_home()
    import json
    from dataclasses import asdict

    from dagster import DagsterInstance

    from assets.lineage import format_lineage, lineage

    with DagsterInstance.get() as instance:
        try:
            node = lineage(instance, args.asset, args.partition, args.run_id)
        except LookupError as e:
            print(e, file=sys.stderr)
            return 1
    print(json.dumps(asdict(node), indent=2, default=str) if args.json else format_lineage(node))
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    """Reruns never delete; this does. It keeps the latest materialization Dagster records for every partition,
    the newest `--keep` versions, everything those were built from, and work in progress a live run holds."""
    ensure_dagster_home()
    from dagster import DagsterInstance

    from assets.lineage import latest_uris, materialization_order
    from synfer_pipeline.config import load_profile
    from synfer_pipeline.io.retention import apply, retention_plan
    from synfer_pipeline.io.storage import Storage

    storage = Storage(load_profile(args.profile).storage_root)
    with DagsterInstance.get() as instance:
        protect, order = latest_uris(instance), materialization_order(instance)
    plan = retention_plan(storage, args.keep, protect, order, leftover_age_s=args.leftovers_older_than * 3600)
    verb = "would delete" if args.dry_run else "deleting"
    for uri in plan.versions:
        print(f"{verb} version {uri}")
    for uri in plan.leftovers:
        print(f"{verb} leftover {uri}")
    for uri in plan.kept_for_lineage:
        print(f"keeping {uri} (a kept version was built from it)")
    if not args.dry_run:
        apply(storage, plan)
    print(f"{len(plan.versions)} version folder(s) and {len(plan.leftovers)} leftover(s) "
          f"{'to delete' if args.dry_run else 'deleted'}; {len(protect)} latest kept")
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module="dagster")
    warnings.filterwarnings("ignore", message=".*is currently in (beta|preview).*")
    parser = argparse.ArgumentParser(prog="synfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-data", help="write the built-in toy-face datasets")
    p.add_argument("--profile", default=None)
    p.add_argument("--force", action="store_true", help="write again even if present")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("demo", help="demo data + materialize the whole graph")
    p.add_argument("--profile", default=None)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("export", help="the voted synthetic set of a round as ImageFolder + WebDataset, with provenance")
    p.add_argument("out", help="a new folder (refused if it exists and is not empty)")
    p.add_argument("--round", default=None, help="the round's partition key (default: the newest)")
    p.add_argument("--format", nargs="+", default=["imagefolder", "webdataset"], choices=["imagefolder", "webdataset"])
    p.add_argument("--with-real", action="store_true", help="add the real labelled faces (train, and test as test/)")
    p.add_argument("--profile", default=None)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("lineage", help="the upstream chain of a materialization (reads $DAGSTER_HOME, default .synfer/dagster_home)")
    p.add_argument("asset")
    p.add_argument("--partition", default=None)
    p.add_argument("--run-id", default=None, help="the materialization made by this run (default: the latest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lineage)
    p = sub.add_parser("retention", help="delete old published versions (never the latest materialization)")
    p.add_argument("--keep", type=int, required=True)
    p.add_argument("--leftovers-older-than", type=float, default=168.0, metavar="HOURS",
                   help="also remove _staging/_work/_cache/_leases leftovers unchanged this long (default 168 h)")
    p.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    p.add_argument("--profile", default=None)
    p.set_defaults(func=cmd_retention)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
