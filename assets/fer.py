"""fer_classifiers: the FER models as roles (guide, judge, voters), trained on the real labelled faces or loaded."""

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import NamedTuple

from dagster import AssetExecutionContext, AssetIn, DataVersion, MetadataValue, Output, asset

from assets.metadata import preview, ref_metadata
from assets.progress import Progress
from resources import ComputeResource, SettingsResource, StorageResource
from synfer_pipeline.config import FERANNO, Profile
from synfer_pipeline.fer.classifiers import TrainedFERSpec, load_fer_classifier
from synfer_pipeline.fer.role import FERClassifier, accuracy_and_confusion
from synfer_pipeline.fer.training import save_trained, train_fer_classifier
from synfer_pipeline.io.datasets import image_member, input_shards, open_image
from synfer_pipeline.io.preview import confusion_png
from synfer_pipeline.io.shards import iter_shard
from synfer_pipeline.io.storage import ArtifactRef, data_version_of, stage_key
from synfer_pipeline.io.versions import weights_version
from synfer_pipeline.settings import plain
from synfer_pipeline.vocab import EXPRESSIONS_7

FER_VERSION = "fer_classifiers-1"
REPORT = "classifiers.json"


class LabelledFaces(NamedTuple):
    images: list
    labels: list
    keys: list


def labelled_faces(store, superres_faces: dict[str, ArtifactRef], datasets) -> dict[str, LabelledFaces]:
    """{"train": LabelledFaces, "test": LabelledFaces} from the labelled datasets' super-resolved faces (keys as
    `{dataset}/{sample key}`); the test split is each dataset's `test` split (`val` where a dataset has no test
    split)."""
    splits: dict[str, dict[str, LabelledFaces]] = {}
    for name in datasets:
        for shard in input_shards(store, superres_faces[name], "faces"):
            for key, members in iter_shard(store, shard):
                meta = json.loads(members["json"])
                if meta.get("label"):
                    target = splits.setdefault(name, {}).setdefault(meta["split"], LabelledFaces([], [], []))
                    target.images.append(open_image(image_member(members)))
                    target.labels.append(meta["label"])
                    target.keys.append(f"{name}/{key}")
    out = {"train": LabelledFaces([], [], []), "test": LabelledFaces([], [], [])}
    for by_split in splits.values():
        for split, target in (("train", "train"), ("test" if "test" in by_split else "val", "test")):
            part = by_split.get(split, LabelledFaces([], [], []))
            for mine, theirs in zip(out[target], part):
                mine.extend(theirs)
    return out


def roles_of(profile: Profile, name: str) -> list[str]:
    section = profile.fer_classifiers
    return [role for role, who in (("guide", section.guide), ("judge", section.judge)) if who == name] + (
        ["voter"] if name in section.voters else [])


@asset(io_manager_key="artifact_io", code_version=FER_VERSION, group_name="fer", kinds={"pytorch"},
       ins={"superres_faces": AssetIn()}, op_tags={"synfer/gpu": "optional"})
def fer_classifiers(context: AssetExecutionContext, superres_faces: dict, storage: StorageResource,
                    settings: SettingsResource, compute: ComputeResource):
    """FER classifiers as roles: the guide of semantic guidance, the judge of generated images (never the guide)
    and the voters of label voting; the `train` kinds trained here on the real labelled faces, every one scored
    (accuracy, confusion matrix) on their real test split."""
    profile, store = settings.get(), storage.get()
    section = profile.fer_classifiers
    faces = labelled_faces(store, superres_faces, section.train_on)
    (train_x, train_y, _), (test_x, test_y, _) = faces["train"], faces["test"]
    if any(isinstance(s, TrainedFERSpec) for s in section.classifiers.values()) and not train_x:
        raise ValueError(f"fer_classifiers: no labelled training faces in {list(section.train_on)}")
    writer = store.artifact("fer_classifiers", "all", stage_key(
        FER_VERSION, {d: superres_faces[d].data_version for d in section.train_on}, plain(section)),
        owner=context.run_id, log=context.log.info)
    report, lines, confusions = {}, [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in section.classifiers.items():
            clf, trained = _classifier(context, name, spec, train_x, train_y, compute.device)
            accuracy, matrix = accuracy_and_confusion(clf, test_x, test_y)
            metrics = {"test_accuracy": accuracy, "n_test": len(test_y), **trained}
            if isinstance(spec, TrainedFERSpec):
                save_trained(clf, Path(tmp) / name, dataclasses.replace(spec.train, device="cpu"), metrics)
                fingerprint = "sha256:" + weights_version(Path(tmp) / name)
            else:
                fingerprint = clf.info.get("fingerprint", "")
            report[name] = {"kind": spec.kind, "roles": roles_of(profile, name), "test_accuracy": accuracy,
                            "confusion": matrix.tolist(), "fingerprint": fingerprint, "train_seconds": trained.get("seconds")}
            confusions[name] = confusion_png(matrix, EXPRESSIONS_7, f"{name}: {accuracy:.1%} on {len(test_y)} real test faces")
            lines.append(f"{name}:{fingerprint}:{','.join(report[name]['roles'])}")
            context.log.info(f"{name} ({spec.kind}): {accuracy:.1%} on the real test split ({len(test_y)} faces)")
        (Path(tmp) / REPORT).write_text(json.dumps({"classifiers": report, "n_train": len(train_y), "guide": section.guide,
                                                    "judge": section.judge, "voters": list(section.voters)}, indent=2))
        for name, png in confusions.items():
            (Path(tmp) / f"confusion_{name}.png").write_bytes(png)
        store.put_folder(tmp, writer.staging)
    ref = writer.publish(ArtifactRef("fer_classifiers", "all", writer.staging, data_version_of(sorted(lines)),
                                     {"classifiers": len(report), "test_faces": len(test_y)}, context.run_id,
                                     {f"superres_faces/{d}": superres_faces[d].summary() for d in section.train_on}))
    table = "| classifier | kind | roles | test accuracy |\n|---|---|---|---|\n" + "\n".join(
        f"| {n} | {r['kind']} | {', '.join(r['roles']) or '-'} | {r['test_accuracy']:.1%} |" for n, r in report.items())
    return Output(ref, data_version=DataVersion(ref.data_version), metadata={
        **ref_metadata(ref), "classifiers": MetadataValue.md(table),
        "guide": section.guide or "-", "judge": section.judge or "-", "voters": MetadataValue.json(list(section.voters)),
        **{f"confusion_{n}": preview(png, f"{n} confusion matrix") for n, png in confusions.items()},
    })


def _classifier(context, name, spec, train_x, train_y, device) -> tuple[FERClassifier, dict]:
    if not isinstance(spec, TrainedFERSpec):
        return load_fer_classifier(spec, name, device), {}
    bar = Progress(context, f"train {name}", spec.train.epochs, unit="epoch")
    clf, trained = train_fer_classifier(train_x, train_y, dataclasses.replace(spec.train, device=device), name,
                                        lambda epoch, epochs, loss: bar.update(epoch, loss=loss))
    bar.close()
    return clf, trained


def load_roles(profile: Profile, store, ref: ArtifactRef, device: str = "cpu") -> dict:
    """{"guide": FERClassifier | None, "judge": ..., "voters": {name: FERClassifier}} from the fer_classifiers
    artifact (trained kinds from its folders, the others from their specs); FERAnno is not among the voters here."""
    folder = store.local_folder(ref.uri)
    section = profile.fer_classifiers
    cache: dict[str, FERClassifier] = {}

    def get(name: str | None) -> FERClassifier | None:
        if name is None:
            return None
        if name not in cache:
            spec = section.classifiers[name]
            cache[name] = load_fer_classifier(spec, name, device, trained_folder=folder / name)
        return cache[name]

    return {"guide": get(section.guide), "judge": get(section.judge),
            "voters": {v: get(v) for v in section.voters if v != FERANNO}}
