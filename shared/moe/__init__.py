"""Mixture-of-experts layers: routers, dispatch, the layer, expert parallelism, experiments."""

from shared.moe.dispatch import (
    capacity,
    capacity_slots,
    einsum_dispatch,
    index_dispatch,
    sort_dispatch,
)
from shared.moe.layer import MoELayer, moe_aux_loss, moe_layers, token_ids
from shared.moe.routers import (
    BiasBalancedRouter,
    HashRouter,
    Router,
    Routing,
    SwitchRouter,
    TopKRouter,
)

__all__ = [
    "BiasBalancedRouter", "HashRouter", "MoELayer", "Router", "Routing", "SwitchRouter",
    "TopKRouter", "capacity", "capacity_slots", "einsum_dispatch", "index_dispatch", "moe_aux_loss",
    "moe_layers", "sort_dispatch", "token_ids",
]
