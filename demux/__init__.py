"""Telling apart the protocols that share one TCP port, and PROXY protocol headers.

`sniff` classifies the first bytes of a stream (TLS, STUN, HTTP, PROXY v1/v2),
`proxy` parses a PROXY protocol header and says which peers may send one; both are
sans-I/O (bytes in, decisions out). `accept` is the asyncio listener around them:
it accepts, peeks at the first bytes without consuming them, strips a trusted PROXY
header and hands each connection on with its kind and its client's address.

Imported by `turn/`, `signaling/` and `appliance/`, so it imports none of them.
"""
