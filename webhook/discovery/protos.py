"""The protobuf descriptors the control plane encodes Envoy's config with: those of the pinned
``xds-protos``, plus what Envoy 1.40 has and that release lacks.

``xds-protos`` lags Envoy:

- its stats access logger config has only the deprecated ``stat_prefix``, not ``stats_scope``
  (an ``envoy.type.v3.Scope``), so Envoy logs a deprecation warning for every listener it is
  sent;
- its set_filter_state network filter config has only ``on_new_connection``, not
  ``on_downstream_tls_handshake``, which the TCP access gate needs (it decides once the
  caller's certificate is known).

:data:`POOL` serves every file of the default pool as it is, except those two, to which it adds
the fields (and the ``Scope`` message) as Envoy 1.40 defines them (same names, field numbers
and types: the wire format is Envoy's). ``json_format`` resolves each ``@type`` in this pool,
so an added field encodes and decodes (``/debug/config``) like any other.
"""

from __future__ import annotations

from typing import Final

from google.protobuf import descriptor_database, descriptor_pool
from google.protobuf.descriptor_pb2 import FieldDescriptorProto, FileDescriptorProto

__all__ = ["POOL"]

_STATS_FILE: Final = "envoy/extensions/access_loggers/stats/v3/stats.proto"
_SCOPE_FILE: Final = "envoy/type/v3/scope.proto"
_WRAPPERS: Final = "google/protobuf/wrappers.proto"
_SET_STATE_FILE: Final = (
    "envoy/extensions/filters/network/set_filter_state/v3/set_filter_state.proto"
)
_F = FieldDescriptorProto


def _scope_file() -> FileDescriptorProto:
    """``envoy.type.v3.Scope``: a stats scope's prefix (and limits sidemesh does not use)."""
    fdp = FileDescriptorProto(
        name=_SCOPE_FILE, package="envoy.type.v3", syntax="proto3", dependency=[_WRAPPERS]
    )
    scope = fdp.message_type.add(name="Scope")
    for number, name in enumerate(("max_counters", "max_gauges", "max_histograms"), 1):
        scope.field.add(
            name=name,
            number=number,
            label=_F.LABEL_OPTIONAL,
            type=_F.TYPE_MESSAGE,
            type_name=".google.protobuf.UInt32Value",
        )
    scope.field.add(name="enable_eviction", number=4, label=_F.LABEL_OPTIONAL, type=_F.TYPE_BOOL)
    scope.field.add(name="prefix", number=5, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
    scope.field.add(name="sharing_name", number=6, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
    return fdp


def _add_config_field(
    fdp: FileDescriptorProto, name: str, json_name: str, number: int, label: int, type_name: str
) -> FileDescriptorProto:
    """``fdp`` with one more message field on its ``Config`` message."""
    config = next(m for m in fdp.message_type if m.name == "Config")
    config.field.add(
        name=name,
        json_name=json_name,
        number=number,
        label=label,
        type=_F.TYPE_MESSAGE,
        type_name=type_name,
    )
    return fdp


def _with_stats_scope(fdp: FileDescriptorProto) -> FileDescriptorProto:
    fdp.dependency.append(_SCOPE_FILE)
    return _add_config_field(
        fdp, "stats_scope", "statsScope", 6, _F.LABEL_OPTIONAL, ".envoy.type.v3.Scope"
    )


def _with_handshake_values(fdp: FileDescriptorProto) -> FileDescriptorProto:
    value = ".envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue"
    return _add_config_field(
        fdp, "on_downstream_tls_handshake", "onDownstreamTlsHandshake", 2, _F.LABEL_REPEATED, value
    )


_AMEND: Final = {_STATS_FILE: _with_stats_scope, _SET_STATE_FILE: _with_handshake_values}


class _Database(descriptor_database.DescriptorDatabase):  # type: ignore[misc]
    """The default pool's files, copied on demand; those of :data:`_AMEND` amended."""

    def __init__(self) -> None:
        super().__init__()
        self._default = descriptor_pool.Default()

    def FindFileByName(self, name: str) -> FileDescriptorProto:  # (protobuf names them)
        if name == _SCOPE_FILE:
            return _scope_file()
        fdp = FileDescriptorProto()
        self._default.FindFileByName(name).CopyToProto(fdp)
        amend = _AMEND.get(name)
        return amend(fdp) if amend else fdp

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptorProto:
        if symbol.startswith("envoy.type.v3.Scope"):
            return _scope_file()
        return self.FindFileByName(self._default.FindFileContainingSymbol(symbol).name)

    def FindFileContainingExtension(self, *args: object) -> FileDescriptorProto:
        raise KeyError(args)

    def FindAllExtensionNumbers(self, *args: object) -> list[int]:
        return []


#: Resolve ``@type`` in this pool (``json_format.ParseDict(…, descriptor_pool=POOL)``).
POOL: Final = descriptor_pool.DescriptorPool(descriptor_db=_Database())
