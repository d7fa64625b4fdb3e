"""Disaggregated P/D and KV offloading on one worker: the P/D connector (tickets, leases, pulls) and
the offloading connector (host and disk tiers) behind one set of scheduler hooks (vLLM's
MultiConnector idea, for these two).

- A request carrying a ticket is the P/D connector's: its KV comes from the prefill worker (the
  router chose that because this worker lacked the prefix, its tiers included). Any other request
  is looked up in the tiers.
- An ended request's blocks may be wanted by both: the P/D connector leases a finished prefill's
  blocks to a decode worker, the offloading connector copies them to the host tier. Then both hold
  the same list and it is freed when the second hands it back, never twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tandem.kv_offload.connector import OffloadingConnector
from tandem.kv_transfer.base import FinishedTransfer, KVConnectorBase, TierChange

if TYPE_CHECKING:
    from tandem.engine.block_pool import KVCacheBlock
    from tandem.engine.request import Request
    from tandem.kv_offload.stats import OffloadStats
    from tandem.kv_transfer.stats import TransferStats
    from tandem.scheduler_output import SchedulerOutput


class MultiConnector(KVConnectorBase):
    def __init__(self, pd: KVConnectorBase, offload: OffloadingConnector) -> None:
        self.pd, self.offload = pd, offload
        self._claimed: dict[str, KVConnectorBase] = {}  # request id -> the connector loading its KV
        self._shared: dict[int, int] = {}  # id(block list) -> holders still to hand it back

    def _owner(self, request: Request) -> KVConnectorBase:
        return self.pd if request.remote_ticket is not None else self.offload

    def add_request(self, request: Request) -> None:
        self.pd.add_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        return self._owner(request).get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        owner = self._owner(request)
        if num_external_tokens:
            self._claimed[request.request_id] = owner
        owner.update_state_after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        return self.pd.build_connector_meta(scheduler_output)

    def progress(self, request: Request, block_ids: list[int], num_computed_tokens: int) -> None:
        self.pd.progress(request, block_ids, num_computed_tokens)

    def request_finished(self, request: Request, blocks: list[KVCacheBlock]) -> tuple[bool, dict | None]:
        self._claimed.pop(request.request_id, None)
        pd_holds, params = self.pd.request_finished(request, blocks)
        offload_holds, _ = self.offload.request_finished(request, blocks)
        holders = pd_holds + offload_holds
        if holders == 2:
            self._shared[id(blocks)] = 2
        return holders > 0, params

    def take_finished(self) -> list[FinishedTransfer]:
        done = []
        for item in self.pd.take_finished() + self.offload.take_finished():
            key = id(item.free)
            if item.free and key in self._shared:
                self._shared[key] -= 1
                if self._shared[key]:  # the other holder still reads them
                    item = FinishedTransfer(free=[], request=item.request, ok=item.ok, error=item.error,
                                            cached=item.cached)
                else:
                    del self._shared[key]
            if item.request is not None:
                self._claimed.pop(item.request.request_id, None)
            if item.free or item.request is not None:
                done.append(item)
        return done

    def has_pending(self) -> bool:
        return self.pd.has_pending() or self.offload.has_pending()

    @property
    def loading(self) -> Mapping[str, Request]:
        return MappingProxyType({**self.pd.loading, **self.offload.loading})

    def transfer_state(self) -> tuple:
        return self.pd.transfer_state() + self.offload.transfer_state()

    def offload_busy(self) -> bool:
        return self.offload.offload_busy()

    def wait(self, timeout_s: float) -> None:
        self.offload.wait(timeout_s)

    def report(self) -> TransferStats | None:
        return self.pd.report()

    def offload_report(self) -> OffloadStats | None:
        return self.offload.offload_report()

    def take_tier_changes(self) -> list[TierChange]:
        return self.offload.take_tier_changes()

    def check_idle(self) -> None:
        assert not self._shared, "blocks still held by both connectors"
        self.pd.check_idle()
        self.offload.check_idle()

    def close(self) -> None:
        self.pd.close()
        self.offload.close()
