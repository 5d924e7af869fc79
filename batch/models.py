"""Load model files (local or object storage), hash them, and read their model cards.

A model file is an ultralytics ``.pt`` checkpoint. Its *model card* says what
it is: the task, the class names, the microns per pixel (mpp) it was trained
at, its data sources and licences, its validation metrics and how to
reproduce it. The card lives in two places, and the loader reads the first
it finds:

1. a sidecar JSON next to the weights with the same stem
   (``detector.pt`` -> ``detector.json``), human-readable and shipped with
   the package;
2. the key ``CARD_KEY`` inside the checkpoint dict (``torch.save`` of a
   dict; ultralytics ignores keys it does not know), so a ``.pt`` copied on
   its own still knows its scale.

Remote weights (``s3://...`` or any fsspec URL) are copied into a local cache
directory (``HEMARAY_CACHE_DIR``, default ``~/.cache/hemaray/models``) keyed
by the URL, with their sidecar card when there is one. The object's ETag is
recorded next to the copy, and every `resolve_model` asks the store for it
again: a replaced object is fetched anew, a deleted one is an error (a run
never uses a stale copy of a URL that now names other bytes, or nothing).
Nothing is ever downloaded from the internet implicitly: a model is a file
the user names.

Model files are untrusted input: a ``.pt`` is a pickle, and a pickle can run
any code when loaded. Every checkpoint is first loaded with
``torch.load(weights_only=True)`` against ultralytics' allow-list of model
classes (`load_checkpoint`); one that names anything else is refused with an
`UntrustedModelError` before ultralytics unpickles it (`load_yolo`). An
optional SHA-256 pin per model (``detect.sha256``, ``classifiers[].sha256``)
refuses any other file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch.errors import ModelLoadError, UntrustedModelError
from batch.storage import redact_url, refuse_credentials

__all__ = [
    "CARD_KEY",
    "DEFAULT_DETECTOR",
    "INTENDED_USE",
    "MODELS_DIR",
    "ModelCard",
    "card_path_for",
    "file_sha256",
    "import_ultralytics",
    "load_checkpoint",
    "load_yolo",
    "logs_to_stderr",
    "model_cache_dir",
    "read_model_card",
    "render_card_markdown",
    "resolve_model",
    "shipped_or_path",
    "write_model_card",
]

#: Directory of the weights shipped inside the package.
MODELS_DIR = Path(__file__).resolve().parent / "models"
#: The default detector (YOLOv8n, RBC / WBC / platelet).
DEFAULT_DETECTOR = MODELS_DIR / "detector.pt"
#: Key under which the card is stored inside an ultralytics checkpoint dict.
CARD_KEY = "hemaray_card"
#: Environment variable naming the cache directory for remote model files.
CACHE_ENV = "HEMARAY_CACHE_DIR"
#: Stated on every card.
INTENDED_USE = "Research use only; not for clinical diagnosis."
#: Bytes read at a time when hashing or copying.
CHUNK_BYTES = 1 << 20
#: Characters of the URL hash used to name a cache entry.
CACHE_KEY_CHARS = 16
#: Suffix of the file next to a cached copy that records the remote object's version (ETag).
VERSION_SUFFIX = ".etag"

log = logging.getLogger(__name__)


@dataclass
class ModelCard:
    """What a model file is, how it was made and how well it does.

    Attributes
    ----------
    name
        Short name (``"detector"``).
    task
        ``"detect"`` or ``"classify"``.
    class_names
        Class names in the model's id order (normalised, e.g. ``"platelet"``).
    trained_mpp
        Microns per pixel of the training images; inputs are resampled to it.
        None: unknown, inputs are used as given.
    architecture
        The ultralytics model yaml or base weights it was built from.
    imgsz
        Training image size in pixels.
    data_sources
        One mapping per dataset: name, path, licence, images used per split.
    metrics
        Validation metrics, one mapping per evaluated set.
    training_command, reproduce_command
        The command that was run, and the one that reproduces it from a
        clean checkout.
    training_time_s
        Wall-clock training time in seconds.
    created
        ISO-8601 UTC time the card was written.
    intended_use
        Always states research use, not clinical diagnosis.
    notes
        Free-text caveats (known gaps, dataset flaws).
    extra
        Anything else (hyper-parameters, dedupe report, ...).
    """

    name: str
    task: str
    class_names: list[str]
    trained_mpp: float | None = None
    architecture: str = ""
    imgsz: int | None = None
    data_sources: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_command: str = ""
    reproduce_command: str = ""
    training_time_s: float | None = None
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    intended_use: str = INTENDED_USE
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The card as plain JSON-serialisable data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Build a card from ``to_dict`` output; unknown keys go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names}
        if "name" not in known or "task" not in known or "class_names" not in known:
            raise ModelLoadError(
                f"model card needs 'name', 'task' and 'class_names'; got keys {sorted(data)}"
            )
        card = cls(**known)
        card.extra.update(unknown)
        if card.trained_mpp is not None:
            card.trained_mpp = float(card.trained_mpp)
        return card


def model_cache_dir() -> Path:
    """Directory where remote model files are cached (``$HEMARAY_CACHE_DIR`` or ``~/.cache``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "hemaray" / "models"


def shipped_or_path(model: str) -> str:
    """A bare shipped model name (``wbc_type``) means ``batch/models/<name>.pt``; else ``model``."""
    if "/" not in model and "\\" not in model and not model.endswith((".pt", ".yaml")):
        return str(MODELS_DIR / f"{model}.pt")
    return model


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def card_path_for(weights: str | Path) -> Path:
    """The sidecar card path of a weights file: same stem, ``.json``."""
    return Path(weights).with_suffix(".json")


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _object_version(info: dict[str, Any]) -> str:
    """What identifies one version of a remote object: its ETag, else its size and time."""
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key])
    stamp = next((info[k] for k in ("LastModified", "mtime", "created") if info.get(k)), None)
    return f"size={info.get('size')};time={stamp}"


def _version_path(local: Path) -> Path:
    return local.with_name(local.name + VERSION_SUFFIX)


def _write_atomic(dest: Path, write: Any) -> None:
    """Make ``dest`` appear in one step with what ``write(fh)`` writes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(fs: Any, fs_path: str, dest: Path) -> None:
    def copy(out: Any) -> None:
        with fs.open(fs_path, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                out.write(chunk)

    _write_atomic(dest, copy)


def _fetch_remote(
    uri: str, local: Path, storage_options: dict[str, Any] | None, refresh: bool
) -> None:
    """Bring the cached copy ``local`` of ``uri`` up to date with the store (by ETag).

    The version is read before the bytes, so a copy is never recorded as newer
    than it is: an object replaced mid-download is fetched again next time.
    """
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache(fs_path)  # a listing cached in this process must not hide a new version
    try:
        info = fs.info(fs_path)
    except FileNotFoundError as e:
        raise ModelLoadError(f"model {redact_url(uri)!r} does not exist; check the URL") from e
    version = _object_version(info)
    recorded = _version_path(local)
    if (
        not refresh
        and local.is_file()
        and recorded.is_file()
        and recorded.read_text().strip() == version
    ):
        return
    if local.exists():
        log.info("model %s changed (or was never recorded); fetching it again", redact_url(uri))
    _download(fs, fs_path, local)
    folder, _, name = fs_path.rpartition("/")
    card_fs_path = f"{folder}/{Path(name).stem}.json"
    card = card_path_for(local)
    if card_fs_path != fs_path and fs.exists(card_fs_path):
        _download(fs, card_fs_path, card)
    elif card.exists():  # the store's card is gone: so must the stale copy be
        card.unlink()
    _write_atomic(recorded, lambda out: out.write(version.encode()))


def resolve_model(
    uri: str | Path | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    sha256: str | None = None,
    refresh: bool = False,
) -> Path:
    """Turn a model location into a local file path.

    Parameters
    ----------
    uri
        Local path, ``file://`` URL, or any fsspec URL (``s3://bucket/key.pt``).
        None: the shipped detector ``DEFAULT_DETECTOR``.
    storage_options
        fsspec options for remote URLs (e.g. ``{"client_kwargs":
        {"endpoint_url": ...}}``); credentials come from the environment.
    cache_dir
        Where remote files are cached; default ``model_cache_dir()``.
    sha256
        Expected SHA-256 hex digest; a mismatch raises `UntrustedModelError`.
    refresh
        Fetch a remote file again even if the cached copy is current.

    Returns
    -------
    Path
        A local file. A remote URL's cached copy is revalidated against the
        object's ETag on every call and fetched again when it changed; the
        sidecar card (same stem, ``.json``) comes along when it exists.

    Raises
    ------
    ConfigError
        If the URL carries credentials (``user:password@``).
    ModelLoadError
        If the file does not exist or cannot be fetched.
    UntrustedModelError
        If the file fails the hash check.
    """
    if uri is None:
        uri = DEFAULT_DETECTOR
    text = str(uri)
    refuse_credentials(text, "a model URL")
    if _is_remote(text):
        key = hashlib.sha256(text.encode()).hexdigest()[:CACHE_KEY_CHARS]
        name = text.rstrip("/").rsplit("/", 1)[-1]
        local = Path(cache_dir or model_cache_dir()) / key / name
        try:
            _fetch_remote(text, local, storage_options, refresh)
        except ModelLoadError:
            raise
        except Exception as e:  # fsspec raises many types; name the model and chain
            raise ModelLoadError(
                f"could not fetch model {text!r}: {e}; check the URL, the endpoint "
                "(storage.endpoint_url) and the credentials in the environment"
            ) from e
    else:
        local = Path(text[len("file://") :] if text.startswith("file://") else text).expanduser()
        if not local.is_file():
            hint = (
                " (the shipped detector is missing: reinstall the package or pass a model path)"
                if local == DEFAULT_DETECTOR
                else ""
            )
            raise ModelLoadError(f"model file {str(local)!r} does not exist{hint}")
    if sha256 is not None:
        actual = file_sha256(local)
        if actual.lower() != sha256.lower():
            where = (
                f"{text!r} (fetched to {str(local)!r})" if _is_remote(text) else repr(str(local))
            )
            raise UntrustedModelError(
                f"model file {where} has SHA-256 {actual}, expected {sha256.lower()}; it was not "
                "loaded. The file changed, or the pinned hash (detect.sha256 / "
                "classifiers[].sha256) is wrong: check the file's origin before updating the pin"
            )
    return local


#: Checkpoints that passed `load_checkpoint`, by (path, inode, size, mtime): not loaded twice.
_VERIFIED: set[tuple[str, int, int, int]] = set()


def _file_identity(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def _unpickling_refused(error: BaseException) -> bool:
    """True when ``error`` (or its causes) is the restricted unpickler refusing something."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_checkpoint(path: str | Path) -> Any:
    """Load an ultralytics ``.pt`` checkpoint with ``torch.load(weights_only=True)``.

    Only tensors, plain containers and the model classes on ultralytics'
    allow-list (``torch.nn`` and ultralytics layers, the classifiers'
    torchvision transforms) are rebuilt; a pickle that names anything else
    (``os.system``, a class of its own) is refused before any of it runs.

    Raises
    ------
    UntrustedModelError
        If the pickle names code outside the allow-list.
    ModelLoadError
        If the file is not a readable checkpoint, or the installed ultralytics
        cannot load checkpoints with ``weights_only=True``.
    """
    import torch

    import_ultralytics()
    from ultralytics.nn.tasks import torch_safe_load

    path = Path(path)
    if "safe_only" not in inspect.signature(torch_safe_load).parameters or not hasattr(
        torch.serialization, "get_unsafe_globals_in_checkpoint"
    ):
        raise ModelLoadError(
            f"cannot load {str(path)!r} safely: the installed ultralytics has no weights_only "
            "loading (torch_safe_load(safe_only=True)); upgrade ultralytics (8.4.190 has it)"
        )
    try:
        ckpt, _ = torch_safe_load(str(path), safe_only=True)
    except Exception as e:  # torch and ultralytics raise many types for bad files
        if _unpickling_refused(e):
            try:
                named = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
            except Exception:  # not a torch archive at all: a damaged or foreign file
                named = None
            if named is not None:
                detail = f"it names {', '.join(named)}" if named else f"{e}"
                raise UntrustedModelError(
                    f"model file {str(path)!r} was not loaded: its pickle names code outside the "
                    f"allow-list of model classes ({detail}), which a full load would run. Use a "
                    "checkpoint saved by ultralytics or hemaray's training jobs from a source "
                    "you trust"
                ) from e
        raise ModelLoadError(f"could not read checkpoint {str(path)!r}: {e}") from e
    _VERIFIED.add(_file_identity(path))
    return ckpt


def load_yolo(path: str | Path, *, task: str) -> Any:
    """An ultralytics ``YOLO`` model of ``path`` whose checkpoint passed `load_checkpoint` first.

    Ultralytics unpickles a ``.pt`` with ``weights_only=False``; a file the
    restricted load accepted names only allow-listed classes, so that load
    runs nothing else. Exported models (``.onnx``, OpenVINO folders) and model
    ``.yaml`` files are not pickles and load as they are. A checkpoint is
    checked once per process (by path, inode, size and mtime).
    """
    import_ultralytics()
    from ultralytics import YOLO

    _unbounded_nms()
    path = Path(path)
    if path.suffix == ".pt" and _file_identity(path) not in _VERIFIED:
        load_checkpoint(path)
    return YOLO(str(path), task=task)


def import_ultralytics() -> None:
    """Import ultralytics with its log lines on stderr, the first import's included.

    Its first import on a machine writes its settings file and says so
    ("Creating new Ultralytics Settings ...") on a handler it opens on
    ``sys.stdout`` at that moment: that line came before the one JSON object
    of a ``--json`` command. The import runs with stdout pointed at stderr,
    and the handler is then moved to stderr for good (`logs_to_stderr`).
    """
    if "ultralytics" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):
            import ultralytics  # noqa: F401
    logs_to_stderr("ultralytics")


def logs_to_stderr(logger: str) -> None:
    """Send a library's log lines to stderr, where hemaray's own go.

    Ultralytics and NNCF log to handlers on ``sys.stdout`` (e.g. "Loading ...
    for OpenVINO inference..." when an export loads), which would break the
    one JSON object that ``--json`` commands print on stdout.
    """
    for handler in logging.getLogger(logger).handlers:
        # Plain stream handlers only: a subclass is someone's capture (e.g. pytest's caplog).
        if type(handler) is logging.StreamHandler and handler.stream is not _STDERR:
            handler.setStream(_STDERR)


def _unbounded_nms() -> None:
    """Take away ultralytics' NMS time limit, in this process, once.

    Ultralytics' ``non_max_suppression`` stops after 2 s + 50 ms per image of
    a batch and returns every image it had not reached yet with no boxes (a
    warning is all it says). On a busy node that drops whole tiles' cells,
    and makes a slide's cells depend on the machine's load. Hemaray's
    batches are bounded (``detect.batch_size`` tiles, ``max_det`` boxes), so
    NMS runs to the end: ``max_time_img`` is made infinite.
    """
    from ultralytics.utils import nms

    original = nms.non_max_suppression
    if getattr(original, "_hemaray_unbounded", False):
        return

    at = list(inspect.signature(original).parameters).index("max_time_img")

    @functools.wraps(original)
    def unbounded(*args: Any, **kwargs: Any) -> Any:
        if len(args) > at:
            args = (*args[:at], math.inf, *args[at + 1 :])
        else:
            kwargs["max_time_img"] = math.inf
        return original(*args, **kwargs)

    unbounded._hemaray_unbounded = True  # type: ignore[attr-defined]
    nms.non_max_suppression = unbounded


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (it may be swapped after set-up)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _Stderr()


def read_model_card(weights: str | Path) -> ModelCard | None:
    """Read a local weights file's model card: sidecar JSON first, then the checkpoint key.

    Returns None when the file has neither (e.g. a plain ultralytics ``.pt``).
    """
    sidecar = card_path_for(weights)
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"model card {str(sidecar)!r} is not valid JSON: {e}") from e
        return ModelCard.from_dict(data)
    if Path(weights).suffix != ".pt":
        return None
    ckpt = load_checkpoint(weights)
    if isinstance(ckpt, dict) and isinstance(ckpt.get(CARD_KEY), dict):
        return ModelCard.from_dict(ckpt[CARD_KEY])
    return None


def render_card_markdown(card: ModelCard) -> str:
    """A human-readable model card (markdown) from a ``ModelCard``."""
    lines = [
        f"# Model card: {card.name}",
        "",
        f"**{card.intended_use}**",
        "",
        f"- Task: {card.task}",
        f"- Classes: {', '.join(card.class_names)}",
        f"- Architecture: {card.architecture or 'unknown'}",
        f"- Trained at: {card.trained_mpp} um/px"
        + (f", image size {card.imgsz} px" if card.imgsz else ""),
    ]
    if card.training_time_s is not None:
        lines.append(f"- Training time: {card.training_time_s / 60:.1f} min")
    lines.append(f"- Created: {card.created}")
    if card.data_sources:
        lines += ["", "## Data sources", ""]
        for src in card.data_sources:
            used = src.get("images", {})
            lines.append(
                f"- **{src.get('name', '?')}** ({src.get('url', '')}), licence: "
                f"{src.get('licence', 'unknown')}; images used: {used}"
            )
    if card.metrics:
        lines += ["", "## Validation metrics", ""]
        for set_name, m in card.metrics.items():
            if not isinstance(m, dict) or "map50" not in m:
                continue
            lines += [
                f"### {set_name} ({m.get('n_images', '?')} images, split {m.get('split', '?')})",
                "",
                "| class | precision | recall | F1 | AP50 | AP50-95 |",
                "| - | - | - | - | - | - |",
                f"| all | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                f"{m['map50']:.3f} | {m['map50_95']:.3f} |",
            ]
            for cls, c in m.get("per_class", {}).items():
                lines.append(
                    f"| {cls} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
                    f"{c['ap50']:.3f} | {c['ap50_95']:.3f} |"
                )
            lines.append("")
    if card.training_command:
        lines += ["", "## Training command", "", "```", card.training_command, "```"]
    if card.reproduce_command:
        lines += ["", "## Reproduce", "", "```", card.reproduce_command, "```"]
    if card.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card.notes]
    return "\n".join(lines) + "\n"


def write_model_card(
    card: ModelCard, weights: str | Path, *, embed: bool = True, markdown: bool = True
) -> Path:
    """Write the card next to the weights (JSON, optional markdown) and optionally into them.

    Parameters
    ----------
    card
        The card to write.
    weights
        The ``.pt`` file it describes.
    embed
        Also store the card under ``CARD_KEY`` inside the checkpoint.
    markdown
        Also write ``<stem>.md``.

    Returns
    -------
    Path
        The sidecar JSON path.
    """
    weights = Path(weights)
    data = card.to_dict()
    data["sha256"] = None  # filled below once the checkpoint bytes are final
    if embed:
        import torch

        ckpt = load_checkpoint(weights)
        if not isinstance(ckpt, dict):
            raise ModelLoadError(f"{str(weights)!r} is not a checkpoint dict; cannot embed a card")
        ckpt[CARD_KEY] = card.to_dict()
        tmp = weights.with_suffix(".pt.part")
        torch.save(ckpt, str(tmp))
        os.replace(tmp, weights)
    data["sha256"] = file_sha256(weights)
    sidecar = card_path_for(weights)
    sidecar.write_text(json.dumps(data, indent=2, default=str) + "\n")
    if markdown:
        md = render_card_markdown(card) + f"\nSHA-256 of `{weights.name}`: `{data['sha256']}`\n"
        weights.with_suffix(".md").write_text(md)
    return sidecar
