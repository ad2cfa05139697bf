"""The node's settings: ``node.toml`` (read with tomllib) with command-line overrides.

Every default lives in the dataclasses below (and nowhere else); a file sets what differs, the command line
what differs for one run. Unknown sections and keys, and values of the wrong type, are errors that name the
file and the key: a typo in a port or an AE title must not start a node that silently listens elsewhere.

::

    [node]
    ae_title = "PNEUMOSEG"
    port = 11112
    allowed_ae_titles = ["ORTHANC"]

    [[destinations]]
    name = "pacs"
    ae_title = "ORTHANC"
    host = "10.1.2.3"
    port = 4242
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python >= 3.11; the pacs extra installs tomli on 3.10
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ConfigError",
    "Destination",
    "DicomWebSettings",
    "InferenceSettings",
    "NodeConfig",
    "NodeSettings",
    "ResultSettings",
    "SendSettings",
    "load_config",
    "parse_destination",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars of the default repertoire, no "\"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the file (or option) and the key."""


@dataclass(frozen=True)
class NodeSettings:
    """``[node]``: the Storage SCP and where the node keeps its state.

    ``state_dir`` holds the spool (received instances), the queue database and, unless ``results_dir`` is
    set, the results; a relative path is relative to the config file. ``quiet_seconds``: a study is complete
    when no instance of it arrived for that long. ``allowed_ae_titles`` / ``allowed_hosts``: calling AE
    titles and peer addresses accepted at association (empty: any).
    """

    ae_title: str = "PNEUMOSEG"
    bind: str = "127.0.0.1"
    port: int = 11112
    state_dir: str = "pneumoseg-node"
    results_dir: str = ""
    quiet_seconds: float = 30.0
    allowed_ae_titles: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_associations: int = 10
    max_pdu: int = 0  # 0: unlimited (pynetdicom's convention)


@dataclass(frozen=True)
class InferenceSettings:
    """``[inference]``: the bundles and how ``pneumoseg infer``'s runner is run on each study."""

    bundles: tuple[str, ...] = ()
    device: str = "auto"
    batch_size: int = 8
    workers: int = 2
    fp32: bool = False
    max_attempts: int = 3  # a study whose processing was interrupted this often (e.g. it crashes the node) fails


@dataclass(frozen=True)
class ResultSettings:
    """``[results]``: what goes back for each scan: the DICOM SEG, a Comprehensive SR (probability,
    positive, area / volume), a Secondary Capture of the overlay."""

    seg: bool = True
    sr: bool = True
    secondary_capture: bool = False


@dataclass(frozen=True)
class SendSettings:
    """``[send]``: retries. A destination that cannot be reached is retried for ever, waiting
    ``initial_backoff_seconds`` doubled per failure up to ``max_backoff_seconds``; a destination that answers
    with a failure status is given ``max_attempts`` tries (0: for ever), then the result is marked failed."""

    initial_backoff_seconds: float = 5.0
    max_backoff_seconds: float = 300.0
    max_attempts: int = 10
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class Destination:
    """``[[destinations]]``: a DICOM node that receives the results (C-STORE SCP)."""

    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class DicomWebSettings:
    """``[dicomweb]``: pull new studies from a DICOMweb server (QIDO-RS / WADO-RS) and store the results
    there (STOW-RS). ``lookback_days``: each poll lists the studies whose StudyDate is within that many days
    (a poll must not list a whole archive; 0: no date filter). ``pull_existing``: also process the studies
    already on the server when the node first starts (default: only those that appear later)."""

    url: str = ""
    poll_seconds: float = 30.0
    lookback_days: int = 2  # QIDO-RS asks for studies of the last days only (StudyDate); 0: every study
    pull_existing: bool = False
    store_results: bool = True
    timeout_seconds: float = 60.0


@dataclass(frozen=True)
class NodeConfig:
    """All settings of ``pneumoseg serve``; ``source`` is the config file (``""`` if none)."""

    node: NodeSettings = field(default_factory=NodeSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    results: ResultSettings = field(default_factory=ResultSettings)
    send: SendSettings = field(default_factory=SendSettings)
    destinations: tuple[Destination, ...] = ()
    dicomweb: DicomWebSettings = field(default_factory=DicomWebSettings)
    source: str = ""

    @property
    def state_dir(self) -> Path:
        return self._path(self.node.state_dir)

    @property
    def results_dir(self) -> Path:
        return self._path(self.node.results_dir) if self.node.results_dir else self.state_dir / "results"

    @property
    def bundle_dirs(self) -> tuple[Path, ...]:
        return tuple(self._path(b) for b in self.inference.bundles)

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute() and self.source:
            path = Path(self.source).resolve().parent / path
        return path


_SECTIONS = {
    "node": NodeSettings,
    "inference": InferenceSettings,
    "results": ResultSettings,
    "send": SendSettings,
    "dicomweb": DicomWebSettings,
}


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """``value`` as the field type ``kind`` (a string annotation: ``str``, ``int``, ``float``, ``bool``,
    ``tuple[str, ...]``), or :class:`ConfigError`."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "tuple[str, ...]":
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    else:  # pragma: no cover - a field type this reader does not know
        raise TypeError(f"{where}: unsupported field type {kind}")
    raise ConfigError(f"{where}: expected {kind}, got {type(value).__name__} {value!r}")


def _section(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in table and f.default is f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    return cls(**{k: _coerce(v, fields[k].type, f"{where}.{k}") for k, v in table.items()})


def parse_destination(text: str, where: str = "--destination") -> Destination:
    """``AE_TITLE@HOST:PORT`` (the command-line form) -> :class:`Destination` named after the AE title."""
    match = re.fullmatch(r"(?P<ae>[^@]+)@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)", text.strip())
    if not match:
        raise ConfigError(f"{where}: {text!r} is not AE_TITLE@HOST:PORT")
    return Destination(match["ae"], match["ae"], match["host"].strip("[]"), int(match["port"]))


def _check(config: NodeConfig) -> NodeConfig:
    where = config.source or "settings"
    titles = [("node.ae_title", config.node.ae_title)]
    titles += [(f"node.allowed_ae_titles[{i}]", t) for i, t in enumerate(config.node.allowed_ae_titles)]
    titles += [(f"destinations.{d.name}.ae_title", d.ae_title) for d in config.destinations]
    for key, title in titles:
        if not _AE_TITLE.match(title) or not title.strip():
            raise ConfigError(f"{where}: {key}: {title!r} is not an AE title (1-16 characters, no backslash)")
    ports = [("node.port", config.node.port)] + [(f"destinations.{d.name}.port", d.port) for d in config.destinations]
    for key, port in ports:
        if not 0 <= port <= 65535 or key != "node.port" and port == 0:
            raise ConfigError(f"{where}: {key}: {port} is not a TCP port")
    for host in config.node.allowed_hosts:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: node.allowed_hosts: {host!r} is not an IP address or network") from None
    names = [d.name for d in config.destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: destinations: names must be unique, got {names}")
    if config.node.quiet_seconds < 0 or config.dicomweb.poll_seconds <= 0 or config.dicomweb.lookback_days < 0:
        raise ConfigError(f"{where}: need node.quiet_seconds >= 0, dicomweb.poll_seconds > 0, lookback_days >= 0")
    if (
        config.send.initial_backoff_seconds <= 0
        or config.send.max_backoff_seconds < config.send.initial_backoff_seconds
    ):
        raise ConfigError(f"{where}: send: need 0 < initial_backoff_seconds <= max_backoff_seconds")
    if config.inference.batch_size < 1 or config.inference.workers < 0 or config.inference.max_attempts < 1:
        raise ConfigError(f"{where}: inference: batch_size >= 1, workers >= 0, max_attempts >= 1")
    return config


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """The node's settings from ``path`` (TOML; ``None``: defaults) with ``overrides`` applied.

    ``overrides``: ``{"section.key": value}`` (``None`` values are ignored), ``"destinations"``: a list of
    :class:`Destination` replacing the file's.
    """
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML ({err})") from None
    unknown = sorted(set(data) - set(_SECTIONS) - {"destinations"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; expected {sorted([*_SECTIONS, 'destinations'])}")
    sections = {name: dict(data.get(name, {})) if isinstance(data.get(name, {}), Mapping) else data[name]
                for name in _SECTIONS}  # fmt: skip
    destinations: Sequence[Destination] = ()
    raw_destinations = data.get("destinations", [])
    if not isinstance(raw_destinations, list):
        raise ConfigError(f"{source}: destinations: expected [[destinations]] tables")
    destinations = [_section(Destination, d, f"{source}: destinations[{i}]") for i, d in enumerate(raw_destinations)]
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "destinations":
            destinations = list(value)
            continue
        section, _, name = key.partition(".")
        if section not in sections or not isinstance(sections[section], dict):
            raise ConfigError(f"override {key!r}: unknown section")
        sections[section][name] = value
    config = NodeConfig(
        **{name: _section(cls, sections[name], f"{source or 'settings'}: {name}") for name, cls in _SECTIONS.items()},
        destinations=tuple(destinations),
        source=source,
    )
    return _check(config)
