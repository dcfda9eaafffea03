"""The embedded STUN/TURN relay: a sans-I/O core (stun, auth, allocation, core, policy) and
thin asyncio transports (udp, tcp, node)."""
