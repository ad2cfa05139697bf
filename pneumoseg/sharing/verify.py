"""Verification of a received bundle (``.zip`` or folder): ``pneumoseg bundle verify PATH``.

A received bundle is data. Verify reads it within bounds (:mod:`pneumoseg.sharing.archive`), checks that it is
exactly what its sender signed (:mod:`pneumoseg.sharing.signing`) and that every file is what the receiving
commands will read it as: a model record of the closed schema, a weights-only state dict that fits the
record's network, an ONNX model without external data that computes what the weights compute, metadata that
is plain data, a model card and licence that are text. The sender's MONAI configs, if present, are
documents under ``reference/configs/``: verify shows how they differ from the installed templates and says
that nothing will execute them. Nothing from the bundle is executed, imported or unpickled.

Each check is a row of the report: ``PASS``, ``FAIL`` or ``NOTE`` (content nothing will execute, or an
accepted weakness such as ``--allow-unsigned``). Checks stop at the first failing stage of archive ->
checksums -> signature: the files of a bundle that is not exactly what its sender signed are not read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.sharing.archive import (
    CHECKSUM_FILE,
    REFERENCE_CONFIG,
    REQUIRED,
    SIGNATURE_FILE,
    ArchiveLimits,
    Member,
    classify,
    printable,
    read_folder,
    read_zip,
    shortened,
)
from pneumoseg.sharing.signing import TrustedKey, check_signature, default_trusted_keys_dir, load_trusted_keys

__all__ = ["Check", "VerifyReport", "check_members", "config_differences", "verify_bundle", "EXPORT_TOLERANCE"]

EXPORT_TOLERANCE = 1e-3
"""Largest probability difference allowed between ``models/model.onnx`` and ``models/model.pt``."""


# ============================================================================================ results


@dataclass
class Check:
    """One row of the report: ``status`` is ``PASS``, ``FAIL`` or ``NOTE``."""

    check: str
    subject: str
    status: str
    detail: str = ""


@dataclass
class VerifyReport:
    """All checks of one bundle; ``ok`` when nothing failed. ``signer`` names the trusted key that signed
    it; ``differences`` lists, per reference config, how it differs from the installed template."""

    source: str
    checks: list[Check] = field(default_factory=list)
    signer: str | None = None
    name: str | None = None
    version: str | None = None
    stopped: str | None = None
    differences: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(c.status == "FAIL" for c in self.checks)

    def add(self, check: str, subject: str, problems: Sequence[str], passed: str = "") -> bool:
        """A ``FAIL`` row per problem, else one ``PASS`` row; returns whether it passed."""
        if problems:
            self.checks.extend(Check(check, subject, "FAIL", p) for p in problems)
        else:
            self.checks.append(Check(check, subject, "PASS", passed))
        return not problems

    def note(self, check: str, subject: str, detail: str) -> None:
        self.checks.append(Check(check, subject, "NOTE", detail))

    def table(self, width: int = 150, differences: bool = False) -> str:
        """The table a person reads (received text escaped: no terminal control sequences)."""
        # details quote received text (names, values): escaped, whatever made them
        rows = [("STATUS", "CHECK", "SUBJECT", "DETAIL")] + [
            (c.status, c.check, printable(c.subject, None), printable(c.detail, None)) for c in self.checks
        ]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        w2 = min(36, max(len(r[2]) for r in rows))
        lines = [f"bundle: {self.source}"]
        if self.name is not None:
            lines.append(f"name: {printable(self.name, None)}, version {printable(str(self.version), None)}")
        lines.append(f"signer: {self.signer or 'none verified'}")
        for r in rows:
            detail = r[3] if len(r[3]) <= width else r[3][: width - 3] + "..."
            lines.append(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<{w2}}  {detail}".rstrip())
            if differences and r[2] in self.differences and r[0] == "NOTE":
                indent = " " * (w0 + w1 + w2 + 8)
                lines += [indent + printable(d, None) for d in self.differences[r[2]]]
        if self.stopped:
            lines.append(f"not checked further: {self.stopped}")
        failed = sum(c.status == "FAIL" for c in self.checks)
        lines.append(f"RESULT: {'PASS' if self.ok else 'FAIL'} ({failed} failed, {len(self.checks)} checks)")
        return "\n".join(lines)


# ====================================================================================== entry points


def verify_bundle(
    path: str | os.PathLike,
    trusted_keys: str | os.PathLike | Sequence[TrustedKey] | None = None,
    allow_unsigned: bool = False,
    limits: ArchiveLimits = ArchiveLimits(),
) -> VerifyReport:
    """Verify a bundle ``.zip`` (streamed into a temporary folder, removed afterwards) or folder.

    ``trusted_keys``: a folder of pinned public keys (default :func:`default_trusted_keys_dir`) or the keys.
    ``allow_unsigned``: accept a bundle that is unsigned or signed by a key that is not pinned (a ``NOTE``
    row instead of a ``FAIL``); a signature that does not match is refused regardless.
    """
    path = Path(path)
    if path.is_dir():
        problems, members = read_folder(path, limits)
        return check_members(str(path), problems, members, trusted_keys, allow_unsigned, limits)
    with tempfile.TemporaryDirectory(prefix="pneumoseg-verify-") as staging:
        problems, members = read_zip(path, staging, limits)
        return check_members(str(path), problems, members, trusted_keys, allow_unsigned, limits)


def check_members(
    source: str,
    structure: Sequence[str],
    members: Mapping[str, Member],
    trusted_keys: str | os.PathLike | Sequence[TrustedKey] | None = None,
    allow_unsigned: bool = False,
    limits: ArchiveLimits = ArchiveLimits(),
) -> VerifyReport:
    """Every check of a bundle whose members were read (by :func:`read_zip` / :func:`read_folder`, which
    returned the ``structure`` problems)."""
    report = VerifyReport(source)
    missing = [f"{name}: missing (a shared bundle needs {', '.join(REQUIRED)})" for name in REQUIRED]
    missing = [m for m, name in zip(missing, REQUIRED) if name not in members]
    passed = f"{len(members)} members of the closed layout, within the limits ({_limits_text(limits)})"
    if not report.add("archive", "layout and limits", [*structure, *missing], passed):
        report.stopped = "the archive is not a bundle of the accepted layout (nothing of it was read)"
        return report
    manifest = _check_checksums(report, members)
    if manifest is None:
        report.stopped = "the files are not the ones the checksum manifest lists"
        return report
    if not _check_signature(report, manifest, members, trusted_keys, allow_unsigned):
        report.stopped = "the bundle is not known to come unchanged from a trusted sender"
        return report
    record, state = _check_record_and_weights(report, members)
    if "models/model.onnx" in members:
        _check_onnx(report, members["models/model.onnx"], record, state)
    _check_metadata(report, members)
    for name in ("docs/README.md", "LICENSE"):
        if name in members:
            _check_text(report, members[name])
    for name in sorted(n for n in members if REFERENCE_CONFIG.fullmatch(n)):
        _check_reference_config(report, members[name])
    return report


def _limits_text(limits: ArchiveLimits) -> str:
    mib = 1024 * 1024
    return (
        f"{limits.max_members} members, {limits.max_member_bytes // mib} MiB per model file, "
        f"{limits.max_text_bytes // mib} MiB per text file, {limits.max_total_bytes // mib} MiB in all"
    )


# ============================================================================================= checks


def _check_checksums(report: VerifyReport, members: Mapping[str, Member]) -> bytes | None:
    """The manifest lists exactly the other members (not the signature) with their streamed hashes."""
    data = members[CHECKSUM_FILE].path.read_bytes()
    problems: list[str] = []
    listed: dict[str, str] = {}
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        lines, problems = [], [f"{CHECKSUM_FILE}: not UTF-8 text"]
    for number, line in enumerate(lines, 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            problems.append(f"{CHECKSUM_FILE} line {number}: not '<sha256>  <path>'")
        elif name in listed:
            problems.append(f"{CHECKSUM_FILE} line {number}: {shortened(name)} listed twice")
        elif name in (CHECKSUM_FILE, SIGNATURE_FILE) or classify(name):
            problems.append(f"{CHECKSUM_FILE} line {number}: {shortened(name)} is not a member a bundle can list")
        else:
            listed[name] = digest
    present = {n for n in members if n not in (CHECKSUM_FILE, SIGNATURE_FILE)}
    problems += [f"{n}: not listed in {CHECKSUM_FILE}" for n in sorted(present - set(listed))]
    problems += [f"{n}: listed in {CHECKSUM_FILE} but missing" for n in sorted(set(listed) - present)]
    changed = sorted(n for n in present & set(listed) if members[n].sha256 != listed[n])
    problems += [f"{n}: SHA-256 differs from {CHECKSUM_FILE}" for n in changed]
    ok = report.add("checksums", CHECKSUM_FILE, problems[:20], f"{len(present)} files match their SHA-256")
    return data if ok else None


def _check_signature(
    report: VerifyReport,
    manifest: bytes,
    members: Mapping[str, Member],
    trusted_keys: str | os.PathLike | Sequence[TrustedKey] | None,
    allow_unsigned: bool,
) -> bool:
    if trusted_keys is None or isinstance(trusted_keys, (str, os.PathLike)):
        folder = Path(trusted_keys) if trusted_keys is not None else default_trusted_keys_dir()
        keys, key_problems = load_trusted_keys(folder)
        keys_source = f"the trusted keys in {folder}"
        for problem in key_problems:
            report.note("signature", "trusted keys", problem)
    else:
        keys, keys_source = list(trusted_keys), "the trusted keys given"
    signature = members[SIGNATURE_FILE].path.read_bytes() if SIGNATURE_FILE in members else None
    result = check_signature(manifest, signature, keys, keys_source)
    if result.status == "valid":
        report.signer = result.detail.removeprefix("signed by ")
        return report.add("signature", SIGNATURE_FILE, [], result.detail)
    if result.status in ("unsigned", "unknown_key") and allow_unsigned:
        report.note("signature", SIGNATURE_FILE, f"{result.detail}; accepted because of --allow-unsigned")
        return True
    hint = " (pass --allow-unsigned to accept it anyway)" if result.status in ("unsigned", "unknown_key") else ""
    return report.add("signature", SIGNATURE_FILE, [result.detail + hint])


def _check_record_and_weights(report: VerifyReport, members: Mapping[str, Member]) -> tuple[Any, Any]:
    import torch

    from pneumoseg.model_record import ModelRecord, ModelRecordError, load_state_dict

    record_member = members["models/model_record.json"]
    try:
        record = ModelRecord.read(record_member.path)
    except (ModelRecordError, ValueError, OSError) as err:
        report.add("record", record_member.name, [_relative(err, record_member)])
        report.add("weights", "models/model.pt", ["not checked: no valid model record to check them against"])
        return None, None
    sizes = ", ".join(f"{kind} {p.image_size} px" for kind, p in record.preprocessing.items())
    report.add(
        "record",
        record_member.name,
        [],
        f"{record.network.name}, {sizes}, operating threshold {record.operating_threshold:g} (closed schema)",
    )
    weights = members["models/model.pt"]
    try:
        state = load_state_dict(weights.path)  # torch.load(weights_only=True): tensors and containers only
        with torch.device("meta"):  # shapes only: nothing allocated for the declared network
            expected = {k: tuple(v.shape) for k, v in record.network.build().state_dict().items()}
    except (ModelRecordError, ValueError, OSError, RuntimeError) as err:
        report.add("weights", weights.name, [_relative(err, weights)])
        return record, None
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [k for k in expected if k in found and expected[k] != found[k]]
    problems = []
    if missing or extra or shapes:
        unexpected = [shortened(k, 60) for k in extra[:3]]
        problems.append(
            f"does not fit the record's network: missing {missing[:3]}, unexpected {unexpected}, "
            f"shape mismatches {shapes[:3]}"
        )
    n_values = sum(int(v.numel()) for v in state.values())
    passed = f"weights-only state dict: {len(state)} tensors, {n_values} values fit the record's network"
    if report.add("weights", weights.name, problems, passed):
        return record, state
    return record, None


def _relative(err: Exception, member: Member) -> str:
    """An error message naming the member, not the temporary folder it was streamed to."""
    return str(err).replace(str(member.path), member.name)[:300]


def _check_onnx(report: VerifyReport, member: Member, record: Any, state: Any) -> None:
    from pneumoseg.sharing.model import ExportedModel, onnx_problems

    try:
        problems = onnx_problems(member.path.read_bytes())
        import onnxruntime  # noqa: F401  (the equivalence check below runs it)
    except ImportError as err:
        report.add("onnx", member.name, [str(err)])
        return
    if problems:
        report.add("onnx", member.name, problems)
        return
    if record is None or state is None:
        report.add("onnx", member.name, ["not compared with the weights: they did not pass"])
        return
    import torch

    network = record.network.build()
    network.load_state_dict(state, strict=True)
    network.eval()
    model = ExportedModel.load(member.path, trust=True)  # checked just above
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = network(x), model(x)
    diff = max(
        float((torch.sigmoid(out.seg) - torch.sigmoid(ref.seg)).abs().max()),
        float((torch.sigmoid(out.cls) - torch.sigmoid(ref.cls)).abs().max()),
    )
    problems = []
    if diff > EXPORT_TOLERANCE:
        problems.append(f"does not compute what models/model.pt computes (max probability difference {diff:.2e})")
    passed = f"no external data, standard operators; equals models/model.pt within {diff:.1e}"
    report.add("onnx", member.name, problems, passed)


def _check_metadata(report: VerifyReport, members: Mapping[str, Member]) -> None:
    from pneumoseg.sharing.metadata import metadata_problems, read_json

    member = members["configs/metadata.json"]
    try:
        value = read_json(member.path)
    except (ValueError, OSError) as err:
        report.add("metadata", member.name, [_relative(err, member)])
        return
    problems = metadata_problems(value)
    if problems:
        report.add("metadata", member.name, problems)
        return
    report.name, report.version = shortened(value["name"], 80), shortened(value["version"], 40)
    report.add("metadata", member.name, [], "plain data, valid against MONAI's schema (this installation's copy)")


def _check_text(report: VerifyReport, member: Member) -> None:
    try:
        member.path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        report.add("text", member.name, ["not UTF-8 text"])
        return
    report.add("text", member.name, [], f"UTF-8 text, {member.size} bytes")


# ================================================================================ reference configs


def _flatten(value: Any, prefix: str, out: dict[str, Any], limit: int = 20000) -> None:
    if len(out) >= limit:
        return
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}#{k}" if prefix else str(k), out, limit)
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}#{i}", out, limit)
    else:
        out[prefix] = value


def config_differences(received: Any, installed: Any) -> list[tuple[str, Any, Any]]:
    """``(id, installed value, received value)`` for every leaf id (MONAI's ``a#b#0`` form) that differs;
    ``...`` stands for a missing side."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(installed, "", a)
    _flatten(received, "", b)
    return [(k, a.get(k, ...), b.get(k, ...)) for k in sorted(set(a) | set(b)) if a.get(k, ...) != b.get(k, ...)]


def _shown(value: Any) -> str:
    import json

    return "(absent)" if value is ... else shortened(json.dumps(value), 60)


def _check_reference_config(report: VerifyReport, member: Member) -> None:
    from pneumoseg.sharing.metadata import read_json
    from pneumoseg.sharing.templates import installed_configs

    try:
        value = read_json(member.path)
    except (ValueError, OSError) as err:
        report.add("reference", member.name, [f"{_relative(err, member)} (reference configs are JSON documents)"])
        return
    leaves: dict[str, Any] = {}
    _flatten(value, "", leaves)
    strings = [v for v in leaves.values() if isinstance(v, str)]
    n_expressions = sum(s.startswith("$") for s in strings)
    code = f"{n_expressions} $-expressions, {sum(k.endswith('_target_') for k in leaves)} _target_"
    template = installed_configs() / Path(member.name).name
    if not template.is_file():
        compared = "no installed config of that name"
    else:
        diffs = config_differences(value, read_json(template))
        report.differences[member.name] = [
            f"{shortened(k, 80)}: {_shown(old)} -> {_shown(new)}" for k, old, new in diffs[:200]
        ]
        compared = f"same values as the installed configs/{template.name}"
        if diffs:
            first = "; ".join(report.differences[member.name][:2])
            compared = f"{len(diffs)} values differ from the installed configs/{template.name} ({first}; ...)"
    report.note("reference", member.name, f"document only, nothing runs it ({code}); {compared}")
