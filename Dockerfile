# One image: the signaling, the embedded STUN/TURN relay and the admin listener.
# The install and run steps are the README's own (its command 1, on the same
# Debian 12): apt-get python3 python3-venv (and nodejs npm), a venv, `npm ci
# --prefix appliance/demo` (in a first stage, so Node stays out of the image),
# `pip install '.[probe]'`, then `appliance serve`; tests/test_dockerfile.py
# checks they stay the same.  Configuration and certificates are volumes; with
# no /etc/appliance/appliance.yaml the container runs on the embedded defaults
# re-pointed at all interfaces by the environment below.
FROM debian:bookworm-slim AS demo-libraries
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/appliance
COPY appliance/demo/package.json appliance/demo/package-lock.json ./appliance/demo/
RUN npm ci --prefix appliance/demo --no-audit --no-fund

FROM debian:bookworm-slim

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# The venv's python, pip and `appliance` first: what `. .venv/bin/activate` does in the README.
ENV PATH=/opt/venv/bin:$PATH

RUN useradd --system --create-home --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance \
 && mkdir -p /etc/appliance/certs && chown -R appliance /etc/appliance

WORKDIR /opt/appliance
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY turn ./turn
COPY signaling ./signaling
COPY ratelog ./ratelog
COPY demux ./demux
COPY config ./config
COPY --from=demo-libraries /opt/appliance/appliance/demo/node_modules ./appliance/demo/node_modules
RUN pip install --no-cache-dir '.[probe]'

# Every listener on all interfaces, so http.listen is not loopback: the demo page
# mints no development tokens here, and `appliance serve` warns until auth.jwt_key,
# auth.jwt_public_key or auth.mode http is set.  The relay ports are a narrow range
# so that they can be published (-p) as well as exposed; widen both together.  They
# lie above Linux's ephemeral port range (32768-60999), as turn.relay_ports' default does.
ENV APPLIANCE_CONFIG=/etc/appliance/appliance.yaml \
    APPLIANCE__DATA_DIR=/var/lib/appliance \
    APPLIANCE__TURN__UDP=0.0.0.0:3478 \
    APPLIANCE__TURN__TCP=0.0.0.0:3478 \
    APPLIANCE__TURN__TLS=0.0.0.0:5349 \
    APPLIANCE__HTTP__LISTEN=0.0.0.0:8443 \
    APPLIANCE__TURN__RELAY_IP=0.0.0.0 \
    APPLIANCE__TURN__RELAY_IP6=null \
    APPLIANCE__TURN__RELAY_PORTS=61000-61199
# Relay sockets bind every interface, so the address clients must use is not
# knowable here: start with `-e APPLIANCE__EXTERNAL_IP=<public IPv4>` (the
# appliance refuses to start without it, naming the key).

USER appliance
VOLUME ["/etc/appliance", "/var/lib/appliance"]
EXPOSE 3478/udp 3478/tcp 5349/tcp 8443/tcp 61000-61199/udp

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["appliance", "healthcheck"]

CMD ["appliance", "serve"]
