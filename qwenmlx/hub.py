"""`qwenmlx pull`: a Hugging Face repo into an MLX model, streamed shard by shard; and the models directory.

A pull reads the repo's small files (config, tokenizer, index) and every shard's safetensors header first,
through huggingface_hub (so HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE all apply), and
plans the whole output from them as `convert` does. Then it writes the output shards in order; an input shard
is downloaded when the first output tensor needs it and deleted once no later one does. The output tensors
are ordered by the input shard they read (convert.in_source_order), so about two input shards are on disk at
a time: the peak disk is the output plus ~8 GB for Qwen3-30B-A3B, not 61 + 18 GB. Shards already in the
Hugging Face cache are read where they are and left there; downloaded ones never enter it.

Everything is written into `.DST.pulling` beside DST, renamed to DST when complete. When a pull stops (an
error, Ctrl-C), the output shards it finished stay there, and the same pull continues from them.

An MLX repo (mlx-community's: a `quantization` section or stacked experts) is downloaded as it is.
"""

import bisect
import fcntl
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from quantize import get_recipe
from quantize.recipes import DEFAULT_GROUP_SIZE

from .checkpoint import HUB_PATTERNS, safetensors_header, weight_files
from .config import read_config
from .convert import (
    MAX_SHARD_BYTES,
    OUTPUT_DTYPES,
    STORED_DTYPES,
    ConversionPlan,
    ConversionReport,
    StoredTensor,
    check_disk_space,
    is_complete_shard,
    kind_summaries,
    plan_conversion,
    write_files,
)
from .destinations import mark_written, move_into_place, prepare_directory
from .errors import QwenMLXError

DEFAULT_REPO = "Qwen/Qwen3-30B-A3B"
DEFAULT_RECIPE = "experts-4"
# The default's sizes (`qwenmlx convert --plan`), for the question a first `qwenmlx chat` asks.
DEFAULT_DOWNLOAD_GB, DEFAULT_OUTPUT_GB = 61, 18
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
SMALL_FILE_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]
MARKER = ".qwenmlx-pull.json"  # in each model dir a pull wrote (and its .pulling dir): what it is and whence
SOURCE_DIR = ".source"  # inside the .pulling dir: the input shards on disk at the moment


def models_dir() -> Path:
    """Where `pull` writes by default: $QWENMLX_HOME/models (default ~/.cache/qwenmlx/models)."""
    return Path(os.environ.get("QWENMLX_HOME") or "~/.cache/qwenmlx").expanduser() / "models"


def model_name(repo_id: str, recipe: str | None, group_size: int = DEFAULT_GROUP_SIZE,
               dtype: str = "bfloat16") -> str:
    """The name a pull gets in the models directory: the repo's name, the recipe, and what differs from defaults."""
    name = repo_id.split("/")[-1]
    if recipe is not None:
        name += f"-{Path(recipe).stem}"
        name += f"-g{group_size}" if group_size != DEFAULT_GROUP_SIZE else ""
        name += "-f16" if dtype == "float16" else ""
    return name


def default_model() -> Path | None:
    """The pulled default model (Qwen3-30B-A3B, experts-4), if it is there."""
    path = models_dir() / model_name(DEFAULT_REPO, DEFAULT_RECIPE)
    return path if (path / MARKER).is_file() else None


def find_model(spec: str) -> str | Path:
    """-m as load() takes it: a directory as is, a name from `qwenmlx list` as its directory, else a Hub id."""
    if Path(spec).expanduser().exists():
        return Path(spec).expanduser()
    if _is_plain_name(spec) and (models_dir() / spec).is_dir():
        return models_dir() / spec
    return spec


def is_hub_id(text: str) -> bool:
    """owner/name, and no such local path."""
    return REPO_ID.fullmatch(text) is not None and not Path(text).expanduser().exists()


# --- the models directory ---


@dataclass
class ModelEntry:
    name: str
    path: Path
    repo_id: str | None  # None: not written by pull
    recipe: str | None
    size_bytes: int
    context: int | None

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def list_models() -> list[ModelEntry]:
    """The model directories in the models directory (hidden, partial and linked entries left out)."""
    from .strategy import native_context

    root = models_dir()
    entries = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or path.is_symlink() or not (path / "config.json").is_file():
            continue
        marker = _read_marker(path)
        try:
            context = native_context(read_config(path))
        except QwenMLXError:
            context = None
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        entries.append(ModelEntry(path.name, path, marker.get("repo_id"), marker.get("recipe"), size, context))
    return entries


def remove(name: str) -> Path:
    """Delete a model that `pull` wrote into the models directory (and its unfinished pull); never anything else."""
    if not _is_plain_name(name):
        raise QwenMLXError(f"{name!r}: not a model name (names are listed by `qwenmlx list`)")
    root = models_dir()
    removed = None
    for path in (root / name, root / f".{name}.pulling"):
        if path.is_symlink():
            raise QwenMLXError(f"{path}: a symbolic link, not a model qwenmlx pulled; left alone")
        if not path.exists():
            continue
        if not path.is_dir() or not (path / MARKER).is_file():
            raise QwenMLXError(f"{path}: not written by qwenmlx pull; left alone")
        trash = root / f".{name}.removing-{os.getpid()}"
        path.rename(trash)  # gone from the list at once, even if deleting the files is interrupted
        shutil.rmtree(trash)
        removed = removed or path
    if removed is None:
        raise QwenMLXError(f"{name}: no such model in {root} (see `qwenmlx list`)")
    return removed


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not name.startswith(".") and "/" not in name \
        and "\\" not in name and not Path(name).is_absolute()


def _read_marker(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}


# --- talking to the Hub ---


@contextmanager
def hub_errors(repo_id: str, filename: str | None = None) -> Iterator[None]:
    """huggingface_hub's exceptions as one line naming the repo (and file): 404, no network, a cut-short download."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        SafetensorsParsingError,
    )

    what = f"{repo_id}/{filename}" if filename else repo_id
    try:
        yield
    except GatedRepoError:
        raise QwenMLXError(f"{repo_id}: a gated repo; accept its terms on the Hub, then log in with `hf auth login`") \
            from None
    except RepositoryNotFoundError:
        raise QwenMLXError(f"{repo_id}: no such model on {constants.ENDPOINT} (or it is private: log in with "
                           "`hf auth login`)") from None
    except RevisionNotFoundError:
        raise QwenMLXError(f"{repo_id}: no such revision") from None
    except RemoteEntryNotFoundError:
        raise QwenMLXError(f"{what}: no such file in the repo") from None
    except NotASafetensorsRepoError:
        raise QwenMLXError(f"{repo_id}: no safetensors weights (qwenmlx reads safetensors only)") from None
    except SafetensorsParsingError as e:
        raise QwenMLXError(f"{repo_id}: {_first_line(e)}") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        if constants.HF_HUB_OFFLINE:
            raise QwenMLXError(f"{what}: not in the local Hugging Face cache, and HF_HUB_OFFLINE forbids "
                               f"downloading; unset it, or download it with `hf download {repo_id}`") from None
        raise QwenMLXError(f"{what}: cannot reach {constants.ENDPOINT} ({_first_line(e.__cause__ or e)})") from None
    except HfHubHTTPError as e:
        raise QwenMLXError(f"{what}: the Hub answered {e.response.status_code}") from None
    except QwenMLXError:
        raise
    except OSError as e:  # huggingface_hub's size check of a download, or the disk
        if cut_short := re.search(r"should be of size (\d+) but has size (\d+)", str(e)):
            expected, got = map(int, cut_short.groups())
            raise QwenMLXError(f"{what}: download cut short (got {got:,} of {expected:,} bytes)") from None
        raise QwenMLXError(f"{what}: {e.strerror or _first_line(e)}") from None
    except Exception as e:
        if is_connection_error(e):
            raise QwenMLXError(f"{what}: cannot reach {constants.ENDPOINT} ({_first_line(e)})") from None
        raise


def is_connection_error(e: Exception) -> bool:
    """No answer from the Hub: offline mode, or the HTTP client's connection and protocol errors."""
    return isinstance(e, ConnectionError) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextmanager
def _quiet_hub_bars() -> Iterator[None]:
    """huggingface_hub's own progress bars off (pull draws its own)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _byte_counter(on_bytes: Callable[[int], None]) -> type:
    """A stand-in for tqdm that hands each downloaded chunk's size to on_bytes (huggingface_hub's tqdm_class)."""

    class ByteCounter:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def update(self, n: int = 1) -> None:
            on_bytes(n)

        def close(self) -> None:
            pass

    return ByteCounter


@dataclass
class Shard:
    """One input safetensors file: its size and header (read from the Hub) and, if cached, where it already is."""

    name: str
    size: int
    header: dict  # tensor name -> {"dtype", "shape", "data_offsets"} (no __metadata__)
    cached: Path | None = None  # in the Hugging Face cache (or a local snapshot): read there, never deleted

    @property
    def data_start(self) -> int:
        """Where the tensor data begins: the file ends with it, after the 8-byte length and the header."""
        return self.size - max((info["data_offsets"][1] for info in self.header.values()), default=0)


@dataclass
class HubSource:
    """A repo at one commit: its small files on disk, and its weights' shards (mostly not downloaded yet)."""

    repo_id: str
    commit: str
    small_files: Path  # config, tokenizer, index, ... (a Hugging Face cache snapshot)
    shards: dict[str, Shard]

    @property
    def config(self) -> dict:
        return json.loads((self.small_files / "config.json").read_text())

    @property
    def is_mlx(self) -> bool:
        """Already in MLX's layout (mlx-community): quantized by mlx-lm, or with its experts stacked."""
        names = [n for shard in self.shards.values() for n in shard.header]
        return "quantization" in self.config or any(".switch_mlp." in n or n.endswith(".scales") for n in names)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards.values())

    def tensors(self, download_dir: Path) -> dict[str, StoredTensor]:
        """Every tensor where it is or will be: a cached shard in place, the others in download_dir."""
        tensors = {}
        for shard in self.shards.values():
            path = shard.cached or download_dir / shard.name
            for name, info in shard.header.items():
                if info["dtype"] not in STORED_DTYPES:
                    raise QwenMLXError(f"{self.repo_id}/{shard.name}: tensor {name} has dtype {info['dtype']}, "
                                       "which qwenmlx cannot convert")
                tensors[name] = StoredTensor(path, name, info["dtype"], tuple(info["shape"]),
                                             shard.data_start + info["data_offsets"][0])
        return tensors


def open_repo(repo_id: str, revision: str | None = None) -> HubSource:
    """The repo's commit, small files and shard headers, without downloading a weight; the local cache if offline."""
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not REPO_ID.fullmatch(repo_id):
        raise QwenMLXError(f"{repo_id}: not a Hugging Face repo id (owner/name)")
    api = HfApi()
    with hub_errors(repo_id), _quiet_hub_bars():
        try:
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
        except Exception as e:
            if not is_connection_error(e):
                raise
            try:
                return _cached_repo(repo_id, revision)
            except LocalEntryNotFoundError:
                raise e from None
        small_files = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=SMALL_FILE_PATTERNS))
        metadata = api.get_safetensors_metadata(repo_id, revision=info.sha)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    shards = {}
    for name, file in metadata.files_metadata.items():
        header = {t: {"dtype": i.dtype, "shape": i.shape, "data_offsets": list(i.data_offsets)}
                  for t, i in file.tensors.items()}
        cached = try_to_load_from_cache(repo_id, name, revision=info.sha)
        shards[name] = Shard(name, sizes[name], header, Path(cached) if isinstance(cached, str) else None)
    return HubSource(repo_id, info.sha, small_files, shards)


def _cached_repo(repo_id: str, revision: str | None) -> HubSource:
    """Offline: the repo as the local Hugging Face cache holds it, complete, or an error."""
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True))
    shards = {}
    for path in weight_files(snapshot):
        header = {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}
        shards[path.name] = Shard(path.name, path.stat().st_size, header, path)
    return HubSource(repo_id, snapshot.name, snapshot, shards)


class PullProgress:
    """What a pull reports as it goes. This one ignores it all; the CLI draws bars, tests sample the disk."""

    def started(self, download_bytes: int, tensors: int) -> None: ...

    def downloaded(self, n_bytes: int) -> None: ...

    def written(self, tensors: int) -> None: ...  # output tensors done so far, of `tensors`


NO_PROGRESS = PullProgress()


class InputShards:
    """The input shards on disk only while an output tensor still needs them.

    Each step's readers are wrapped: the first read of step k deletes the downloads no step from k on
    reads, then downloads what step k reads and is not there yet.
    """

    def __init__(self, source: HubSource, plan: ConversionPlan, download_dir: Path, progress: PullProgress):
        self.source, self.download_dir, self.progress = source, download_dir, progress
        self.needs = [step.weight.files for step in plan.steps]
        self.last_use = {path: k for k, files in enumerate(self.needs) for path in files}
        self.held: set[Path] = set()
        self.step = -1
        for k, step in enumerate(plan.steps):
            step.weight.parts = [self._fetching(k, read) for read in step.weight.parts]

    def _fetching(self, k: int, read):
        def read_after_fetching(start: int, count: int):
            self.ready(k)
            return read(start, count)

        return read_after_fetching

    def ready(self, k: int) -> None:
        if k == self.step:
            return
        self.step = k
        for path in [p for p in self.held if self.last_use[p] < k]:
            path.unlink()
            self.held.discard(path)
        for path in sorted(self.needs[k]):
            if path.parent == self.download_dir and path not in self.held:
                self._download(self.source.shards[path.name])
                self.held.add(path)

    def _download(self, shard: Shard) -> None:
        from huggingface_hub import hf_hub_download

        with hub_errors(self.source.repo_id, shard.name):
            path = Path(hf_hub_download(self.source.repo_id, shard.name, revision=self.source.commit,
                                        local_dir=self.download_dir,
                                        tqdm_class=_byte_counter(self.progress.downloaded)))
        header = {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}
        with open(path, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        if header != shard.header or data_start != shard.data_start:
            raise QwenMLXError(f"{self.source.repo_id}/{shard.name}: the downloaded file's header differs from "
                               "the one read before (did the repo change during the pull?)")

    def to_download(self, steps) -> int:
        """Bytes of the shards the given steps read that are not on disk."""
        paths = {p for step in steps for p in step.weight.files if p.parent == self.download_dir}
        return sum(self.source.shards[p.name].size for p in paths)


@dataclass
class PullReport:
    repo_id: str
    commit: str
    dst: Path
    recipe: str  # "as published" for a repo already in MLX's layout
    size_bytes: int
    downloaded_bytes: int
    kept_shards: int  # output shards an interrupted pull had finished, kept
    seconds: float
    conversion: ConversionReport | None = None

    def as_dict(self) -> dict:
        facts = {k: v for k, v in asdict(self).items() if k != "conversion"}
        facts.update(dst=str(self.dst), size_gb=round(self.size_bytes / 1e9, 3),
                     downloaded_gb=round(self.downloaded_bytes / 1e9, 3), seconds=round(self.seconds, 2))
        if self.conversion is not None:
            facts["conversion"] = self.conversion.as_dict()
        return facts


def pull(repo_id: str = DEFAULT_REPO, dst: str | Path | None = None, recipe: str | None = None, *,
         group_size: int = DEFAULT_GROUP_SIZE, dtype: str = "bfloat16", force: bool = False,
         revision: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
         progress: PullProgress = NO_PROGRESS) -> PullReport:
    """repo_id as an MLX model in dst (default: the models directory): converted with `recipe` (default experts-4),
    or, for a repo already in MLX's layout, downloaded as it is."""
    if dtype not in OUTPUT_DTYPES:
        raise QwenMLXError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    quantization = get_recipe(recipe or DEFAULT_RECIPE, group_size)  # a bad recipe fails before any download
    source = open_repo(repo_id, revision)
    if source.is_mlx:
        if recipe is not None:
            raise QwenMLXError(f"{repo_id}: already an MLX model; pull it without --recipe to download it as it is")
        dst = Path(dst).expanduser() if dst else models_dir() / model_name(repo_id, None)
        return download_as_published(source, dst, force=force, progress=progress)
    name = model_name(repo_id, recipe or DEFAULT_RECIPE, group_size, dtype)
    dst = Path(dst).expanduser() if dst else models_dir() / name
    return convert_from_hub(source, dst, quantization, dtype, force=force, max_shard_bytes=max_shard_bytes,
                            progress=progress)


def plan_from_hub(source: HubSource, recipe, dtype: str, *, dequantize: bool = False,
                  download_dir: Path = Path(SOURCE_DIR), max_shard_bytes: int = MAX_SHARD_BYTES) -> ConversionPlan:
    """convert's plan of the repo's conversion, from the headers alone; shards not cached are read in download_dir."""
    return plan_conversion(source.small_files, recipe, OUTPUT_DTYPES[dtype], dequantize=dequantize,
                           max_shard_bytes=max_shard_bytes, tensors=source.tensors(download_dir))


def convert_from_hub(source: HubSource, dst: Path, recipe, dtype: str = "bfloat16", *, force: bool = False,
                     dequantize: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                     progress: PullProgress = NO_PROGRESS) -> PullReport:
    """The streamed conversion: what `pull` does with a Hugging Face checkpoint, and `convert REPO_ID`."""
    start = time.perf_counter()
    arguments = {"repo_id": source.repo_id, "commit": source.commit, "recipe": recipe.name if recipe else None,
                 "recipe_digest": _digest(repr(recipe)), "dtype": dtype, "max_shard_bytes": max_shard_bytes}
    with resumable_dir(dst, arguments, force) as partial:
        download_dir = partial / SOURCE_DIR
        plan = plan_from_hub(source, recipe, dtype, dequantize=dequantize, download_dir=download_dir,
                             max_shard_bytes=max_shard_bytes)
        inputs = InputShards(source, plan, download_dir, progress)
        kept = [i for i, steps in enumerate(plan.shards) if is_complete_shard(partial / plan.shard_name(i), steps)]
        to_write = [step for i, steps in enumerate(plan.shards) if i not in kept for step in steps]
        download_bytes = inputs.to_download(to_write)
        check_disk_space(dst, plan.total_bytes - sum((partial / plan.shard_name(i)).stat().st_size for i in kept)
                         + 2 * max((s.size for s in source.shards.values() if not s.cached), default=0))
        progress.started(download_bytes, len(plan.steps))
        kinds = kind_summaries(plan.steps)
        download_dir.mkdir(exist_ok=True)
        weight_map = write_files(plan, partial, kinds, _tensor_counter(plan, progress.written))
        shutil.rmtree(download_dir)
    report = ConversionReport(dst, plan.recipe.name if plan.recipe else "unquantized", plan.total_bytes,
                              sum(k.elements for k in kinds.values()), len(weight_map), len(plan.shards),
                              time.perf_counter() - start, list(kinds.values()))
    return PullReport(source.repo_id, source.commit, dst, report.recipe, plan.total_bytes, download_bytes,
                      len(kept), time.perf_counter() - start, report)


def download_as_published(source: HubSource, dst: Path, *, force: bool = False,
                          progress: PullProgress = NO_PROGRESS) -> PullReport:
    """An MLX repo, file by file into the .pulling dir (a second run skips finished files), then renamed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import filter_repo_objects

    start = time.perf_counter()
    arguments = {"repo_id": source.repo_id, "commit": source.commit, "recipe": None}
    with resumable_dir(dst, arguments, force) as partial:
        local = {p.name: p for p in source.small_files.iterdir() if p.is_file()}
        local.update({name: shard.cached for name, shard in source.shards.items() if shard.cached})
        names = list(filter_repo_objects(dict.fromkeys([*source.shards, *local]), allow_patterns=HUB_PATTERNS))
        kept = [n for n in source.shards if (partial / n).is_file()]
        download_bytes = sum(s.size for n, s in source.shards.items() if n not in kept and n not in local)
        check_disk_space(dst, download_bytes)
        progress.started(download_bytes, 0)
        for name in names:
            if name in local:
                _link_or_copy(local[name], partial / name)
                continue
            with hub_errors(source.repo_id, name):
                hf_hub_download(source.repo_id, name, revision=source.commit, local_dir=partial,
                                tqdm_class=_byte_counter(progress.downloaded))
        shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's download records
        for path in weight_files(partial):
            safetensors_header(path)
        read_config(partial)
    return PullReport(source.repo_id, source.commit, dst, "as published", source.size, download_bytes, len(kept),
                      time.perf_counter() - start)


@contextmanager
def resumable_dir(dst: Path, arguments: dict, force: bool) -> Iterator[Path]:
    """`.DST.pulling`, locked, for the body to fill; renamed to dst when the body ends.

    Found with other arguments (another commit, recipe, ...), it is emptied first. When the body fails,
    the downloads go; the finished output shards stay for the next pull with the same arguments, and
    when there are none the directory goes too.
    """
    dst = dst.expanduser()
    if _read_marker(dst) == arguments and not force:
        raise QwenMLXError(f"{dst}: already pulled ({arguments['repo_id']} at this commit); --force pulls it again")
    dst = prepare_directory(dst, force=force)
    partial = dst.with_name(f".{dst.name}.pulling")
    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise QwenMLXError(f"{partial}: in the way and not written by qwenmlx pull; move it away")
    partial.mkdir(parents=True, exist_ok=True)
    lock = os.open(partial, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QwenMLXError(f"{partial}: another qwenmlx pull is writing there") from None
        marker = _read_marker(partial)
        if any(partial.iterdir()) and not marker:
            raise QwenMLXError(f"{partial}: in the way and not written by qwenmlx pull; move it away")
        if marker != arguments:
            _empty(partial)
        (partial / MARKER).write_text(json.dumps(arguments, indent=2))
        try:
            yield partial
            shutil.rmtree(partial / SOURCE_DIR, ignore_errors=True)
            mark_written(partial)
            move_into_place(partial, dst)
        except BaseException as e:
            shutil.rmtree(partial / SOURCE_DIR, ignore_errors=True)
            for leftover in partial.glob("*.incomplete"):
                leftover.unlink()
            finished = len(list(partial.glob("*.safetensors")))
            if not finished:
                shutil.rmtree(partial, ignore_errors=True)
            elif isinstance(e, QwenMLXError):
                raise QwenMLXError(f"{e}; {finished} finished shard(s) kept in {partial}: the same command "
                                   "resumes from them") from None
            raise
    finally:
        os.close(lock)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A file of the Hugging Face cache into the model: a hard link where the filesystem allows, else a copy."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _empty(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tensor_counter(plan: ConversionPlan, on_tensors: Callable[[int], None]) -> Callable[[int], None]:
    """write_files reports bytes; this turns them into output tensors finished (the steps, in writing order)."""
    ends = list(itertools.accumulate(step.nbytes for step in plan.steps))
    written = done = 0

    def count(n_bytes: int) -> None:
        nonlocal written, done
        written += n_bytes
        if (finished := bisect.bisect_right(ends, written)) != done:
            done = finished
            on_tensors(done)

    return count
