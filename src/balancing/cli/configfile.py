"""The agent's configuration: a versioned YAML file, environment variables and flags, merged and checked.

``BalancingConfiguration`` is the file's schema (``apiVersion: balancing.elf.io/v1alpha1``, ``kind:
BalancingConfiguration``, fields in camelCase; every field documented in ``docs/configuration.md``). The
same fields come from environment variables, ``BALANCING_`` and the field in upper snake case, nested with
``__`` (``BALANCING_NODE_NAME``, ``BALANCING_EVENTS__MODE``; lists as JSON), read with pydantic-settings,
and from the agent's flags (``FLAGS``: flag → field). Precedence: flags > environment > file > defaults,
field by field, except that the layer naming a source (``source.manifests`` or one of
``source.kubernetes``' ``inCluster``, ``kubeconfig``, ``apiServer``) replaces the source of the layers
below it.

Each layer is validated on its own, so an error names where the value came from: ``FILE: events.mode``,
``BALANCING_EVENTS__MODE`` or ``--events``. Unknown fields, a missing or wrong ``apiVersion``/``kind`` are
errors. Values whose form the flags also check (HOST:PORT, durations, node names) go through
``cli.flags``; checks against the machine (a directory exists, a cgroup v2 mount) are ``agent_cmd``'s, which
builds ``AgentConfig`` from ``Loaded.config`` and names fields with ``Loaded.where``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeGuard

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from balancing import errors
from balancing.cli import flags, logs
from balancing.datapath import abi, maglev, northsouth, sockterm
from balancing.events import stream
from balancing.model import config as model_config

__all__ = ["API_VERSION", "FLAGS", "KIND", "BalancingConfiguration", "Loaded", "load"]

API_VERSION = "balancing.elf.io/v1alpha1"
KIND = "BalancingConfiguration"
ENV_PREFIX = "BALANCING_"
DEFAULT_BPFFS = Path("/sys/fs/bpf/balancing")

Json = dict[str, Any]
FieldPath = tuple[str, ...]


def _via(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A validator returning ``check(value)``; the ``errors.ConfigError`` it raises becomes pydantic's."""

    def validate(value: Any) -> Any:
        try:
            return check(value)
        except errors.ConfigError as exc:
            raise ValueError(exc.message) from None

    return validate


def _node_name(value: str | None) -> str | None:
    if value is not None and (not value.strip() or not value.isprintable()):
        raise ValueError(f"{value!r} is not a node name")
    return value


def _power_of_two(value: int) -> int:
    if value < 4096 or value & (value - 1):
        raise ValueError(f"{value} is not a power of two of at least 4096")
    return value


def _cidrs(value: list[str]) -> list[str]:
    model_config.parse_cidrs(value)  # ValueError names the bad one
    return value


HostPort = Annotated[str, AfterValidator(_via(lambda v: flags.host_port("", v) and v))]
OptionalHostPort = Annotated[str, AfterValidator(_via(lambda v: v and flags.host_port("", v) and v))]
Seconds = Annotated[float, AfterValidator(_via(lambda v: flags.positive_seconds("", v)))]
Level = Annotated[str, AfterValidator(_via(lambda v: logs.check_level("", v)))]
Format = Annotated[str, AfterValidator(_via(lambda v: logs.check_format("", v)))]


class Section(BaseModel):
    """camelCase in the file and snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, extra="forbid")


class KubernetesSource(Section):
    """The Kubernetes API: in-cluster, a kubeconfig (and a context of it, else its current one), a plain URL,
    or ``context`` alone: that context of the environment's kubeconfig (``KUBECONFIG``, else
    ``~/.kube/config``; ``sources.kubeconfig``)."""

    in_cluster: bool = False
    kubeconfig: Path | None = None
    context: str | None = None
    api_server: str | None = None

    @model_validator(mode="after")
    def _one_way(self) -> KubernetesSource:
        given = [n for n, v in (("inCluster", self.in_cluster), ("kubeconfig", self.kubeconfig),
                                ("apiServer", self.api_server)) if v]  # fmt: skip
        if len(given) > 1:
            raise ValueError(f"give one of inCluster, kubeconfig, apiServer (got {', '.join(given)})")
        return self


class Source(Section):
    """Exactly one of a manifest directory or the Kubernetes API (checked on the merged configuration)."""

    manifests: Path | None = None
    kubernetes: KubernetesSource | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> Source:
        if self.manifests is not None and self.kubernetes is not None:
            raise ValueError("give one of manifests, kubernetes (got both)")
        return self


class Maps(Section):
    """Map sizes, set at load time (a pinned map keeps its size until ``balancing cleanup``)."""

    services: int = Field(abi.DEFAULT_SVC_ENTRIES, ge=1)
    backends: int = Field(abi.DEFAULT_BACKENDS, ge=1)
    reverse: int = Field(abi.DEFAULT_REV_ENTRIES, ge=1)
    # No effect since 0.4 (the agent warns when it is set): a translated connected socket keeps its reverse
    # translation in its own socket storage, which has no capacity to configure.
    sockets: int | None = Field(None, ge=1)
    affinity: int = Field(abi.DEFAULT_AFF_ENTRIES, ge=1)


class Events(Section):
    mode: Literal["off", "sampled", "all"] = "off"
    sample_every: int = Field(100, ge=1)
    reverse: bool = False
    ring_bytes: Annotated[int, AfterValidator(_power_of_two)] = abi.DEFAULT_EVENT_BYTES
    stdout: bool = False
    log: Path | None = None
    log_max_bytes: int = Field(100 << 20, ge=1)
    log_backups: int = Field(3, ge=0)
    socket: Path = stream.DEFAULT_SOCKET


class SocketLB(Section):
    host_namespace_only: bool = False


def _snat_ports(value: str) -> str:
    northsouth.parse_snat_ports(value)  # ValueError says what is wrong
    return value


def _maglev_size(value: int) -> int:
    maglev.valid_size(value)  # ValueError: not a prime, and the next one
    return value


class NorthSouth(Section):
    """North-south: NodePort, load-balancer and externalIP traffic from outside, translated in TC on the
    node's devices (off unless ``enabled`` or ``devices`` is given)."""

    enabled: bool = False
    devices: list[str] = Field(default_factory=list)  # empty: the devices holding this Node's addresses
    maglev_table_size: Annotated[int, AfterValidator(_maglev_size)] = abi.DEFAULT_MAGLEV_SIZE
    snat_ports: Annotated[str, AfterValidator(_snat_ports)] = "{}-{}".format(*northsouth.DEFAULT_SNAT_PORTS)
    conntrack_entries: int = Field(abi.DEFAULT_CT_ENTRIES, ge=2, le=0xFFFFFFFF)  # a map's size is a __u32
    attach_mode: Literal["auto", "tcx", "clsact"] = "auto"


class Logging(Section):
    level: Level = "info"
    format: Format = "text"


class BalancingConfiguration(Section):
    """The file's schema; every field has the flag's default (``None``: computed, see the docs)."""

    api_version: str = API_VERSION
    kind: str = KIND
    node_name: Annotated[str | None, AfterValidator(_node_name)] = None
    source: Source = Field(default_factory=Source)
    cgroup: Path | None = None
    bpffs: Path = DEFAULT_BPFFS
    bpf_object: Path | None = None
    health_addr: HostPort = "0.0.0.0:10256"
    state_addr: OptionalHostPort = "127.0.0.1:10264"
    metrics_addr: OptionalHostPort = "127.0.0.1:10249"
    healthcheck_address: str = "0.0.0.0"
    resync_interval: Seconds = 30.0
    nodeport_addresses: Annotated[list[str], AfterValidator(_cidrs)] = Field(default_factory=list)
    external_ips_local_only: bool = Field(False, alias="externalIPsLocalOnly")
    out_of_cluster: bool = False
    host_netns: Path | None = None
    policy_status: bool = True
    terminate_udp_sockets: bool = Field(True, alias="terminateUDPSockets")
    netns_dirs: list[Path] = Field(default_factory=lambda: list(sockterm.NETNS_DIRS))
    maps: Maps = Field(default_factory=Maps)
    events: Events = Field(default_factory=Events)
    socket_lb: SocketLB = Field(default_factory=SocketLB, alias="socketLB")
    north_south: NorthSouth = Field(default_factory=NorthSouth)
    logging: Logging = Field(default_factory=Logging)


class _Environment(BalancingConfiguration, BaseSettings):
    """Only to read the environment with pydantic-settings (validation is ``BalancingConfiguration``'s)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__")


DEFAULTS = BalancingConfiguration()

# flag → field path (python names). ``--in-cluster`` counts only when true.
FLAGS: dict[str, FieldPath] = {
    "--node-name": ("node_name",),
    "--manifests": ("source", "manifests"),
    "--in-cluster": ("source", "kubernetes", "in_cluster"),
    "--kubeconfig": ("source", "kubernetes", "kubeconfig"),
    "--context": ("source", "kubernetes", "context"),
    "--api-server": ("source", "kubernetes", "api_server"),
    "--cgroup": ("cgroup",),
    "--bpffs": ("bpffs",),
    "--bpf-object": ("bpf_object",),
    "--health-addr": ("health_addr",),
    "--state-addr": ("state_addr",),
    "--metrics-addr": ("metrics_addr",),
    "--healthcheck-address": ("healthcheck_address",),
    "--resync-interval": ("resync_interval",),
    "--nodeport-addresses": ("nodeport_addresses",),
    "--external-ips-local-only": ("external_ips_local_only",),
    "--out-of-cluster": ("out_of_cluster",),
    "--host-netns": ("host_netns",),
    "--policy-status": ("policy_status",),
    "--terminate-udp-sockets": ("terminate_udp_sockets",),
    "--netns-dir": ("netns_dirs",),
    "--max-services": ("maps", "services"),
    "--max-backends": ("maps", "backends"),
    "--max-reverse": ("maps", "reverse"),
    "--max-sockets": ("maps", "sockets"),
    "--max-affinity": ("maps", "affinity"),
    "--events": ("events", "mode"),
    "--event-sample-every": ("events", "sample_every"),
    "--event-reverse": ("events", "reverse"),
    "--event-bytes": ("events", "ring_bytes"),
    "--event-stdout": ("events", "stdout"),
    "--event-log": ("events", "log"),
    "--event-log-max-bytes": ("events", "log_max_bytes"),
    "--event-log-backups": ("events", "log_backups"),
    "--events-socket": ("events", "socket"),
    "--socket-lb-host-namespace-only": ("socket_lb", "host_namespace_only"),
    "--north-south": ("north_south", "enabled"),
    "--nodeport-devices": ("north_south", "devices"),
    "--maglev-table-size": ("north_south", "maglev_table_size"),
    "--snat-ports": ("north_south", "snat_ports"),
    "--max-conntrack": ("north_south", "conntrack_entries"),
    "--tc-attach-mode": ("north_south", "attach_mode"),
    "--log-level": ("logging", "level"),
    "--log-format": ("logging", "format"),
}
_FLAG_OF = {path: flag for flag, path in FLAGS.items()}
_SOURCE_KINDS = (("source", "manifests"), ("source", "kubernetes"))
_KUBE_WAYS = ("in_cluster", "kubeconfig", "api_server")


@dataclass
class Loaded:
    """The merged configuration and, per field, where its value came from."""

    config: BalancingConfiguration
    file: Path | None = None
    origins: dict[FieldPath, str] = field(default_factory=dict)  # field path → "file" | "env" | "flag"

    def where(self, *path: str) -> str:
        """How an error names the field: its flag, environment variable, or ``FILE: camel.path``."""
        origin = self.origins.get(path, "default")
        if origin == "env":
            return env_name(path)
        if origin == "file" or (origin == "default" and path not in _FLAG_OF):
            return f"{self.file}: {camel_path(path)}" if self.file else camel_path(path)
        return _FLAG_OF.get(path, camel_path(path))


def _field_alias(model: type[BaseModel], name: str) -> tuple[str, type[BaseModel] | None]:
    info = model.model_fields.get(name)
    if info is None:
        return name, None
    nested = info.annotation
    sub = next((t for t in getattr(nested, "__args__", (nested,)) if _is_model(t)), None)
    return info.alias or name, sub


def _is_model(t: object) -> TypeGuard[type[BaseModel]]:
    return isinstance(t, type) and issubclass(t, BaseModel)


def camel_path(path: Iterable[str | int]) -> str:
    """``("events", "sample_every")`` → ``events.sampleEvery`` (list indexes as ``[i]``)."""
    out, model = "", BalancingConfiguration
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        alias, sub = _field_alias(model, part) if model is not None else (part, None)
        out += f".{alias}" if out else alias
        model = sub  # type: ignore[assignment]
    return out


def _dotted(loc: Iterable[str | int]) -> str:
    """An error location as written in the file: ``events.sampleEvry``, ``nodeportAddresses[1]``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def env_name(path: Iterable[str | int]) -> str:
    return ENV_PREFIX + "__".join(p.upper() for p in path if isinstance(p, str))


def _names(path: Iterable[str | int]) -> FieldPath:
    """An error location (aliases or names) as python names."""
    out: list[str] = []
    model: type[BaseModel] | None = BalancingConfiguration
    for part in path:
        if isinstance(part, int) or model is None:
            break
        name = next((n for n, f in model.model_fields.items() if part in (n, f.alias)), str(part))
        out.append(name)
        model = _field_alias(model, name)[1]
    return tuple(out)


def _problems(exc: ValidationError, label: Callable[[tuple[str | int, ...]], str]) -> errors.ConfigError:
    """Every problem pydantic found, in one line, each named by ``label(location)``."""
    found = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required"
        found.append((label(tuple(err["loc"])), msg))
    (first, msg), rest = found[0], found[1:]
    return errors.ConfigError(first, "; ".join([msg, *(f"{w}: {m}" for w, m in rest)]))


def _validate(data: Mapping[str, Any], label: Callable[[tuple[str | int, ...]], str], by_alias: bool) -> Json:
    """One layer validated on its own (keys: aliases, else python names); what it sets, as python names."""
    try:
        model = BalancingConfiguration.model_validate(data, by_alias=by_alias, by_name=not by_alias)
    except ValidationError as exc:
        raise _problems(exc, label) from None
    return model.model_dump(exclude_unset=True)


def read_file(path: Path) -> Json:
    """The file's fields (python names), checked; ``errors.ConfigError`` names the file and field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise errors.ConfigError(str(path), f"cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise errors.ConfigError(str(path), f"{where}not YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise errors.ConfigError(str(path), f"not a {KIND} (a YAML mapping)")
    for key, wanted in (("apiVersion", API_VERSION), ("kind", KIND)):
        if raw.get(key) != wanted:
            got = "missing" if key not in raw else f"{raw[key]!r}"
            raise errors.ConfigError(f"{path}: {key}", f"must be {wanted!r} (got {got})")
    fields = _validate(raw, lambda loc: f"{path}: {_dotted(loc)}", by_alias=True)
    fields.pop("api_version", None)
    fields.pop("kind", None)
    return fields


def read_environment(environ: Mapping[str, str] | None = None) -> Json:
    """The ``BALANCING_*`` variables naming fields (python names), checked."""
    source = EnvSettingsSource(_Environment)
    if environ is not None:
        source.env_vars = {k.lower(): v for k, v in environ.items()}
    try:
        values = source()
    except SettingsError as exc:  # a list or section that is not JSON
        found = re.search(r'field "([a-z_]+)"', str(exc))
        name = env_name((found.group(1),)) if found else f"{ENV_PREFIX}*"
        raise errors.ConfigError(name, 'not JSON (a list is written ["a", "b"])') from None
    for key in ("api_version", "kind"):
        values.pop(key, None)
    return _validate(values, env_name, by_alias=False)


def read_flags(given: Mapping[str, Any]) -> Json:
    """Flags as given (flag → value, already split into lists) into fields, checked."""
    data: Json = {}
    for flag, value in given.items():
        if flag == "--in-cluster" and not value:
            continue
        _put(data, FLAGS[flag], value)
    chosen = [f for f in _SOURCE_FLAGS if given.get(f)]
    if len(chosen) > 1:
        raise errors.ConfigError(
            chosen[0], f"give one source: {', '.join(_SOURCE_FLAGS)} (got {', '.join(chosen)})"
        )

    def label(loc: tuple[str | int, ...]) -> str:
        path = _names(loc)  # a problem of source.kubernetes as a whole: the flags of it, as given
        under = [f for f in given if FLAGS[f][: len(path)] == path]
        return _FLAG_OF.get(path) or "/".join(under) or camel_path(path)

    return _validate(data, label, by_alias=False)


_SOURCE_FLAGS = ("--manifests", "--kubeconfig", "--api-server", "--in-cluster")


def _put(data: Json, path: FieldPath, value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _leaves(data: Mapping[str, Any], prefix: FieldPath = ()) -> Iterable[FieldPath]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _merge(low: Json, high: Json) -> Json:
    """``high`` over ``low``, field by field; a source named in ``high`` replaces ``low``'s."""
    out = {k: v for k, v in low.items()}
    high_source = high.get("source") or {}
    if high_source:
        low_source = dict(out.get("source") or {})
        if "manifests" in high_source:
            low_source.pop("kubernetes", None)
        kube = high_source.get("kubernetes") or {}
        if "kubernetes" in high_source and any(kube.get(w) for w in _KUBE_WAYS):
            low_source = {"kubernetes": {}}
        elif "kubernetes" in high_source:
            low_source.pop("manifests", None)
        out["source"] = low_source
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load(
    file: Path | None, given_flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Loaded:
    """Defaults < ``file`` < environment < flags, each layer checked; ``errors.ConfigError`` otherwise."""
    layers = [
        ("file", read_file(file) if file is not None else {}),
        ("env", read_environment(environ)),
        ("flag", read_flags(given_flags)),
    ]
    merged: Json = {}
    origins: dict[FieldPath, str] = {}
    for origin, fields in layers:
        merged = _merge(merged, fields)
        origins = {p: o for p, o in origins.items() if _still_set(merged, p)}
        origins.update(dict.fromkeys(_leaves(fields), origin))
    loaded = Loaded(DEFAULTS, file, origins)
    try:
        loaded.config = BalancingConfiguration.model_validate(merged, by_name=True, by_alias=False)
    except ValidationError as exc:
        raise _problems(exc, lambda loc: loaded.where(*_names(loc))) from None
    return loaded


def _still_set(data: Json, path: FieldPath) -> bool:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True
