"""In-process `MeshService`s on loopback for rpc and mesh unit tests: real gRPC, real
membership and gossip, no node processes.

    nodes = MeshServices(listen_addr="127.0.0.1:0", probe_interval_ms=50)   # the base config
    a = await nodes.start("a", providers=[FakeProvider("fakeai", models=["m"])])
    b = await nodes.start("b", seeds=[a.advertise_address], secret="s")    # per-node overrides
    await nodes.stop()
"""

from __future__ import annotations

from meshnode.config import MeshConfig, RoutingConfig
from meshnode.mesh.service import MeshService
from meshnode.providers.fake import FakeProvider
from meshnode.routing.router import Router


class MeshServices:
    def __init__(self, **base: object) -> None:
        self.base = base
        self.services: list[MeshService] = []

    async def start(self, node_id: str, providers: list[FakeProvider] | None = None,
                    relay: bool = True, routing: RoutingConfig | None = None,
                    **mesh: object) -> MeshService:
        """A started service whose router has `providers` and, with `relay`, the mesh."""
        chain = [p.name for p in providers or []] + (["mesh"] if relay else [])
        router = Router(routing or RoutingConfig(), chain, providers or [], node_id)
        svc = MeshService(MeshConfig(**{**self.base, **mesh}), node_id, router, announce=False)
        await svc.start()
        self.services.append(svc)
        return svc

    async def stop(self) -> None:
        for svc in self.services:
            await svc.stop(graceful=False, grace_s=0)


def members(svc: MeshService) -> set[str]:
    """The node ids `svc` has in its membership table (any status)."""
    assert svc.membership is not None
    return {m.node_id for m in svc.membership.members()}
