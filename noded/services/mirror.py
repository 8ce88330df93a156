"""The bookkeeping both netfilter proxiers share: which frontends each service has programmed and the
rules each frontend owns, what a sync must look at, and how the mirror follows a committed transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from noded.kernel.conntrack import Serving
from noded.model.tracker import Frontend, FrontendState, ServiceKey, ServiceModel

R = TypeVar("R")
RULE_PROTOCOLS = ("TCP", "UDP")
KEEP_SCRIPT = 1 << 20  # bytes: a larger transaction is not kept after it ran (a full sync's: megabytes)


def kept(script: str) -> str:
    """What a proxier keeps of the transaction it ran (tests read partial ones): the script when small."""
    return script if len(script) <= KEEP_SCRIPT else ""


class RuleMirror(Generic[R]):
    def __init__(
        self,
        model: ServiceModel,
        cluster_cidrs: list[str],
        build: Callable[[Frontend, FrontendState, list[str], R | None], R],  # the last: what is programmed
    ) -> None:
        self.model = model
        self.tracker = model.frontend_changes()  # this proxier's own change tracker
        self.cluster_cidrs = cluster_cidrs
        self._build = build
        self.programmed: dict[Frontend, R] = {}
        self._by_service: dict[ServiceKey, set[Frontend]] = {}
        self.touched_udp: Serving = {}  # of the last changes(): UDP frontends and who serves them now

    def changes(self, full: bool) -> dict[ServiceKey, dict[Frontend, R]]:
        """The desired rules of every service to look at: the changed ones, or all of them when full."""
        if full:
            changed = self.tracker.take_all(self.model.service_keys) | set(self._by_service)
        else:
            changed = self.tracker.take()
        self.touched_udp = {}
        desired = {}
        for key in changed:
            self.touched_udp.update(
                {(fe.ip, fe.port): frozenset() for fe in self._by_service.get(key, ()) if fe.protocol == "UDP"}
            )
            frontends = self.model.frontends_of(key)
            self.touched_udp.update(
                {(fe.ip, fe.port): st.serving for fe, st in frontends.items() if fe.protocol == "UDP"}
            )
            desired[key] = {
                fe: self._build(fe, st, self.cluster_cidrs, self.programmed.get(fe))
                for fe, st in frontends.items()
                if fe.protocol in RULE_PROTOCOLS
            }
        return desired

    def old_of(self, key: ServiceKey) -> dict[Frontend, R]:
        return {fe: self.programmed[fe] for fe in self._by_service.get(key, set())}

    def after(self, desired_by_key: dict[ServiceKey, dict[Frontend, R]]) -> dict[Frontend, R]:
        """Every frontend's rules once these changes are in (the mirror is not touched)."""
        new = dict(self.programmed)
        for key, frontends in desired_by_key.items():
            for fe in self._by_service.get(key, set()):
                new.pop(fe, None)
            new.update(frontends)
        return new

    def commit(self, desired_by_key: dict[ServiceKey, dict[Frontend, R]]) -> None:
        """The transaction went through: the mirror follows."""
        self.programmed = self.after(desired_by_key)
        for key, frontends in desired_by_key.items():
            self._by_service.pop(key, None)
            if frontends:
                self._by_service[key] = set(frontends)
