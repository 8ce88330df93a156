"""What the daemon asks of a services mode: the `Proxier` protocol the eBPF, nftables and iptables proxiers
implement, so the daemon calls them alike (no probing for attributes).

- `tracker`: its own change tracker (the model's `frontend_changes()`): the services changed since its last
  sync; the daemon sets its `wake` to ask the runner for a sync.
- `sync(full)`: apply the changes its tracker holds (every service when full, repairing what was changed
  behind noded's back); the number of services synced. Raises when the kernel refused; the runner retries
  with a full sync.
- `set_external_interfaces(interfaces)`: where packets from outside arrive (eBPF attaches its tc programs
  there; the netfilter modes match on addresses, not interfaces, and ignore it).
- `extras()`: mode-specific state for `noded status`: socket termination and NodePort flows (eBPF), none
  elsewhere.
- `set_mesh_netns(cookie, mesh)`: a mesh pod's network namespace came or went. eBPF leaves its TCP connects
  untranslated (its capture sees the VIP and resolves it); the netfilter modes translate after the pod's
  own capture has seen the VIP anyway, and ignore it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from noded.model.tracker import KeyChanges

if TYPE_CHECKING:
    from noded.services.mirror import RuleMirror


class Proxier(Protocol):
    name: str
    tracker: KeyChanges

    def sync(self, full: bool = False) -> int: ...

    def set_external_interfaces(self, interfaces: dict[str, int]) -> None: ...

    def extras(self) -> dict[str, object]: ...

    def set_mesh_netns(self, cookie: int, mesh: bool) -> None: ...


class NetfilterExtras:
    """The hooks the netfilter proxiers have nothing to do for; their tracker is their rule mirror's."""

    mirror: RuleMirror

    @property
    def tracker(self) -> KeyChanges:
        return self.mirror.tracker

    def set_mesh_netns(self, cookie: int, mesh: bool) -> None:
        return None

    def set_external_interfaces(self, interfaces: dict[str, int]) -> None:
        return None

    def extras(self) -> dict[str, object]:
        return {}
