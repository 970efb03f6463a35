"""Load the released POSTER++ and APViT checkpoints safely, and what each one expects and answers.

Files as released:
  POSTER++ (Talented-Q/POSTER_V2 `main.py`): `torch.save({'epoch', 'state_dict', 'best_acc', 'optimizer',
      'recorder1', 'recorder'})`, the state_dict from `nn.DataParallel` (keys prefixed `module.`), `best_acc` a
      tensor, `recorder`/`recorder1` instances of `__main__.RecorderMeter`/`RecorderMeter1` holding numpy arrays.
  APViT (youqingxiaozhua/APViT, MMClassification): `{'meta': {...}, 'state_dict': {...}}` (published files may have
      no meta; meta, when there, holds mmcv/mmcls versions, the config as text, CLASSES, epoch, numpy scalars).

Safety: nothing in a file is executed. `torch.load(weights_only=True)` runs under an explicit allow-list
(`_allow_list`): numpy arrays, scalars and dtypes (inert data), `argparse.Namespace` (an attribute bag) and POSTER's
two recorder classes, which resolve to `_InertRecord`, a class with no behaviour, so their attributes arrive as plain
data and POSTER's training code is never needed. The unpickler stops at the first global outside the list, before it
is called or built; `UnsafeCheckpointError` then names the file and every such global as written in the file
(`posix.system`, `builtins.eval`, `subprocess.Popen`, ...), found by a static pickletools scan.

Class orders (each module answers in its checkpoint's order; map with `vocab.map_class_order`):
  POSTER++ trains on `torchvision.datasets.ImageFolder`, so the order is the sorted class-folder names. The repo does
  not publish its folders; the order below assumes folders named by each dataset's own label ids, as users
  reconstruct it (POSTER_V2 issue #25: RAF-DB `train/1 .. train/7`): RAF-DB `EmoLabel` ids 1..7 = surprise, fear,
  disgust, happiness, sadness, anger, neutral; AffectNet ids 0..7 = neutral, happy, sad, surprise, fear, disgust,
  anger, contempt (AffectNet-7 drops contempt). Unverified against the weights: check on a few labelled faces, or
  use `dataclasses.replace(POSTER_RAFDB, class_names=(...))`.
  APViT: `mmcls/datasets/raf.py` converts RAF-DB labels into its `FER_CLASSES` order (`convert_gt_label`,
  `CLASSES = FER_CLASSES[:7]`): anger, disgust, fear, sadness, happiness, surprise, neutral (and contempt 8th); the
  repo's demo.ipynb prints index 4 as 'Happiness'. A checkpoint whose meta has CLASSES is checked against it.

Test-time transforms: POSTER++ `Resize((224, 224))` (PIL bilinear), `ToTensor`, ImageNet mean/std. APViT
`Resize(112)` (cv2 bilinear, to 112x112), `Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
to_rgb)`, i.e. the ImageNet mean/std on a 0-255 scale. Both expect aligned face crops.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synfer_pipeline.fer.apvit import APVIT_INPUT_SIZE, APViT, build_apvit
from synfer_pipeline.fer.poster import POSTER_INPUT_SIZE, PosterV2, build_poster
from synfer_pipeline.vocab import canonical_expression

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

RAFDB_LABEL_ORDER: tuple[str, ...] = ("surprise", "fear", "disgust", "happy", "sad", "anger", "neutral")
AFFECTNET_LABEL_ORDER: tuple[str, ...] = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
APVIT_FER_CLASSES: tuple[str, ...] = ("anger", "disgust", "fear", "sad", "happy", "surprise", "neutral", "contempt")


@dataclass(frozen=True)
class ReleasedSpec:
    """What a released checkpoint expects and answers.

    input_size: side S of the (N, 3, S, S) input; mean/std: per-channel RGB normalisation on a 0-1 scale;
    class_names: the logits' column order (spellings `vocab.canonical_expression` accepts); antialias: whether the
    repo's resize low-pass filters when shrinking (PIL does, cv2 INTER_LINEAR does not).
    """

    name: str
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    antialias: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, 3, S, S) resized (bilinear) and normalised, differentiably."""
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=self.antialias)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


POSTER_RAFDB = ReleasedSpec("poster_rafdb", "poster", POSTER_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD,
                            RAFDB_LABEL_ORDER, antialias=True)
POSTER_AFFECTNET7 = ReleasedSpec("poster_affectnet7", "poster", POSTER_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD,
                                 AFFECTNET_LABEL_ORDER[:7], antialias=True)
POSTER_AFFECTNET8 = ReleasedSpec("poster_affectnet8", "poster", POSTER_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD,
                                 AFFECTNET_LABEL_ORDER, antialias=True)
APVIT_RAFDB = ReleasedSpec("apvit_rafdb", "apvit", APVIT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD,
                           APVIT_FER_CLASSES[:7], antialias=False)
RELEASED_SPECS: dict[str, ReleasedSpec] = {s.name: s for s in (POSTER_RAFDB, POSTER_AFFECTNET7, POSTER_AFFECTNET8,
                                                                APVIT_RAFDB)}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle names a global outside the allow-list; nothing in it was run."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model: missing, unexpected or wrongly shaped keys."""


class _InertRecord:
    """Stands in for a pickled training-log object (POSTER's RecorderMeter): its attributes only, no methods."""

    def __repr__(self) -> str:
        return f"_InertRecord({sorted(vars(self))})"


def _allow_list() -> list[tuple[object, str]]:
    """(object, pickled name) pairs `torch.load(weights_only=True)` may resolve, beyond torch's own tensor types."""
    reconstruct = np.ndarray((0,)).__reduce__()[0]  # numpy's array-rebuild function, wherever numpy keeps it
    scalar = np.float64(0).__reduce__()[0]
    pairs: list[tuple[object, str]] = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"),
                                       (argparse.Namespace, "argparse.Namespace")]
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x spell the module apart
        pairs += [(reconstruct, f"{core}._reconstruct"), (scalar, f"{core}.scalar")]
    # numpy >= 1.25 gives every dtype its own class; the unpickler must be allowed to set their state
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGOUSVMm"}
    pairs += [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in dtype_classes]
    for module in ("__main__", "main", "main_8"):  # POSTER's main.py / main_8.py, run as a script or imported
        pairs += [(_InertRecord, f"{module}.RecorderMeter"), (_InertRecord, f"{module}.RecorderMeter1")]
    return pairs


def _python3_name(module: str, name: str) -> str:
    """`module.name` as Python 3 reads it: protocol-2 pickles spell some in Python 2 (`__builtin__`, `commands`)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _globals_in_stream(stream, pickles: int) -> set[str]:
    """Globals named by the next `pickles` pickles of a binary stream, read with pickletools (nothing is built)."""
    found: set[str] = set()
    for _ in range(pickles):
        strings: list[str] = []
        for op, arg, _pos in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                found.add(_python3_name(*str(arg).split(" ", 1)))
            elif op.name == "STACK_GLOBAL":
                found.add(".".join(strings[-2:]) if len(strings) >= 2 else "<STACK_GLOBAL>")
            elif isinstance(arg, str):
                strings.append(arg)
    return found


def pickle_globals(path: str | Path) -> set[str]:
    """Every `module.name` a torch.save file's pickles refer to, as written in the file, found statically.

    Zip format: the object pickle `*/data.pkl`. Legacy format: its five leading pickles (magic number, protocol,
    system info, the object, storage keys); the raw storage bytes after them are not pickles.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return set().union(*(_globals_in_stream(io.BytesIO(archive.read(n)), 1) for n in members))
    with path.open("rb") as f:
        return _globals_in_stream(f, 5)


def _allowed_names() -> set[str]:
    names = {name for _, name in _allow_list()}
    try:  # torch's own tensor, storage and container names; private, so only used to word the error
        from torch._weights_only_unpickler import _get_allowed_globals
        names |= set(_get_allowed_globals())
    except ImportError:
        pass
    return names


def _refusal(path: Path, err: Exception) -> UnsafeCheckpointError:
    try:
        offending = sorted(pickle_globals(path) - _allowed_names())
    except Exception:  # a pickle too broken to scan: torch's own message is all there is
        offending = []
    named = ", ".join(offending) if offending else f"a global torch refused ({err})"
    return UnsafeCheckpointError(f"refused to load checkpoint {path}: its pickle names {named}, which is not on the "
                                 "allow-list of plain data types; nothing in the file was run")


def read_checkpoint(path: str | Path) -> object:
    """Unpickle a `torch.save` file without running code from it; tensors land on the CPU.

    Returns whatever was saved (typically a dict). Raises UnsafeCheckpointError (naming the file and the globals) if
    the pickle refers to anything outside the allow-list, FileNotFoundError if there is no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with torch.serialization.safe_globals(_allow_list()):
        try:
            # weights_only stops at the first global outside the allow-list, before it can be called or built
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refusal(path, err) from err


def _state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a loaded checkpoint, prefixes `module.` (DataParallel) stripped."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        raw = checkpoint["state_dict"]
    elif isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raw = checkpoint
    else:
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointMismatchError(f"checkpoint {path} holds no 'state_dict' of tensors (top level: {keys}); "
                                      "POSTER's model_best files written by its save_checkpoint hold the optimizer only")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected and wrongly shaped key; silent on a match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not match {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointMismatchError("\n".join(lines))


def _head_classes(state: Mapping[str, torch.Tensor], key: str, path: Path) -> int:
    if key not in state:
        raise CheckpointMismatchError(f"checkpoint {path}: no classifier weight {key!r}; is this the right model?")
    return int(state[key].shape[0])


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, device: str) -> nn.Module:
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _check_spec(spec: ReleasedSpec | None, architecture: str, num_classes: int, path: Path) -> None:
    if spec is None:
        return
    if spec.architecture != architecture:
        raise ValueError(f"spec {spec.name} is for {spec.architecture}, not {architecture}")
    if spec.num_classes != num_classes:
        raise CheckpointMismatchError(f"checkpoint {path} has {num_classes} classes; spec {spec.name} names "
                                      f"{spec.num_classes}: {spec.class_names}")


def load_poster_checkpoint(path: str | Path, num_classes: int | None = None, spec: ReleasedSpec | None = None,
                           device: str = "cpu") -> PosterV2:
    """POSTER++ with the weights of a released checkpoint, in eval mode on `device`.

    num_classes defaults to the checkpoint's head size; a given one (or a spec's) must agree with it. The class
    order is not in the file: pair the model with the `ReleasedSpec` of the dataset it was trained on.
    """
    path = Path(path)
    state = _state_dict(read_checkpoint(path), path)
    found = _head_classes(state, "VIT.head.linear.weight", path)
    if num_classes is not None and num_classes != found:
        raise CheckpointMismatchError(f"checkpoint {path} has {found} classes, {num_classes} were asked for")
    _check_spec(spec, "poster", found, path)
    return _load_into(build_poster(found), state, path, device)


def apvit_checkpoint_classes(checkpoint: object) -> tuple[str, ...] | None:
    """The class names an MMClassification checkpoint's meta records (meta['CLASSES']), or None without meta."""
    meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
    classes = meta.get("CLASSES") if isinstance(meta, Mapping) else None
    return tuple(str(c) for c in classes) if classes else None


def load_apvit_checkpoint(path: str | Path, num_classes: int | None = None, spec: ReleasedSpec | None = None,
                          device: str = "cpu") -> APViT:
    """APViT with the weights of an MMClassification checkpoint, in eval mode on `device`.

    num_classes defaults to the head size. With a spec, its class order must agree with the meta's CLASSES where the
    file has them (a mismatch is an error rather than silently permuted votes).
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    state = _state_dict(checkpoint, path)
    found = _head_classes(state, "head.fc.weight", path)
    if num_classes is not None and num_classes != found:
        raise CheckpointMismatchError(f"checkpoint {path} has {found} classes, {num_classes} were asked for")
    _check_spec(spec, "apvit", found, path)
    recorded = apvit_checkpoint_classes(checkpoint)
    if spec is not None and recorded is not None:
        if [canonical_expression(c) for c in recorded] != [canonical_expression(c) for c in spec.class_names]:
            raise CheckpointMismatchError(f"checkpoint {path} records classes {list(recorded)}, spec {spec.name} "
                                          f"says {list(spec.class_names)}")
    return _load_into(build_apvit(found), state, path, device)
