"""Several gateways on one fleet, coordinated through Redis (``[cluster] redis_url``).

Two gateways behind a load balancer must not both load, evict and restart the same nodes. The nodes stay
the source of truth for what is loaded; Redis holds only what the gateways must agree on: who may act on
a node now (:mod:`~cortex.cluster.lease`), which model is being loaded where, the pins, learned sizes,
drain flags and response ids (:mod:`~cortex.cluster.shared`), what every gateway has in flight
(:mod:`~cortex.cluster.inflight`) and who the gateways are (:mod:`~cortex.cluster.gateways`). When Redis
does not answer, every gateway keeps serving what is loaded and acts on nothing (read-only lifecycle).

This package is imported only when ``redis_url`` is set: a single gateway never loads the Redis client.
"""

from cortex.cluster.coordinator import Cluster

__all__ = ["Cluster"]
