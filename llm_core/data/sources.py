"""Find the input files behind `corpus.sources`: files, directories (recursive), globs, fsspec URIs;
and how they differ from what raw_corpus last ingested (what the new-data sensor asks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import fsspec

from llm_core.config import PROJECT_ROOT, CorpusConfig, ScratchConfig
from llm_core.files import read_json, short_hash
from llm_core.layout import RAW_CORPUS_DIR

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
GLOB_CHARS = set("*?[")


@dataclasses.dataclass(frozen=True)
class SourceFile:
    uri: str  # what users see in `source` columns and messages
    size: int
    fingerprint: str  # changes when the file changes (size + mtime, or the store's ETag)
    kind: str  # "txt" | "jsonl" | "parquet" | "unsupported"
    compression: str | None  # "gzip" | "zstd" | None
    root: str | None = None  # a local file's configured source folder (a directory, a glob's, a file's own)

    @property
    def id_key(self) -> str:
        """What document ids are derived from, so that ids (and with them the train/val split) do not
        depend on where the files live: inside the project, the path relative to it (the same in every
        clone); elsewhere on local disk, the path from the configured source's folder, that folder's
        name first (moving the folder keeps them); a URI as it is."""
        path = self.local_path()
        if path is None:
            return self.uri
        if path.is_relative_to(PROJECT_ROOT):
            return str(path.relative_to(PROJECT_ROOT))
        if self.root is not None and path.is_relative_to(self.root):
            return str(Path(Path(self.root).name) / path.relative_to(self.root))
        return self.uri

    def local_path(self) -> Path | None:
        """The file on local disk, when it is one (for quarantine copies)."""
        return Path(self.uri) if "://" not in self.uri else None


@dataclasses.dataclass
class Discovery:
    files: list[SourceFile]
    missing: list[tuple[str, str]]  # (source as configured, reason)
    skipped: list[str]  # files under a directory/glob with an extension not in `extensions`
    source_of: dict[str, str] = dataclasses.field(default_factory=dict)  # file URI -> source name


def file_kind(name: str) -> tuple[str, str | None]:
    """('txt'|'jsonl'|'parquet'|'unsupported', compression) from a file name."""
    path = Path(name.lower())
    compression = COMPRESSIONS.get(path.suffix)
    if compression:
        path = path.with_suffix("")
    kind = {".txt": "txt", ".md": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "unsupported")
    if kind == "parquet" and compression:
        kind = "unsupported"  # parquet compresses internally; a .parquet.gz is not something we can stream
    return kind, compression


def _extension(name: str) -> str:
    path = Path(name.lower())
    if path.suffix in COMPRESSIONS:
        path = path.with_suffix("")
    return path.suffix


def _resolve(source: str) -> str:
    if "://" in source:
        return source
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else PROJECT_ROOT / path)


def _describe(fs, path: str, uri: str, info: dict | None = None, root: str | None = None) -> SourceFile:
    info = info or fs.info(path)
    size = int(info.get("size") or 0)
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    kind, compression = file_kind(path)
    return SourceFile(uri=uri, size=size, fingerprint=f"{size}:{stamp}", kind=kind, compression=compression,
                      root=root)


def _source_folder(path: str, is_glob: bool, is_dir: bool) -> str:
    """The folder a local source's document ids start from: the directory itself, the fixed part of a glob,
    a single file's parent."""
    if is_glob:
        fixed = path[:min(path.index(c) for c in GLOB_CHARS if c in path)]
        return fixed if fixed.endswith("/") else str(Path(fixed).parent)
    return path if is_dir else str(Path(path).parent)


def discover(sources: list[str], extensions: list[str]) -> Discovery:
    """Expand every configured source into files, in a stable order, without reading them."""
    found: dict[str, SourceFile] = {}
    missing: list[tuple[str, str]] = []
    skipped: list[str] = []
    for source in sources:
        target = _resolve(source)
        try:
            fs, path = fsspec.core.url_to_fs(target)
        except (ImportError, ValueError) as exc:
            missing.append((source, f"cannot open source: {exc}"))
            continue
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        to_uri = (lambda p: p) if protocol in ("file", "local") else (lambda p: fs.unstrip_protocol(p))
        try:
            is_glob, is_dir = bool(GLOB_CHARS & set(path)), False
            if is_glob:
                matches = {p: None for p in sorted(fs.glob(path)) if fs.isfile(p)}
                expanded = True
            elif is_dir := fs.isdir(path):
                matches = dict(sorted(fs.find(path, detail=True).items()))
                expanded = True
            elif fs.exists(path):
                matches, expanded = {path: None}, False
            else:
                missing.append((source, "path not found"))
                continue
        except PermissionError as exc:
            missing.append((source, f"permission denied: {exc}"))
            continue
        if not matches:
            missing.append((source, "no files matched"))
        root = _source_folder(path, is_glob, is_dir) if protocol in ("file", "local") else None
        for path_i, info in matches.items():
            uri = to_uri(path_i)
            if uri in found:
                continue
            if expanded and _extension(path_i) not in extensions:
                skipped.append(uri)
                continue
            try:
                found[uri] = _describe(fs, path_i, uri, info, root)
            except OSError as exc:
                missing.append((uri, f"cannot stat file: {exc}"))
    return Discovery(files=list(found.values()), missing=missing, skipped=skipped)


def distinct_id_keys(files: list[SourceFile]) -> list[SourceFile]:
    """For discover_sources, whose files raw_corpus derives ids from. Two folders of the same name (say
    /a/texts and /b/texts, both with a.txt) would give their files the same ids: a file whose key an
    earlier source's file already has keeps its full path as key."""
    taken: set[str] = set()
    out = []
    for f in files:
        if f.id_key in taken:
            f = dataclasses.replace(f, root=None)
        taken.add(f.id_key)
        out.append(f)
    return out


def discover_sources(corpus: CorpusConfig) -> Discovery:
    """Every file of corpus.sources with the name of its source (a file listed by two sources belongs to
    the first), in corpus order."""
    out = Discovery(files=[], missing=[], skipped=[])
    for name, paths in corpus.named_sources().items():
        found = discover(paths, corpus.extensions)
        new = [f for f in found.files if f.uri not in out.source_of]
        out.files += new
        out.source_of.update((f.uri, name) for f in new)
        out.missing += found.missing
        out.skipped += found.skipped
    out.files = distinct_id_keys(out.files)
    return out


def source_problems(corpus: CorpusConfig) -> list[str]:
    """Why each source path that gives no file gives none (`scratchllm check-config`). Local paths and
    globs are looked up (relative ones in the project root, as at run time); URIs are checked for syntax
    only: no network before a run."""
    problems, extensions = [], corpus.extensions
    named = [(name, path) for name, paths in corpus.named_sources().items() for path in paths]
    for i, (name, source) in enumerate(named):
        field = f"corpus.sources[{i}] {source!r}" if len(named) == len(corpus.sources) else \
            f"corpus.sources {name!r}: {source!r}"
        if "://" in source:
            protocol, _ = fsspec.core.split_protocol(source)
            if protocol not in fsspec.available_protocols():
                problems.append(f"{field}: unknown protocol {protocol!r} (known: s3, gs, https, memory, ...)")
            continue
        found = discover([source], extensions)
        if found.missing:
            problems.append(f"{field}: {found.missing[0][1]} (looked at {_resolve(source)})")
        elif not found.files:
            problems.append(f"{field}: no file with an extension of corpus.extensions {extensions} "
                            f"({len(found.skipped)} other files, e.g. {found.skipped[0]})")
    return problems


def open_binary(uri: str):
    """Open a source for reading raw (still compressed) bytes."""
    return fsspec.open(uri, "rb").open()


@dataclasses.dataclass
class SourceChanges:
    """How corpus.sources differ from what raw_corpus last ingested (file URIs)."""

    new: list[str]
    changed: list[str]
    removed: list[str]

    def __bool__(self) -> bool:
        return bool(self.new or self.changed or self.removed)

    def summary(self) -> str:
        return f"{len(self.new)} new, {len(self.changed)} changed, {len(self.removed)} removed files"


def source_changes(cfg: ScratchConfig) -> tuple[SourceChanges, str]:
    """(what changed since the last raw_corpus, a fingerprint of the sources as they are now).
    Reads file listings only (size + mtime, or the store's ETag), never file contents."""
    found = discover(cfg.corpus.source_paths(), cfg.corpus.extensions)
    now = {f.uri: f.fingerprint for f in found.files}
    shards = read_json(cfg.data_path / RAW_CORPUS_DIR / "manifest.json").get("shards", [])
    ingested = {f["uri"]: f["fingerprint"] for s in shards for f in s["files"]}
    changes = SourceChanges(new=sorted(now.keys() - ingested.keys()), removed=sorted(ingested.keys() - now.keys()),
                            changed=sorted(u for u in now.keys() & ingested.keys() if now[u] != ingested[u]))
    return changes, short_hash(sorted(now.items()))
