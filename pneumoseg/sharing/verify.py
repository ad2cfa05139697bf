"""Static verification of a received MONAI bundle (folder or .zip): ``pneumoseg bundle verify PATH``.

Nothing from the bundle is ever executed. Configs are parsed as JSON and every ``$`` expression with
:mod:`ast`; nothing goes through ``eval`` or ``monai.bundle.ConfigParser.get_parsed_content``. Weights are
read with ``torch.load(weights_only=True)`` after their pickle opcodes were listed with :mod:`pickletools`
(which only disassembles). TorchScript is checked as a zip without ``torch.jit.load`` (which deserialises
TorchScript code that can call any registered operator) unless ``--trust`` is given. ONNX is parsed with
protobuf and ``onnx.checker``.

Checks, each a row of the report (``PASS`` / ``FAIL`` / ``SKIP``):

- ``archive``: members are relative, without ``..``, links, device files, duplicates or encryption; one
  top-level folder; bounded uncompressed size (folders: no symlinks or special files).
- ``checksums``: ``checksums.sha256`` (``sha256sum`` format) lists every file, nothing else, all hashes match.
- ``metadata``: ``configs/metadata.json`` against MONAI's metadata schema (the receiver's own offline copy).
- ``shapes``: ``network_data_format`` consistent with every ``network_def`` and with the weights / exports.
- ``code``: every ``$`` expression, ``_target_``, ``_requires_``, ``_disabled_``, ``_mode_`` and ``%`` macro of
  every config, against :data:`ALLOWED_MODULES` / :data:`ALLOWED_BUILTINS` minus :data:`BLOCKED_NAMES`.
- ``logging``: ``logging.conf`` holds only local stdlib handlers/formatters and literal ``args``.
- ``weights`` / ``torchscript`` / ``onnx``: loadable without running code, shapes as declared.
"""

from __future__ import annotations

import ast
import configparser
import functools
import hashlib
import io
import json
import os
import pickletools
import re
import stat
import types
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "ALLOWED_BUILTINS",
    "ALLOWED_MODULES",
    "BLOCKED_NAMES",
    "CHECKSUM_FILE",
    "Check",
    "VerifyReport",
    "BundleFiles",
    "read_bundle",
    "check_archive",
    "check_checksums",
    "check_expression",
    "check_config",
    "check_contents",
    "check_logging_conf",
    "checksum_manifest",
    "verify_bundle",
]

CHECKSUM_FILE = "checksums.sha256"
"""Checksum manifest at the bundle root, in ``sha256sum`` format (``sha256sum -c checksums.sha256`` works)."""

ALLOWED_MODULES: frozenset[str] = frozenset({"monai", "pneumoseg", "torch", "numpy", "math", "ignite"})
"""Top-level modules a config may name. ``ignite`` is not in the issue's list, but MONAI's engines are Ignite
engines and bundle configs routinely name Ignite handlers (``train.json`` uses ``ignite.handlers.ProgressBar``)."""

ALLOWED_BUILTINS: frozenset[str] = frozenset(
    "len int float str bool list dict tuple set frozenset min max range sum abs round isinstance zip enumerate "
    "sorted reversed any all map filter print slice None True False".split()
)
"""Builtins a config needs (``print`` for the bundle's progress lines)."""

RESTRICTED_NAMES: Mapping[str, frozenset[str]] = {"os": frozenset({"environ"})}
"""Non-allowlisted modules a config may import for one harmless attribute only: ``os.environ[...]`` /
``os.environ.get(...)`` (the multi-GPU configs read ``LOCAL_RANK``). ``os`` is imported by every Python
process already, so ``$import os`` runs no new code; any other use of ``os`` fails."""

BLOCKED_NAMES: frozenset[str] = frozenset(
    {
        # deserialisation that can run code, or loads native code
        "torch.load",  # allowed only with a literal weights_only=True (see _call_problems)
        "torch.serialization",
        "torch.jit.load",
        "torch.jit.load_c10d",
        "torch.hub",
        "torch.package",
        "torch.export.load",
        "torch.utils.cpp_extension",
        "torch.utils.collect_env",
        "torch.ops.load_library",
        "torch.classes.load_library",
        "torch.library",
        "torch.distributed.rpc",
        "torch.distributed.run",
        "torch.distributed.launch",
        "torch.multiprocessing.spawn",
        "torch.distributed.elastic",  # launches processes running a given entry point
        "torch.distributed.launcher",
        "ignite.distributed",
        "numpy.load",  # allowed only without allow_pickle=True (see _call_problems)
        "numpy.ctypeslib",
        "numpy.f2py",
        "numpy.distutils",
        "numpy.testing",
        "numpy.lib.format",
        # MONAI: downloads, nested config parsing, dynamic imports, subprocesses
        "monai.bundle",
        "monai.auto3dseg",  # pickle.loads of algorithm objects
        "monai.apps.auto3dseg",
        "monai.apps.utils",
        "monai.apps.download_url",
        "monai.apps.download_and_extract",
        "monai.apps.extractall",
        "monai.apps.datasets",
        "monai.apps.mmars",
        "monai.utils.module",
        "monai.utils.optional_import",
        "monai.utils.instantiate",
        "monai.utils.run_cmd",
        "monai.utils.misc.run_cmd",
        "monai.data.torchscript_utils",
        "monai.data.load_net_with_metadata",
        "pneumoseg.sharing",
        "pneumoseg.cli",  # runs any pneumoseg command
        "pneumoseg.demo",  # runs subprocesses
    }
)
"""Dotted names (and everything below them) blocked even inside allowlisted modules: they load pickles or
native code, download, run subprocesses or parse further configs. Matched against both the name as written
and the resolved object's own module path."""

FRAME_ATTRIBUTES = frozenset(
    "gi_frame gi_code cr_frame cr_code ag_frame ag_code f_globals f_locals f_builtins f_back f_code tb_frame "
    "tb_next co_code func_globals mro".split()
)

ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("torch", "device"),
        ("builtins", "set"),
    }
)
_STORAGE_GLOBAL = re.compile(
    r"^torch (\w*Storage|float\w*|bfloat16|half|double|int\w*|uint\w*|long|short|bool|complex\w*)$"
)

MAX_UNCOMPRESSED = 4 * 2**30
MAX_RATIO = 200  # zip bomb guard: uncompressed / compressed per member

_REF = re.compile(r"@\w*(?:#\w*)*")
_FORMAT_FIELD_ACCESS = re.compile(r"\{[^{}:!]*[.\[]")
_ABS_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Check:
    """One row of the report: ``status`` is ``PASS``, ``FAIL`` or ``SKIP``."""

    check: str
    subject: str
    status: str
    detail: str = ""


@dataclass
class VerifyReport:
    """All checks of one bundle; ``ok`` when nothing failed."""

    source: str
    checks: list[Check] = field(default_factory=list)
    listing: list[tuple[str, str, str, str, str]] = field(default_factory=list)  # config, location, kind, text, verdict
    bundle: BundleFiles | None = field(default=None, repr=False)  # the bytes that were verified (for import)

    @property
    def ok(self) -> bool:
        return not any(c.status == "FAIL" for c in self.checks)

    def add(self, check: str, subject: str, problems: list[str], passed: str = "", skip: str = "") -> None:
        if skip:
            self.checks.append(Check(check, subject, "SKIP", skip))
        elif problems:
            self.checks.extend(Check(check, subject, "FAIL", p) for p in problems)
        else:
            self.checks.append(Check(check, subject, "PASS", passed))

    def table(self, width: int = 110) -> str:
        """The pass/fail table a person reads."""
        rows = [("STATUS", "CHECK", "SUBJECT", "DETAIL")] + [
            (c.status, c.check, c.subject, c.detail) for c in self.checks
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        w2 = min(40, max(len(r[2]) for r in rows))
        lines = [f"bundle: {self.source}"]
        for r in rows:
            detail = r[3] if len(r[3]) <= width else r[3][: width - 3] + "..."
            lines.append(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<{w2}}  {detail}".rstrip())
        failed = sum(c.status == "FAIL" for c in self.checks)
        lines.append(f"RESULT: {'PASS' if self.ok else 'FAIL'} ({failed} failed, {len(self.checks)} checks)")
        return "\n".join(lines)

    def listing_text(self) -> str:
        """Every expression / target / reference of every config, with its verdict."""
        return "\n".join(
            f"{cfg}  {loc}  [{kind}] {text}  -> {verdict}" for cfg, loc, kind, text, verdict in self.listing
        )


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class BundleFiles:
    """A bundle's regular files as bytes, keyed by POSIX path relative to the bundle root."""

    source: str
    files: dict[str, bytes]
    prefix: str = ""  # the zip's top-level folder ("" for a folder)


def _member_problems(info: zipfile.ZipInfo) -> list[str]:
    name = info.filename
    problems = []
    mode = info.external_attr >> 16
    path = PurePosixPath(name.replace("\\", "/"))
    if "\\" in name:
        problems.append("backslash in member name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        problems.append("absolute member path")
    if ".." in path.parts:
        problems.append("'..' in member path")
    if "\x00" in name:
        problems.append("NUL in member name")
    if any(part in ("", ".") for part in name.rstrip("/").split("/")[1:]):
        problems.append("empty or '.' path component")
    kind = stat.S_IFMT(mode)  # 0 when the writer stored permissions only (Python's writestr does)
    if kind == stat.S_IFLNK:
        problems.append("symbolic link")
    elif kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        problems.append(f"special file (mode {oct(mode)})")
    if info.flag_bits & 0x1:
        problems.append("encrypted member")
    if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > 2**20:
        problems.append(f"compression ratio {info.file_size // info.compress_size}:1 (zip bomb?)")
    return problems


def check_archive(path: str | os.PathLike) -> tuple[list[str], BundleFiles]:
    """Screen a zip's members without extracting; return (problems, the safe regular files read into memory)."""
    problems: list[str] = []
    files: dict[str, bytes] = {}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        return [f"{path}: not a readable zip ({err})"], BundleFiles(str(path), {})
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        folded = [n.casefold() for n in names]  # case-insensitive file systems would merge these
        duplicates = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
        problems += [f"{n}: duplicate member (ignoring case)" for n in duplicates]
        total = sum(i.file_size for i in infos)
        if total > MAX_UNCOMPRESSED:
            problems.append(f"{total} bytes uncompressed exceeds {MAX_UNCOMPRESSED}")
            return problems, BundleFiles(str(path), {})
        safe = []
        for info in infos:
            member = _member_problems(info)
            problems += [f"{info.filename}: {p}" for p in member]
            if not member and not info.is_dir():
                safe.append(info)
        tops = {PurePosixPath(i.filename).parts[0] for i in safe if PurePosixPath(i.filename).parts}
        prefix = ""
        if len(tops) == 1 and all(len(PurePosixPath(i.filename).parts) > 1 for i in safe):
            prefix = tops.pop() + "/"
        elif safe:
            problems.append("members must sit in one top-level folder (the bundle's name)")
        for info in safe:
            try:
                files[info.filename[len(prefix) :]] = archive.read(info)
            except (zipfile.BadZipFile, RuntimeError, OSError) as err:  # CRC error, unsupported compression
                problems.append(f"{info.filename}: unreadable ({err})")
    return problems, BundleFiles(str(path), files, prefix)


def _read_folder(root: Path) -> tuple[list[str], BundleFiles]:
    problems: list[str] = []
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: symbolic link")
            elif stat.S_ISREG(mode):
                files[rel] = full.read_bytes()
            elif not stat.S_ISDIR(mode):
                problems.append(f"{rel}: special file (mode {oct(mode)})")
        dirnames[:] = [d for d in dirnames if not Path(dirpath, d).is_symlink()]
    return problems, BundleFiles(str(root), files)


def read_bundle(path: str | os.PathLike) -> tuple[list[str], BundleFiles]:
    """Read a bundle folder or .zip into memory; return structural problems and the readable files."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return check_archive(path)
    return [f"{path}: no such file or folder"], BundleFiles(str(path), {})


# -------------------------------------------------------------------------------------------- checksums
def checksum_manifest(files: Mapping[str, bytes]) -> str:
    """``sha256sum``-format manifest of ``files`` (sorted; the manifest itself excluded)."""
    return "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items()) if name != CHECKSUM_FILE
    )


def check_checksums(bundle: BundleFiles) -> list[str]:
    """Problems with ``checksums.sha256``: missing, malformed, unlisted / extra files, wrong hashes."""
    if CHECKSUM_FILE not in bundle.files:
        return [f"{CHECKSUM_FILE} missing"]
    listed: dict[str, str] = {}
    problems = []
    for number, line in enumerate(bundle.files[CHECKSUM_FILE].decode("utf-8", "replace").splitlines(), 1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
        if not match:
            problems.append(f"{CHECKSUM_FILE} line {number}: not '<sha256>  <path>'")
            continue
        listed[match.group(2)] = match.group(1)
    present = {n for n in bundle.files if n != CHECKSUM_FILE}
    problems += [f"{n}: not listed in {CHECKSUM_FILE}" for n in sorted(present - set(listed))]
    problems += [f"{n}: listed in {CHECKSUM_FILE} but missing" for n in sorted(set(listed) - present)]
    for name in sorted(present & set(listed)):
        if hashlib.sha256(bundle.files[name]).hexdigest() != listed[name]:
            problems.append(f"{name}: SHA-256 differs from {CHECKSUM_FILE}")
    return problems


# --------------------------------------------------------------------------------------------- contents
CONTENT_RULES: Mapping[str, tuple[str, ...]] = {
    "configs/": (".json", ".conf", ".yaml", ".yml"),
    "models/": (".pt", ".pth", ".ts", ".onnx"),
    "docs/": (".md", ".txt", ".png", ".jpg", ".jpeg", ".svg", ".pdf"),
}
TOP_LEVEL_FILES = frozenset({"LICENSE", "LICENSE.txt", "README.md", "README.txt", CHECKSUM_FILE})


def check_contents(names: list[str]) -> list[str]:
    """Files outside the bundle layout, e.g. Python modules: running ``python -m monai.bundle`` from the
    bundle folder puts it first on ``sys.path``, so a ``pneumoseg.py`` or ``torch/`` there would replace the
    real package, and a ``scripts/`` folder is code the configs may import."""
    problems = []
    for name in names:
        folder = next((f for f in CONTENT_RULES if name.startswith(f)), None)
        if folder is None and name not in TOP_LEVEL_FILES:
            problems.append(f"{name}: not part of the bundle layout (configs/, models/, docs/, LICENSE)")
        elif folder is not None and not name.lower().endswith(CONTENT_RULES[folder]):
            problems.append(f"{name}: unexpected file type in {folder}")
        elif folder is not None and folder != "docs/" and "/" in name[len(folder) :]:
            problems.append(f"{name}: sub-folder in {folder}")
    return problems


# ------------------------------------------------------------------------------------------ expressions
def _is_blocked(dotted: str) -> str | None:
    for blocked in BLOCKED_NAMES:
        if dotted == blocked or dotted.startswith(blocked + "."):
            return blocked
    return None


def _canonical(obj: Any) -> str | None:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return None


def _resolve_dotted(dotted: str) -> tuple[str | None, Any]:
    """Resolve an allowlisted dotted name by importing only allowlisted (the receiver's own, trusted)
    modules and reading attributes of module objects; returns (problem or None, object or None)."""
    import importlib

    parts = dotted.split(".")
    private = [p for p in parts if p.startswith("_") or p in FRAME_ATTRIBUTES]
    if private:
        return f"'{dotted}' names the private/special attribute '{private[0]}'", None
    if parts[0] not in ALLOWED_MODULES:
        return f"module '{parts[0]}' is not allowlisted", None
    try:
        obj: Any = importlib.import_module(parts[0])
    except ImportError as err:
        return f"cannot import '{parts[0]}' ({err})", None
    for i, part in enumerate(parts[1:], 1):
        if not isinstance(obj, types.ModuleType):
            break  # attribute of a class/function: checked by name (no dunders/privates) only
        prefix = ".".join(parts[: i + 1])
        if _is_blocked(prefix):  # before importing it: not even a blocked module's import is wanted
            return f"'{dotted}' is blocked ({_is_blocked(prefix)})", None
        try:
            obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(prefix)
        except ImportError:
            return f"'{dotted}' does not exist", None
        if isinstance(obj, types.ModuleType) and obj.__name__.split(".")[0] not in ALLOWED_MODULES:
            return f"'{prefix}' is the module '{obj.__name__}', which is not allowlisted", None
    canonical = _canonical(obj)
    if canonical and canonical.split(".")[0] not in ALLOWED_MODULES | {"builtins"}:
        return f"'{dotted}' is '{canonical}', outside the allowlisted modules", None
    for name in (dotted, canonical or ""):
        blocked = _is_blocked(name) if name else None
        if blocked:
            return f"'{dotted}' is blocked ({blocked})", None
    return None, obj


class _ExpressionChecker(ast.NodeVisitor):
    """Collect problems of one parsed expression. ``names`` maps config-level names (imports) to dotted paths."""

    def __init__(self, names: Mapping[str, str], refs: set[str]) -> None:
        self.names = names
        self.refs = refs
        self.local: set[str] = set()
        self.problems: list[str] = []

    # names bound inside the expression (lambda arguments, comprehension targets)
    def _bind(self, target: ast.AST) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                self.local.add(node.id)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
            self.local.add(arg.arg)
        for arg in (node.args.vararg, node.args.kwarg):
            if arg is not None:
                self.local.add(arg.arg)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self._bind(node.target)
        self.generic_visit(node)

    def _visit_comp(self, node: ast.AST) -> None:
        for gen in node.generators:  # type: ignore[attr-defined]
            self._bind(gen.target)
        self.generic_visit(node)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _visit_comp

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.problems.append("assignment expression (:=) is not allowed")

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and "__" in node.value:
            self.problems.append(f"string constant {node.value!r} contains '__' (attribute-name tricks)")
        elif isinstance(node.value, str) and _FORMAT_FIELD_ACCESS.search(node.value):
            self.problems.append(f"format string {node.value!r} reads attributes/items (str.format tricks)")

    def _dotted(self, node: ast.AST) -> str | None:
        """``a.b.c`` for a chain of attributes on a plain name, else None."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
            return ".".join(reversed(parts))
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr.startswith("_") or node.attr in FRAME_ATTRIBUTES:
            self.problems.append(f"access to the private/special attribute '.{node.attr}'")
            return
        dotted = self._dotted(node)
        if dotted is not None:
            self._check_name_chain(dotted)
            return  # the chain was checked as a whole
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self._check_name_chain(node.id)

    def _check_name_chain(self, dotted: str) -> None:
        head, _, rest = dotted.partition(".")
        if head in self.refs or head in self.local:
            return  # a config reference or a local name: an opaque value; its attributes were screened
        if head in RESTRICTED_NAMES and self.names.get(head, head) == head:
            attr = rest.split(".")[0]
            if (
                attr not in RESTRICTED_NAMES[head]
                or rest.count(".") > 1
                or ("." in rest and rest.split(".")[1] != "get")
            ):
                self.problems.append(f"'{dotted}': only {sorted(RESTRICTED_NAMES[head])} of '{head}' may be read")
            return
        if head in self.names:
            full = self.names[head] + ("." + rest if rest else "")
        elif head in ALLOWED_BUILTINS and not rest:
            return
        elif head in ("np",):
            full = "numpy" + ("." + rest if rest else "")
        elif head in ALLOWED_MODULES:
            full = dotted
        else:
            self.problems.append(f"name '{head}' is not allowed")
            return
        problem, obj = _resolve_dotted(full)
        if problem:
            self.problems.append(problem)
        elif isinstance(obj, types.ModuleType):
            # a module passed around as a value escapes the name checks: (lambda t: t.load(p))(torch)
            self.problems.append(f"module '{full}' used as a value (only its functions and classes may be named)")

    def visit_Call(self, node: ast.Call) -> None:
        dotted = self._dotted(node.func)
        if dotted is not None:
            head, _, rest = dotted.partition(".")
            full = self.names.get(head, "numpy" if head == "np" else head) + ("." + rest if rest else "")
            _, obj = _resolve_dotted(full) if full.split(".")[0] in ALLOWED_MODULES else (None, None)
            canonical = _canonical(obj) or full
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if full == "torch.load" or canonical == "torch.serialization.load":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    self.problems.append("torch.load without a literal weights_only=True")
                for child in [*node.args, *node.keywords]:
                    self.visit(child)
                return
            for name, required in (("allow_pickle", False), ("weights_only", True)):
                value = keywords.get(name)
                if value is not None and not (isinstance(value, ast.Constant) and value.value is required):
                    self.problems.append(f"{name}={ast.unparse(value)} (must be a literal {required})")
            if full == "numpy.load" or canonical.startswith("numpy.lib._npyio_impl.load"):
                allow = keywords.get("allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    self.problems.append("numpy.load with allow_pickle")
                for child in [*node.args, *node.keywords]:
                    self.visit(child)
                return
        self.generic_visit(node)


def check_expression(text: str, names: Mapping[str, str] | None = None) -> list[str]:
    """Problems of one ``$`` expression (without the ``$``); ``[]`` means allowed.

    ``@id`` references are replaced by opaque placeholder names first, as MONAI replaces them by values.
    """
    names = dict(names or {})
    refs: dict[str, str] = {}
    source = _REF.sub(lambda m: refs.setdefault(m.group(), f"_ref{len(refs)}_"), text).strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        try:
            module = ast.parse(source, mode="exec")
        except SyntaxError as err:
            return [f"not valid Python ({err.msg})"]
        if module.body and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in module.body):
            return _import_problems(module)
        return ["statements other than imports are not allowed"]
    checker = _ExpressionChecker(names, set(refs.values()))  # placeholders stand for config values
    checker.visit(tree)
    return sorted(set(checker.problems))


def _import_problems(module: ast.Module) -> list[str]:
    problems = []
    for stmt in module.body:
        if isinstance(stmt, ast.ImportFrom):
            modules = [stmt.module or ""] if stmt.level == 0 else [""]
            targets = [f"{stmt.module}.{a.name}" for a in stmt.names]
        else:
            modules = [a.name for a in stmt.names]  # type: ignore[union-attr]
            targets = modules
        for mod in modules:
            root = mod.split(".")[0]
            if root in RESTRICTED_NAMES and mod == root and isinstance(stmt, ast.Import):
                continue
            if root not in ALLOWED_MODULES:
                problems.append(f"import of '{mod or '.'}' (not an allowlisted module)")
        for target in targets:
            if target.split(".")[0] in ALLOWED_MODULES:
                problem, _ = _resolve_dotted(target)
                if problem:
                    problems.append(problem)
            if any(a.name == "*" for a in stmt.names):
                problems.append("star import")
    return problems


def _import_names(text: str) -> dict[str, str]:
    """Names an allowed ``$import`` binds, e.g. ``{"dist": "torch.distributed"}``."""
    try:
        module = ast.parse(text.strip(), mode="exec")
    except SyntaxError:
        return {}
    names = {}
    for stmt in module.body:
        if isinstance(stmt, ast.Import):
            for a in stmt.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            for a in stmt.names:
                names[a.asname or a.name] = f"{stmt.module}.{a.name}"
    return names


def _check_target(target: str, locator: Any) -> list[str]:
    if "." not in target:
        module = locator.get_component_module_name(target) if locator is not None else None
        if module is None:
            return [f"_target_ '{target}' is not a MONAI component"]
        modules = module if isinstance(module, list) else [module]
        problems = [p for m in modules for p in [_resolve_dotted(f"{m}.{target}")[0]] if p]
        return problems[:1] if len(problems) == len(modules) else []
    problem, _ = _resolve_dotted(target)
    return [f"_target_ {problem}"] if problem else []


@functools.lru_cache(maxsize=1)
def _component_locator() -> Any:
    """MONAI's own map of bare ``_target_`` names to modules (scans MONAI once)."""
    from monai.bundle import ComponentLocator

    return ComponentLocator()


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, str | None, Any]]:
    """(location, dict key or None, value) for every value of a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            loc = f"{where}#{key}" if where else str(key)
            yield loc, str(key), value
            yield from _walk(value, loc)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            loc = f"{where}#{i}"
            yield loc, None, value
            yield from _walk(value, loc)


def check_config(name: str, config: Any, names: Mapping[str, str] | None = None) -> tuple[list[str], list[tuple]]:
    """Screen one parsed JSON config: every expression, target, requirement, mode and macro.

    Returns (problems "location: problem", listing rows (location, kind, text, verdict)).
    ``names`` are import bindings from other configs of the bundle (MONAI merges config files).
    """
    locator = _component_locator()
    bound = dict(names or {})
    for _, _, value in _walk(config):
        if isinstance(value, str) and value.startswith("$") and "import" in value:
            if not _import_problems_safe(value[1:]):
                bound.update(_import_names(value[1:]))
    problems: list[str] = []
    listing: list[tuple] = []
    for loc, key, value in _walk(config):
        if key is not None and key.startswith("_") and key.endswith("_"):
            if key == "_target_" and isinstance(value, str) and not value.startswith(("$", "@")):
                found = _check_target(value, locator)
                listing.append((loc, "_target_", value, "; ".join(found) or "ok"))
                problems += [f"{loc}: {p}" for p in found]
            elif key == "_mode_" and value not in ("default", "callable", "partial"):
                listing.append((loc, "_mode_", str(value), "not allowed"))
                problems.append(f"{loc}: _mode_ {value!r} (only 'default' / 'callable'; 'debug' starts pdb)")
        if key == "allow_pickle" and value is not False:
            listing.append((loc, "argument", f"allow_pickle={value!r}", "not allowed"))
            problems.append(f"{loc}: allow_pickle must be false (unpickling runs code)")
        elif key == "weights_only" and value is not True:
            listing.append((loc, "argument", f"weights_only={value!r}", "not allowed"))
            problems.append(f"{loc}: weights_only must be true (a full torch.load unpickles, which runs code)")
        if not isinstance(value, str):
            continue
        if value.startswith("$"):
            found = check_expression(value[1:], bound)
            kind = "import" if value[1:].lstrip().startswith(("import ", "from ")) else "expression"
            listing.append((loc, kind, value, "; ".join(found) or "ok"))
            problems += [f"{loc}: {value[:80]!r}: {p}" for p in found]
        elif value.startswith("%"):
            target = value[1:].split("#")[0]
            bad = bool(target) and (_ABS_PATH.match(target) or ".." in PurePosixPath(target).parts or "://" in target)
            listing.append((loc, "macro", value, "outside the bundle" if bad else "ok"))
            if bad:
                problems.append(f"{loc}: macro {value!r} reads a file outside the bundle")
        elif value.startswith("@"):
            listing.append((loc, "reference", value, "ok"))
    return problems, listing


def _import_problems_safe(text: str) -> list[str]:
    try:
        module = ast.parse(text.strip(), mode="exec")
    except SyntaxError as err:
        return [str(err)]
    if not all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in module.body):
        return ["not an import"]
    return _import_problems(module)


# ---------------------------------------------------------------------------------------------- logging
LOGGING_HANDLERS = frozenset(
    {"StreamHandler", "FileHandler", "NullHandler", "handlers.RotatingFileHandler", "handlers.TimedRotatingFileHandler",
     "handlers.WatchedFileHandler"}
)  # fmt: skip
"""Local handlers only: socket / HTTP / SMTP / syslog / queue handlers could send data elsewhere."""


def _literal_args(text: str) -> str | None:
    """None if ``args``/``kwargs`` is made of literals and ``sys.stdout``/``sys.stderr``; else the problem."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        return f"not a Python literal ({err.msg})"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id == "sys" and node.attr in ("stdout", "stderr")):
                return f"attribute access other than sys.stdout/sys.stderr: {ast.unparse(node)}"
        elif isinstance(node, ast.Name):
            if node.id != "sys":
                return f"name '{node.id}'"
        elif not isinstance(node, (ast.Expression, ast.Tuple, ast.List, ast.Dict, ast.Constant, ast.Load, ast.USub,
                                   ast.UnaryOp)):  # fmt: skip
            return f"{type(node).__name__} in {text.strip()!r}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _ABS_PATH.match(node.value) or ".." in PurePosixPath(node.value).parts:
                return f"file path {node.value!r} outside the working folder"
    return None


def check_logging_conf(text: str) -> list[str]:
    """Problems of a ``logging.fileConfig`` file (which ``eval``s handler ``args`` and imports classes)."""
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(text)
    except configparser.Error as err:
        return [f"not an INI file ({err})"]
    problems = []
    allowed = {
        "loggers": {"keys"},
        "handlers": {"keys"},
        "formatters": {"keys"},
        "logger_": {"level", "handlers", "propagate", "qualname"},
        "handler_": {"class", "level", "formatter", "args", "kwargs"},
        "formatter_": {"format", "datefmt", "style", "validate", "class"},
    }
    for section in parser.sections():
        kind = section if section in allowed else section.split("_")[0] + "_"
        if kind not in allowed:
            problems.append(f"[{section}]: unknown section")
            continue
        for key, value in parser.items(section):
            if key not in allowed[kind]:
                problems.append(f"[{section}] {key}: key not allowed")
            elif kind == "handler_" and key == "class":
                name = value.strip().removeprefix("logging.")
                if name not in LOGGING_HANDLERS:
                    problems.append(
                        f"[{section}] class={value}: only local logging handlers {sorted(LOGGING_HANDLERS)}"
                    )
            elif kind == "formatter_" and key == "class" and value.strip() not in ("logging.Formatter", "Formatter"):
                problems.append(f"[{section}] class={value}: only logging.Formatter")
            elif kind == "handler_" and key in ("args", "kwargs"):
                problem = _literal_args(value)
                if problem:
                    problems.append(f"[{section}] {key}={value}: {problem}")
    return problems


# ---------------------------------------------------------------------------------------------- weights
def _pickle_globals(data: bytes) -> tuple[list[str], str | None]:
    """GLOBAL / STACK_GLOBAL references of a pickle, found by disassembly only (nothing is imported)."""
    found: list[str] = []
    recent: list[tuple[str, Any]] = []  # previous opcodes, MEMOIZE skipped
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            if opcode.name == "GLOBAL":
                found.append(str(arg))
            elif opcode.name == "STACK_GLOBAL":
                if len(recent) < 2 or not all("UNICODE" in name for name, _ in recent[-2:]):
                    return found, "STACK_GLOBAL whose name is not given literally"
                found.append(f"{recent[-2][1]} {recent[-1][1]}")
            if opcode.name != "MEMOIZE":
                recent = [*recent[-1:], (opcode.name, arg)]
    except Exception as err:  # malformed pickle
        return found, f"unreadable pickle ({err})"
    return found, None


def _torch_zip_pickle(data: bytes) -> tuple[list[str], bytes | None]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            problems = [f"member {n!r} has an absolute or '..' path" for n in archive.namelist()
                        if n.startswith("/") or ".." in PurePosixPath(n).parts]  # fmt: skip
            if len(pkls) != 1:
                return problems + [f"expected one data.pkl, found {len(pkls)}"], None
            return problems, archive.read(pkls[0])
    except zipfile.BadZipFile:
        return ["not a torch zip checkpoint (legacy pickle format is refused)"], None


def check_weights(name: str, data: bytes) -> tuple[list[str], dict | None]:
    """Disassemble the checkpoint's pickle, then ``torch.load(weights_only=True)``; return (problems, state dict)."""
    import torch

    problems, pkl = _torch_zip_pickle(data)
    if pkl is None:
        return problems, None
    globals_, problem = _pickle_globals(pkl)
    if problem:
        problems.append(problem)
    for ref in globals_:
        module, _, attr = ref.partition(" ")
        if (module, attr) not in ALLOWED_PICKLE_GLOBALS and not _STORAGE_GLOBAL.match(ref):
            problems.append(f"pickle references {module}.{attr} (only tensors and OrderedDict are expected)")
    if problems:
        return problems, None
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        return [f"torch.load(weights_only=True) refused it ({str(err).splitlines()[0][:200]})"], None
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return ["not a state dict of tensors"], None
    return [], {k.removeprefix("module."): v for k, v in loaded.items()}


def check_torchscript(data: bytes) -> list[str]:
    """Structure of a TorchScript zip (``torch.jit.load`` is not called: see the module docstring)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return ["not a TorchScript zip"]
    problems = [f"member {n!r}: absolute or '..' path" for n in names if n.startswith("/") or ".." in n.split("/")]
    tops = {n.split("/")[0] for n in names}
    if len(tops) != 1:
        problems.append(f"expected one top-level folder, found {sorted(tops)[:5]}")
    rest = {n.split("/", 1)[1] for n in names if "/" in n}
    for required in ("data.pkl", "constants.pkl", "version"):
        if required not in rest:
            problems.append(f"missing {required}")
    if not any(n.startswith("code/") for n in rest):
        problems.append("missing code/")
    return problems


def _onnx_shapes(data: bytes) -> tuple[list[str], list[list[Any]], list[list[Any]]]:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as err:
        return [f"not an ONNX model ({err})"], [], []
    problems = []
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        problems.append(f"onnx.checker: {str(err).splitlines()[0][:200]}")
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            problems.append(f"initializer {tensor.name!r} stores its data in an external file")
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    if domains:
        problems.append(f"operators of custom domains {sorted(domains)}")

    def dims(value: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return problems, [dims(v) for v in model.graph.input], [dims(v) for v in model.graph.output]


# ----------------------------------------------------------------------------------------------- shapes
def _network_defs(configs: Mapping[str, Any]) -> dict[str, dict]:
    defs = {}
    for name, config in configs.items():
        if isinstance(config, dict) and isinstance(config.get("network_def"), dict):
            defs[name] = config["network_def"]
    return defs


def _literal_kwargs(network_def: Mapping[str, Any]) -> dict[str, Any] | None:
    kwargs = {k: v for k, v in network_def.items() if not (k.startswith("_") and k.endswith("_"))}
    for value in kwargs.values():
        for _, _, v in [("", None, value), *_walk(value)]:
            if isinstance(v, str) and v.startswith(("$", "@", "%")):
                return None
    return kwargs


def _check_shapes(meta: Mapping[str, Any], configs: Mapping[str, Any], state: dict | None) -> list[str]:
    problems: list[str] = []
    fmt = meta.get("network_data_format", {})
    inputs, outputs = fmt.get("inputs", {}), fmt.get("outputs", {})
    image = inputs.get("image") or next(iter(inputs.values()), None)
    pred = outputs.get("pred") or next(iter(outputs.values()), None)
    if image is None or pred is None:
        return ["network_data_format needs an input and an output"]
    spatial = image.get("spatial_shape", [])
    for size in spatial:
        if isinstance(size, int) and size % 64:
            problems.append(f"input spatial size {size} is not a multiple of 64 (the network's total stride)")
        elif isinstance(size, str) and not re.fullmatch(r"64\*\w+|\d+\*n", size.replace(" ", "")):
            problems.append(f"input spatial size {size!r} is not of the form '64*n'")
    if "cls" in outputs and outputs["cls"].get("num_channels") != 1:
        problems.append("output 'cls' must have 1 channel")
    for cfg, network_def in _network_defs(configs).items():
        if network_def.get("_target_") != "pneumoseg.networks.SCSEUNet":
            continue
        dims = network_def.get("spatial_dims", 2)
        if isinstance(dims, int) and len(spatial) != dims:
            problems.append(f"{cfg}: spatial_dims {dims} vs input spatial_shape {spatial}")
        for key, declared, default in (("in_channels", image.get("num_channels"), 1),
                                       ("out_channels", pred.get("num_channels"), 1)):  # fmt: skip
            value = network_def.get(key, default)
            if isinstance(value, int) and value != declared:
                problems.append(f"{cfg}: network_def {key}={value} but metadata declares {declared}")
        if state is not None and cfg.endswith("inference.json"):
            kwargs = _literal_kwargs(network_def)
            if kwargs is None:
                problems.append(f"{cfg}: network_def has expressions; weights not compared with it")
                continue
            try:
                import torch

                from pneumoseg.networks import SCSEUNet

                kwargs.pop("pretrained_path", None)
                with torch.device("meta"):
                    expected = SCSEUNet(**kwargs).state_dict()
            except Exception as err:
                problems.append(f"{cfg}: network_def cannot build pneumoseg.networks.SCSEUNet ({err})")
                continue
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            shapes = [k for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
            if missing or extra or shapes:
                problems.append(
                    f"models/model.pt does not fit {cfg} network_def: missing {missing[:3]}, unexpected "
                    f"{extra[:3]}, shape mismatches {shapes[:3]}"
                )
    return problems


# ------------------------------------------------------------------------------------------------ main
def _trusted_schema(files: Mapping[str, bytes]) -> tuple[dict | None, str]:
    """The receiver's own offline schema (this installation's bundle); the bundle's copy only as a fallback."""
    from pneumoseg.workflows import BUNDLE_NAME

    local = Path(__file__).resolve().parents[2] / "bundles" / BUNDLE_NAME / "configs" / "meta_schema.json"
    if local.is_file():
        return json.loads(local.read_text()), f"schema: {local.name} of this pneumoseg installation"
    if "configs/meta_schema.json" in files:
        return json.loads(files["configs/meta_schema.json"]), "schema: the bundle's own copy (no local copy found)"
    return None, ""


def _json(files: Mapping[str, bytes], name: str) -> tuple[Any, str | None]:
    try:
        return json.loads(files[name].decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{name}: not valid JSON ({err})"


def verify_bundle(path: str | os.PathLike, trust: bool = False) -> VerifyReport:
    """Run every check on a bundle folder or .zip; nothing from the bundle is executed.

    ``trust``: code findings (expressions, targets, logging) are reported as ``SKIP`` instead of ``FAIL``,
    and TorchScript files are additionally loaded with ``torch.jit.load`` and run on a zero image.
    """
    report = VerifyReport(str(path))
    structure, bundle = read_bundle(path)
    report.bundle = bundle
    report.add("archive", bundle.source, structure, f"{len(bundle.files)} files")
    files = bundle.files
    if not files:
        return report
    report.add("checksums", CHECKSUM_FILE, check_checksums(bundle), f"{len(files) - 1} files match")
    problems = check_contents(sorted(files))
    if trust and problems:
        report.add("contents", "bundle layout", [], skip=f"--trust: {len(problems)} findings ignored: {problems[0]}")
    else:
        report.add("contents", "bundle layout", problems, "configs/, models/, docs/, LICENSE only; no code files")

    # configs: JSON only (YAML cannot be screened here)
    configs: dict[str, Any] = {}
    config_names = sorted(n for n in files if n.startswith("configs/"))
    for name in config_names:
        if name.endswith((".yaml", ".yml")):
            report.add("code", name, ["YAML configs are not screened; convert to JSON"])
        elif name.endswith(".json") and name != "configs/meta_schema.json":
            config, problem = _json(files, name)
            if problem:
                report.add("code", name, [problem])
            else:
                configs[name] = config
    imports: dict[str, str] = {}
    for config in configs.values():  # MONAI merges configs, so imports of one are visible in the next
        for _, _, value in _walk(config):
            if isinstance(value, str) and value.startswith("$") and not _import_problems_safe(value[1:]):
                imports.update(_import_names(value[1:]))
    for name, config in configs.items():
        if name == "configs/metadata.json":
            continue
        problems, listing = check_config(name, config, imports)
        report.listing += [(name, *row) for row in listing]
        n_expr = sum(1 for r in listing if r[1] in ("expression", "import"))
        n_target = sum(1 for r in listing if r[1] == "_target_")
        passed = f"{n_expr} expressions, {n_target} _target_, {len(listing) - n_expr - n_target} references/macros"
        if trust and problems:
            report.add("code", name, [], skip=f"--trust: {len(problems)} findings ignored: {problems[0]}")
        else:
            report.add("code", name, problems, passed)

    # logging.conf
    for name in sorted(n for n in files if n.endswith(".conf") or n.endswith(".ini")):
        problems = check_logging_conf(files[name].decode("utf-8", "replace"))
        if trust and problems:
            report.add("logging", name, [], skip=f"--trust: {problems[0]}")
        else:
            report.add("logging", name, problems, "local stdlib handlers, literal args")

    # metadata
    meta: dict = {}
    if "configs/metadata.json" not in files:
        report.add("metadata", "configs/metadata.json", ["missing"])
    else:
        meta_value, problem = _json(files, "configs/metadata.json")
        meta = meta_value if isinstance(meta_value, dict) else {}
        schema, where = _trusted_schema(files)
        if problem:
            report.add("metadata", "configs/metadata.json", [problem])
        elif schema is None:
            report.add("metadata", "configs/metadata.json", ["no metadata schema available"])
        else:
            import jsonschema

            validator = jsonschema.Draft7Validator(schema)
            errors = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in
                      validator.iter_errors(meta_value)]  # fmt: skip
            version = meta.get("version")
            if version and version not in meta.get("changelog", {}):
                errors.append(f"version {version} has no changelog entry")
            report.add("metadata", "configs/metadata.json", errors, f"valid ({where}); version {version}")

    # weights, exports, shapes
    state = None
    for name in sorted(n for n in files if n.startswith("models/") and n.endswith((".pt", ".pth"))):
        problems, loaded = check_weights(name, files[name])
        state = loaded if name == "models/model.pt" else state
        n_params = sum(int(v.numel()) for v in (loaded or {}).values())
        report.add("weights", name, problems, f"weights_only load: {len(loaded or {})} tensors, {n_params} values")
    for name in sorted(n for n in files if n.endswith(".ts")):
        problems = check_torchscript(files[name])
        if not problems and trust:
            problems = _run_torchscript(files[name], meta)
            report.add("torchscript", name, problems, "--trust: loaded with torch.jit.load, outputs as declared")
        else:
            report.add("torchscript", name, problems, "zip structure ok (not loaded: use --trust to load and run)")
    for name in sorted(n for n in files if n.endswith(".onnx")):
        try:
            import onnx  # noqa: F401
        except ImportError:
            report.add("onnx", name, [], skip="onnx not installed (pip install 'pneumoseg[onnx]')")
            continue
        problems, ins, outs = _onnx_shapes(files[name])
        channels = meta.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("num_channels")
        if ins and (len(ins) != 1 or len(ins[0]) != 4 or ins[0][1] != channels):
            problems.append(f"inputs {ins}: expected one [batch, {channels}, H, W]")
        out_channels = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("num_channels")
        if ins and (len(outs) != 2 or len(outs[0]) != 4 or outs[0][1] != out_channels):
            problems.append(f"outputs {outs}: expected seg [batch, {out_channels}, H, W] and cls [batch, 1]")
        report.add("onnx", name, problems, f"onnx.checker ok; inputs {ins}, outputs {outs}")
    if meta:
        report.add("shapes", "network_data_format", _check_shapes(meta, configs, state), "consistent with configs")
    return report


def _run_torchscript(data: bytes, meta: Mapping[str, Any]) -> list[str]:
    import torch

    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        channels = int(meta.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("num_channels", 1))
        with torch.no_grad():
            out = module(torch.zeros(1, channels, 64, 64))
    except Exception as err:
        return [f"torch.jit.load / forward failed ({str(err).splitlines()[0][:200]})"]
    seg, cls = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    problems = []
    if tuple(seg.shape[2:]) != (64, 64):
        problems.append(f"segmentation output {tuple(seg.shape)} for a 64x64 input")
    if cls is not None and tuple(cls.shape) != (1, 1):
        problems.append(f"classification output {tuple(cls.shape)}, expected (1, 1)")
    return problems
