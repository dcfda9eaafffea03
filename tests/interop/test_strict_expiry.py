"""`turn.strict_expiry` over the wire: once the username expires, the live allocation's
Refresh is refused with 401 (off, as coturn, it is accepted), and the allocation ends."""

from __future__ import annotations

import struct
import time

import pytest

from turn import stun

from .conftest import start_appliance, stop_appliance
from .test_relay_quotas import UdpTurnClient, code

TTL_S = 2


@pytest.mark.parametrize("strict, refresh_code", [(True, 401), (False, 0)])
def test_a_refresh_after_the_username_expired(tmp_path, strict, refresh_code):
    app = start_appliance(tmp_path, {"strict_expiry": strict})
    client = UdpTurnClient(app, "alice", ttl_s=TTL_S)
    try:
        reply = client.allocate((stun.LIFETIME, struct.pack("!I", 3600)))
        assert code(reply) == 0
        lifetime = stun.u32(reply.get(stun.LIFETIME))
        assert lifetime <= TTL_S if strict else lifetime == 3600
        time.sleep(TTL_S + 1.2)
        assert code(client.request(stun.REFRESH, (stun.LIFETIME, struct.pack("!I", 600)))) == refresh_code
        if strict:
            # The allocation ended at the expiry: a fresh credential finds none (437).
            fresh = UdpTurnClient(app, "alice")
            fresh.sock.close()
            fresh.sock = client.sock
            assert code(fresh.request(stun.REFRESH)) == 437
    finally:
        client.close()
        assert stop_appliance(app) == 0
