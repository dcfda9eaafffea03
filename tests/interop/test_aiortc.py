"""Two aiortc peers connect with relay-only ICE through our relay and exchange
data-channel messages and an audio track: every packet of the call crosses
the relay (both candidates are relay candidates on it)."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtcconfiguration import RTCIceTransportPolicy

MESSAGES = 20


def relay_only(relay, user: str, transport: str) -> RTCConfiguration:
    username, password = relay.credentials(user)
    url = f"turn:{relay.host}:{relay.port}?transport={transport}"
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=url, username=username, credential=password)],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_call_through_relay(relay, transport):
    caller = RTCPeerConnection(relay_only(relay, "caller", transport))
    callee = RTCPeerConnection(relay_only(relay, "callee", transport))
    try:
        channel = caller.createDataChannel("chat")
        caller.addTrack(AudioStreamTrack())
        opened = asyncio.Event()
        channel.on("open", opened.set)
        got_by_callee: list[str] = []
        got_by_caller: list[str] = []
        all_in = asyncio.Event()
        remote_track = asyncio.get_running_loop().create_future()

        @callee.on("datachannel")
        def on_datachannel(remote):
            @remote.on("message")
            def on_message(message):
                got_by_callee.append(message)
                remote.send("ack:" + message)

        @channel.on("message")
        def on_ack(message):
            got_by_caller.append(message)
            if len(got_by_caller) == MESSAGES:
                all_in.set()

        @callee.on("track")
        def on_track(track):
            if not remote_track.done():
                remote_track.set_result(track)

        await caller.setLocalDescription(await caller.createOffer())
        offer = caller.localDescription
        assert "typ relay" in offer.sdp and "typ host" not in offer.sdp
        await callee.setRemoteDescription(RTCSessionDescription(offer.sdp, offer.type))
        await callee.setLocalDescription(await callee.createAnswer())
        answer = callee.localDescription
        assert "typ relay" in answer.sdp and "typ host" not in answer.sdp
        await caller.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))

        await asyncio.wait_for(opened.wait(), 20)
        for i in range(MESSAGES):
            channel.send(f"hello {i} 你好")
        await asyncio.wait_for(all_in.wait(), 10)
        assert got_by_callee == [f"hello {i} 你好" for i in range(MESSAGES)]

        track = await asyncio.wait_for(remote_track, 10)
        assert track.kind == "audio"
        frames = [await asyncio.wait_for(track.recv(), 5) for _ in range(10)]
        assert all(f.sample_rate > 0 for f in frames)

        # The selected pair is relay <-> relay on our relay's address.
        pair = caller.sctp.transport.transport._connection._nominated
        local, remote = next(iter(pair.values())).local_candidate, next(iter(pair.values())).remote_candidate
        assert local.type == "relay" and remote.type == "relay"
        assert local.host == relay.host and remote.host == relay.host
    finally:
        await caller.close()
        await callee.close()
